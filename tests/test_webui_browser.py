"""Opt-in browser tier: the Train Embedding tab driven in headless Chromium against a real webui (v1.10.1).

Enable it with ``TI_TRAINER_WEBUI_DIR=<webui folder>`` (``TI_TRAINER_WEBUI_PYTHON=<its python>``, default
``<webui>/venv/bin/python``) and ``TI_TRAINER_CHROMIUM=<a Chromium executable>`` (the distribution's; the
``playwright`` package must be importable, and it never downloads a browser: Chromium is launched from that
path). ``TI_TRAINER_SHOTS=<folder>`` keeps a 1600x1000 screenshot of each stage. The webui starts on
127.0.0.1 on CPU with the shipped micro model, as the real-host tier starts it.

The journey, as a user does it: fill the form, train the micro model, see the host's progress bar as a
percentage and the run panel update, a second Train refused naming the run, reload the page and find the
run again, Stop it, Resume (refused with the form's defaults, listing the differences; Load run; Resume
continues with the saved settings), find the embedding and its checkpoints in the Textual Inversion cards,
and a txt2img with a checkpoint's name listing that checkpoint in "TI hashes".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

WEBUI = os.environ.get("TI_TRAINER_WEBUI_DIR", "")
CHROMIUM = os.environ.get("TI_TRAINER_CHROMIUM", "")
SHOTS = os.environ.get("TI_TRAINER_SHOTS", "")
ROOT = Path(__file__).resolve().parents[1]
NAME = "browsertok"
STEPS = 400

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not (WEBUI and CHROMIUM), reason="browser tier: set TI_TRAINER_WEBUI_DIR=<a webui v1.10.1 "
                       "folder> and TI_TRAINER_CHROMIUM=<a Chromium executable> (with the playwright package "
                       "installed; no browser is downloaded) to run it"),
]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    from test_webui_real import _add_micro_model, _free_port, running_webui

    from lib_ti.bench.speed import draw_images
    from lib_ti.micro.model import NAME as MICRO

    data_dir = tmp_path_factory.mktemp("webui-browser")
    models = data_dir / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    extension = data_dir / "extensions" / "sd-webui-ti-trainer"
    shutil.copytree(ROOT, extension,
                    ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", ".pytest_cache"))
    _add_micro_model(models, extension)
    (data_dir / "embeddings").mkdir()
    (data_dir / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}))
    draw_images(data_dir / "ti-data", 4, 64)
    port = _free_port()
    python = os.environ.get("TI_TRAINER_WEBUI_PYTHON", str(Path(WEBUI) / "venv" / "bin" / "python"))
    args = [python, "launch.py", "--data-dir", str(data_dir), "--ckpt", str(models / f"{MICRO}.safetensors"),
            "--api", "--port", str(port), "--use-cpu", "all", "--no-half", "--precision", "full",
            "--skip-torch-cuda-test", "--skip-prepare-environment", "--skip-install", "--no-download-sd-model",
            "--skip-version-check", "--ti-trainer-output-dir", str(data_dir / "ti-runs")]
    with running_webui(args, data_dir, port) as host:
        yield host


@pytest.fixture(scope="module")
def page(webui):
    with chromium_page(CHROMIUM, timeout_ms=60_000) as page:
        yield page


@contextlib.contextmanager
def chromium_page(executable: str, timeout_ms: int):
    """A 1600x1000 page in headless Chromium launched from ``executable`` (playwright never downloads one)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tier: pip install playwright (the "
                                   "package only: Chromium comes from TI_TRAINER_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(timeout_ms)
        yield page
        browser.close()


def open_tab(page, base: str) -> None:
    page.goto(base)
    page.locator("#tabs > .tab-nav button", has_text=re.compile(r"^\s*Train\s*$")).click()
    page.locator("#train_tabs > .tab-nav button", has_text="Train Embedding").click()
    page.locator("#ti_trainer_panel").wait_for(state="visible")


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def field(page, name: str):
    return page.locator(f"#ti_trainer_{name} :is(input[type=number], input[type=text], textarea)").first


def set_value(page, name: str, value) -> None:
    box = field(page, name)
    box.fill(str(value))
    box.press("Tab")  # Gradio takes the value on change


def run_panel(page) -> str:
    return page.locator("#ti_trainer_run.prose").inner_text()  # Gradio 3.41 gives the block and its content the id


def wait_for_panel(page, pattern: str, timeout: float = 120) -> str:
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = run_panel(page)
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"the run panel never showed {pattern!r}; it shows: {text}")


def poll_clicks(page, seconds: float) -> int:
    """How often the page script clicks its hidden Poll button in ``seconds`` (every 1.5 s when healthy)."""
    page.evaluate("window.__ti_polls = 0; document.querySelector('#ti_trainer_poll')"
                  ".addEventListener('click', () => window.__ti_polls++)")
    page.wait_for_timeout(seconds * 1000)
    return page.evaluate("window.__ti_polls")


def message(page) -> str:
    return page.locator("#ti_trainer_message.prose").inner_text()


