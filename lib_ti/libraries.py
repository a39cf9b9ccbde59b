"""The model libraries we build on (diffusers, transformers), made quiet."""

from __future__ import annotations

import importlib


def quiet_libraries() -> None:
    """diffusers/transformers log advice meant for their own users (install accelerate, ...) and
    per-file progress bars; our progress reporting is the trainer's events. Errors still show.
    A library that is not installed is skipped: the webui has transformers but no diffusers, and
    scoring there loads CLIP with transformers alone."""
    for library in ("diffusers", "transformers"):
        try:
            logging = importlib.import_module(f"{library}.utils.logging")
        except ModuleNotFoundError:
            continue
        logging.set_verbosity_error()
        logging.disable_progress_bar()
