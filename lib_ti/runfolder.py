"""The run folder: checked before any model work, locked while a run uses it, swept when a run starts.

* ``check_run``: what can be refused about a run's files before the model loads: the folder (no file,
  not below a file, writable), a run that holds it now, an earlier run or an embedding of the name
  that only ``overwrite`` may replace, and an ``init_from`` holding non-finite values.
* ``RunLock``: one run per folder at a time. The lock file holds its owner's pid, host, boot and
  process start time; a lock whose process is gone (a crash, a kill, a power cut, a reboot) is stale
  and taken over, so no lock stays stuck. A lock taken on another host is never taken over: the
  message names it, for a person to remove once no run is active there.
* ``sweep``: what interrupted runs leave (temp files of interrupted writes, ours and those the
  safetensors library writes itself; checkpoint embeddings whose state was never written or was
  already deleted) is removed at the next start of the run, under its lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from .config import TrainConfig, check_output_dir
from .errors import TIError, warn
from .fileio import TMP_SUFFIX, write_error

LOCK_FILE = ".ti-trainer.lock"
EMBEDDING_SUFFIXES = (".safetensors", ".pt")  # what a run writes as its final embedding
_FRESH_S = 10.0  # an unreadable lock younger than this is being written by its owner right now
_OUR_TEMP = re.compile(r"\.(?P<target>.+)\.[A-Za-z0-9_]{8}" + re.escape(TMP_SUFFIX))  # fileio.atomic_path's
_LIBRARY_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # safetensors' save_file (the Rust tempfile crate)


# ---------------------------------------------------------------------- before any model work
def check_run(cfg: TrainConfig, *, resume: bool) -> None:
    """Refuse, before any model work, a run that could not start or would replace what it may not."""
    check_output_dir(cfg)
    owner = lock_owner(cfg.run_dir)
    if owner is not None:
        raise TIError(_locked_message(cfg.run_dir, owner))
    if not resume:
        check_new_run(cfg)
    if cfg.init_from:
        _check_init_file(cfg.init_from)


def check_new_run(cfg: TrainConfig) -> None:
    """A new run may replace an earlier run of its name, or an embedding file of its name, only with overwrite."""
    from .checkpoints import list_states  # imports torch

    if cfg.overwrite:
        return
    existing = list_states(cfg.run_dir, cfg.name)
    if existing:
        raise TIError(
            f"run folder {str(cfg.run_dir)!r} already holds checkpoints of {cfg.name!r} (last at step "
            f"{existing[-1][0]}): resume it, pick another name or output folder, or allow overwrite"
        )
    lora = cfg.run_dir / f"{cfg.name}-lora.safetensors"  # checkpoints.final_lora_path (it imports torch)
    if lora.exists():
        raise TIError(f"a LoRA of {cfg.name!r} already exists ({str(lora)!r}) and would be replaced or outlive its "
                      "embedding: pick another name or output folder, or allow overwrite")
    for suffix in EMBEDDING_SUFFIXES:
        final = cfg.run_dir / f"{cfg.name}{suffix}"
        continuing = bool(cfg.init_from) and _same_file(cfg.init_from, final)  # training an embedding in place
        if final.exists() and not continuing:
            raise TIError(f"an embedding named {cfg.name!r} already exists ({str(final)!r}) and would be replaced: "
                          "pick another name or output folder, or allow overwrite")


def _check_init_file(path: str) -> None:
    import torch

    from .formats.embeddings import load_embedding

    emb = load_embedding(path)
    broken = [key for key, vec in emb.vectors.items() if not bool(torch.isfinite(vec).all())]
    if broken:
        raise TIError(f"init_from {path!r} holds non-finite values (NaN or infinity) in {', '.join(broken)}: "
                      "training cannot start from it; use another embedding, or init_text")


def _same_file(a: str | Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return b.exists() and os.path.samefile(a, b)
    return False


# ---------------------------------------------------------------------- the lock
class RunLock:
    """Hold ``run_dir`` for one run: ``with RunLock(run_dir): ...``. Raises TIError when another run holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.owner: dict | None = None

    def __enter__(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.run_dir, exc) from None
        me = _identity()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock_owner(self.run_dir)
                if owner is not None:
                    raise TIError(_locked_message(self.run_dir, owner)) from None
                continue  # it was stale and is gone now: try again
            except OSError as exc:
                raise write_error(self.path, exc) from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(me))
            self.owner = me
            return self
        raise TIError(f"could not lock the run folder {str(self.run_dir)!r}: other runs keep taking it; try again")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.owner is not None and _read_lock(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.owner = None


def lock_owner(run_dir: Path) -> dict | None:
    """Who holds ``run_dir`` now, or None; a stale lock (its process is gone) is removed on the way."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    owner = _read_lock(path)
    if owner is None:  # unreadable: half-written by its owner this instant, or left by a crash while writing it
        with contextlib.suppress(OSError):
            if time.time() - path.stat().st_mtime < _FRESH_S:
                return {"pid": "?", "host": "?", "started": "just now"}
            path.unlink(missing_ok=True)
        return None
    if _alive(owner):
        return owner
    warn(f"removing the stale lock of {str(run_dir)!r}: its run (pid {owner.get('pid')}, started "
         f"{owner.get('started')}) ended without releasing it")
    path.unlink(missing_ok=True)
    return None


def _locked_message(run_dir: Path, owner: dict) -> str:
    return (f"run folder {str(run_dir)!r} is in use by another run (pid {owner.get('pid')} on "
            f"{owner.get('host')}, started {owner.get('started')}): wait for it to end or stop it, or use another "
            f"output folder. If no such run exists (another machine shares the folder), delete "
            f"{str(Path(run_dir) / LOCK_FILE)!r}")


def _read_lock(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _identity() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot": _boot_id(), "process_start": _process_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(owner: dict) -> bool:
    """Whether the lock's process still runs; a lock of another host counts as alive (it cannot be checked)."""
    if owner.get("host") != socket.gethostname():
        return True
    if owner.get("boot") and _boot_id() and owner["boot"] != _boot_id():
        return False  # the machine rebooted since
    pid = owner["pid"]
    if not _pid_alive(pid):
        return False
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)  # else the pid was reused


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":
        return _windows_pid_alive(pid)
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        with contextlib.suppress(OSError):
            return stat.read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie has ended
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


