"""The webui's folders, and publishing what a run saves into them (shared by every A1111-style webui).

Where to write: the embeddings and Lora folders, the run folders' root. What a confined request may
read: the data folder, the template folder and the allowed roots. Publishing copies a file into the
embeddings folder and has the model side (``Host.register_file``) make it usable in prompts at once.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from ..fileio import atomic_path
from .host import Host
from .settings import setting

OUTPUT_SUBDIR = ("textual_inversion", "ti-trainer")


def embeddings_dir() -> Path:
    from modules import shared

    return Path(shared.cmd_opts.embeddings_dir)


def output_root() -> Path:
    """--ti-trainer-output-dir, else the setting, else <data dir>/textual_inversion/ti-trainer."""
    from modules import paths_internal, shared

    flag = getattr(shared.cmd_opts, "ti_trainer_output_dir", None)
    return Path(flag or setting("output_dir") or Path(paths_internal.data_path).joinpath(*OUTPUT_SUBDIR))


def checkpoint_subdir() -> str:
    return setting("checkpoint_subdir") or "ti-trainer"


def data_folder() -> Path:
    """The webui's data folder (--data-dir; by default its install folder)."""
    from modules import paths_internal

    return Path(paths_internal.data_path)


def templates_dir() -> Path:
    """The host's own textual-inversion template folder (--textual-inversion-templates-dir)."""
    from modules import shared

    return Path(shared.cmd_opts.textual_inversion_templates_dir)


def extra_read_roots() -> list[Path]:
    """The folders --ti-trainer-allowed-roots and the allowed-roots setting add, each a list like PATH's."""
    from modules import shared

    text = "\n".join([getattr(shared.cmd_opts, "ti_trainer_allowed_roots", None) or "", str(setting("allowed_roots"))])
    return [Path(part.strip()).expanduser() for line in text.splitlines() for part in line.split(os.pathsep)
            if part.strip()]


def ui_exposed() -> bool:
    """Whether others than the machine's own user may reach the UI: the host's own rule (--share, --listen,
    --ngrok or --server-name, without --enable-insecure-extension-access), which it uses for its Extensions tab."""
    from modules import shared

    return bool(getattr(shared.cmd_opts, "disable_extension_access", False))


def publish(host: Host, path: Path, target: Path) -> Path:
    """Copy a saved embedding into the embeddings folder (atomically) and register it with the host now."""
    copy_file(path, target)
    host.register_file(target)
    return target


def copy_file(path: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(path, tmp)


def lora_dir() -> Path:
    """The host's Lora folder (--lora-dir, which its built-in Lora extension adds; by default models/Lora)."""
    from modules import paths, shared

    return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")


def publish_lora(path: Path, target: Path) -> Path:
    """Copy a pivotal run's LoRA into the Lora folder (atomically) and have the host list it at once, so that
    ``<lora:name:1>`` works in the next txt2img without the refresh button."""
    copy_file(path, target)
    networks = sys.modules.get("networks")  # the built-in Lora extension's module, when it is enabled
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()
    return target
