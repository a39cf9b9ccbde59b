"""Atomic file writes: a crash mid-write never leaves a half-written file behind.

A write that fails (disk full, file-size limit, permissions) is a ``WriteError`` naming the file,
never a library's traceback. ``fault_point`` is the project's one test hook (see there).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import WriteError

TMP_SUFFIX = ".tmp"  # temp files are ".<target name>.<random>.tmp" beside the target
FAULT_ENV = "TI_TRAINER_FAULT"


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``.

    The temp file lives in the same folder so the final ``os.replace`` is atomic on
    every OS. On error the temp file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise write_error(target, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp creates 0600 files; a webui running as another user (Docker, shared servers) must read them.
        os.chmod(tmp_path, _file_mode(target))
        yield tmp_path
        fault_point(f"write {target.name}")
        os.replace(tmp_path, target)
    except OSError as exc:
        if exc.filename not in (None, str(tmp_path), str(target)):
            raise  # about another file (a copy's source, say): not a failure to write this one
        raise write_error(target, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def save_torch(obj: object, target: str | os.PathLike) -> None:
    """``torch.save`` to ``target`` atomically. Serialized in memory first: a torch archive written to a path
    is named after that (temporary, random) path, so identical objects would give different bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(target, buffer.getvalue())


_ADVICE = {
    errno.ENOSPC: "the disk is full; free some space and try again",
    errno.EFBIG: "the file would exceed this process's file-size limit (ulimit -f); raise the limit",
    errno.EACCES: "permission denied; check who owns the folder, or choose another one",
    errno.EPERM: "permission denied; check who owns the folder, or choose another one",
    errno.EROFS: "the file system is read-only; choose another folder",
    getattr(errno, "EDQUOT", -1): "the disk quota is used up; free some space and try again",
}


def write_error(target: Path, exc: OSError) -> WriteError:
    """The one message for a failed write: the file, and what to do."""
    reason = _ADVICE.get(exc.errno or 0) or exc.strerror or type(exc).__name__
    return WriteError(f"could not write {str(target)!r}: {reason}")


def _file_mode(target: Path) -> int:
    """The existing file's mode, else what a plain open() would give under the current umask."""
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fault_point(name: str) -> None:
    """Test hook: when the environment variable ``TI_TRAINER_FAULT`` equals ``name``, the process is killed
    right here, as a SIGKILL or a power cut would kill it (no cleanup runs).

    The fault-injection tests (tests/test_faults.py) use it to crash a run at a chosen point instead of
    at a random moment. Points: ``write <file name>`` (the temp file is written, not yet renamed),
    ``checkpoint <name>-<step>`` (its embedding is written, its state not yet) and ``prune <name>-<step>``
    (its state is deleted, its embedding not yet). Unset in real use: it costs one environment look-up.
    """
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def load_torch(path: str | os.PathLike):
    """``torch.load`` with ``weights_only`` (a restricted unpickler: no pickled code runs).

    Called through ``torch.serialization.load`` on purpose: the webui replaces ``torch.load`` with a
    checker that refuses every file written by a recent torch (its ``.format_version`` entry), so
    our own checkpoints could not be resumed inside the host.
    """
    import torch

    return torch.serialization.load(path, map_location="cpu", weights_only=True)
