"""Training checkpoints with ``torch.distributed.checkpoint`` on iopath locations."""

from torchrec_pss.checkpoint.iopath_storage import IopathFileSystem, IopathReader, IopathWriter
from torchrec_pss.checkpoint.training_state import (
    checkpoint_path,
    complete_checkpoints,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)

__all__ = [
    "IopathFileSystem",
    "IopathReader",
    "IopathWriter",
    "checkpoint_path",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_training_state",
    "save_training_state",
]
