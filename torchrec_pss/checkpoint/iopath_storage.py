"""``torch.distributed.checkpoint`` storage on any iopath location (local path or registered URI prefix).

DCP's :class:`FileSystemWriter` / :class:`FileSystemReader` do their I/O through a ``FileSystemBase``;
:class:`IopathFileSystem` implements it with an iopath ``PathManager``, so a checkpoint written with
:class:`IopathWriter` goes wherever the manager's handlers reach. DCP writes the ``.metadata`` file
last (through a temporary name and a rename), so a directory without it is an incomplete checkpoint.
"""

from __future__ import annotations

import io
import os
import posixpath
import urllib.parse
from contextlib import contextmanager
from typing import Generator

from iopath.common.file_io import PathManager, g_pathmgr
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter


def local_file_uri(path: str) -> str:
    """``path`` with a ``file://`` URI turned into the local path it names (``file:///tmp/x`` -> ``/tmp/x``, percent
    escapes decoded); anything else unchanged. iopath's native handler would read ``file:///tmp/x`` as the relative
    path ``file:/tmp/x``. Raises ``ValueError`` for a ``file://`` URI naming another host (``file://ckpt/x``)."""
    parts = urllib.parse.urlsplit(path)
    if parts.scheme != "file":
        return path
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"{path!r}: a file:// URI must name a local absolute path (file:///dir/...), not host "
                         f"{parts.netloc!r}")
    return urllib.parse.unquote(parts.path)


class IopathFileSystem(FileSystemBase):
    """DCP file operations through ``path_manager`` (iopath's global manager by default)."""

    def __init__(self, path_manager: PathManager | None = None) -> None:
        self.path_manager = path_manager or g_pathmgr

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with self.path_manager.open(os.fspath(path), mode) as stream:
            yield stream

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return posixpath.join(os.fspath(path), suffix)

    def init_path(self, path: str | os.PathLike, **kwargs: object) -> str:
        return os.fspath(path)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        if not self.path_manager.mv(os.fspath(path), os.fspath(new_path)):
            raise OSError(f"could not rename {os.fspath(path)!r} to {os.fspath(new_path)!r}")

    def mkdir(self, path: str | os.PathLike) -> None:
        self.path_manager.mkdirs(os.fspath(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))

    def exists(self, path: str | os.PathLike) -> bool:
        return self.path_manager.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.path_manager.rm(os.fspath(path))

    def ls(self, path: str | os.PathLike) -> list[str]:
        return [self.concat_path(path, name) for name in self.path_manager.ls(os.fspath(path))]


class IopathWriter(FileSystemWriter):
    """A DCP storage writer into the iopath directory ``path`` (created if missing)."""

    def __init__(self, path: str | os.PathLike, path_manager: PathManager | None = None, **kwargs: object) -> None:
        super().__init__(path, **kwargs)
        self.fs = IopathFileSystem(path_manager)
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return IopathFileSystem.validate_checkpoint_id(checkpoint_id)


class IopathReader(FileSystemReader):
    """A DCP storage reader of the iopath directory ``path``."""

    def __init__(self, path: str | os.PathLike, path_manager: PathManager | None = None) -> None:
        super().__init__(path)
        self.fs = IopathFileSystem(path_manager)
        self.path = self.fs.init_path(path)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return IopathFileSystem.validate_checkpoint_id(checkpoint_id)
