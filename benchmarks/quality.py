"""Evidence on real data (issue 8): test AUC versus embedding memory for every compression method.

    python benchmarks/quality.py                     # the full run: 3 datasets x 17 cells x 3 seeds, ~25 min
    python benchmarks/quality.py --quick             # ~5 min: few steps, one seed, small synthetic test set
    python benchmarks/quality.py --datasets movielens --methods robe qr --seeds 0 1 --steps 500
    python benchmarks/quality.py --report-only --json benchmarks/results/quality_full.json   # rewrite
                                                     # docs/quality.md and the plots from a run's JSON
    python benchmarks/quality.py --report-only --merge a.json b.json --json all.json   # one report of several runs

A torchrec ``DLRM`` (``DLRMTrain``) sized to each dataset is trained in one process, uncompressed and
with every method, for the same number of steps and on the same batches per seed. Embedding tables are
``CompressedEmbeddingBagCollection`` tables updated by fused Adagrad inside backward
(``apply_optimizer_in_backward``), the dense layers by Adagrad; torch runs on ``--threads`` (1) threads.

Budgets: ``ratio`` x means at most ``logical bytes / ratio`` stored (parameters and buffers, e.g. hash
constants: the module's ``num_bytes()``, the report's bytes column). The largest tables
are compressed (the fewest such that the plain ones fit in half the budget; ``min_rows`` of the flag),
each at the per-table ratio that fills the rest: ROBE (one shared array, hash seed = run seed), the
hashing trick, QR (mult; 3 partitions when 2 cannot reach the ratio) and TT (per table the largest rank
<= 32 that reaches it). A method that cannot reach a budget (the flag parser / ``compress_`` raise
``ValueError``, or what it stores exceeds the budget by more than 5%) is skipped and reported as such.
MLET trains at ``d / 4`` and ``d / 8`` with ``k = 4 · (d / f)`` and is served collapsed (``n · d / f``
floats); ``smalldim`` is the control, plain tables at the same reduced dims.

Datasets: MovieLens-100K (``torchrec_pss.datasets.movielens``), the real Criteo 8k split of
``../shared/data/criteo`` (train on ``kaggle_8k_train``, test on dev + test, 800 rows), and
Criteo-Kaggle-shaped synthetic data (``SyntheticCriteo`` with the Kaggle cardinalities of the ROBE
paper's appendix 7.5, 33.76M rows in total). Test AUC (torchmetrics ``BinaryAUROC``) and log-loss are
taken every ``eval_every`` steps against the training time (model steps only; data and evaluation
excluded), which gives the AUC-vs-time curves and ROBE's time to the uncompressed model's final AUC.

Writes ``benchmarks/results/quality.json`` (after every cell; each run's ``curve`` holds
``[step, training seconds, test AUC, test log-loss]`` rows), and after every dataset ``docs/quality.md``,
``docs/quality_auc_vs_bytes.png`` and ``docs/quality_auc_vs_time.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC
from torchrec import EmbeddingBagCollection
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec_pss_plugins.tt import suggest_tt_shapes
from tqdm import tqdm

from torchrec_pss import (
    CompressedEmbeddingBagCollection,
    compress_,
    parse_compression_flag,
)
from torchrec_pss.datasets import SyntheticCriteo, criteo_text_batches, read_criteo_rows
from torchrec_pss.datasets.movielens import NUM_DENSE as MOVIELENS_DENSE
from torchrec_pss.datasets.movielens import load_movielens_100k
from torchrec_pss.gradient_layout import use_sparse_gradient
from torchrec_pss.optim import release_in_backward_optimizers

ROOT = Path(__file__).resolve().parents[1]
CRITEO_DIR = ROOT.parent / "shared" / "data" / "criteo"
KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306, 10,
    5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
"""Rows per Criteo Kaggle feature (ROBE paper, appendix 7.5): 33,762,577 in total."""
METHODS = ("robe", "qr", "tt", "hashing", "mlet", "smalldim")
BASELINE = "uncompressed"
PLAIN_SHARE = 0.5
"""Plain (small) tables may use at most this share of a budget; the rest goes to the compressed ones."""
BUDGET_SLACK = 1.05
MAX_TT_RANK = 32
ROBE_CHUNK = 32
TIME_TO_QUALITY_RATIOS = (100, 1000)


@dataclasses.dataclass(frozen=True)
class Setting:
    """Model and training sizes of one dataset: embedding dim ``d``, ``steps`` of ``batch_size`` examples."""

    embedding_dim: int
    batch_size: int
    steps: int
    eval_every: int
    learning_rate: float
    dense_arch: tuple[int, ...]
    over_arch: tuple[int, ...]
    test_examples: int | None = None


SETTINGS = {
    # 2 epochs of the 90,000 training interactions (the uncompressed model overfits after about 2).
    "movielens": Setting(16, 256, 700, 50, 0.05, (32,), (64, 32, 1)),
    # 1 epoch of the 7,200 rows: later epochs only memorise (test AUC falls, log-loss explodes).
    "criteo8k": Setting(16, 64, 112, 8, 0.05, (64,), (64, 32, 1)),
    # 410k examples in batches of 2048 (the ROBE paper's batch), 60-250 ms a step at 1 thread; AUC still rises.
    "kaggle_synthetic": Setting(16, 2048, 200, 20, 0.05, (64,), (64, 32, 1), test_examples=32768),
}
QUICK = {
    "movielens": Setting(16, 256, 60, 20, 0.05, (32,), (64, 32, 1)),
    "criteo8k": Setting(16, 64, 30, 10, 0.05, (64,), (64, 32, 1)),
    "kaggle_synthetic": Setting(16, 2048, 6, 3, 0.05, (64,), (64, 32, 1), test_examples=8192),
}


@dataclasses.dataclass
class Data:
    """A dataset as the trainer sees it: ``train(seed, batch_size)`` is an endless stream of batches."""

    name: str
    description: str
    features: list[str]
    cardinalities: list[int]
    dense_in_features: int
    train: Callable[[int, int], Iterator[Batch]]
    test: list[Batch]
    num_train: int | None

    @property
    def num_test(self) -> int:
        return sum(b.labels.numel() for b in self.test)

    @property
    def test_positives(self) -> int:
        return int(sum(b.labels.sum() for b in self.test))


def _epochs(make_epoch: Callable[[int], Iterator[Batch]], seed: int) -> Iterator[Batch]:
    """Epoch after epoch, epoch ``e`` shuffled with seed ``seed * 1000 + e``."""
    return itertools.chain.from_iterable(make_epoch(seed * 1000 + epoch) for epoch in itertools.count())


def load_movielens(cache_dir: str | None) -> Data:
    data = load_movielens_100k(cache_dir)
    return Data(
        name="movielens",
        description="MovieLens-100K, label rating >= 4, 8 sparse features (genre multi-hot), chronological "
                    f"90/10 split; wheel {data.wheel.name}",
        features=list(data.cardinalities), cardinalities=list(data.cardinalities.values()),
        dense_in_features=MOVIELENS_DENSE,
        train=lambda seed, batch: _epochs(lambda s: data.train.batches(batch, shuffle=True, seed=s, drop_last=True),
                                          seed),
        test=list(data.test.batches(4096)),
        num_train=len(data.train),
    )


def load_criteo8k(directory: Path) -> Data:
    """Train on ``kaggle_8k_train.tsv``, test on dev + test. Each feature's table has 4x as many rows as the
    feature has distinct values in the training file (hex ids mod rows, the reader's preprocessing)."""
    train_path = str(directory / "kaggle_8k_train.tsv")
    test_paths = [str(directory / "kaggle_8k_dev.tsv"), str(directory / "kaggle_8k_test.tsv")]
    raw = [row[2] for row in read_criteo_rows(train_path, [1 << 62] * len(DEFAULT_CAT_NAMES))]
    cardinalities = [max(2, 4 * len({row[f] for row in raw})) for f in range(len(DEFAULT_CAT_NAMES))]
    train_all = next(criteo_text_batches([train_path], len(raw), cardinalities))
    test = list(criteo_text_batches(test_paths, 4096, cardinalities))

    def epoch(seed: int, batch: int) -> Iterator[Batch]:
        order = torch.randperm(len(raw), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(raw) - batch + 1, batch):
            yield _rows_of(train_all, order[start : start + batch])

    return Data(
        name="criteo8k",
        description="real Criteo Kaggle rows (Wide-ResDNN 8k split): train 7,200, test = dev + test; "
                    "tables 4x the distinct training values per feature",
        features=list(DEFAULT_CAT_NAMES), cardinalities=cardinalities, dense_in_features=13,
        train=lambda seed, batch: _epochs(lambda s: epoch(s, batch), seed), test=test, num_train=len(raw),
    )


def _rows_of(batch: Batch, rows: torch.Tensor) -> Batch:
    """Rows ``rows`` of a batch whose KJT has exactly one id per example and feature."""
    keys = batch.sparse_features.keys()
    ids = batch.sparse_features.values().view(len(keys), -1)[:, rows]
    return Batch(dense_features=batch.dense_features[rows],
                 sparse_features=KeyedJaggedTensor(
                     keys=keys, values=ids.reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)),
                 labels=batch.labels[rows])


