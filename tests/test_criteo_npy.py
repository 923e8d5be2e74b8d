"""TorchRec's NumPy Criteo days (written by TorchRec's own ``tsv_to_npys`` from real Kaggle rows) as a data source."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.criteo import BinaryCriteoUtils

from torchrec_pss.app.dlrm_main import main
from torchrec_pss.datasets import criteo_npy_batches, npy_days, read_criteo_rows
from torchrec_pss.models import PRESETS

CRITEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo"


@pytest.fixture(scope="module")
def npy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CRITEO.is_dir():
        pytest.skip("needs ../shared/data/criteo beside the checkout")
    root = tmp_path_factory.mktemp("npy")
    for day, name in enumerate(["kaggle_8k_train.tsv", "kaggle_8k_test.tsv"]):
        BinaryCriteoUtils.tsv_to_npys(str(CRITEO / name), *(str(root / f"day_{day}_{p}.npy")
                                                           for p in ("dense", "sparse", "labels")))
    return root


def tsv_rows(name: str, count: int) -> list[list[str]]:
    with open(CRITEO / name) as f:
        return [next(f).rstrip("\n").split("\t") for _ in range(count)]


def test_batches_carry_the_rows_of_the_days(npy_root: Path) -> None:
    sizes = PRESETS["small"].num_embeddings
    assert npy_days(str(npy_root)) == {0: 7200, 1: 391}  # the rows of the two files
    first = next(criteo_npy_batches(str(npy_root), [0], 100, sizes, rank=0, world_size=1))
    rows = tsv_rows("kaggle_8k_train.tsv", 100)
    assert torch.equal(first.labels, torch.tensor([float(r[0]) for r in rows]))
    assert first.labels.dtype == torch.float32 and first.dense_features.shape == (100, 13)
    features = first.sparse_features.to_dict()
    for f, n in enumerate(sizes):
        expected = [int(r[14 + f] or "0", 16) % n for r in rows]
        assert features[f"cat_{f}"].values().tolist() == expected


def test_dense_inputs_differ_from_the_text_readers(npy_root: Path) -> None:
    """``tsv_to_npys`` writes ``log(x - m + 2)`` (``m`` the day file's smallest integer feature), the text reader
    ``log(max(x, 0) + 1)``: the same rows give different dense inputs by the two paths (module docstrings)."""
    rows = tsv_rows("kaggle_8k_train.tsv", 7200)
    raw = torch.tensor([[float(x or 0) for x in r[1:14]] for r in rows], dtype=torch.float64)
    m = raw.min()
    assert m == -2  # I2 of the Kaggle rows
    dense = torch.from_numpy(np.load(npy_root / "day_0_dense.npy"))
    assert torch.allclose(dense.double(), torch.log(raw - m + 2), atol=1e-6)
    text = torch.tensor([r[1] for r in read_criteo_rows(str(CRITEO / "kaggle_8k_train.tsv"), [1] * 26)],
                        dtype=torch.float64)
    assert torch.allclose(text, torch.log(raw.clamp(min=0) + 1))
    zero = raw == 0
    assert (text[zero] == 0).all() and (dense[zero].double() - math.log(4.0)).abs().max() < 1e-6  # log(2 - m)


def test_ranks_take_alternate_batches(npy_root: Path) -> None:
    sizes = PRESETS["small"].num_embeddings
    whole = [b.labels for b in criteo_npy_batches(str(npy_root), [0], 64, sizes, rank=0, world_size=1)]
    ranks = [[b.labels for b in criteo_npy_batches(str(npy_root), [0], 64, sizes, rank=r, world_size=2)]
             for r in (0, 1)]
    assert len(whole) == 7200 // 64 and len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    for index, labels in enumerate(whole[: 2 * len(ranks[0])]):
        assert torch.equal(ranks[index % 2][index // 2], labels)


def test_a_missing_part_names_the_file(tmp_path: Path, npy_root: Path) -> None:
    for part in ("dense", "sparse"):
        np.save(tmp_path / f"day_3_{part}.npy", np.load(npy_root / f"day_0_{part}.npy"))
    with pytest.raises(ValueError, match="day_3_labels.npy"):
        npy_days(str(tmp_path))
    with pytest.raises(ValueError, match="no such directory"):
        npy_days(str(tmp_path / "absent"))


@pytest.mark.parametrize("present", [("sparse", "labels"), ("dense",)], ids=["no_dense", "dense_only"])
def test_a_day_missing_any_part_is_named_not_skipped(tmp_path: Path, npy_root: Path, present: tuple[str, ...]) -> None:
    """Days are found from every part: a day lacking its dense file is refused, not left out."""
    for day in (0, 1):
        for part in ("dense", "sparse", "labels"):
            np.save(tmp_path / f"day_{day}_{part}.npy", np.load(npy_root / f"day_{day}_{part}.npy"))
    for part in present:
        np.save(tmp_path / f"day_2_{part}.npy", np.load(npy_root / f"day_1_{part}.npy"))
    missing = ({"dense", "sparse", "labels"} - set(present)).pop() if len(present) == 2 else "sparse"
    with pytest.raises(ValueError, match=f"day 2 has no day_2_{missing}.npy"):
        npy_days(str(tmp_path))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"labels": np.zeros((100, 1), np.int32)}, r"the parts of day 0 have different row counts: "
                                                   r"\{'dense': 128, 'sparse': 128, 'labels': 100\}"),
        ({"dense": np.zeros((128, 12), np.float32)}, r"day_0_dense.npy: shape \[128, 12\], expected \['rows', 13\]"),
        ({"sparse": np.zeros((128,), np.int64)}, r"day_0_sparse.npy: shape \[128\], expected \['rows', 26\]"),
        ({"labels": np.zeros((128, 2), np.int32)}, r"day_0_labels.npy: shape \[128, 2\], expected \['rows', 1\]$"),
        ({"labels": np.zeros((128,), np.int32)}, r"day_0_labels.npy: shape \[128\], expected \['rows', 1\] \(save it "
                                                 r"as labels.reshape\(-1, 1\)\)"),  # TorchRec's reader needs [rows, 1]
    ],
)
def test_parts_of_a_day_must_agree(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    """TorchRec's reader counts rows from the dense file, the job from the labels: a mismatch is refused first."""
    parts = {"dense": np.zeros((128, 13), np.float32), "sparse": np.zeros((128, 26), np.int64),
             "labels": np.zeros((128, 1), np.int32), **arrays}
    for part, array in parts.items():
        np.save(tmp_path / f"day_0_{part}.npy", array)
    with pytest.raises(ValueError, match=message):
        npy_days(str(tmp_path))


def test_a_label_other_than_0_or_1_is_refused(tmp_path: Path, npy_root: Path) -> None:
    """``tsv_to_npys`` writes -1 for the unlabelled rows of Kaggle's test file: training on them is refused."""
    for part in ("dense", "sparse", "labels"):
        np.save(tmp_path / f"day_0_{part}.npy", np.load(npy_root / f"day_1_{part}.npy"))
    labels = np.load(npy_root / "day_1_labels.npy")
    labels[70] = -1
    np.save(tmp_path / "day_0_labels.npy", labels)
    sizes = [1000] * 26
    batches = criteo_npy_batches(str(tmp_path), [0], 32, sizes, rank=0, world_size=1)
    assert len([next(batches), next(batches)]) == 2  # rows 0-63 are labelled
    with pytest.raises(ValueError, match=r"day_0_labels.npy'\]: batch 2 of this rank \(train\) has the label -1"):
        next(batches)


def test_a_file_that_is_not_npy_is_named(tmp_path: Path, npy_root: Path) -> None:
    for part in ("dense", "sparse", "labels"):
        np.save(tmp_path / f"day_0_{part}.npy", np.load(npy_root / f"day_1_{part}.npy"))
    (tmp_path / "day_0_sparse.npy").write_text("not an array")
    with pytest.raises(ValueError, match=r"day_0_sparse.npy: not a .npy array"):
        npy_days(str(tmp_path))


def test_job_trains_on_npy_days(npy_root: Path) -> None:
    summary = main(["--data", f"npy:{npy_root}", "--steps", "80", "--batch-size", "128", "--eval-batches", "1",
                    "--eval-every", "40", "--pss", "robe:compression=100,chunk_size=8,min_rows=10000"])
    assert summary["data"] == f"npy:{npy_root}" and [e["step"] for e in summary["evaluations"]] == [40, 80]
    assert summary["auc"] > 0.55 and summary["compression_ratio"] > 10


FIRST_BATCH_RSS = """
import sys
from torchrec_pss.datasets import criteo_npy_batches
def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current RSS
before = status("VmRSS")
next(criteo_npy_batches(sys.argv[1], [0], 64, [1000] * 26, rank=0, world_size=1))
print(status("VmHWM") - before)
"""


def test_a_batch_reads_its_rows_not_the_whole_day(tmp_path: Path) -> None:
    """The days are memory-mapped: the first batch of a 400k-row day (52 MB of dense and sparse arrays) costs a
    few MB, where loading the day whole (and taking its ids mod the tables' sizes) cost over 50 MB."""
    rows = 400_000
    rng = np.random.default_rng(0)
    np.save(tmp_path / "day_0_dense.npy", rng.random((rows, 13), dtype=np.float32))
    np.save(tmp_path / "day_0_sparse.npy", rng.integers(0, 10**6, (rows, 26)))
    np.save(tmp_path / "day_0_labels.npy", rng.integers(0, 2, (rows, 1)).astype(np.int32))
    out = subprocess.run([sys.executable, "-c", FIRST_BATCH_RSS, str(tmp_path)], check=True, capture_output=True,
                         text=True, timeout=300)
    assert int(out.stdout.split()[-1]) < 20 * 2**20
