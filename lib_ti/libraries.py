"""The model libraries we build on (diffusers, transformers), made quiet."""

from __future__ import annotations


def quiet_libraries() -> None:
    """diffusers/transformers log advice meant for their own users (install accelerate, ...) and
    per-file progress bars; our progress reporting is the trainer's events. Errors still show."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
