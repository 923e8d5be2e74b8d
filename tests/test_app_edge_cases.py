"""Edge cases of the DLRM job, its torchx component and ``scripts/demo.sh``: uneven or too small data on 2 gloo
ranks (no hang), argument checks, resuming past ``--steps``, and demo arguments that replace its defaults."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from torchrec_pss.app.dlrm_main import deal, main, parse_args
from torchrec_pss_torchx.dlrm import dlrm_pss

ROOT = Path(__file__).resolve().parents[1]
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BATCH = 16
SMALL = ["--batch-size", str(BATCH), "--pss", "robe:compression=100,chunk_size=8,min_rows=10000"]


def write_criteo(path: Path, rows: int, seed: int = 0) -> str:
    """A Criteo day-format TSV of ``rows`` random rows (label, 13 counts, 26 hex ids); returns its path."""
    rng = random.Random(seed)
    lines = ["\t".join([str(rng.randint(0, 1)), *(str(rng.randint(0, 50)) for _ in range(13)),
                        *(f"{rng.getrandbits(32):08x}" for _ in range(26))]) for _ in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_job(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` in its own session; on timeout kill the whole group (launcher and ranks) and fail."""
    process = subprocess.Popen(command, env=JOB_ENV, cwd=ROOT, start_new_session=True, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} hung for {timeout} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def two_ranks(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "torchrec_pss.app.dlrm_main", *SMALL, *args]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("option, value, expected", [
    ("--steps", "0", "argument --steps: must be at least 1, got 0"),
    ("--steps", "-5", "argument --steps: must be at least 1, got -5"),
    ("--steps", "ten", "argument --steps: expected an integer, got 'ten'"),
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--eval-batches", "0", "argument --eval-batches: must be at least 1, got 0"),
    ("--eval-every", "-1", "argument --eval-every: must be at least 0, got -1"),
    ("--checkpoint-every", "-2", "argument --checkpoint-every: must be at least 0, got -2"),
    ("--checkpoint-every", "3", "--checkpoint-every needs --checkpoint-dir"),
])
def test_bad_arguments_are_refused_naming_option_and_value(option: str, value: str, expected: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args([option, value])
    assert exited.value.code == 2 and expected in capsys.readouterr().err


def test_zero_intervals_and_positive_counts_are_accepted() -> None:
    args = parse_args(["--steps", "1", "--batch-size", "1", "--eval-batches", "1", "--eval-every", "0",
                       "--checkpoint-every", "0"])
    assert (args.steps, args.batch_size, args.eval_batches, args.eval_every, args.checkpoint_every) == (1, 1, 1, 0, 0)


def test_deal_gives_every_rank_as_many_batches_of_complete_rounds() -> None:
    dealt = [list(deal(range(8), rank, 3)) for rank in range(3)]
    assert dealt == [[0, 3], [1, 4], [2, 5]]
    assert list(deal(range(2), 0, 3)) == [] and list(deal(range(3), 0, 1)) == [0, 1, 2]


def test_two_ranks_evaluate_uneven_held_out_data_without_hanging(tmp_path: Path) -> None:
    """3 held-out batches on 2 ranks (dealt round-robin: 2 and 1 before the fix, which hung in the all-to-all)."""
    train = write_criteo(tmp_path / "train.tsv", 6 * BATCH, seed=1)
    held_out = write_criteo(tmp_path / "test.tsv", 3 * BATCH + 7, seed=2)
    summary_path = tmp_path / "summary.json"
    run = run_job(two_ranks("--data", f"{train},{held_out}", "--steps", "2", "--eval-batches", "4",
                            "--eval-every", "1", "--summary", str(summary_path)), timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["world_size"] == 2 and [e["step"] for e in summary["evaluations"]] == [1, 2]
    assert all(math.isfinite(e["log_loss"]) for e in summary["evaluations"])


@pytest.mark.parametrize("train_rows, held_out_rows, which, rows, batches", [
    (BATCH + 4, 4 * BATCH, "training data", BATCH + 4, 1),
    (4 * BATCH, BATCH + 9, "held-out data", BATCH + 9, 1),
])
def test_two_ranks_fail_alike_when_data_gives_a_rank_no_batch(tmp_path: Path, train_rows: int, held_out_rows: int,
                                                               which: str, rows: int, batches: int) -> None:
    train = write_criteo(tmp_path / "train.tsv", train_rows, seed=1)
    held_out = write_criteo(tmp_path / "test.tsv", held_out_rows, seed=2)
    run = run_job(two_ranks("--data", f"{train},{held_out}", "--steps", "2", "--eval-batches", "1"), timeout=120)
    assert run.returncode != 0
    file = train if which == "training data" else held_out
    message = (f"--data: {which} ({file}) has {rows} rows, {batches} full batches of {BATCH} (the batch size per "
               f"rank), but world size 2 needs at least 2")
    for rank in (0, 1):
        assert f"[rank{rank}]: ValueError: {message}" in run.stderr, run.stderr[-3000:]


def test_one_rank_with_less_than_a_batch_of_training_rows_fails_instead_of_spinning(tmp_path: Path) -> None:
    train = write_criteo(tmp_path / "train.tsv", 150)
    held_out = write_criteo(tmp_path / "test.tsv", 600, seed=1)
    with pytest.raises(ValueError, match=rf"training data \({train}\) has 150 rows, 0 full batches of 512"):
        main(["--data", f"{train},{held_out}", "--steps", "2", "--eval-batches", "1"])
    assert not dist.is_initialized()


def write_npy_days(root: Path, rows: tuple[int, ...]) -> str:
    """TorchRec NumPy days ``day_<i>_{dense,sparse,labels}.npy`` of ``rows[i]`` zero rows; returns the flag."""
    root.mkdir()
    for day, count in enumerate(rows):
        np.save(root / f"day_{day}_dense.npy", np.zeros((count, 13), dtype=np.float32))
        np.save(root / f"day_{day}_sparse.npy", np.zeros((count, 26), dtype=np.int32))
        np.save(root / f"day_{day}_labels.npy", np.zeros((count, 1), dtype=np.int32))
    return f"npy:{root}"


def test_npy_days_too_small_for_a_batch_fail_naming_the_days(tmp_path: Path) -> None:
    short_training = write_npy_days(tmp_path / "a", (10, 100))
    with pytest.raises(ValueError, match=r"training data \(days \[0\] of .*a\) has 10 rows, 0 full batches of 16"):
        main(["--data", short_training, "--steps", "2", "--batch-size", "16"])
    short_held_out = write_npy_days(tmp_path / "b", (200, 100))
    with pytest.raises(ValueError, match=r"held-out data \(the first half of day 1 of .*b\) has 50 rows, 0 full"):
        main(["--data", short_held_out, "--steps", "2", "--batch-size", "60"])
    assert not dist.is_initialized()


def test_resuming_a_checkpoint_past_steps_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    job = [*SMALL, "--eval-batches", "1", "--checkpoint-dir", str(checkpoints)]
    main([*job, "--steps", "3"])
    before = tree_digest(checkpoints)
    with pytest.raises(ValueError, match=r"the checkpoint is at step 3, --steps 2"):
        main([*job, "--steps", "2", "--summary", str(tmp_path / "s.json")])
    assert not dist.is_initialized() and tree_digest(checkpoints) == before
    assert not (tmp_path / "s.json").exists()
    at_the_end = main([*job, "--steps", "3"])
    assert at_the_end["resumed_from_step"] == 3 and [e["step"] for e in at_the_end["evaluations"]] == [3]
    assert at_the_end["examples_per_second"] == 0 and tree_digest(checkpoints) == before


def test_a_resume_with_another_global_batch_warns_which_examples_move(tmp_path: Path) -> None:
    """The data position is kept in batches per rank; read with another global batch it starts elsewhere in the
    data, which the resume now says (it said nothing: examples were trained twice, or skipped)."""
    job = [*SMALL, "--eval-batches", "1", "--checkpoint-dir", str(tmp_path / "ckpt")]
    main([*job, "--steps", "2"])
    with pytest.warns(UserWarning, match=r"it took 16 examples per step, this job 8 \(--nproc_per_node × --batch-size\); "
                      r"the data position \(2 batches per rank\) starts this job at example 16 where the checkpoint "
                      r"had reached 32: examples 16–31 are trained again"):
        main([*job, "--steps", "3", "--batch-size", "8"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="resuming")
        main([*job, "--steps", "4", "--batch-size", "8"])


def test_component_refuses_checkpoint_every_without_checkpoint_dir() -> None:
    with pytest.raises(ValueError, match="--checkpoint_every 5 needs --checkpoint_dir"):
        dlrm_pss(checkpoint_every=5)
    assert "--checkpoint-every 5" in " ".join(dlrm_pss(checkpoint_dir="/ckpt", checkpoint_every=5).roles[0].args)


def test_demo_arguments_replace_its_defaults(tmp_path: Path) -> None:
    """README's ``bash scripts/demo.sh --steps ...``: once refused by torchx as a repeated argument."""
    summary_path = tmp_path / "demo.json"
    run = run_job(["bash", str(ROOT / "scripts" / "demo.sh"), "--steps=2", "--summary", str(summary_path),
                   "--batch_size", str(BATCH), "--eval_batches", "1"], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2 and summary["batch_size_per_rank"] == BATCH
