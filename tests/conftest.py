"""Shared fixtures. ``tiny_model`` builds each tiny SD model once per test session; ``cli`` runs the command line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One torch thread for the tests and the commands they start: the tiny models' tensors are too small to
# split between cores, and two threads competing with any other process on a 2-core machine made the
# fast tier 1.5x slower (97 s vs 64 s measured side by side) and whole runs up to 5x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # let tests import lib_ti without installing the project
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory ``tiny_model(family, single_file=False, prediction_type=None) -> Path``.

    Returns the diffusers folder, or with ``single_file=True`` the original-layout
    ``.safetensors`` (its ``.yaml`` and ``<stem>.diffusers`` config folder lie beside it).
    Each combination is built once per session (seed 0) and shared: treat it as read-only.
    """
    from lib_ti.models.tiny import build_tiny_model

    built: dict[tuple, Path] = {}

    def make(family: str, single_file: bool = False, prediction_type: str | None = None) -> Path:
        key = (family, single_file, prediction_type)
        if key not in built:
            label = f"tiny-{family}-{'single' if single_file else 'diffusers'}-{prediction_type or 'default'}"
            out = tmp_path_factory.mktemp(label)
            built[key] = build_tiny_model(family, out, single_file=single_file, prediction_type=prediction_type)
        return built[key]

    return make


@pytest.fixture(scope="module")
def engines(tiny_model):
    """``engines(family) -> StandaloneEngine``: each tiny model loaded once per test module."""
    from lib_ti.engines.standalone import StandaloneEngine

    cache: dict[str, StandaloneEngine] = {}

    def get(family: str) -> StandaloneEngine:
        if family not in cache:
            cache[family] = StandaloneEngine.load(tiny_model(family))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 4 distinct 64x64 images, once per test module."""
    from lib_ti.bench.speed import draw_images

    return draw_images(tmp_path_factory.mktemp("images"), 4, 64)


@pytest.fixture
def cli(capsys):
    """``cli(*args) -> (exit code, stdout, stderr)``: ``python -m lib_ti ARGS`` in this process.

    The fast tier checks the command line this way (a fresh interpreter costs 3-5 s of imports per call);
    the slow tier's journeys start real ``python -m lib_ti`` processes.
    """
    from lib_ti.cli import main

    def run(*args) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse: --help and usage errors
            code = exc.code if isinstance(exc.code, int) else 2
        out, err = capsys.readouterr()
        return code, out, err

    return run
