"""Atomic file writes: a crash mid-write never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    The temp file lives in the same folder so the final ``os.replace`` is atomic on
    every OS. On error the temp file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; a webui running as another user (Docker, shared servers) must read them.
    os.chmod(tmp_path, _file_mode(target))
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def _file_mode(target: Path) -> int:
    """The existing file's mode, else what a plain open() would give under the current umask."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_torch(path: str | os.PathLike):
    """``torch.load`` with ``weights_only`` (a restricted unpickler: no pickled code runs).

    Called through ``torch.serialization.load`` on purpose: the webui replaces ``torch.load`` with a
    checker that refuses every file written by a recent torch (its ``.format_version`` entry), so
    our own checkpoints could not be resumed inside the host.
    """
    import torch

    return torch.serialization.load(path, map_location="cpu", weights_only=True)
