"""TorchRec's NumPy Criteo days (written by TorchRec's own ``tsv_to_npys`` from real Kaggle rows) as a data source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.criteo import BinaryCriteoUtils

from torchrec_pss.app.dlrm_main import main
from torchrec_pss.datasets import criteo_npy_batches, npy_days
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
    assert npy_days(str(npy_root)) == [0, 1]
    first = next(criteo_npy_batches(str(npy_root), [0], 100, sizes, rank=0, world_size=1))
    rows = tsv_rows("kaggle_8k_train.tsv", 100)
    assert torch.equal(first.labels, torch.tensor([float(r[0]) for r in rows]))
    assert first.labels.dtype == torch.float32 and first.dense_features.shape == (100, 13)
    features = first.sparse_features.to_dict()
    for f, n in enumerate(sizes):
        expected = [int(r[14 + f] or "0", 16) % n for r in rows]
        assert features[f"cat_{f}"].values().tolist() == expected


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


def test_job_trains_on_npy_days(npy_root: Path) -> None:
    summary = main(["--data", f"npy:{npy_root}", "--steps", "80", "--batch-size", "128", "--eval-batches", "1",
                    "--eval-every", "40", "--pss", "robe:compression=100,chunk_size=8,min_rows=10000"])
    assert summary["data"] == f"npy:{npy_root}" and [e["step"] for e in summary["evaluations"]] == [40, 80]
    assert summary["auc"] > 0.55 and summary["compression_ratio"] > 10
