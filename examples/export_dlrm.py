"""Serve a compressed DLRM without Python model code: ``torch.export``, save, reload, compare.

    .venv/bin/python examples/export_dlrm.py [--pss FLAG] [--out /tmp/dlrm_pss.pt2]

Builds the ``small`` preset (``torchrec.models.dlrm.DLRM``, 26 tables, d = 16), compresses it with
``--pss`` (by default every method at once: ROBE for the large tables, QR, TT, the hashing trick and
MLET for one table each), exports it with :func:`torchrec_pss.export.export_for_inference` (batch
size and id counts symbolic), writes it with ``torch.export.save``, loads it back with
:func:`torchrec_pss.export.load_exported` (``torch.export.load`` with the methods' ops registered) and
checks that the reloaded program gives the eager model's outputs on batches of several sizes.
Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Iterable

import torch
from torch import nn
from torch.export import ExportedProgram
from torchrec.datasets.utils import Batch

from torchrec_pss import compress_, parse_compression_flag
from torchrec_pss.datasets import SyntheticCriteo
from torchrec_pss.export import export_for_inference, load_exported
from torchrec_pss.models import PRESETS

DEFAULT_PSS = (
    "robe:compression=100,min_rows=40000;t_cat_1=qr:collisions=200;t_cat_2=tt:ranks=8;"
    "t_cat_3=hashing:compression=10;t_cat_4=mlet:inner_dim=4"
)


def build_model(preset: str = "small", pss: str = DEFAULT_PSS, seed: int = 0) -> nn.Module:
    """The preset's DLRM on the CPU with its tables compressed as the ``pss`` flag says."""
    torch.manual_seed(seed)
    model = PRESETS[preset].build("cpu")
    return compress_(model, parse_compression_flag(pss))


def export_and_reload(model: nn.Module, example: Batch, path: str | os.PathLike[str]) -> ExportedProgram:
    """Export ``model`` on ``example`` (dense ``[B, 13]``, sparse KJT), save it to ``path``, load it back."""
    program = export_for_inference(model, (example.dense_features, example.sparse_features))
    torch.export.save(program, path)
    return load_exported(path)


def max_difference(model: nn.Module, program: ExportedProgram, batches: Iterable[Batch]) -> float:
    """Largest ``|program - model|`` logit over ``batches``; raises if any output is not close (rtol = atol = 1e-6)."""
    served = program.module()
    was_training = model.training
    model.eval()
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = model(batch.dense_features, batch.sparse_features)
            actual = served(batch.dense_features, batch.sparse_features)
            torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
            worst = max(worst, (actual - expected).abs().max().item())
    model.train(was_training)
    return worst


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--pss", default=DEFAULT_PSS, help="compression flag (torchrec_pss.parse_compression_flag)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the example the export traces")
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "dlrm_pss.pt2"),
                        help="where to write the exported program")
    args = parser.parse_args(argv)

    model = build_model(args.preset, args.pss)
    data = SyntheticCriteo(PRESETS[args.preset].num_embeddings, seed=1)
    start = time.perf_counter()
    program = export_and_reload(model, data.batch(args.batch_size), args.out)
    seconds = time.perf_counter() - start
    sizes = [args.batch_size, 3 * args.batch_size + 1, 1]
    summary = {
        "path": str(args.out),
        "file_bytes": os.path.getsize(args.out),
        "export_save_load_s": round(seconds, 2),
        "checked_batch_sizes": sizes,
        "max_abs_difference": max_difference(model, program, (data.batch(size) for size in sizes)),
        "custom_ops": sorted({str(n.target) for n in program.graph.nodes if "torchrec_pss" in str(n.target)}),
    }
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
