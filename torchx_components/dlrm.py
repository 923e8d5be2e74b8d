"""``torchx run dlrm_pss``: the DLRM preset trained with compressed tables under DMP."""

from torchx import specs
from torchx.components.dist import ddp


def dlrm_pss(
    nnodes: int = 1,
    nproc_per_node: int = 1,
    preset: str = "small",
    pss: str = "robe:compression=100,chunk_size=8,min_rows=10000",
    data: str = "synthetic",
    steps: int = 200,
    batch_size: int = 0,
    eval_batches: int = 4,
    eval_every: int = 0,
    checkpoint_dir: str = "",
    checkpoint_every: int = 0,
    summary: str = "dlrm_pss_summary.json",
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
) -> specs.AppDef:
    """Train a DLRM preset (``small`` or ``mlperf_dcnv2``) with the ``--pss`` compression flag.

    Args:
        nnodes: number of nodes
        nproc_per_node: processes (ranks) per node
        preset: model preset (small, mlperf_dcnv2)
        pss: compression flag, e.g. robe:compression=1000,min_rows=100000;t_cat_3=tt:ranks=16
        data: "synthetic" (the embedded generator), comma-separated Criteo text files/URIs (the last held out)
            or npy:<dir> with TorchRec's NumPy Criteo days
        steps: total training steps (a resumed run continues up to this step)
        batch_size: examples per rank and step (0: the preset's global batch / world size)
        eval_batches: evaluation batches per rank (fewer where the held-out data has fewer rounds of one per rank)
        eval_every: also evaluate every N steps (0: only at the end)
        checkpoint_dir: iopath location for checkpoints (empty: none); the job resumes from the newest one there
        checkpoint_every: checkpoint every N steps (0: only at the end); needs checkpoint_dir
        summary: path of the JSON summary written by rank 0
        image: container image (for container schedulers)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
    """
    if checkpoint_every and not checkpoint_dir:
        raise ValueError(f"--checkpoint_every {checkpoint_every} needs --checkpoint_dir")
    args = ["--preset", preset, "--pss", pss, "--data", data, "--steps", str(steps),
            "--eval-batches", str(eval_batches), "--eval-every", str(eval_every), "--summary", summary]
    if checkpoint_dir:
        args += ["--checkpoint-dir", checkpoint_dir, "--checkpoint-every", str(checkpoint_every)]
    if batch_size:
        args += ["--batch-size", str(batch_size)]
    return ddp(*args, m="torchrec_pss.app.dlrm_main", name="dlrm_pss", image=image, cpu=cpu, gpu=gpu, memMB=memMB,
               j=f"{nnodes}x{nproc_per_node}")
