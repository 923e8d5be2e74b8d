"""Train a DLRM preset with compressed tables under DistributedModelParallel (run it with torchrun / torchx).

    torchrun --nproc_per_node 2 -m torchrec_pss.app.dlrm_main --preset small \\
        --pss "robe:compression=100,min_rows=10000" --steps 200 --summary summary.json

Builds the preset on meta, compresses it with ``compress_`` and the ``--pss`` flag, plans with
``make_planner`` (compressed tables replicated, the rest sharded by TorchRec), trains with
``TrainPipelineSparseDist`` and fused Adagrad on the synthetic Criteo-like stream, Criteo text files or
TorchRec's NumPy Criteo days (each rank its own slice, every rank as many batches), evaluates AUC and
log-loss (torchmetrics, synced across ranks) every ``--eval-every`` steps and at the end, checkpoints to an
iopath location with ``torch.distributed.checkpoint`` (resuming from the newest complete checkpoint there)
and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.models.dlrm import DLRMTrain
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from torchrec_pss import compress_, parse_compression_flag
from torchrec_pss.checkpoint import agreed_latest_checkpoint, load_training_state, save_training_state
from torchrec_pss.datasets import SyntheticCriteo, criteo_npy_batches, criteo_text_batches, npy_days, read_criteo_rows
from torchrec_pss.distributed import get_pss_sharders, make_planner
from torchrec_pss.models import PRESETS

EVAL_STREAM = 1_000_000


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers ``>= minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--pss", default="robe:compression=100,chunk_size=8,min_rows=10000",
                        help="compression flag; '' or 'plain' trains uncompressed")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (the embedded generator); comma-separated Criteo text files / URIs "
                             "(day-format TSV or CSV with header), the last file held out for evaluation; or "
                             "'npy:<dir>' with TorchRec's NumPy days day_<i>_{dense,sparse,labels}.npy, the first "
                             "half of the last day held out")
    parser.add_argument("--steps", type=int_at_least(1), default=200,
                        help="total training steps (including resumed ones)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=None,
                        help="per rank; default: the preset's / world size")
    parser.add_argument("--eval-batches", type=int_at_least(1), default=4,
                        help="evaluation batches per rank (fewer where the held-out data has fewer rounds of one "
                             "batch per rank)")
    parser.add_argument("--eval-every", type=int_at_least(0), default=0,
                        help="also evaluate every N steps (0: only at the end)")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="iopath location for checkpoints; a run resumes from the newest complete one there")
    parser.add_argument("--checkpoint-every", type=int_at_least(0), default=0,
                        help="checkpoint every N steps (0: only at the end); needs --checkpoint-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", type=Path, default=None, help="JSON summary path (rank 0 writes it)")
    args = parser.parse_args(argv)
    if args.checkpoint_every and not args.checkpoint_dir:
        parser.error("--checkpoint-every needs --checkpoint-dir")
    return args


def deal(batches: Iterable[Batch], rank: int, world: int) -> Iterator[Batch]:
    """Batch ``rank`` of every complete round of ``world`` consecutive ``batches``: a trailing incomplete round
    is dropped, so that every rank gets as many batches."""
    mine: Batch | None = None
    for index, batch in enumerate(batches):
        if index % world == rank:
            mine = batch
        if index % world == world - 1:
            yield mine


def require_a_batch_per_rank(what: str, rows: int, batch_size: int, world: int) -> None:
    """ValueError unless ``rows`` make at least one full batch of ``batch_size`` for each of ``world`` ranks."""
    if rows // batch_size < world:
        raise ValueError(
            f"--data: {what} has {rows} rows, {rows // batch_size} full batches of {batch_size} (the batch size per "
            f"rank), but world size {world} needs at least {world} (one per rank): give more rows, a smaller "
            f"--batch-size or fewer ranks")


def data_streams(args: argparse.Namespace, num_embeddings: Sequence[int], batch_size: int, rank: int, world: int
                 ) -> tuple[Callable[[int], Iterator[Batch]], Callable[[], Iterable[Batch]]]:
    """A maker of this rank's training batches from a data position up to step ``args.steps``, and a maker of
    its evaluation batches.

    Synthetic: one planted model, a sample stream per rank. Files: every rank reads them in order and keeps
    its batch of every complete round of ``world`` batches (``deal``), cycling the training files as needed,
    so every rank runs as many evaluation batches (at most ``--eval-batches``). NumPy days: TorchRec's
    reader, which also keeps complete rounds only. Data that cannot give every rank a training batch and
    an evaluation batch raises ``ValueError`` here, on every rank alike, before anything is trained.
    """
    if args.data == "synthetic":
        def synthetic_train(start: int) -> Iterator[Batch]:
            stream = SyntheticCriteo(num_embeddings, seed=args.seed, stream=rank).batches(batch_size, args.steps)
            return itertools.islice(stream, start, None)

        return synthetic_train, lambda: SyntheticCriteo(
            num_embeddings, seed=args.seed, stream=EVAL_STREAM + rank).batches(batch_size, args.eval_batches)
    if args.data.startswith("npy:"):
        root = args.data[len("npy:"):]
        day_rows = npy_days(root)
        days = list(day_rows)
        if len(days) < 2:
            raise ValueError(f"--data {args.data}: needs at least two days (training, then one held out), got {days}")
        train_rows = sum(day_rows[day] for day in days[:-1])
        require_a_batch_per_rank(f"training data (days {days[:-1]} of {root})", train_rows, batch_size, world)
        held_out = day_rows[days[-1]]
        require_a_batch_per_rank(f"held-out data (the first half of day {days[-1]} of {root})", (held_out + 1) // 2,
                                 batch_size, world)

        def npy_train(start: int) -> Iterator[Batch]:
            epochs = itertools.chain.from_iterable(
                criteo_npy_batches(root, days[:-1], batch_size, num_embeddings, rank, world) for _ in itertools.count())
            return itertools.islice(epochs, start, args.steps)

        return npy_train, lambda: itertools.islice(
            criteo_npy_batches(root, days[-1:], batch_size, num_embeddings, rank, world, stage="val"), args.eval_batches)
    paths = [p for p in args.data.split(",") if p]
    if len(paths) < 2:
        raise ValueError(f"--data needs at least two Criteo files (training, then one held out), got {paths}")
    train_files, eval_files = paths[:-1], paths[-1:]
    for what, files in (("training data", train_files), ("held-out data", eval_files)):
        rows = itertools.chain.from_iterable(read_criteo_rows(path, num_embeddings) for path in files)
        count = sum(1 for _ in itertools.islice(rows, world * batch_size))
        require_a_batch_per_rank(f"{what} ({','.join(files)})", count, batch_size, world)

    def files_train(start: int) -> Iterator[Batch]:
        passes = itertools.chain.from_iterable(
            deal(criteo_text_batches(train_files, batch_size, num_embeddings, drop_last=True), rank, world)
            for _ in itertools.count())
        return itertools.islice(passes, start, args.steps)

    return files_train, lambda: itertools.islice(
        deal(criteo_text_batches(eval_files, batch_size, num_embeddings, drop_last=True), rank, world),
        args.eval_batches)


def warn_if_the_data_position_moves(path: str, data_position: int, saved_batch: int, global_batch: int) -> None:
    """Warn when a resume reads its data from another example than the checkpoint had reached: the position is
    kept in batches per rank, which mean the same examples only for the same global batch (``--nproc_per_node`` ×
    ``--batch-size``; any split of it into ranks and batches reads the same rows)."""
    if not saved_batch or saved_batch == global_batch:
        return
    reached, start = data_position * saved_batch, data_position * global_batch
    what = f"examples {reached}–{start - 1} are skipped" if start > reached else f"examples {start}–{reached - 1} " \
        "are trained again"
    warnings.warn(f"resuming {path}: it took {saved_batch} examples per step, this job {global_batch} "
                  f"(--nproc_per_node × --batch-size); the data position ({data_position} batches per rank) starts "
                  f"this job at example {start} where the checkpoint had reached {reached}: {what}", stacklevel=2)


def evaluate(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device) -> tuple[float, float]:
    """Test AUC and mean log-loss of ``model`` (a DMP-wrapped ``DLRMTrain``) over every rank's ``batches``."""
    auroc = BinaryAUROC().to(device)
    log_loss, count = torch.zeros((), device=device), torch.zeros((), device=device)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(device)
            _, (_, logits, labels) = model(batch)
            auroc.update(torch.sigmoid(logits), labels.long())
            log_loss += torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), reduction="sum")
            count += labels.numel()
    model.train()
    dist.all_reduce(log_loss)
    dist.all_reduce(count)
    return auroc.compute().item(), (log_loss / count).item()