def load_kaggle_synthetic(test_examples: int) -> Data:
    """``SyntheticCriteo`` with the Kaggle cardinalities: one planted task (seed 0), a sample stream per run seed."""
    test = list(SyntheticCriteo(KAGGLE_CARDINALITIES, seed=0, stream=1_000_000).batches(4096, test_examples // 4096))
    return Data(
        name="kaggle_synthetic",
        description="SyntheticCriteo with the Criteo Kaggle cardinalities (33.76M rows), planted logistic labels",
        features=list(DEFAULT_CAT_NAMES), cardinalities=list(KAGGLE_CARDINALITIES), dense_in_features=13,
        train=lambda seed, batch: SyntheticCriteo(KAGGLE_CARDINALITIES, seed=0, stream=seed + 1).batches(
            batch, 1 << 62),
        test=test, num_train=None,
    )


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method at one budget: ``ratio`` (compression of the logical bytes) or ``dim_factor`` (MLET / smalldim)."""

    method: str
    ratio: int | None = None
    dim_factor: int | None = None

    @property
    def label(self) -> str:
        if self.method == BASELINE:
            return BASELINE
        return f"{self.method} {self.ratio}x" if self.ratio else f"{self.method} d/{self.dim_factor}"


def cells_for(methods: Sequence[str], ratios: Sequence[int], dim_factors: Sequence[int]) -> list[Cell]:
    cells = [Cell(BASELINE)]
    for method in methods:
        if method in ("mlet", "smalldim"):
            cells += [Cell(method, dim_factor=f) for f in dim_factors]
        else:
            cells += [Cell(method, ratio=r) for r in ratios]
    return cells


def split_budget(cardinalities: Sequence[int], dim: int, ratio: float) -> tuple[int, float]:
    """``(min_rows, per-table ratio)``: compress the fewest largest tables such that the plain ones use at
    most ``PLAIN_SHARE`` of ``logical / ratio`` bytes; the compressed ones share the rest at one ratio."""
    budget = sum(cardinalities) * dim * 4 / ratio
    sizes = sorted(set(cardinalities), reverse=True)
    for min_rows in sizes:
        plain = sum(n for n in cardinalities if n < min_rows) * dim * 4
        if plain <= PLAIN_SHARE * budget:
            compressed = sum(n for n in cardinalities if n >= min_rows) * dim * 4
            return min_rows, compressed / (budget - plain)
    raise ValueError(f"no split for {ratio}x")  # unreachable: the smallest size compresses every table


def tt_rank(n: int, dim: int, ratio: float) -> int:
    """The largest TT rank <= ``MAX_TT_RANK`` whose 3 cores compress an ``[n, dim]`` table ``ratio``x."""
    p, q = suggest_tt_shapes(n, dim, 3)
    for rank in range(MAX_TT_RANK, 0, -1):
        ranks = (1, rank, rank, 1)
        if n * dim / sum(p[k] * ranks[k] * q[k] * ranks[k + 1] for k in range(3)) >= ratio:
            return rank
    raise ValueError(f"TT cannot compress a {n} x {dim} table {ratio:.4g}x (rank 1 is not enough)")


def flags_for(cell: Cell, data: Data, dim: int, seed: int) -> list[str]:
    """Compression flags (``torchrec_pss.flags``) to try in order for ``cell``; the first that builds is used."""
    if cell.method in (BASELINE, "smalldim"):
        return ["plain"]
    if cell.method == "mlet":
        return [f"mlet:inner_dim={4 * dim},gradient=auto"]
    min_rows, ratio = split_budget(data.cardinalities, dim, cell.ratio)
    common = f"compression={ratio:.6g},gradient=auto,min_rows={min_rows}"
    if cell.method == "robe":
        return [f"robe:{common},chunk_size={ROBE_CHUNK},seed={seed}"]
    if cell.method == "hashing":
        return [f"hashing:{common},seed={seed}"]
    if cell.method == "qr":
        return [f"qr:{common}", f"qr:{common},num_partitions=3"]
    if cell.method == "tt":
        clauses = [f"t_{f}=tt:ranks={tt_rank(n, dim, ratio)},seed={seed}"
                   for f, n in zip(data.features, data.cardinalities) if n >= min_rows]
        return [";".join(["plain", *clauses])]
    raise ValueError(f"unknown method {cell.method!r}; known: {METHODS}")


def build_model(data: Data, setting: Setting, dim: int, flag: str, seed: int) -> DLRMTrain:
    """A DLRM with one ``dim``-wide table per feature, compressed by ``flag``, initialised from ``seed``.

    Built on meta and materialised after ``compress_``, so no uncompressed table is allocated for a
    compressed model. The dense layers and every table that stays plain start from the same values in
    every cell of a seed (each plain table from its own seed ``seed * 1000 + index``), so cells differ only
    in the compressed tables. Plain tables get sparse gradients by the methods' ``"auto"`` rule (sparse
    when the table has more than ``DEFAULT_AUTO_DENSE_RATIO`` x ``batch_size`` rows)."""
    torch.manual_seed(seed)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
              for f, n in zip(data.features, data.cardinalities)]
    model = DLRMTrain(DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")),
        dense_in_features=data.dense_in_features, dense_arch_layer_sizes=[*setting.dense_arch, dim],
        over_arch_layer_sizes=list(setting.over_arch), dense_device=torch.device("cpu"),
    ))
    compress_(model, parse_compression_flag(flag))
    ebc = embeddings(model)
    ebc.to_empty(device="cpu")
    for index, table in enumerate(ebc.embedding_bag_configs()):
        if table.name in ebc.embedding_bags:
            bag = ebc.embedding_bags[table.name]
            torch.manual_seed(seed * 1_000 + index)
            table.init_fn(bag.weight)
            bag.sparse = use_sparse_gradient("auto", bag.num_embeddings, setting.batch_size)
    torch.manual_seed(seed)
    for memory in ebc.pss_memories.values():
        memory.reset_parameters()
    return model


def embeddings(model: DLRMTrain) -> CompressedEmbeddingBagCollection:
    return model.model.sparse_arch.embedding_bag_collection


@torch.no_grad()
def evaluate(model: DLRMTrain, test: list[Batch]) -> tuple[float, float]:
    """``(AUC, mean log-loss in nats)`` of ``model`` on ``test``."""
    model.eval()
    auroc, loss, count = BinaryAUROC(), 0.0, 0
    for batch in test:
        _, (_, logits, labels) = model(batch)
        auroc.update(torch.sigmoid(logits), labels.long())
        loss += F.binary_cross_entropy_with_logits(logits, labels, reduction="sum").item()
        count += labels.numel()
    model.train()
    return auroc.compute().item(), loss / count


def train_run(data: Data, setting: Setting, cell: Cell, flag: str, seed: int, model: DLRMTrain,
              logical_bytes: int, resume_at: int = 0) -> dict:
    """Train ``model`` ``setting.steps`` steps on seed ``seed``'s stream from its batch ``resume_at`` (a model trained
    on the first ``resume_at`` batches goes on with the next ones); the run's metrics and AUC curve."""
    started = time.perf_counter()
    ebc = embeddings(model)
    apply_optimizer_in_backward(torch.optim.Adagrad, ebc.parameters(), {"lr": setting.learning_rate})
    dense = torch.optim.Adagrad([p for _, p in in_backward_optimizer_filter(model.named_parameters())],
                                lr=setting.learning_rate)
    stream = itertools.islice(data.train(seed, setting.batch_size), resume_at, None)
    curve = [[0, 0.0, *evaluate(model, data.test)]]
    seconds, losses = 0.0, []
    for step in tqdm(range(1, setting.steps + 1), desc=f"{data.name} {cell.label} s{seed}", mininterval=5.0,
                     leave=False):
        batch = next(stream)
        start = time.perf_counter()
        loss, _ = model(batch)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        seconds += time.perf_counter() - start
        losses.append(loss.item())
        if step % setting.eval_every == 0 or step == setting.steps:
            curve.append([step, seconds, *evaluate(model, data.test)])
    stored = sum(ebc.num_bytes().values())
    dim = ebc.embedding_bag_configs()[0].embedding_dim
    serving = sum(data.cardinalities) * dim * 4 if cell.method == "mlet" else stored
    return {
        "seed": seed, "flag": flag, "auc": curve[-1][2], "log_loss": curve[-1][3],
        "embedding_bytes": stored, "parameter_bytes": sum(p.numel() * p.element_size() for p in ebc.parameters()),
        "serving_bytes": serving, "compression": logical_bytes / serving,
        "train_seconds": seconds, "wall_seconds": time.perf_counter() - started,
        "examples_per_second": setting.steps * setting.batch_size / seconds,
        "first_train_loss": statistics.fmean(losses[:10]), "last_train_loss": statistics.fmean(losses[-10:]),
        "curve": curve,
    }


