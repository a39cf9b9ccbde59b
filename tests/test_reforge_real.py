"""Opt-in real-host tier: the extension inside a real reForge (Panchovix/stable-diffusion-webui-reForge), over HTTP.

Enable it with ``TI_TRAINER_REFORGE_DIR=<reForge folder>`` (and ``TI_TRAINER_REFORGE_PYTHON=<its python>``,
default ``<reForge>/venv/bin/python``; ``TI_TRAINER_REFORGE_CKPT=<an SD1 single-file checkpoint>``). reForge's
loader only recognises real-size architectures (the project's tiny models are refused: "Could not detect
model type"), so without a checkpoint the test builds a random-weight SD1.5-size one with the project's own
code (~2 GB in float16, ~4.5 GiB of memory while it is built; reForge then needs ~5-6 GiB). The webui runs on
CPU from a fresh data folder holding a copy of this repository as an extension, plus a test-only probe
extension that reports a hash of the loaded model's weights. It never installs or builds reForge; CI does not
set the variable, so the tier is skipped there.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from test_webui_real import PASSWORD, USER, _free_port, run_config, running_webui

from lib_ti.bench.speed import draw_images

REFORGE = os.environ.get("TI_TRAINER_REFORGE_DIR", "")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not REFORGE, reason="reForge real-host tier: set TI_TRAINER_REFORGE_DIR=<a reForge folder> "
                                           "(and TI_TRAINER_REFORGE_PYTHON, TI_TRAINER_REFORGE_CKPT) to run it"),
]

# Test-only: reads the loaded model's weights (UNet, VAE, CLIP: all submodules of sd_model in reForge).
PROBE = '''
import hashlib
from modules import script_callbacks, shared


def _mount(demo, app):
    @app.get("/ti-test/v1/weights")
    def weights():
        digest = hashlib.sha256()
        for name, tensor in sorted(shared.sd_model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy())
        return {"sha256": digest.hexdigest()}


script_callbacks.on_app_started(_mount)
'''


def _checkpoint(folder: Path) -> Path:
    given = os.environ.get("TI_TRAINER_REFORGE_CKPT", "")
    if given:
        return Path(given)
    import gc
    from types import SimpleNamespace

    import torch

    from lib_ti.formats.model_files import save_single_file
    from lib_ti.models.real import build_random_engine

    engine = build_random_engine("sd15", device="cpu", dtype=torch.float32, seed=0)
    first = engine.encoders[0]
    pipe = SimpleNamespace(unet=engine.unet.half(), vae=engine.vae.half(), text_encoder=first.model.half(),
                           tokenizer=first.tokenizer, text_encoder_2=None, tokenizer_2=None)
    ckpt = save_single_file(pipe, "sd1", folder, name="random-sd15", config_folder=False)
    del engine, pipe, first
    gc.collect()
    return ckpt


@pytest.fixture(scope="module")
def reforge(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("reforge-data")
    ckpt = _checkpoint(tmp_path_factory.mktemp("reforge-models"))
    (data_dir / "embeddings").mkdir()
    (data_dir / "config.json").write_text('{"show_progress_type": "Approx cheap"}')  # no VAE-approx download
    extensions = data_dir / "extensions"
    shutil.copytree(ROOT, extensions / "sd-webui-ti-trainer",
                    ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", ".pytest_cache"))
    (extensions / "ti-test-probe" / "scripts").mkdir(parents=True)
    (extensions / "ti-test-probe" / "scripts" / "probe.py").write_text(PROBE)
    port = _free_port()
    python = os.environ.get("TI_TRAINER_REFORGE_PYTHON", str(Path(REFORGE) / "venv" / "bin" / "python"))
    args = [python, "launch.py", "--data-dir", str(data_dir), "--ckpt-dir", str(ckpt.parent), "--ckpt", str(ckpt),
            "--embeddings-dir", str(data_dir / "embeddings"), "--api", "--api-auth", f"{USER}:{PASSWORD}",
            "--port", str(port), "--always-cpu", "--use-cpu", "all", "--no-half", "--precision", "full",
            "--skip-prepare-environment", "--skip-install", "--skip-python-version-check", "--skip-torch-cuda-test",
            "--skip-version-check", "--no-download-sd-model", "--ti-trainer-output-dir", str(data_dir / "ti-runs")]
    with running_webui(args, data_dir, port, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                       DO_NOT_TRACK="1", GRADIO_ANALYTICS_ENABLED="False", cwd=REFORGE) as host:
        yield host


def _weights(reforge) -> str:
    code, out = reforge.call("GET", "/ti-test/v1/weights")
    assert code == 200, out
    return out["sha256"]


def test_the_extension_loads_without_errors_and_serves_the_reforge_adapter(reforge):
    log = reforge.log.read_text(errors="replace")
    assert "lib_ti" not in log and "ti_trainer.py" not in log, log[-4000:]
    code, out = reforge.call("POST", "/ti-trainer/v1/selfcheck?init_text=a%20photo")
    assert code == 200, out
    assert out["family"] == "sd1" and out["vectors"] == 2, out
    assert out["max_abs_diff"]["cond"] < 1e-4 and out["grad_norm"]["clip_l"] > 0 and out["ok"], out


def test_train_through_the_api_leaves_the_weights_and_the_embedding_is_used_in_txt2img(reforge):
    data = draw_images(reforge.data_dir / "ti-data", 4, 64)
    before = _weights(reforge)
    plain = reforge.txt2img("a photo of cat")
    # "name": prompts are the token alone (a random checkpoint's CLIP gives NaN for a few template prompts).
    code, started = reforge.call("POST", "/ti-trainer/v1/train", run_config(data, "rftok", template="name"))
    assert code == 202, started
    status = reforge.wait_for_run(started["run_id"], timeout=900)
    assert status["state"] == "finished" and status["step"] == 6 and not status["warnings"], (status, reforge.tail())
    assert status["last_preview"] and Path(status["last_preview"]).is_file()
    run_dir = Path(status["saved"][0]).parents[1]  # <run>/checkpoints/rftok-3.safetensors
    losses = [float(line.split(",")[1]) for line in (run_dir / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses), losses
    assert _weights(reforge) == before  # the UNet, VAE and CLIP bit for bit as they were
    used = reforge.txt2img("a photo of rftok")
    assert "rftok" in used.get("extra_generation_params", {}).get("TI hashes", ""), used
    assert "TI hashes" not in plain.get("extra_generation_params", {}), plain


@pytest.fixture(scope="module")
def page(reforge):
    from test_webui_browser import chromium_page

    chromium = os.environ.get("TI_TRAINER_CHROMIUM", "")
    if not chromium:
        pytest.skip("the tab in a browser: set TI_TRAINER_CHROMIUM=<a Chromium executable> (playwright installed)")
    with chromium_page(chromium, timeout_ms=120_000) as page:
        yield page


def test_the_train_embedding_tab_trains_and_publishes(reforge, page):
    from test_webui_browser import open_tab, set_value, wait_for_panel

    data = draw_images(reforge.data_dir / "tab-data", 4, 64)
    open_tab(page, reforge.base)
    for name, value in [("name", "tabtok"), ("init_text", "a photo"), ("data_dir", data), ("steps", 4),
                        ("learning_rate", "0.01"), ("width", 64), ("height", 64)]:
        set_value(page, name, value)
    page.locator("#ti_trainer_advanced").locator("button, .label-wrap").first.click()
    for name, value in [("save_every", 2), ("preview_every", 2), ("preview_steps", 2), ("log_every", 1)]:
        set_value(page, name, value)
    page.locator("#ti_trainer_train").click()
    wait_for_panel(page, r"finished[\s\S]*Step\s+4 / 4", timeout=600)
    assert (reforge.data_dir / "embeddings" / "tabtok.safetensors").is_file()
    used = reforge.txt2img("a photo of tabtok")
    assert "tabtok" in used.get("extra_generation_params", {}).get("TI hashes", ""), used
