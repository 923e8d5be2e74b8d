"""Training checkpoints with ``torch.distributed.checkpoint`` on iopath locations."""

from torchrec_pss.checkpoint.iopath_storage import IopathFileSystem, IopathReader, IopathWriter
from torchrec_pss.checkpoint.training_state import (
    MANIFEST,
    Progress,
    agreed_latest_checkpoint,
    checkpoint_path,
    complete_checkpoints,
    latest_checkpoint,
    load_training_state,
    save_training_state,
    verify_checkpoint,
)

__all__ = [
    "MANIFEST",
    "IopathFileSystem",
    "IopathReader",
    "IopathWriter",
    "Progress",
    "agreed_latest_checkpoint",
    "checkpoint_path",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_training_state",
    "save_training_state",
    "verify_checkpoint",
]
