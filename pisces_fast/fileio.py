"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The one home of this helper (it imports nothing else of pisces_fast, so every layer can use it): the OT-map
files and fit checkpoints (rewards), the training checkpoints, metrics and reports (training).
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(path: PathLike) -> None:
    """Make a rename inside `path` durable (the directory entry itself is flushed)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None], *, durable: bool = True) -> None:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it over `path` in one `os.replace`.

    durable: fsync the file before the rename and the directory after it, so a power loss cannot leave an empty
    or truncated file under the final name either.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)
