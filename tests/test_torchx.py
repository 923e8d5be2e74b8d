"""``torchx run dlrm_pss`` (local_cwd, 2 gloo ranks) and the DLRM job behind it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.specs import AppDef

from torchrec_pss.app.dlrm_main import main
from torchrec_pss_torchx.dlrm import dlrm_pss

BIN = Path(sys.executable).parent


def torchx(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(BIN / "torchx"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_builtins_list_our_component_and_torchx_own(tmp_path: Path) -> None:
    listed = torchx("builtins", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "dlrm_pss" in listed.stdout and "dist.ddp" in listed.stdout and "utils.echo" in listed.stdout


def test_component_is_a_ddp_appdef() -> None:
    app = dlrm_pss(nnodes=1, nproc_per_node=2, pss="robe:compression=10", steps=5)
    assert isinstance(app, AppDef) and app.roles[0].entrypoint == "bash"
    command = " ".join(app.roles[0].args)
    assert "torchrun" in command and "-m torchrec_pss.app.dlrm_main" in command and "--nproc_per_node 2" in command
    assert "--checkpoint-dir" not in command
    resumable = " ".join(dlrm_pss(checkpoint_dir="/ckpt/run1", checkpoint_every=50, eval_every=25).roles[0].args)
    assert "--checkpoint-dir /ckpt/run1 --checkpoint-every 50" in resumable and "--eval-every 25" in resumable


def test_torchx_run_trains_two_ranks_and_writes_the_summary(tmp_path: Path) -> None:
    run = torchx("run", "-s", "local_cwd", "dlrm_pss", "--nproc_per_node", "2", "--steps", "20",
                 "--summary", str(tmp_path / "summary.json"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert 0.0 <= summary["auc"] <= 1.0 and math.isfinite(summary["log_loss"])
    assert summary["compression_ratio"] > 10 and summary["examples_per_second"] > 0


def test_single_process_job_learns(tmp_path: Path) -> None:
    summary = main(["--steps", "150", "--summary", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert summary["world_size"] == 1 and summary["auc"] > 0.65 and summary["last_train_loss"] < summary["first_train_loss"]


def test_job_trains_on_real_criteo_files(tmp_path: Path) -> None:
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo"
    if not data.is_dir():
        pytest.skip("needs ../shared/data/criteo beside the checkout")
    files = ",".join(str(data / f) for f in ("kaggle_8k_train.tsv", "kaggle_8k_test.tsv"))
    summary = main(["--data", files, "--steps", "120", "--batch-size", "128", "--eval-batches", "3",
                    "--pss", "robe:compression=100,chunk_size=8,min_rows=10000"])
    assert summary["data"] == files and summary["steps"] == 120
    assert summary["auc"] > 0.55 and summary["compression_ratio"] > 10  # AUC 0.687 when written