def run_cell(data: Data, setting: Setting, cell: Cell, seeds: Sequence[int]) -> dict:
    """Every seed of one cell, or the reason it was skipped (the method cannot reach the budget)."""
    dim = setting.embedding_dim // (cell.dim_factor or 1)
    logical = sum(data.cardinalities) * setting.embedding_dim * 4
    result = {"dataset": data.name, "method": cell.method, "label": cell.label, "ratio": cell.ratio,
              "dim_factor": cell.dim_factor, "embedding_dim": dim, "status": "ok", "runs": []}
    for seed in seeds:
        started = time.perf_counter()
        try:
            flag, model = _first_buildable(cell, data, setting, dim, seed)
        except ValueError as error:
            return {**result, "status": "skipped", "reason": str(error), "runs": []}
        build_seconds = time.perf_counter() - started
        stored = sum(embeddings(model).num_bytes().values())  # what the report's bytes column shows
        if cell.ratio and stored > BUDGET_SLACK * logical / cell.ratio:
            return {**result, "status": "skipped", "runs": [],
                    "reason": f"{flag!r} stores {stored:,} bytes, over the {logical / cell.ratio:,.0f}-byte budget "
                              f"(reaches {logical / stored:.3g}x)"}
        run = train_run(data, setting, cell, flag, seed, model, logical)
        result["runs"].append({**run, "build_seconds": build_seconds})
        release_in_backward_optimizers(model)  # else torch's in-backward records keep every model's tables alive
        del model
        gc.collect()
    return result