def _windows_pid_alive(pid: int) -> bool:
    if sys.platform != "win32":
        return False
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.GetLastError() == 5  # ERROR_ACCESS_DENIED: it exists
    try:
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _process_start(pid: int) -> int | None:
    """Linux: when the process started (clock ticks since boot), which tells a reused pid apart; else None."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
    return None


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


# ---------------------------------------------------------------------- the sweep
def sweep(run_dir: Path, name: str) -> list[Path]:
    """Remove what interrupted runs of ``name`` left in ``run_dir``; call it only holding the run's lock."""
    from .checkpoints import remove_orphans  # imports torch

    removed = []
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "previews"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.is_file() and (_is_our_temp(path.name, name) or _is_library_temp(path)):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed + remove_orphans(run_dir, name)


def _is_our_temp(file_name: str, name: str) -> bool:
    """A temp file of ``fileio.atomic_path`` for one of this run's files (its embeddings, checkpoints, previews,
    config, loss log or latent cache): others' temp files in a shared folder are left alone."""
    match = _OUR_TEMP.fullmatch(file_name)
    if match is None:
        return False
    target = match.group("target")
    return (target.startswith((f"{name}.", f"{name}-", "latents-")) or target in ("config.yaml", "loss.csv"))


def _is_library_temp(path: Path) -> bool:
    """A temp file safetensors' own save_file left (this trainer wrote those before it wrote its own bytes):
    empty, or starting like a safetensors file (8-byte header length, then the JSON header)."""
    if _LIBRARY_TEMP.fullmatch(path.name) is None:
        return False
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(9)
        return len(head) == 0 or (len(head) == 9 and head[8:9] == b"{")
    return False
