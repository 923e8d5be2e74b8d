"""Warm start on real Criteo (issue 9): sketch a trained DLRM's tables into ROBE, test AUC before and after fine-tuning.

    python benchmarks/sketch_criteo.py                        # 5 seeds, 10x and 100x, 2 fine-tuning lrs: ~3 min
    python benchmarks/sketch_criteo.py --seeds 0 --ratios 10 --finetune-steps 16 --finetune-lrs 0.005

Per seed, the uncompressed DLRM of ``benchmarks/quality.py`` (its ``criteo8k`` setting: d = 16, batches of
64, 112 steps = one epoch of ``kaggle_8k_train``, Adagrad 0.05, fused in backward for the tables) is trained
and tested on dev + test (800 rows). For each ratio its tables are compressed as quality.py's ROBE cell
compresses them (the largest tables share one ROBE memory at the ratio that fills the budget; the small ones
stay plain), but with signs and the memory sketched from the trained tables (``sketch_from_pretrained``):
test AUC with no training, then along ``--finetune-steps`` more steps of the same training stream, from where
the trained model stopped (the second epoch, shuffled anew: there is no other training data) at each of
``--finetune-lrs``. Controls: the uncompressed model trained for
the same extra steps, and the same signed ROBE model trained from scratch for one epoch (the quality.py
cell). ``relative error`` is ``‖Ẽ - E‖_F / ‖E‖_F`` over the sketched tables; the count-sketch variance of
``torchrec_pss/sketch.py`` predicts ``sqrt(N / |M|)`` (``N`` sketched elements).

Writes ``benchmarks/results/sketch_criteo.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from quality import (
    BASELINE,
    CRITEO_DIR,
    SETTINGS,
    Cell,
    Data,
    Setting,
    build_model,
    embeddings,
    flags_for,
    hanley_mcneil_se,
    load_criteo8k,
    paired_delta,
    summarise,
    train_run,
)
from torchrec.models.dlrm import DLRMTrain

from torchrec_pss import parse_compression_flag, sketch_from_pretrained

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BASELINE_FLAG = "plain"
SHOWN_STEPS = (16, 56)
"""Fine-tuning steps (besides 0 and the last) whose AUC the report shows."""


def warm_model(data: Data, setting: Setting, trained: DLRMTrain, flag: str, seed: int) -> DLRMTrain:
    """A copy of ``trained`` whose tables are sketched into the ROBE memory that ``flag`` describes."""
    model = build_model(data, setting, setting.embedding_dim, BASELINE_FLAG, seed)
    model.load_state_dict(trained.state_dict())
    model.model.sparse_arch.embedding_bag_collection = sketch_from_pretrained(embeddings(trained),
                                                                              parse_compression_flag(flag))
    return model


@torch.no_grad()
def relative_error(trained: DLRMTrain, warm: DLRMTrain) -> tuple[float, float]:
    """``(‖Ẽ - E‖_F / ‖E‖_F, sqrt(N / |M|))`` over the tables ``warm`` sketched."""
    sketched = embeddings(warm)
    source = embeddings(trained).embedding_bags
    names = list(sketched.compression)
    error = sum((sketched.memory_for(n).materialize(n) - source[n].weight.double()).pow(2).sum().item() for n in names)
    norm = sum(source[n].weight.double().pow(2).sum().item() for n in names)
    elements = sum(source[n].weight.numel() for n in names)
    memory = sum(m.memory_size for m in sketched.pss_memories.values())
    return math.sqrt(error / norm), math.sqrt(elements / memory)


def run_seed(data: Data, setting: Setting, seed: int, ratios: Sequence[int], finetunes: Sequence[Setting]) -> dict:
    """The trained model, its fine-tuned controls, and per ratio the sketched (fine-tuned with every setting of
    ``finetunes``; keys: learning rates) and from-scratch ROBE models."""
    logical = sum(data.cardinalities) * setting.embedding_dim * 4
    trained = build_model(data, setting, setting.embedding_dim, BASELINE_FLAG, seed)
    result = {"seed": seed, "uncompressed": train_run(data, setting, Cell(BASELINE), BASELINE_FLAG, seed, trained,
                                                      logical), "uncompressed_finetuned": {}, "ratios": {}}
    for finetune in finetunes:
        control = build_model(data, setting, setting.embedding_dim, BASELINE_FLAG, seed)
        control.load_state_dict(trained.state_dict())
        result["uncompressed_finetuned"][str(finetune.learning_rate)] = train_run(
            data, finetune, Cell(BASELINE), BASELINE_FLAG, seed, control, logical, resume_at=setting.steps)
    for ratio in ratios:
        cell = Cell("robe", ratio=ratio)
        flag = f"{flags_for(cell, data, setting.embedding_dim, seed)[0]},use_sign=True"
        started = time.perf_counter()
        warm = warm_model(data, setting, trained, flag, seed)
        sketch_seconds = time.perf_counter() - started
        measured, predicted = relative_error(trained, warm)
        scratch = build_model(data, setting, setting.embedding_dim, flag, seed)
        result["ratios"][str(ratio)] = {
            "flag": flag, "sketch_seconds": sketch_seconds,
            "relative_error": measured, "predicted_relative_error": predicted,
            "sketched": {str(f.learning_rate): train_run(data, f, cell, flag, seed,
                                                         warm_model(data, setting, trained, flag, seed), logical,
                                                         resume_at=setting.steps)
                         for f in finetunes},
            "scratch": train_run(data, setting, cell, flag, seed, scratch, logical),
        }
    return result


def _auc_at(run: dict, step: int) -> float:
    """Test AUC of a run's curve at ``step`` (its ``[step, seconds, auc, log-loss]`` rows)."""
    return next(row[2] for row in run["curve"] if row[0] == step)


