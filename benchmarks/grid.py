"""The PSS paper's Figure-3 grid: forward and training-step time of every method against the baselines.

For each logical table of ``n`` rows (``--rows``) and ``d`` = 128 columns and each pooling factor ``L``
(``--pooling``), one batch of ``B`` bags of ``L`` uniform random ids (B = 4096 on the CPU, 10240 on CUDA)
is timed, in the same process and on the same device, through:

- the baseline: FBGEMM's CPU TBE with ``EXACT_SGD`` fused into backward. With ``--device cuda`` it is
  ``torch.nn.EmbeddingBag(sparse=True)`` with SGD fused into backward, because FBGEMM's CUDA wheel cannot
  be installed on the lent GPU machine (the outputs say so);
- ``torchrec.EmbeddingBagCollection`` (dense table gradient) with SGD fused into backward;
- every method at every asked compression (``--compressions``), as ``CompressedEmbeddingBagCollection``
  with ``apply_optimizer_in_backward(torch.optim.SGD)``: ROBE at every chunk size Z (``--chunk-sizes``;
  its backward scatters the SGD update straight into ``M``), QR (mult), the hashing trick, MLET (the widest
  low-rank table reaching the ratio) and TT (the largest rank <= 32 reaching the ratio). With a fused SGD the
  layout of QR's, hashing's and MLET's gradients follows the ``"auto"`` rule whatever their config says
  (:func:`torchrec_pss.gradient_layout.gradient_mode`: the step is the same either way), so each method has
  one variant.

Every cell reports the median forward time (under ``torch.no_grad``) and the median training step
(forward + backward + fused SGD, loss = sum of the pooled outputs) over ``--steps`` timed steps after
``--warmup`` untimed ones, and both as ratios to the baseline (lower is better). Each cell is timed in rounds
interleaved with the baseline (one call of each per round; the baseline table stays allocated for the whole
setting) and divided by the baseline's medians of those same rounds, so a drift of the machine's speed between
cells (2× within minutes on a shared VM) does not show up as a ratio. A method that cannot
reach a ratio is recorded as unreachable (a dash in the tables). The compressed modules run with their
input checks off, as torchrec's EBC checks nothing (``--check-inputs`` turns them on).
``--caller-thread-backward`` runs every backward (the baselines' too) on the calling thread
(``torch.autograd.set_multithreading_enabled(False)``) instead of autograd's device thread: a backward
written in Python (the fused ROBE / QR / TT steps) then takes the GIL without a thread switch, which saves
≈ 0.2 ms per step on the lent GPU machine (``benchmarks/op_overhead.py``). A (rows, L)
setting whose baseline table does not fit in the device's free memory (or in ``--max-table-gib``) has its
baseline recorded as skipped with the reason, as has the EBC alone when its table plus dense gradient does not
fit; the compressed methods of that setting are still timed wherever their own memory (three times the
compressed size: memory, gradient, optimizer scratch) fits, and reported in milliseconds without a ratio —
the tables that need compression most are the ones whose uncompressed baseline cannot be allocated. Each cell's
modules are freed before the next.

    python benchmarks/grid.py                 # full CPU grid: 4M-256M rows, 10x-10000x, Z 1-32, L 1 and 20
    python benchmarks/grid.py --quick         # a tiny grid (under 2 minutes on 2 CPU cores)
    python benchmarks/grid.py --device cuda

writes ``benchmarks/results/grid_<device>.json`` and ``.md`` (``grid_<device>_quick.*`` with ``--quick``) and
one plot per (rows, L) setting, ``grid_<device>_n<rows>_L<L>.png`` (time vs asked compression, log-log, one
line per method variant); with ``--out STEM`` the files are ``STEM.json``, ``STEM.md`` and
``STEM_n<rows>_L<L>.png``.
The outputs are rewritten after every (rows, L) setting, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import matplotlib
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from matplotlib.figure import Figure
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lookup import LR, cpu_tbe, interleaved_medians, mlet_config, qr_config, tt_config
from torchrec_pss import CompressedEmbeddingBagCollection, HashingConfig, MethodConfig, RobeConfig
from torchrec_pss.optim import release_in_backward_optimizers

METHODS = ("robe", "qr", "tt", "hashing", "mlet")
MEMORY_FRACTION = 0.8  # a table must fit in this share of the device's free memory
FLOAT_BYTES = 4
BASELINES = {
    "cpu": "FBGEMM CPU TBE (SplitTableBatchedEmbeddingBagsCodegen, EXACT_SGD fused into backward)",
    "cuda": "torch.nn.EmbeddingBag(sparse=True) + SGD fused into backward on CUDA (FBGEMM's CUDA wheel "
            "cannot be installed on the lent GPU machine, so it replaces FBGEMM's CUDA TBE)",
}
FULL = {
    "rows": [4_000_000, 16_000_000, 64_000_000, 256_000_000],
    "compressions": [10.0, 100.0, 1000.0, 10000.0],
    "chunk_sizes": [1, 4, 8, 16, 32],
    "pooling": [1, 20],
    "steps": 5,
    "warmup": 2,
}
QUICK = {
    "rows": [100_000],
    "compressions": [10.0, 1000.0],
    "chunk_sizes": [1, 32],
    "pooling": [1],
    "steps": 3,
    "warmup": 1,
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One method configuration of the grid; ``config`` builds it for a table at an asked ratio."""

    method: str
    chunk_size: int | None = None

    @property
    def label(self) -> str:
        return self.method if self.chunk_size is None else f"{self.method} Z={self.chunk_size}"

    def row(self, ratio: float) -> dict[str, Any]:
        """The fields naming this variant at ``ratio`` in a result row."""
        return {"method": self.method, "label": self.label, "chunk_size": self.chunk_size, "asked": ratio}

    def config(self, table: EmbeddingBagConfig, ratio: float) -> MethodConfig | None:
        """The method config at ``ratio``x, or None where the benchmark's rule finds none reaching it."""
        if self.method == "robe":
            return RobeConfig(compression=ratio, chunk_size=self.chunk_size)
        if self.method == "hashing":
            return HashingConfig(compression=ratio)
        if self.method == "tt":
            return tt_config(table, ratio)
        return qr_config(table, ratio) if self.method == "qr" else mlet_config(table, ratio)