def test_the_tab_journey_in_a_browser(webui, page):
    base = webui.base
    open_tab(page, base)
    shot(page, "01-tab")
    page.locator("#ti_gallery_container").wait_for(state="hidden", timeout=5_000)  # the host's output column
    settings, panel = page.locator("#ti_trainer_settings").bounding_box(), page.locator("#ti_trainer_panel")
    assert panel.bounding_box()["x"] > settings["x"] + settings["width"] - 1  # two columns, panel on the right
    assert panel.bounding_box()["x"] + panel.bounding_box()["width"] > 1400  # the full width of the page
    assert field(page, "width").input_value() == "64"  # the micro model's own size
    for click in ("#train_tabs > .tab-nav button:has-text('Train'):not(:has-text('Embedding'))",):
        page.locator(click).first.click()
        page.locator("#ti_gallery_container").wait_for(state="visible", timeout=5_000)  # the host's tab keeps it
    page.locator("#train_tabs > .tab-nav button", has_text="Train Embedding").click()

    for name, value in [("name", NAME), ("init_text", "a photo"), ("data_dir", webui.data_dir / "ti-data"),
                        ("steps", STEPS), ("learning_rate", "0.01")]:
        set_value(page, name, value)
    page.locator("#ti_trainer_advanced").locator("button, .label-wrap").first.click()
    for name, value in [("save_every", 20), ("preview_every", 20), ("preview_steps", 2), ("keep_last", 1),
                        ("log_every", 1)]:
        set_value(page, name, value)
    assert poll_clicks(page, 6.0) <= 8  # the panel's poll keeps its pace (once a click storm starved the page)
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")  # Advanced open: the settings scroll ...
    assert page.locator("#ti_trainer_train").bounding_box()["y"] >= 0  # ... the run panel's buttons stay in view
    page.evaluate("window.scrollTo(0, 0)")
    page.locator("#ti_trainer_train").click()

    bar = page.locator("#ti_trainer_panel .progressDiv .progress")
    bar.wait_for(state="visible")
    deadline = time.time() + 120
    while "%" not in bar.inner_text() and time.time() < deadline:
        time.sleep(0.3)
    text = bar.inner_text()
    assert re.search(rf"^Training {NAME}: step \d+/{STEPS} \d+%", text) and "<" not in text, text
    wait_for_panel(page, rf"{NAME}[\s\S]*training[\s\S]*Step\s+\d+ / {STEPS}")
    shot(page, "02-training")
    page.locator("#ti_trainer_train").click()  # a second Train: refused at once, naming the active run
    page.wait_for_function("document.querySelector('#ti_trainer_message').innerText.includes('already active')")
    assert NAME in message(page) and page.locator("#ti_trainer_message .ti-trainer-error").is_visible()

    wait_for_panel(page, r"Step\s+(2\d|[3-9]\d|\d{3}) /")  # a checkpoint and a preview exist
    page.reload()
    open_tab(page, base)
    wait_for_panel(page, rf"{NAME}[\s\S]*training")  # the run is back after the reload, with its settings
    assert "ti-data" in page.locator("#ti_trainer_run.prose details").text_content()  # the run's own settings
    bar.wait_for(state="visible", timeout=5_000)  # the host's bar follows the run again
    page.locator("#ti_trainer_gallery img").first.wait_for(state="visible")  # its previews
    shot(page, "03-after-reload")
    page.locator("#ti_trainer_stop").click()
    wait_for_panel(page, r"stopped")
    stopped_at = int(re.search(r"Step\s+(\d+) /", run_panel(page)).group(1))
    assert stopped_at < STEPS
    shot(page, "04-stopped")

    page.reload()  # the form is back to its defaults: Resume must not train with them
    open_tab(page, base)
    set_value(page, "name", NAME)
    page.locator("#ti_trainer_resume").click()
    page.wait_for_function("document.querySelector('#ti_trainer_message').innerText.includes('differs')")
    assert "Initialization text: run 'a photo', form '*'" in message(page)
    shot(page, "05-resume-refused")
    page.locator("#ti_trainer_load").click()
    page.wait_for_function("document.querySelector('#ti_trainer_message').innerText.includes('Loaded the settings')")
    assert field(page, "init_text").input_value() == "a photo" and field(page, "steps").input_value() == str(STEPS)
    page.locator("#ti_trainer_resume").click()
    wait_for_panel(page, r"training")
    wait_for_panel(page, rf"finished[\s\S]*Step\s+{STEPS} / {STEPS}", timeout=600)
    shot(page, "06-resumed-finished")
    # The host's bar goes with the run (it once stayed on a stale step), no error is shown, the form keeps its values.
    page.wait_for_function("!document.querySelector('#ti_trainer_panel .progressDiv')", timeout=15_000)
    assert page.locator("#ti_trainer_panel .ti-trainer-error:visible, #ti_trainer_panel .error:visible").count() == 0
    assert page.locator("#ti_trainer_mode input").first.input_value() == "embedding"
    code, status = webui.call("GET", "/ti-trainer/v1/status")
    assert code == 200 and status["state"] == "finished" and status["step"] == STEPS, status
    saved = json.loads(json.dumps(status))
    assert saved["final_path"].endswith(f"{NAME}.safetensors")

    page.locator("#tabs > .tab-nav button", has_text="txt2img").click()
    page.locator("#txt2img_extra_tabs > .tab-nav button", has_text="Textual Inversion").click()
    card = page.locator(f"#txt2img_textual_inversion_cards .card[data-name='{NAME}']")
    card.wait_for(state="attached")
    assert card.locator("img").count() == 1  # its preview, from the image beside the file
    checkpoint = f"{NAME}-{stopped_at // 20 * 20}" if stopped_at >= 20 else f"{NAME}-{STEPS}"
    assert page.locator(f"#txt2img_textual_inversion_cards .card[data-name='{checkpoint}']").count() == 1
    # The stop's own checkpoint (between previews) shows the run's last preview, as the final embedding does.
    assert page.locator(f"#txt2img_textual_inversion_cards .card[data-name='{NAME}-{stopped_at}'] img").count() == 1
    shot(page, "07-cards")
    info = webui.txt2img(f"a photo of {checkpoint}")
    assert checkpoint in info["infotexts"][0].split("TI hashes:")[1], info["infotexts"][0]