def mean_std(values: Sequence[float]) -> str:
    return "{:.4f} ± {:.4f}".format(*summarise(values))


def delta(values: Sequence[float], base: Sequence[float], seeds: Sequence[int]) -> str:
    """quality.py's paired Δ (mean ± std over seeds, ``~`` within seed noise) of ``values`` against ``base``."""
    return paired_delta([{"seed": s, "auc": v} for s, v in zip(seeds, values)],
                        [{"seed": s, "auc": b} for s, b in zip(seeds, base)])


def run_meta(args: argparse.Namespace, started: float) -> dict:
    """Command line, date, machine, torch version and threads, wall time of a run."""
    return {"argv": args.argv, "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "seeds": args.seeds, "total_seconds": time.perf_counter() - started}


def markdown(results: dict) -> str:
    meta, runs, info = results["meta"], results["runs"], results["dataset"]
    seeds = meta["seeds"]
    finetune, rates = meta["finetune_steps"], list(runs[0]["uncompressed_finetuned"])
    base = [r["uncompressed"]["auc"] for r in runs]
    se = hanley_mcneil_se(statistics.fmean(base), info["test_positives"], info["num_test"] - info["test_positives"])
    shown = [s for s in SHOWN_STEPS if s < finetune]
    lines = [
        "# Warm start: ROBE sketched from a trained DLRM, real Criteo 8k (issue 9)", "",
        (f"Generated by `python benchmarks/sketch_criteo.py {' '.join(meta['argv'])}` on {meta['date']} "
         f"({meta['machine']}, torch {meta['torch']}, {meta['threads']} thread; {meta['total_seconds']:.0f} s). "
         f"Seeds {meta['seeds']}; mean ± sample std over seeds, Δ paired by seed against the trained "
         f"uncompressed model. Raw numbers: `benchmarks/results/sketch_criteo.json`."), "",
        (f"{info['description']}. Trained {meta['steps']} steps of {meta['batch_size']} (lr "
         f"{meta['learning_rate']}); fine-tuning: {finetune} more steps of the same stream (the second epoch, "
         f"shuffled anew; fresh "
         f"Adagrad state) at lr {' and '.join(rates)}. Test set {info['num_test']} rows: an AUC's sampling error "
         f"is about ±{se:.4f}."), "",
        "| model | bytes | test AUC | Δ AUC vs trained |", "|---|---|---|---|",
        f"| uncompressed, trained | {runs[0]['uncompressed']['embedding_bytes']:,} | {mean_std(base)} | |",
    ]
    for rate in rates:
        values = [r["uncompressed_finetuned"][rate]["auc"] for r in runs]
        lines.append(f"| uncompressed, + {finetune} steps at lr {rate} | "
                     f"{runs[0]['uncompressed']['embedding_bytes']:,} | {mean_std(values)} | {delta(values, base, seeds)} |")
    for ratio in runs[0]["ratios"]:
        cells = [r["ratios"][ratio] for r in runs]
        size = f"{cells[0]['scratch']['embedding_bytes']:,}"
        rows = [(f"sketched {ratio}x, no training", [_auc_at(c["sketched"][rates[0]], 0) for c in cells])]
        for rate in rates:
            rows += [(f"sketched {ratio}x, + {s} steps at lr {rate}", [_auc_at(c["sketched"][rate], s) for c in cells])
                     for s in shown]
            rows.append((f"sketched {ratio}x, + {finetune} steps at lr {rate}",
                         [c["sketched"][rate]["auc"] for c in cells]))
        rows.append((f"ROBE {ratio}x from scratch, {meta['steps']} steps", [c["scratch"]["auc"] for c in cells]))
        lines += [f"| {label} | {size} | {mean_std(values)} | {delta(values, base, seeds)} |" for label, values in rows]
    lines += ["", "Sketch accuracy on the trained tables (‖Ẽ − E‖_F / ‖E‖_F; prediction sqrt(N / |M|)):", "",
              "| ratio | flag (seed 0) | measured | predicted | sketch s |", "|---|---|---|---|---|"]
    for ratio in runs[0]["ratios"]:
        cells = [r["ratios"][ratio] for r in runs]
        lines.append(f"| {ratio}x | `{cells[0]['flag']}` | {mean_std([c['relative_error'] for c in cells])} | "
                     f"{statistics.fmean(c['predicted_relative_error'] for c in cells):.3f} | "
                     f"{statistics.fmean(c['sketch_seconds'] for c in cells):.2f} |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--ratios", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: quality.py's epoch)")
    parser.add_argument("--finetune-steps", type=int, default=112)
    parser.add_argument("--finetune-lrs", nargs="+", type=float, default=[0.05, 0.005],
                        help="one fine-tuning run per learning rate (training: 0.05)")
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--criteo-dir", type=Path, default=CRITEO_DIR)
    parser.add_argument("--json", type=Path, default=RESULTS / "sketch_criteo.json")
    parser.add_argument("--report", type=Path, default=RESULTS / "sketch_criteo.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    return args


def measured(args: argparse.Namespace, run: Callable[[], dict], report: Callable[[dict], str]) -> dict:
    """``run()`` on ``args.threads`` torch threads (restored after); its results written to ``args.json`` and,
    as ``report(results)``, to ``args.report``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run()
    finally:
        torch.set_num_threads(threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    args.report.write_text(report(results))
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    def run() -> dict:
        started = time.perf_counter()
        setting = dataclasses.replace(SETTINGS["criteo8k"], eval_every=args.eval_every,
                                      steps=args.steps or SETTINGS["criteo8k"].steps)
        finetunes = [dataclasses.replace(setting, steps=args.finetune_steps, learning_rate=lr)
                     for lr in args.finetune_lrs]
        data = load_criteo8k(args.criteo_dir)
        runs = [run_seed(data, setting, seed, args.ratios, finetunes) for seed in args.seeds]
        return {
            "meta": {**run_meta(args, started), "steps": setting.steps, "batch_size": setting.batch_size,
                     "learning_rate": setting.learning_rate, "finetune_steps": args.finetune_steps},
            "dataset": {"description": data.description, "cardinalities": data.cardinalities,
                        "num_test": data.num_test, "test_positives": data.test_positives},
            "runs": runs,
        }

    return measured(args, run, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