def init_process_group() -> None:
    """torchrun's environment, or a single-rank group, so that DMP runs the same way in both."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, join (or make) the process group, train and return the summary."""
    args = parse_args(argv)
    init_process_group()
    try:
        return train(args)
    finally:
        dist.destroy_process_group()


def train(args: argparse.Namespace) -> dict:
    """The job in the current process group: data and resume checks, training, evaluation, the summary."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    preset = PRESETS[args.preset]
    batch_size = args.batch_size or max(1, preset.batch_size // world)
    train_from, eval_batches = data_streams(args, preset.num_embeddings, batch_size, rank, world)
    found = agreed_latest_checkpoint(args.checkpoint_dir) if args.checkpoint_dir else None
    if found is not None and found[0] > args.steps:
        raise ValueError(f"--checkpoint-dir {args.checkpoint_dir}: the checkpoint is at step {found[0]}, --steps "
                         f"{args.steps}: ask for at least {found[0]} steps or use another --checkpoint-dir")
    torch.manual_seed(args.seed)

    model = DLRMTrain(preset.build("meta"))
    compress_(model, parse_compression_flag(args.pss or "plain"))
    ebc = model.model.sparse_arch.embedding_bag_collection
    logical = sum(t.num_embeddings * t.embedding_dim * 4 for t in ebc.embedding_bag_configs())
    stored = sum(ebc.num_bytes().values())
    apply_optimizer_in_backward(torch.optim.Adagrad, ebc.parameters(), {"lr": preset.learning_rate})
    sharders = get_pss_sharders() + get_default_sharders()
    # Plain tables table-wise: TorchRec's own DATA_PARALLEL tables would drop their in-backward optimizer.
    plain_tables = {
        t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])
        for t in ebc.embedding_bag_configs() if t.name not in ebc.compression
    }
    planner = make_planner(model, Topology(world_size=world, compute_device=device.type), constraints=plain_tables)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=device, plan=plan, sharders=sharders)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=preset.learning_rate))
    pipeline = TrainPipelineSparseDist(dmp, dense, device)

    optimizers = {"fused": dmp.fused_optimizer, "dense": dense}
    first_step = data_position = 0
    global_batch = world * batch_size
    if found is not None:
        first_step, data_position, saved_batch = load_training_state(found[1], dmp, optimizers)
        if rank == 0:
            print(f"resumed from {found[1]} (step {first_step}, data position {data_position})")
            warn_if_the_data_position_moves(found[1], data_position, saved_batch, global_batch)

    train_batches = train_from(data_position)
    start = time.perf_counter()
    losses, history = [], []
    for step in tqdm(range(first_step + 1, args.steps + 1), disable=rank != 0, desc=f"train {args.preset}",
                     initial=first_step, total=args.steps, mininterval=5.0):
        loss, _, _ = pipeline.progress(train_batches)
        losses.append(float(loss))
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            pipeline.detach()  # the sharded modules' own forward for evaluation; progress() re-attaches
            auc, log_loss = evaluate(dmp, eval_batches(), device)
            history.append({"step": step, "seconds": time.perf_counter() - start, "auc": auc, "log_loss": log_loss})
        if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
            save_training_state(args.checkpoint_dir, step, dmp, optimizers, global_batch=global_batch)
    seconds = time.perf_counter() - start
    pipeline.detach()
    if args.checkpoint_dir and args.steps > first_step:
        save_training_state(args.checkpoint_dir, args.steps, dmp, optimizers, global_batch=global_batch)

    auc, log_loss = evaluate(dmp, eval_batches(), device)
    history.append({"step": args.steps, "seconds": seconds, "auc": auc, "log_loss": log_loss})
    trained = args.steps - first_step
    summary = {
        "preset": args.preset, "pss": args.pss, "data": args.data, "world_size": world, "steps": args.steps,
        "resumed_from_step": first_step, "batch_size_per_rank": batch_size,
        "auc": auc, "log_loss": log_loss, "evaluations": history,
        "first_train_loss": losses[0] if losses else None, "last_train_loss": losses[-1] if losses else None,
        "embedding_bytes": stored, "logical_embedding_bytes": logical, "compression_ratio": logical / stored,
        "examples_per_second": trained * global_batch / seconds if seconds > 0 else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if rank == 0:
        print(json.dumps(summary, indent=2))
        if args.summary is not None:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