def variants(methods: list[str], chunk_sizes: list[int]) -> list[Variant]:
    """Every ROBE Z, then each other method once."""
    out: list[Variant] = []
    for method in methods:
        out += [Variant(method, chunk) for chunk in chunk_sizes] if method == "robe" else [Variant(method)]
    return out


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of /proc/meminfo on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def does_not_fit(what: str, needed: int, device: torch.device, cap_gib: float | None = None) -> str | None:
    """Why ``needed`` bytes for ``what`` cannot be allocated now (more than ``MEMORY_FRACTION`` of the free
    memory, or than ``cap_gib``), or None when they fit."""
    if cap_gib is not None and needed > cap_gib * 2**30:
        return f"{what} needs {needed / 2**30:.2f} GiB, more than the {cap_gib:g} GiB of --max-table-gib"
    free = free_bytes(device)
    if needed <= MEMORY_FRACTION * free:
        return None
    return (f"{what} needs {needed / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
            f"{free / 2**30:.1f} GiB free on {device.type}")


def release(device: torch.device) -> None:
    """Collect the last cell's modules (released from their in-backward optimizers) and cached CUDA blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_kjt(n: int, pooling: int, batch: int, device: torch.device) -> KeyedJaggedTensor:
    """``batch`` bags of ``pooling`` uniform random ids in ``[0, n)``, offsets included (seeded)."""
    lengths = torch.full((batch,), pooling)
    return KeyedJaggedTensor(
        keys=["f"],
        values=torch.randint(0, n, (batch * pooling,), generator=torch.Generator().manual_seed(0)),
        lengths=lengths,
        offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
    ).to(device)


Forward = Callable[[], torch.Tensor]


def measure(forwards: list[Forward], warmup: int, iters: int, device: torch.device) -> list[dict[str, float]]:
    """Median milliseconds of each forward under ``no_grad`` and of its training step (loss = sum of the output;
    the optimizers fused into backward are the callers'), timed in interleaved rounds (``interleaved_medians``)."""

    def infer(forward: Forward) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                forward()
        return run

    forward_ms = interleaved_medians([infer(f) for f in forwards], warmup, iters, device)
    step_ms = interleaved_medians([lambda f=f: f().sum().backward() for f in forwards], warmup, iters, device)
    return [{"forward_ms": fwd, "step_ms": step} for fwd, step in zip(forward_ms, step_ms)]


def measure_beside(forward: Forward, baseline: Forward | None, warmup: int, iters: int, device: torch.device
                   ) -> tuple[dict[str, float], dict[str, float] | None]:
    """:func:`measure` of ``forward``, in rounds interleaved with ``baseline`` when there is one, and the baseline's
    medians from those rounds (None without a baseline)."""
    times = measure([forward, *([] if baseline is None else [baseline])], warmup, iters, device)
    return times[0], times[1] if baseline is not None else None


def fused_sgd(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with SGD fused into backward for its parameters (undo: ``release_in_backward_optimizers``)."""
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": LR})
    return module


def baseline_forward(n: int, d: int, kjt: KeyedJaggedTensor, device: torch.device
                     ) -> tuple[Forward, torch.nn.Module | None]:
    """FBGEMM's CPU TBE (EXACT_SGD, fused by itself); ``nn.EmbeddingBag`` with sparse gradients + fused SGD on CUDA
    (returned as the module to release)."""
    indices, offsets = kjt.values(), kjt.offsets()
    if device.type == "cuda":
        bag = fused_sgd(torch.nn.EmbeddingBag(n, d, mode="sum", sparse=True, include_last_offset=True,
                                              device=device))
        return (lambda: bag(indices, offsets)), bag
    tbe = cpu_tbe(n, d, EmbOptimType.EXACT_SGD)
    return (lambda: tbe(indices, offsets)), None


def ebc_cell(table: EmbeddingBagConfig, kjt: KeyedJaggedTensor, warmup: int, iters: int, device: torch.device,
             baseline: Forward | None) -> tuple[dict[str, float], dict[str, float] | None]:
    """Median times of ``torchrec.EmbeddingBagCollection`` (dense table gradient) with SGD fused into backward, and
    the baseline's medians from the same rounds (None: timed alone)."""
    ebc = fused_sgd(EmbeddingBagCollection([table], device=device))
    times = measure_beside(lambda: ebc(kjt).values(), baseline, warmup, iters, device)
    release_in_backward_optimizers(ebc)
    return times


def compressed_cell(table: EmbeddingBagConfig, config: MethodConfig, kjt: KeyedJaggedTensor, warmup: int,
                    iters: int, device: torch.device, check_inputs: bool,
                    baseline: Forward | None) -> tuple[dict[str, float], dict[str, float] | None]:
    """Achieved compression and median times of one compressed module (ValueError: the ratio is unreachable), and
    the baseline's medians from the same rounds (None without a baseline)."""
    module = fused_sgd(CompressedEmbeddingBagCollection([table], {"t": config}, device,
                                                        validate_inputs=check_inputs))
    stored = module.memory_for("t").num_bytes()
    times, paired = measure_beside(lambda: module(kjt).values(), baseline, warmup, iters, device)
    release_in_backward_optimizers(module)
    compression = table.num_embeddings * table.embedding_dim * FLOAT_BYTES / stored
    return {"compression": compression, **times}, paired


def with_ratios(row: dict[str, Any], base: dict[str, float] | None) -> dict[str, Any]:
    """``row`` plus its forward and step times over the baseline's (None without a baseline)."""
    if base is None:
        return {**row, "forward_ratio": None, "step_ratio": None}
    return {**row, "forward_ratio": row["forward_ms"] / base["forward_ms"], "step_ratio": row["step_ms"] / base["step_ms"]}


def with_paired_ratios(row: dict[str, Any], paired: dict[str, float] | None,
                       alone: dict[str, float] | None) -> dict[str, Any]:
    """``row`` with its ratios over the baseline's medians from its own rounds (``paired``, recorded as
    ``baseline_forward_ms`` / ``baseline_step_ms``), or over the baseline timed alone where the two could not be
    interleaved (``paired`` None: ``"paired": False``); no ratio without a baseline."""
    if paired is None:
        return {**with_ratios(row, alone), "paired": False}
    return {**with_ratios(row, paired), "paired": True, "baseline_forward_ms": paired["forward_ms"],
            "baseline_step_ms": paired["step_ms"]}


def run_setting(n: int, pooling: int, grid: list[Variant], ratios: list[float], batch: int, dim: int,
                warmup: int, iters: int, device: torch.device, check_inputs: bool,
                cap_gib: float | None = None) -> list[dict[str, Any]]:
    """Every cell of one (rows, L) setting: EBC, baseline, then every variant at every ratio, each timed in rounds
    interleaved with the baseline (kept for the whole setting) and divided by the baseline's medians of those rounds;
    without a baseline (its table does not fit) the variants whose own memory fits are timed alone. The EBC is timed
    alone, before the baseline is allocated, where its table and dense gradient fit beside no other copy of the
    table, and divided by the baseline timed alone (``"paired": False``)."""
    table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=n, feature_names=["f"])
    common: dict[str, Any] = {"rows": n, "pooling": pooling, "batch": batch, "dim": dim}
    logical = n * dim * FLOAT_BYTES
    kjt = make_kjt(n, pooling, batch, device)
    ebc: dict[str, Any] = {**common, "method": "ebc", "label": "ebc", "asked": 1.0}
    baseline: Forward | None = None
    baseline_module: torch.nn.Module | None = None
    skipped = does_not_fit(f"the {n:,} x {dim} baseline table", logical, device, cap_gib)
    if skipped:
        rows = [{**common, "method": "baseline", "label": "baseline", "asked": 1.0, "status": "skipped",
                 "reason": skipped}, {**ebc, "status": "skipped", "reason": skipped}]
        report(rows[0])
    else:
        reason = does_not_fit("the EBC's table and dense gradient", 2 * logical, device, cap_gib)
        beside_baseline = not reason and not does_not_fit("the EBC beside the baseline", 3 * logical, device, cap_gib)
        ebc_alone = None if reason or beside_baseline else ebc_cell(table, kjt, warmup, iters, device, None)[0]
        release(device)
        baseline, baseline_module = baseline_forward(n, dim, kjt, device)
        (base,) = measure([baseline], warmup, iters, device)
        rows = [with_ratios({**common, "method": "baseline", "label": "baseline", "asked": 1.0, "compression": 1.0,
                             "status": "ok", **base}, base)]
        report(rows[0])
        if reason:
            rows.append({**ebc, "status": "skipped", "reason": reason})
        else:
            times, paired = ((ebc_alone, None) if ebc_alone is not None
                             else ebc_cell(table, kjt, warmup, iters, device, baseline))
            rows.append(with_paired_ratios({**ebc, "compression": 1.0, "status": "ok", **times}, paired, base))
            release(device)
        report(rows[-1])
    resident = 0 if baseline is None else logical  # the baseline's table stays allocated beside every cell
    for ratio in ratios:
        for variant in grid:
            row = {**common, **variant.row(ratio)}
            too_big = does_not_fit(f"{variant.label} at {ratio:g}x (memory, gradient and optimizer scratch)",
                                   3 * int(logical / ratio) + resident, device, cap_gib)
            try:
                config = variant.config(table, ratio)
                if config is None:
                    raise ValueError("no configuration of this method reaches the ratio")
                row["config"] = repr(config)
                if too_big:
                    row.update(status="skipped", reason=too_big)
                else:
                    times, paired = compressed_cell(table, config, kjt, warmup, iters, device, check_inputs, baseline)
                    row = with_paired_ratios({**row, "status": "ok", **times}, paired, None)
            except ValueError as error:
                row.update(status="unreachable", reason=str(error))
            except torch.OutOfMemoryError as error:
                row.update(status="skipped", reason=f"out of memory: {error}".splitlines()[0])
            release(device)
            rows.append(row)
            report(row)
    if baseline_module is not None:
        release_in_backward_optimizers(baseline_module)
    return rows


def report(row: dict[str, Any]) -> None:
    """One progress line per cell."""
    head = f"n={row['rows']:,} L={row['pooling']} {row['label']}" + (
        f" {row['asked']:g}x" if row["method"] not in ("baseline", "ebc") else "")
    if row["status"] != "ok":
        print(f"{head}: {row['status']} ({row['reason']})", flush=True)
        return
    ratios = ("", "") if row["step_ratio"] is None else (f" ({row['forward_ratio']:.2f}x)",
                                                          f" ({row['step_ratio']:.2f}x)")
    print(f"{head}: fwd {row['forward_ms']:.2f} ms{ratios[0]}, step {row['step_ms']:.2f} ms{ratios[1]}", flush=True)


def _cell_text(row: dict[str, Any], kind: str) -> str:
    """``ratio (ms)`` of a table cell, with the achieved compression when it is off the asked one by > 5%."""
    if row["status"] != "ok":
        return "-" if row["status"] == "unreachable" else "skipped"
    achieved = "" if abs(row["compression"] / row["asked"] - 1) <= 0.05 else f", {row['compression']:.0f}x"
    ratio = row[f"{kind}_ratio"]
    return f"{'n/a' if ratio is None else f'{ratio:.2f}'} ({row[f'{kind}_ms']:.2f} ms{achieved})"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The baselines table, then one table of ratios per timed quantity (training step, forward)."""
    ratios = sorted({r["asked"] for r in results if r["method"] not in ("baseline", "ebc")})
    lines = [
        f"# PSS grid on {meta['device']}",
        "",
        f"Generated by `python benchmarks/grid.py {' '.join(meta['argv'])}` on {meta['date']}. Baseline: "
        f"{meta['baseline']}. Batch {meta['batch']} bags of L uniform random ids, d = {meta['dim']}, SGD "
        f"(lr {LR}) fused into backward everywhere; medians of {meta['steps']} timed steps after "
        f"{meta['warmup']} warm-up steps, each cell in rounds interleaved with the baseline and divided by the "
        f"baseline's medians of the same rounds; compressed modules' input checks "
        f"{'on' if meta['check_inputs'] else 'off'}; backward on "
        f"{'the calling thread' if meta.get('caller_thread_backward') else 'autograd default threads'}; "
        f"torch {meta['torch']}, {meta['threads']} threads, "
        f"{meta['machine']}.",
        "",
        "## Baselines",
        "",
        "The baseline timed alone, and the range of its step medians in the rounds of the cells it was paired with "
        "(the ratios below divide by those); the EBC's ratio is over the baseline in its own rounds, or over the "
        "baseline alone where its table and gradient did not fit beside the baseline's (marked alone).",
        "",
        "| rows | L | baseline fwd ms | baseline step ms | baseline step ms in the cells' rounds | EBC fwd ms | "
        "EBC step ms | EBC step / baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    settings = list(dict.fromkeys((r["rows"], r["pooling"]) for r in results))
    by_setting = {s: [r for r in results if (r["rows"], r["pooling"]) == s] for s in settings}
    for (n, pooling), rows in by_setting.items():
        base, ebc = (next(r for r in rows if r["method"] == m) for m in ("baseline", "ebc"))
        if base["status"] != "ok":
            lines.append(f"| {n:,} | {pooling} | skipped: {base['reason']} | | | | | |")
            continue
        paired = [r["baseline_step_ms"] for r in rows if r["status"] == "ok" and r.get("paired")]
        paired_range = f"{min(paired):.2f}–{max(paired):.2f}" if paired else ""
        ebc_cells = (f"{ebc['forward_ms']:.2f} | {ebc['step_ms']:.2f} | {ebc['step_ratio']:.2f}"
                     f"{'' if ebc.get('paired') else ' (alone)'}"
                     if ebc["status"] == "ok" else f"skipped: {ebc['reason']} | | ")
        lines.append(f"| {n:,} | {pooling} | {base['forward_ms']:.2f} | {base['step_ms']:.2f} | {paired_range} | "
                     f"{ebc_cells} |")
    for kind, title in (("step", "Training step (forward + backward + fused SGD)"), ("forward", "Forward only")):
        lines += [
            "",
            f"## {title}: time / baseline (ms)",
            "",
            "Lower is better; a dash: the method cannot reach the asked ratio; n/a: no baseline to divide by (its "
            "table does not fit), the time alone; the achieved compression is shown where it is more than 5% off "
            "the asked one.",
            "",
            "| rows | L | method | " + " | ".join(f"{r:g}x" for r in ratios) + " |",
            "|---|---|---|" + "---|" * len(ratios),
        ]
        for (n, pooling), rows in by_setting.items():
            if not any(r["status"] == "ok" for r in rows if r["method"] not in ("baseline", "ebc")):
                continue
            labels = list(dict.fromkeys(r["label"] for r in rows if r["method"] not in ("baseline", "ebc")))
            for label in labels:
                by_ratio = {r["asked"]: r for r in rows if r["label"] == label}
                cells = [_cell_text(by_ratio[r], kind) if r in by_ratio else "" for r in ratios]
                lines.append(f"| {n:,} | {pooling} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], meta: dict[str, Any], stem: Path) -> list[Path]:
    """One PNG per measured (rows, L): forward and training-step ms vs asked compression (log-log; the baselines as
    lines at their times alone, the band: the baseline's medians in the cells' own rounds), and, with a baseline,
    the step's ratio to the baseline of its rounds (the tables' ratios)."""
    paths = []
    settings = dict.fromkeys((r["rows"], r["pooling"]) for r in results if r["status"] == "ok")
    for n, pooling in settings:
        rows = [r for r in results if (r["rows"], r["pooling"]) == (n, pooling) and r["status"] == "ok"]
        labels = list(dict.fromkeys(r["label"] for r in rows if r["method"] not in ("baseline", "ebc")))
        colors = matplotlib.colormaps["tab20"]
        has_ratios = any(r["step_ratio"] is not None for r in rows if r["method"] not in ("baseline", "ebc"))
        figure = Figure(figsize=(22 if has_ratios else 15, 5.5))
        axes = figure.subplots(1, 3 if has_ratios else 2)
        for ax, kind, title in zip(axes, ("forward", "step"), ("forward only", "training step (fwd + bwd + SGD)")):
            for i, label in enumerate(labels):
                points = sorted((r["asked"], r[f"{kind}_ms"]) for r in rows if r["label"] == label)
                ax.plot([x for x, _ in points], [y for _, y in points], "-", marker="o", color=colors(i % 20),
                        label=label)
            for method, color in (("baseline", "black"), ("ebc", "grey")):
                for r in rows:
                    if r["method"] == method:
                        ax.axhline(r[f"{kind}_ms"], color=color, linewidth=2, label=f"{method} (alone)"
                                   if method == "baseline" or not r.get("paired") else method)
            paired = [r[f"baseline_{kind}_ms"] for r in rows if r.get("paired")]
            if paired:
                ax.axhspan(min(paired), max(paired), color="black", alpha=0.12, label="baseline in the cells' rounds")
            ax.set(xscale="log", yscale="log", xlabel="compression (asked)", ylabel="ms (median)", title=title)
            ax.grid(True, which="both", alpha=0.3)
        if has_ratios:
            ax = axes[2]
            for i, label in enumerate(labels):
                points = sorted((r["asked"], r["step_ratio"]) for r in rows if r["label"] == label)
                ax.plot([x for x, _ in points], [y for _, y in points], "-", marker="o", color=colors(i % 20))
            ax.axhline(1.0, color="black", linewidth=2)
            ax.set(xscale="log", yscale="log", xlabel="compression (asked)", ylabel="step / baseline (same rounds)",
                   title="training step over the baseline")
            ax.grid(True, which="both", alpha=0.3)
        handles, names = axes[1].get_legend_handles_labels()
        figure.legend(handles, names, loc="center right", fontsize=8)
        baseline = (f"baseline = {meta['baseline'].split(' (')[0]}" if any(r["method"] == "baseline" for r in rows)
                    else "no baseline: its table does not fit")
        figure.suptitle(f"{meta['device']}: n = {n:,}, L = {pooling}, B = {meta['batch']}, d = {meta['dim']}; "
                        f"{baseline}", fontsize=10)
        figure.tight_layout(rect=(0, 0, 0.88 if has_ratios else 0.84, 1))
        path = stem.parent / f"{stem.name}_n{n}_L{pooling}.png"
        figure.savefig(path, dpi=100)
        paths.append(path)
    return paths


def write_outputs(results: list[dict[str, Any]], meta: dict[str, Any], stem: Path) -> str:
    """Write ``STEM.json``, ``STEM.md`` and the plots; return the markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, meta)
    Path(f"{stem}.md").write_text(table)
    plot(results, meta, stem)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI; grid options left out take the full grid's values, or the quick grid's with ``--quick``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--rows", type=int, nargs="+", help=f"logical rows (default {FULL['rows']})")
    parser.add_argument("--compressions", type=float, nargs="+", help="asked ratios (default 10 100 1000 10000)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", help="ROBE chunk sizes Z (default 1 4 8 16 32)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--pooling", type=int, nargs="+", help="pooling factors L (default 1 20)")
    parser.add_argument("--steps", type=int, help="timed steps per cell (default 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 2)")
    parser.add_argument("--batch", type=int, help="bags per batch (default 4096 on the CPU, 10240 on CUDA)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--check-inputs", action="store_true",
                        help="keep the compressed modules' input checks on (one device synchronisation per batch; "
                             "off by default, as torchrec's EBC checks nothing)")
    parser.add_argument("--caller-thread-backward", action="store_true",
                        help="run backward on the calling thread (torch.autograd.set_multithreading_enabled(False))")
    parser.add_argument("--max-table-gib", type=float,
                        help="allocate no table (baseline, EBC, compressed memory x 3) above this many GiB; default: "
                             f"{MEMORY_FRACTION * 100:.0f}%% of the device's free memory is the only limit")
    parser.add_argument("--quick", action="store_true",
                        help=f"a tiny grid: {', '.join(f'{k}={v}' for k, v in QUICK.items())}")
    parser.add_argument("--out", type=Path, help="path stem (default benchmarks/results/grid_<device>[_quick])")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch is None:
        args.batch = 10240 if args.device.type == "cuda" else 4096
    if args.out is None:
        args.out = Path(__file__).parent / "results" / f"grid_{args.device.type}{'_quick' if args.quick else ''}"
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.manual_seed(0)
    cuda = args.device.type == "cuda"
    meta = {
        "argv": args.argv,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "baseline": BASELINES[args.device.type],
        "batch": args.batch,
        "dim": args.dim,
        "steps": args.steps,
        "warmup": args.warmup,
        "check_inputs": args.check_inputs,
        "caller_thread_backward": args.caller_thread_backward,
        "max_table_gib": args.max_table_gib,
    }
    grid = variants(args.methods, args.chunk_sizes)
    results: list[dict[str, Any]] = []
    table = ""
    with torch.autograd.set_multithreading_enabled(not args.caller_thread_backward):
        for n in args.rows:
            for pooling in args.pooling:
                results += run_setting(n, pooling, grid, args.compressions, args.batch, args.dim, args.warmup,
                                       args.steps, args.device, args.check_inputs, args.max_table_gib)
                table = write_outputs(results, meta, args.out)
    print(table)
    return results


if __name__ == "__main__":
    main()