def _first_buildable(cell: Cell, data: Data, setting: Setting, dim: int, seed: int) -> tuple[str, DLRMTrain]:
    errors = []
    for flag in flags_for(cell, data, dim, seed):
        try:
            return flag, build_model(data, setting, dim, flag, seed)
        except ValueError as error:
            errors.append(f"{flag!r}: {error}")
    raise ValueError("; ".join(errors))


def summarise(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def time_to_quality(cells: list[dict]) -> list[dict]:
    """Per dataset, seed and ROBE budget in ``TIME_TO_QUALITY_RATIOS``: the training time at which ROBE's test
    AUC first reaches the same seed's uncompressed final AUC, over the uncompressed model's training time."""
    rows = []
    for dataset in dict.fromkeys(c["dataset"] for c in cells):
        base = next((c for c in cells if c["dataset"] == dataset and c["method"] == BASELINE), None)
        if base is None:
            continue
        base_runs = {r["seed"]: r for r in base["runs"]}
        for cell in cells:
            if cell["dataset"] != dataset or cell["method"] != "robe" or cell["ratio"] not in TIME_TO_QUALITY_RATIOS:
                continue
            for run in cell["runs"]:
                reference = base_runs.get(run["seed"])
                if reference is None:
                    continue
                reached = next((point[1] for point in run["curve"] if point[2] >= reference["auc"]), None)
                rows.append({"dataset": dataset, "label": cell["label"], "seed": run["seed"],
                             "target_auc": reference["auc"], "seconds": reached,
                             "baseline_seconds": reference["train_seconds"],
                             "baseline_first_seconds": next(p[1] for p in reference["curve"]
                                                            if p[2] >= reference["auc"]),
                             "ratio": None if reached is None else reached / reference["train_seconds"]})
    return rows


def hanley_mcneil_se(auc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC from the test set's size alone (Hanley & McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)) / (
        positives * negatives)
    return math.sqrt(max(variance, 0.0))


def paired_delta(runs: list[dict], base_runs: list[dict]) -> str:
    """``mean ± std`` over shared seeds of the AUC difference to the baseline, ``~`` when within 2 standard errors."""
    base = {r["seed"]: r["auc"] for r in base_runs}
    deltas = [r["auc"] - base[r["seed"]] for r in runs if r["seed"] in base]
    if not deltas:
        return ""
    mean, std = summarise(deltas)
    within = len(deltas) > 1 and abs(mean) <= 2 * std / math.sqrt(len(deltas))
    return f"{mean:+.4f} ± {std:.4f}{' ~' if within else ''}"


def _fmt_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def markdown(results: dict, plots: dict[str, str]) -> str:
    """The report: setup, one mean ± std table per dataset, skipped cells, time-to-quality, plots."""
    meta, cells = results["meta"], results["cells"]
    lines = [
        "# Quality: AUC versus embedding memory, every method (issue 8)",
        "",
        (f"Generated by `python benchmarks/quality.py {' '.join(meta['argv'])}` on {meta['date']} "
         f"({meta['machine']}, torch {meta['torch']}, torch threads: {meta['threads']}; wall time "
         f"{meta.get('total_seconds', 0) / 60:.1f} min). Raw numbers: `{meta.get('json', 'see --json')}`."),
        *[f"Merged with `python benchmarks/quality.py {' '.join(m['argv'])}` on {m['date']} (wall time "
          f"{m.get('total_seconds', 0) / 60:.1f} min; raw numbers `{m.get('json')}`)." for m in meta.get("merged", [])],
        "",
        "Each cell trains a torchrec `DLRM` with the same steps, batches and seeds; the compressed tables are",
        "`CompressedEmbeddingBagCollection` memories (fused Adagrad in backward), the dense layers Adagrad.",
        "*Bytes* are what the embedding module stores (`num_bytes()`: memories, hash constants and plain",
        "tables; MLET: the collapsed serving table, its training factors are in the JSON), *ratio* is the",
        "uncompressed model's bytes over them. AUC and log-loss are on the test set after the last step,",
        "mean ± sample std over seeds. A seed fixes the data order, the dense layers' init and the init of",
        "every table left plain, so cells of one seed differ only in their compressed tables: *Δ AUC* is the",
        "mean ± std over seeds of (cell − uncompressed, same seed), marked ~ when |mean| <= 2 · std / sqrt(n)",
        "(within seed noise; needs 2+ seeds). *train s* is the time of the model",
        "steps only (no data loading or evaluation), on one thread of a 2-core machine shared with other work.",
        "",
    ]
    for dataset, info in results["datasets"].items():
        ds_cells = [c for c in cells if c["dataset"] == dataset]
        setting = info["setting"]
        lines += [f"## {dataset}", "", (
            f"{info['description']}. {info['num_test']:,} test examples ({info['test_positives']:,} positive); "
            f"{setting['steps']} steps of {setting['batch_size']}, d = {setting['embedding_dim']}, lr "
            f"{setting['learning_rate']}; tables: {info['num_tables']} with {info['total_rows']:,} rows = "
            f"{_fmt_bytes(info['logical_bytes'])}."), ""]
        base = next((c for c in ds_cells if c["method"] == BASELINE and c["runs"]), None)
        base_auc = summarise([r["auc"] for r in base["runs"]]) if base else None
        if base_auc:
            se = hanley_mcneil_se(base_auc[0], info["test_positives"], info["num_test"] - info["test_positives"])
            lines += [(f"Test-set sampling error of an AUC near {base_auc[0]:.3f} on this test set (Hanley-McNeil): "
                       f"±{se:.4f}; differences below about {2 * se:.3f} could come from the test sample alone."), ""]
        lines += ["| cell | seeds | bytes | ratio | test AUC | Δ AUC | log-loss | train s | examples/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for cell in ds_cells:
            if cell["status"] != "ok":
                continue
            runs = cell["runs"]
            auc, auc_std = summarise([r["auc"] for r in runs])
            loss, loss_std = summarise([r["log_loss"] for r in runs])
            delta = paired_delta(runs, base["runs"]) if base and cell is not base else ""
            lines.append(
                f"| {cell['label']} | {len(runs)} | {_fmt_bytes(statistics.fmean(r['serving_bytes'] for r in runs))} | "
                f"{statistics.fmean(r['compression'] for r in runs):,.1f}x | {auc:.4f} ± {auc_std:.4f} | {delta} | "
                f"{loss:.4f} ± {loss_std:.4f} | {statistics.fmean(r['train_seconds'] for r in runs):.1f} | "
                f"{statistics.fmean(r['examples_per_second'] for r in runs):,.0f} |")
        skipped = [c for c in ds_cells if c["status"] != "ok"]
        if skipped:
            lines += ["", "Skipped (the method cannot reach the budget):", ""]
            lines += [f"- {c['label']}: {c['reason']}" for c in skipped]
        lines.append("")
    ttq = results.get("time_to_quality", [])
    if ttq:
        lines += ["## Time to quality (ROBE)", "",
                  "Training time until ROBE's test AUC (evaluated every `eval_every` steps) first reaches the same",
                  "seed's uncompressed final test AUC, over the uncompressed model's training time (< 1: ROBE gets",
                  "there sooner; *not reached*: not within the same number of steps). The last column is when the",
                  "uncompressed model itself first reached its final AUC, on the same scale.", "",
                  "| dataset | cell | reached | time ratio (mean ± std of reached) | per seed | uncompressed |",
                  "|---|---|---|---|---|---|"]
        for (dataset, label), group in itertools.groupby(ttq, key=lambda r: (r["dataset"], r["label"])):
            group = list(group)
            ratios = [r["ratio"] for r in group if r["ratio"] is not None]
            mean = "—" if not ratios else "{:.2f} ± {:.2f}".format(*summarise(ratios))
            per_seed = ", ".join(f"s{r['seed']}: " + ("not reached" if r["ratio"] is None else f"{r['ratio']:.2f}")
                                 for r in group)
            own = statistics.fmean(r["baseline_first_seconds"] / r["baseline_seconds"] for r in group)
            lines.append(f"| {dataset} | {label} | {len(ratios)}/{len(group)} | {mean} | {per_seed} | {own:.2f} |")
        lines.append("")
    lines += ["## Plots", ""]
    lines += [f"![{title}]({path})" for title, path in plots.items()]
    lines.append("")
    return "\n".join(lines)


_STYLES = {BASELINE: "black", "robe": "tab:red", "qr": "tab:blue", "tt": "tab:green", "hashing": "tab:orange",
           "mlet": "tab:purple", "smalldim": "tab:gray"}


def plot(results: dict, bytes_png: Path, time_png: Path) -> None:
    """AUC vs embedding bytes (log x, mean ± std per cell, one line per method) and AUC vs training time
    (seed-mean curves; line style by budget), one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(results["datasets"])
    ok = [c for c in results["cells"] if c["status"] == "ok" and c["runs"]]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method, color in _STYLES.items():
            cells = sorted((c for c in ok if c["dataset"] == dataset and c["method"] == method),
                           key=lambda c: -statistics.fmean(r["serving_bytes"] for r in c["runs"]))
            if not cells:
                continue
            x = [statistics.fmean(r["serving_bytes"] for r in c["runs"]) for c in cells]
            stats = [summarise([r["auc"] for r in c["runs"]]) for c in cells]
            ax.errorbar(x, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        color=color, label=method, linestyle="-" if method != BASELINE else "none")
            if method == BASELINE:
                ax.axhline(stats[0][0], color="black", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (log)")
        ax.set_ylabel("test AUC")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bytes_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        budget_styles: dict[str, str] = {}
        for cell in (c for c in ok if c["dataset"] == dataset):
            points = min(len(r["curve"]) for r in cell["runs"])
            seconds = [statistics.fmean(r["curve"][i][1] for r in cell["runs"]) for i in range(points)]
            aucs = [statistics.fmean(r["curve"][i][2] for r in cell["runs"]) for i in range(points)]
            budget = cell["label"].split(" ", 1)[-1]
            style = budget_styles.setdefault(budget, ["-", "--", ":", "-."][len(budget_styles) % 4])
            ax.plot(seconds, aucs, color=_STYLES[cell["method"]], linestyle="-" if cell["method"] == BASELINE else style,
                    linewidth=2 if cell["method"] in (BASELINE, "robe") else 1, label=cell["label"])
        ax.set_xlabel("training time (s, model steps only)")
        ax.set_ylabel("test AUC")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(time_png, dpi=110)
    plt.close(fig)


def merge_runs(paths: list[Path]) -> dict:
    """One result of several runs' JSONs: the first run's meta (the others' under ``meta["merged"]``), every
    dataset, and per (dataset, cell) the runs of every seed. A dataset in several runs must have the same
    setting; a (dataset, cell, seed) run that an earlier file already holds is left out (the first is kept).
    Cells skipped in one run and measured in another are taken as measured."""
    runs = [json.loads(path.read_text()) for path in paths]
    merged = {"meta": {**runs[0]["meta"], "merged": [run["meta"] for run in runs[1:]]}, "datasets": {}, "cells": []}
    cells: dict[tuple[str, str], dict] = {}
    for path, run in zip(paths, runs):
        for name, info in run["datasets"].items():
            known = merged["datasets"].setdefault(name, info)
            if known["setting"] != info["setting"]:
                raise ValueError(f"{path}: dataset {name!r} was run with another setting than in an earlier file")
        for cell in run["cells"]:
            key = (cell["dataset"], cell["label"])
            if key not in cells or (cells[key]["status"] != "ok" and cell["status"] == "ok"):
                cells[key] = {**cell, "runs": []}
            seeds = {r["seed"] for r in cells[key]["runs"]}
            cells[key]["runs"] += [r for r in cell["runs"] if r["seed"] not in seeds]
    merged["cells"] = list(cells.values())
    return merged


def write_outputs(results: dict, json_path: Path | None, md_path: Path | None) -> None:
    """The JSON (with the time-to-quality rows; not without ``json_path``); with ``md_path``, the two PNGs beside it
    and the report."""
    results["time_to_quality"] = time_to_quality(results["cells"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))
    if md_path is None:
        return
    md_path.parent.mkdir(parents=True, exist_ok=True)
    bytes_png = md_path.with_name(f"{md_path.stem}_auc_vs_bytes.png")
    time_png = md_path.with_name(f"{md_path.stem}_auc_vs_time.png")
    plot(results, bytes_png, time_png)
    plots = {"AUC vs embedding bytes": bytes_png.name, "AUC vs training time": time_png.name}
    md_path.write_text(markdown(results, plots))


def _shown(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def load_data(name: str, setting: Setting, args: argparse.Namespace) -> Data:
    if name == "movielens":
        return load_movielens(args.recbole_cache)
    if name == "criteo8k":
        return load_criteo8k(args.criteo_dir)
    if name == "kaggle_synthetic":
        return load_kaggle_synthetic(setting.test_examples or 32768)
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(SETTINGS)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the uncompressed model always runs")
    parser.add_argument("--ratios", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--dim-factors", nargs="+", type=int, default=[4, 8], help="MLET / smalldim: d / f")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="override every dataset's steps")
    parser.add_argument("--eval-every", type=int, default=None, help="override every dataset's eval interval")
    parser.add_argument("--quick", action="store_true", help="few steps, seed 0, small synthetic test set")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads; 1 keeps step times stable on a shared machine (2 threads "
                             "on 2 busy cores made OpenMP regions wait for a descheduled thread: 25 ms steps took 600)")
    parser.add_argument("--recbole-cache", default=None, help="where the recbole wheel is cached")
    parser.add_argument("--criteo-dir", type=Path, default=CRITEO_DIR)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "quality.json")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "quality.md",
                        help="markdown report; the PNGs are written beside it")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report and plots from --json (which it leaves as it is unless --merge)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="with --report-only: combine these runs' JSONs (other datasets) into --json and one report")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick and args.seeds == parser.get_default("seeds"):
        args.seeds = [0]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.report_only:
        results = merge_runs(args.merge) if args.merge else json.loads(args.json.read_text())
        write_outputs(results, args.json if args.merge else None, args.report)
        return results
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict:
    """Every cell of every dataset; the JSON is rewritten after each cell, the report and plots after each dataset."""
    started = time.perf_counter()
    results: dict = {
        "meta": {"argv": args.argv, "json": _shown(args.json),
                 "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {platform.processor()}".strip(),
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "seeds": args.seeds},
        "datasets": {}, "cells": [],
    }
    cells = cells_for(args.methods, args.ratios, args.dim_factors)
    for name in args.datasets:
        setting = (QUICK if args.quick else SETTINGS)[name]
        setting = dataclasses.replace(setting, steps=args.steps or setting.steps,
                                      eval_every=args.eval_every or setting.eval_every)
        data = load_data(name, setting, args)
        results["datasets"][name] = {
            "description": data.description, "setting": dataclasses.asdict(setting),
            "features": data.features, "cardinalities": data.cardinalities, "num_tables": len(data.cardinalities),
            "total_rows": sum(data.cardinalities), "logical_bytes": sum(data.cardinalities) * setting.embedding_dim * 4,
            "num_train": data.num_train, "num_test": data.num_test, "test_positives": data.test_positives,
        }
        for cell in tqdm(cells, desc=name):
            results["cells"].append(run_cell(data, setting, cell, args.seeds))
            results["meta"]["total_seconds"] = time.perf_counter() - started
            write_outputs(results, args.json, None)
        write_outputs(results, args.json, args.report)
    return results


if __name__ == "__main__":
    main()
