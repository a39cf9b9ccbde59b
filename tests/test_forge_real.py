"""Opt-in real-host tier: the extension inside a real Forge (lllyasviel/stable-diffusion-webui-forge), over HTTP.

Enable it with ``TI_TRAINER_FORGE_DIR=<Forge folder>`` (``TI_TRAINER_FORGE_PYTHON=<its python>``, default
``<forge>/venv/bin/python``) and ``TI_TRAINER_FORGE_CKPT=<a checkpoint file Forge loads>``. Forge recognises a
checkpoint by its state dict against the architectures it ships, so the tiny test models do not load: without
``TI_TRAINER_FORGE_CKPT`` the test builds an SD1.5-size random-weight one with the project's code (2 GB on disk,
about 5 GB of memory while building, 7 GB in Forge). Forge starts on CPU (``--always-cpu``) on 127.0.0.1 with a
fresh data folder holding a copy of this working tree as ``extensions/sd-webui-ti-trainer``; nothing is installed
or built in the Forge folder. ``TI_TRAINER_CHROMIUM=<a Chromium executable>`` (with the ``playwright`` package
importable) adds the tab through a browser. CI sets none of these, so the tier is skipped there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from lib_ti.bench.speed import draw_images

FORGE = os.environ.get("TI_TRAINER_FORGE_DIR", "")
CKPT = os.environ.get("TI_TRAINER_FORGE_CKPT", "")
CHROMIUM = os.environ.get("TI_TRAINER_CHROMIUM", "")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not FORGE, reason="Forge tier: set TI_TRAINER_FORGE_DIR=<a Forge folder> (and "
                                         "TI_TRAINER_FORGE_PYTHON=<its python>, TI_TRAINER_FORGE_CKPT=<a checkpoint "
                                         "it loads>) to run it"),
]


def _checkpoint(folder: Path) -> Path:
    """TI_TRAINER_FORGE_CKPT, else an SD1.5-size random-weight checkpoint built here (Forge's loader needs the
    real architecture: the tiny models' state dicts match none of its configs)."""
    if CKPT:
        return Path(CKPT)
    import torch

    from lib_ti.formats.model_files import save_single_file
    from lib_ti.models.real import build_random_engine

    engine = build_random_engine("sd15", device="cpu", dtype=torch.float32, seed=0)
    first = engine.encoders[0]
    pipe = type("Pipe", (), {"unet": engine.unet.half(), "vae": engine.vae.half(), "text_encoder": first.model.half(),
                             "tokenizer": first.tokenizer, "text_encoder_2": None, "tokenizer_2": None})()
    return save_single_file(pipe, "sd1", folder, name="random-sd15", config_folder=False)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    from test_webui_real import _free_port, running_webui

    data_dir = tmp_path_factory.mktemp("forge-data")
    ckpt = _checkpoint(tmp_path_factory.mktemp("forge-models"))
    extension = data_dir / "extensions" / "sd-webui-ti-trainer"
    # A copy of the working tree, as "Install from URL" leaves it (minus .git, whose remote a local clone lacks).
    shutil.copytree(ROOT, extension,
                    ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", ".pytest_cache"))
    (data_dir / "embeddings").mkdir()
    # Live previews with the default "Approx NN" would try to download a VAE approximation.
    (data_dir / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}))
    port = _free_port()
    python = os.environ.get("TI_TRAINER_FORGE_PYTHON", str(Path(FORGE) / "venv" / "bin" / "python"))
    args = [python, "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-python-version-check",
            "--skip-torch-cuda-test", "--skip-version-check", "--always-cpu", "--api", "--port", str(port),
            "--data-dir", str(data_dir), "--ckpt-dir", str(ckpt.parent), "--ckpt", str(ckpt),
            "--embeddings-dir", str(data_dir / "embeddings"), "--no-download-sd-model",
            # Gradio 4 serves only allowed folders: Forge's own scripts lie outside a separate data folder.
            "--gradio-allowed-path", FORGE]
    with running_webui(args, data_dir, port, cwd=FORGE, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")) as host:
        host.auth = {}
        host.checkpoint = ckpt
        yield host


@pytest.fixture(scope="module")
def dataset(forge):
    return draw_images(forge.data_dir / "ti-data", 4, 64)  # inside the data folder: requests may read it


def txt2img(forge, prompt: str) -> tuple[str, str]:
    """(infotext, sha256 of the image) of a 64 px, 2-step Euler render at seed 1."""
    code, out = forge.call("POST", "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                                          "sampler_name": "Euler", "seed": 1, "cfg_scale": 5})
    assert code == 200, out
    return json.loads(out["info"])["infotexts"][0], hashlib.sha256(base64.b64decode(out["images"][0])).hexdigest()


def selfcheck(forge) -> dict:
    code, out = forge.call("POST", "/ti-trainer/v1/selfcheck?init_text=a%20photo&weights=true")
    assert code == 200, out
    return out


def test_the_extension_loads_without_errors(forge):
    log = forge.log.read_text(errors="replace")
    assert "Traceback" not in log and "lib_ti" not in log and "ti_trainer.py" not in log, log[-4000:]
    assert "unexpected argument for" not in log  # Forge's Gradio 4 shim drops unknown keywords with this warning


def test_selfcheck_matches_forges_conditioning_and_reaches_the_vectors(forge):
    txt2img(forge, "a photo")  # Forge loads its checkpoint at the first generation
    out = selfcheck(forge)
    assert out["family"] == "sd1" and out["vectors"] == 2 and set(out["grad_norm"]) == {"clip_l"}, out
    assert out["max_abs_diff"]["cond"] < 1e-4 and out["grad_norm"]["clip_l"] > 0 and out["ok"], out


def test_train_through_the_api_then_use_it_in_txt2img_at_once(forge, dataset):
    name = "forgetok"
    prompt = f"a photo of {name} on a table"
    info_before, image_before = txt2img(forge, prompt)
    weights_before = selfcheck(forge)["weights_digest"]
    config = {"name": name, "init_text": "a photo", "num_vectors": 2, "data_dir": str(dataset), "width": 64,
              "height": 64, "batch_size": 1, "learning_rate": "0.01", "steps": 4, "save_every": 2, "keep_last": 0,
              "preview_every": 4, "preview_steps": 2, "log_every": 1}
    code, started = forge.call("POST", "/ti-trainer/v1/train", config)
    assert code == 202, started
    status = forge.wait_for_run(started["run_id"], timeout=1200)
    assert status["state"] == "finished" and status["step"] == 4 and status["error"] is None, (status, forge.tail())
    assert status["loss"] is not None and status["last_preview"] and Path(status["last_preview"]).is_file()
    assert (forge.data_dir / "embeddings" / f"{name}.safetensors").is_file()
    assert selfcheck(forge)["weights_digest"] == weights_before  # the run left Forge's weights bit-identical
    info_after, image_after = txt2img(forge, prompt)  # no restart, no refresh: Forge uses it at once
    assert f"TI: {name}" in info_after and "TI:" not in info_before, info_after
    assert image_after != image_before
    checkpoint_info, _ = txt2img(forge, "a photo of forgetok-2")  # a published checkpoint, by its own name
    assert "TI: forgetok-2" in checkpoint_info, checkpoint_info


@pytest.mark.skipif(not CHROMIUM, reason="Forge tab: set TI_TRAINER_CHROMIUM=<a Chromium executable> "
                                         "(and install the playwright package; no browser is downloaded)")
def test_train_from_the_top_level_tab(forge, dataset):
    sync_api = pytest.importorskip("playwright.sync_api", reason="Forge tab: pip install playwright")
    name = "tabtok"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(forge.base)
        page.locator("#tabs button", has_text=re.compile(r"^\s*Train Embedding\s*$")).first.click()
        page.locator("#ti_trainer_panel").wait_for(state="visible")

        def fill(field: str, value) -> None:
            box = page.locator(f"#ti_trainer_{field} :is(input[type=number], input[type=text], textarea)").first
            box.fill(str(value))
            box.press("Tab")

        for field, value in [("name", name), ("init_text", "a photo"), ("data_dir", dataset), ("steps", 2),
                             ("width", 64), ("height", 64)]:
            fill(field, value)
        page.locator("#ti_trainer_advanced").locator("button, .label-wrap").first.click()
        for field, value in [("save_every", 2), ("preview_every", 2), ("preview_steps", 2), ("batch_size", 1)]:
            fill(field, value)
        page.locator("#ti_trainer_train").click()
        deadline, text = time.time() + 900, ""
        while time.time() < deadline and not re.search(r"finished|failed|stopped", text):
            time.sleep(1)
            text = page.locator("#ti_trainer_run").first.inner_text()
        browser.close()
    assert re.search(r"finished", text), (text, errors, forge.tail())
    assert not errors, errors
    info, _ = txt2img(forge, f"a photo of {name}")
    assert f"TI: {name}" in info, info
