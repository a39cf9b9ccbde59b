"""Opt-in real-host tier: the extension inside a real AUTOMATIC1111 webui (v1.10.1), driven over HTTP.

Enable it with ``TI_TRAINER_WEBUI_DIR=<webui folder>`` (and ``TI_TRAINER_WEBUI_PYTHON=<its python>``,
default ``<webui>/venv/bin/python``). The test builds a tiny SD1 checkpoint with its same-named yaml,
links this repository into a fresh data folder's ``extensions/``, starts the webui on 127.0.0.1 on CPU,
trains through the extension's API and generates with the embedding through ``/sdapi/v1/txt2img``.
It never installs or builds the webui. CI does not set the variable, so the tier is skipped there.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lib_ti.bench.speed import draw_images
from lib_ti.devices import cpu_has_bf16

WEBUI = os.environ.get("TI_TRAINER_WEBUI_DIR", "")
ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("sd1", "sd2", "sdxl")
USER, PASSWORD = "tester", "s3cret"

pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not WEBUI, reason="real-host tier: set TI_TRAINER_WEBUI_DIR=<a webui v1.10.1 folder> "
                                         "(and TI_TRAINER_WEBUI_PYTHON=<its python>) to run it"),
]


class Webui:
    def __init__(self, base: str, log: Path, proc: subprocess.Popen, data_dir: Path) -> None:
        self.base, self.log, self.proc, self.data_dir = base, log, proc, data_dir
        self.allowed = data_dir  # the extra folder requests may read (--ti-trainer-allowed-roots)
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        self.auth = {"Authorization": f"Basic {token}"}

    def call(self, method: str, path: str, body=None, *, auth: bool = True, timeout: float = 600):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", **(self.auth if auth else {})}
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait_for_run(self, run_id: str, until=lambda s: s["state"] not in ("queued", "running", "stopping"),
                     timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            code, status = self.call("GET", f"/ti-trainer/v1/status?run_id={run_id}")
            assert code == 200, status
            if until(status):
                return status
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} did not get there in {timeout} s: {status}\n{self.tail()}")

    def txt2img(self, prompt: str) -> dict:
        code, out = self.call("POST", "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                                             "sampler_name": "Euler", "seed": 1})
        assert code == 200, out
        return json.loads(out["info"])

    def use_model(self, family: str, checkpoint: str = "") -> None:
        checkpoint = checkpoint or f"tiny-{family}.safetensors"
        code, out = self.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": checkpoint})
        assert code == 200, out
        code, options = self.call("GET", "/sdapi/v1/options")
        assert options["sd_model_checkpoint"].startswith(checkpoint), (options["sd_model_checkpoint"], self.tail())

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    from lib_ti.models.tiny import build_tiny_model

    data_dir = tmp_path_factory.mktemp("webui-data")
    allowed = tmp_path_factory.mktemp("allowed")
    models = data_dir / "models" / "Stable-diffusion"
    models.mkdir(parents=True)
    for family in FAMILIES:  # each checkpoint with its same-named yaml and the side folders the yaml names
        ckpt = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), single_file=True)
        for part in ckpt.parent.iterdir():
            (models / part.name).symlink_to(part)
    site = _register_open_clip_configs(tmp_path_factory.mktemp("site"), models)
    extension = data_dir / "extensions" / "sd-webui-ti-trainer"
    _add_micro_model(models, extension)
    (data_dir / "embeddings").mkdir()
    # Live previews with the default "Approx NN" would try to download a VAE approximation for SDXL.
    (data_dir / "config.json").write_text(json.dumps({"show_progress_type": "Approx cheap"}))
    (data_dir / "extensions").mkdir()
    # A copy of the working tree, as "Install from URL" leaves it (minus .git, whose remote a local clone lacks).
    shutil.copytree(ROOT, extension,
                    ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__", ".pytest_cache"))
    port = _free_port()
    python = os.environ.get("TI_TRAINER_WEBUI_PYTHON", str(Path(WEBUI) / "venv" / "bin" / "python"))
    args = [
        python,
        "launch.py",
        "--data-dir",
        str(data_dir),
        "--ckpt",
        str(models / "tiny-sd1.safetensors"),
        "--api",
        "--api-auth",
        f"{USER}:{PASSWORD}",
        "--port",
        str(port),
        "--use-cpu",
        "all",
        "--no-half",
        "--precision",
        "full",
        "--skip-torch-cuda-test",
        "--skip-prepare-environment",
        "--skip-install",
        "--no-download-sd-model",
        "--skip-version-check",
        "--ti-trainer-output-dir",
        str(data_dir / "ti-runs"),
        "--ti-trainer-allowed-roots",  # read by requests besides the data folder (the benchmark's images)
        str(allowed),
    ]
    with running_webui(args, data_dir, port, PYTHONPATH=str(site)) as host:
        host.allowed = allowed
        yield host


@contextlib.contextmanager
def running_webui(args: list[str], data_dir: Path, port: int, cwd: str = "", **env: str):
    """The webui started with ``args`` in ``cwd`` (default: the A1111 folder; offline, its log in ``data_dir``),
    up and answering; stopped after."""
    log = data_dir / "webui.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=cwd or WEBUI, stdout=out, stderr=subprocess.STDOUT, env=env)
    host = Webui(f"http://127.0.0.1:{port}", log, proc, data_dir)
    try:
        _wait_until_up(host)
        yield host
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _add_micro_model(models: Path, extension: Path) -> None:
    """The shipped micro model, as the README tells a webui run with ``--data-dir`` to add it: the single
    file, and its yaml with the CLIP folder named by its absolute path (the shipped yaml names it
    relative to the webui's own folder, which only fits the default layout)."""
    import yaml

    from lib_ti.micro.model import NAME

    shipped = extension / "lib_ti" / "assets" / NAME
    (models / f"{NAME}.safetensors").symlink_to(shipped / f"{NAME}.safetensors")
    config = yaml.safe_load((ROOT / "lib_ti" / "assets" / NAME / f"{NAME}.yaml").read_text())
    params = config["model"]["params"]["cond_stage_config"]["params"]
    assert params["version"] == f"extensions/sd-webui-ti-trainer/lib_ti/assets/{NAME}/{NAME}.diffusers/tokenizer"
    params["version"] = str(shipped / f"{NAME}.diffusers" / "tokenizer")
    (models / f"{NAME}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _register_open_clip_configs(site: Path, models: Path) -> Path:
    """The tiny SD2/SDXL yamls name OpenCLIP architectures open_clip does not ship: a sitecustomize on
    the webui's PYTHONPATH registers their configs at start, leaving the webui install untouched."""
    folders = sorted(str(p) for p in models.glob("*.open_clip"))
    (site / "sitecustomize.py").write_text(
        "import open_clip\n" + "".join(f"open_clip.add_model_config({f!r})\n" for f in folders))
    return site


def _wait_until_up(host: Webui, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if host.proc.poll() is not None:
            raise AssertionError(f"the webui exited ({host.proc.returncode}):\n{host.tail()}")
        # No request before the webui has added its API: a request in between makes Starlette build its
        # middleware stack, and the webui's own api_middleware then fails ("Cannot add middleware after an
        # application has started"). It logs "Startup time" once everything is added.
        if "Startup time" not in host.tail():
            time.sleep(1)
            continue
        try:
            code, _ = host.call("GET", "/ti-trainer/v1/runs", timeout=5)
            if code == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the webui did not come up in {timeout} s:\n{host.tail()}")


@pytest.fixture(scope="module")
def dataset(webui):
    return draw_images(webui.data_dir / "ti-data", 4, 64)  # inside the data folder: requests may read it


def run_config(dataset: Path, name: str, **changes) -> dict:
    return {"name": name, "init_text": "a photo", "num_vectors": 2, "data_dir": str(dataset), "width": 64,
            "height": 64, "batch_size": 2, "learning_rate": "0.01", "steps": 6, "save_every": 3, "keep_last": 0,
            "preview_every": 3, "preview_steps": 2, "log_every": 1, **changes}


def test_the_extension_loads_without_errors(webui):
    log = webui.log.read_text(errors="replace")
    assert "Traceback" not in log and "lib_ti" not in log and "ti_trainer.py" not in log, log[-4000:]


def test_api_requires_the_hosts_api_auth(webui):
    code, _ = webui.call("GET", "/ti-trainer/v1/runs", auth=False)
    assert code == 401


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_conditioning_is_the_hosts_own_and_trains_the_vectors(webui, family):
    # Vectors equal to "a photo"'s token embeddings: our prompt "a <token> on a table" must give exactly
    # the host's generation conditioning for "a a photo on a table" (SDXL: crossattn and the pooled
    # vector), tokens after the name included; and the gradient must reach every encoder's vectors.
    webui.use_model(family)
    code, out = webui.call("POST", "/ti-trainer/v1/selfcheck?init_text=a%20photo")
    assert code == 200, out
    assert out["family"] == family and out["vectors"] == 2, out
    assert set(out["grad_norm"]) == {"sd1": {"clip_l"}, "sd2": {"clip_h"}, "sdxl": {"clip_l", "clip_g"}}[family]
    assert max(out["max_abs_diff"].values()) < 1e-4 and min(out["grad_norm"].values()) > 0 and out["ok"], out


def test_train_through_the_api_then_use_every_checkpoint_in_txt2img(webui, dataset):
    webui.use_model("sd1")
    code, started = webui.call("POST", "/ti-trainer/v1/train", run_config(dataset, "tinytok"))
    assert code == 202, started
    status = webui.wait_for_run(started["run_id"])
    assert status["state"] == "finished", (status, webui.tail())
    assert status["step"] == 6 and status["error"] is None
    embeddings = webui.data_dir / "embeddings"
    assert (embeddings / "tinytok.safetensors").is_file()
    for step in (3, 6):  # every checkpoint, the last one too (it is also the final file)
        assert (embeddings / "ti-trainer" / "tinytok" / f"tinytok-{step}.safetensors").is_file()
    assert status["last_preview"] and Path(status["last_preview"]).is_file()

    code, listed = webui.call("GET", "/sdapi/v1/embeddings")
    assert code == 200 and {"tinytok", "tinytok-3", "tinytok-6"} <= set(listed["loaded"]), listed
    assert listed["loaded"]["tinytok"]["vectors"] == 2

    for prompt_name in ("tinytok", "tinytok-3"):  # final and checkpoint, usable at once: no refresh, no restart
        info = webui.txt2img(f"a photo of {prompt_name}")
        hashes = info.get("extra_generation_params", {}).get("TI hashes", "")
        assert f"{prompt_name}: " in hashes, info


def _cat_image(webui) -> bytes:
    code, out = webui.call("POST", "/sdapi/v1/txt2img", {"prompt": "a photo of a cat", "steps": 2, "width": 64,
                                                         "height": 64, "sampler_name": "Euler", "seed": 7})
    assert code == 200, out
    return base64.b64decode(out["images"][0])


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bfloat16 instructions")
def test_a_bf16_run_leaves_every_host_weight_bit_identical(webui, dataset):
    webui.use_model("sd1")
    code, before = webui.call("POST", "/ti-trainer/v1/selfcheck?weights=true")
    assert code == 200 and len(before["weights_digest"]) == 32, before
    image = _cat_image(webui)
    code, started = webui.call("POST", "/ti-trainer/v1/train", run_config(dataset, "bf16tok", precision="bf16"))
    assert code == 202, started
    status = webui.wait_for_run(started["run_id"])
    assert status["state"] == "finished" and status["step"] == 6, (status, webui.tail())
    assert status["last_preview"] and Path(status["last_preview"]).is_file()  # previews render on bf16 weights
    code, after = webui.call("POST", "/ti-trainer/v1/selfcheck?weights=true")
    assert after["weights_digest"] == before["weights_digest"]  # every parameter and buffer, bit for bit
    assert _cat_image(webui) == image


def test_bench_speed_pairs_ours_with_the_builtin_and_reports_its_failures(webui, dataset):
    from lib_ti.bench import webui_speed

    webui.use_model("sd1")
    settings = webui_speed.WebuiSpeedSettings(url=webui.base, auth=f"{USER}:{PASSWORD}", data_dir=str(dataset),
                                              resolution=64, steps=60, warmup=2, vectors=2, pairs=1)
    report = webui_speed.run(settings)
    ours, builtin = report["runs"]
    assert ours["trainer"] == "ours" and ours["s_per_step"] > 0 and "error" not in ours, ours
    assert ours["peak_rss_gib"] >= ours["baseline_rss_gib"] > 0.1 and ours["time_to_first_step_s"] > 0
    # On a recent torch the built-in cannot start (its dataset sampler); that is reported, not hidden.
    assert builtin.get("s_per_step", 0) > 0 or "GroupedBatchSampler" in builtin["error"], builtin
    text = webui_speed.format_report(report)
    assert "| 1 | ours |" in text and "| 1 | builtin |" in text


def test_an_interrupted_run_resumes_from_its_last_checkpoint(webui, dataset):
    webui.use_model("sd1")
    cfg = run_config(dataset, "resumetok", steps=300, save_every=2, preview_every=0)
    code, started = webui.call("POST", "/ti-trainer/v1/train", cfg)
    assert code == 202, started
    webui.wait_for_run(started["run_id"], until=lambda s: s["step"] >= 4)
    code, _ = webui.call("POST", "/ti-trainer/v1/stop")
    assert code == 200
    stopped = webui.wait_for_run(started["run_id"])
    assert stopped["state"] == "stopped" and 4 <= stopped["step"] < 300, stopped

    code, again = webui.call("POST", "/ti-trainer/v1/train", cfg)  # a new run over it is refused...
    assert code == 422 and "already exists" in again["detail"]
    code, resumed = webui.call("POST", "/ti-trainer/v1/train?resume=true", cfg)  # ...resuming is not
    assert code == 202, resumed
    done = webui.wait_for_run(resumed["run_id"])
    assert done["state"] == "finished" and done["step"] == 300, (done["error_detail"], webui.tail())
    code, runs = webui.call("GET", "/ti-trainer/v1/runs")
    on_disk = {r["name"]: r for r in runs["on_disk"]}
    assert on_disk["resumetok"]["checkpoint_steps"][-1] == 300


@pytest.mark.parametrize("changes, message", [
    ({"output_dir": "../escape"}, "'..' are not allowed"),
    ({"output_dir": "/tmp/escape"}, "absolute paths"),
    ({"name": "../evil"}, "config name="),
    ({"init_from": "/etc/passwd"}, "config init_from="),
    ({"model": "/some/model.safetensors"}, "config model="),
])
def test_bad_requests_are_refused_before_any_work(webui, dataset, changes, message):
    code, out = webui.call("POST", "/ti-trainer/v1/train", {**run_config(dataset, "badtok"), **changes})
    assert code == 422 and message in out["detail"], out
    assert not (webui.data_dir / "escape").exists()


SECRET = "root:x:0:0:secret-first-line"


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """Files outside every allowed folder: a dataset, a template whose first line is a secret, an embedding."""
    import torch

    from lib_ti.embedding import Embedding
    from lib_ti.formats.embeddings import save_embedding

    root = tmp_path_factory.mktemp("outside")
    draw_images(root / "data", 2, 64)
    (root / "template.txt").write_text(f"{SECRET}\na photo of [name]\n")
    save_embedding(Embedding("x", {"clip_l": torch.zeros(1, 32)}), root / "x.safetensors")
    return root


@pytest.mark.parametrize("field, value", [
    ("template", "/etc/passwd"), ("template", "{outside}/template.txt"), ("data_dir", "/etc"),
    ("data_dir", "{outside}/data"), ("data_dir", "{outside}/no-such-folder"), ("init_from", "/etc/passwd"),
    ("init_from", "{outside}/x.safetensors"), ("output_dir", "/tmp"), ("output_dir", "../../outside"),
])
def test_requests_naming_files_outside_the_allowed_folders_get_422_before_any_work(webui, dataset, outside, field,
                                                                                  value):
    _, before = webui.call("GET", "/ti-trainer/v1/runs")
    body = {**run_config(dataset, "outsidetok"), field: value.format(outside=outside)}
    code, out = webui.call("POST", "/ti-trainer/v1/train", body)
    assert code == 422 and f"config {field}=" in out["detail"], out
    assert SECRET not in json.dumps(out) and "root:x" not in json.dumps(out)
    code, out = webui.call("POST", "/ti-trainer/v1/train?resume=true", body)  # nothing to resume, or refused
    assert code == 422 and SECRET not in json.dumps(out) and "root:x" not in json.dumps(out), out
    _, after = webui.call("GET", "/ti-trainer/v1/runs")
    assert len(after["session"]) == len(before["session"])  # no run was started
    assert not (webui.data_dir / "ti-runs" / "outsidetok").exists()


def test_no_status_quotes_a_file_even_inside_the_allowed_folders(webui, dataset):
    webui.use_model("sd1")
    template = webui.allowed / "no-name.txt"  # readable by requests, but has no [name]: the run fails
    template.write_text(f"{SECRET}\nanother line\n")
    code, started = webui.call("POST", "/ti-trainer/v1/train", {**run_config(dataset, "leaktok"),
                                                                "template": str(template)})
    assert code == 202, started
    status = webui.wait_for_run(started["run_id"])
    assert status["state"] == "failed" and "no line contains [name]" in status["error"], status
    assert status["error_detail"] is None and SECRET not in json.dumps(status)


@pytest.mark.parametrize("family, keys", [("sd2", {"clip_h"}), ("sdxl", {"clip_l", "clip_g"})])
def test_sd2_v_and_sdxl_train_and_are_used_in_txt2img(webui, dataset, family, keys):
    from lib_ti.formats.embeddings import load_embedding

    webui.use_model(family)
    name = f"{family}tok"
    code, started = webui.call("POST", "/ti-trainer/v1/train", run_config(dataset, name, steps=4, save_every=2,
                                                                         preview_every=2))
    assert code == 202, started
    status = webui.wait_for_run(started["run_id"])
    assert status["state"] == "finished" and status["step"] == 4 and not status["warnings"], status
    saved = load_embedding(webui.data_dir / "embeddings" / f"{name}.safetensors")
    first = load_embedding(webui.data_dir / "embeddings" / "ti-trainer" / name / f"{name}-2.safetensors")
    # One-tensor files (SD1/SD2) are named by their width on reading; the tiny SD2's width is SD1-like.
    assert (set(saved.vectors) == keys if len(keys) > 1 else len(saved.vectors) == 1) and saved.step == 4
    for key in saved.vectors:  # every encoder's vectors trained
        assert not (saved.vectors[key] == first.vectors[key]).all(), key
    info = webui.txt2img(f"a photo of {name}")
    assert f"{name}: " in info.get("extra_generation_params", {}).get("TI hashes", ""), info


def test_creating_an_sdxl_embedding_works_where_the_hosts_own_create_fails(webui):
    from lib_ti.formats.embeddings import load_embedding

    webui.use_model("sdxl")
    body = {"name": "xlnew", "init_text": "a red cube", "num_vectors": 3}
    code, out = webui.call("POST", "/ti-trainer/v1/create", body)
    assert code == 200, out
    emb = load_embedding(out["path"])
    assert set(emb.vectors) == {"clip_l", "clip_g"} and emb.num_vectors == 3 and emb.step == 0
    code, listed = webui.call("GET", "/sdapi/v1/embeddings")
    assert listed["loaded"]["xlnew"]["vectors"] == 3, listed
    code, again = webui.call("POST", "/ti-trainer/v1/create", body)
    assert code == 422 and "already exists" in again["detail"]


# ---------------------------------------------------------------------- the micro model in the webui
def test_the_webui_loads_the_micro_model_and_its_renders_follow_prompts(webui):
    from PIL import Image

    from lib_ti.micro import assets
    from lib_ti.micro.classifier import classify, load_classifier
    from lib_ti.micro.evaluate import plain_cases, score

    webui.use_model("sd1", "micro-sd.safetensors")
    cases = plain_cases(16, seed=7)
    images = []
    for case in cases:
        code, out = webui.call("POST", "/sdapi/v1/txt2img", {
            "prompt": case.prompt, "seed": case.seed, "steps": 20, "cfg_scale": 7, "width": 64, "height": 64,
            "sampler_name": "Euler"})
        assert code == 200, out
        images.append(Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB"))
    figures = score(classify(load_classifier(assets.classifier_file()), images), cases)
    # chance is 1/8 for shape and colour; the standalone engine's figures are in the README
    assert figures["shape"] >= 0.6 and figures["colour"] >= 0.5 and figures["background"] >= 0.7, figures


def test_bench_quality_runs_its_loop_through_the_webui(webui, tmp_path):
    from lib_ti.micro.quality import QualityConfig

    webui.use_model("sd1", "micro-sd.safetensors")
    concept = QualityConfig().concept
    proc = subprocess.run(
        [sys.executable, "-m", "lib_ti", "bench", "quality", "--engine", "webui", "--webui-url", webui.base,
         "--webui-auth", f"{USER}:{PASSWORD}", "--steps", "100", "--eval-every", "50", "--renders", "8",
         "--out", str(webui.allowed / "bq"), "--json", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr + webui.tail()
    report = json.loads((tmp_path / "r.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == ["init word 'shape'", "step 50", "step 100", f"word '{concept}'"]
    assert report["engine"] == "webui" and report["model"].startswith("micro-sd") and report["steps_done"] == 100
    # the learned token draws the concept far more often than the init word it started from
    assert rows["step 100"]["shape"] >= rows["init word 'shape'"]["shape"] + 0.25, report["rows"]
    assert Path(report["embedding"]) == webui.data_dir / "embeddings" / f"my-{concept}.safetensors"


def test_bench_quality_drives_the_webuis_own_trainer_or_names_the_host_fix_it_needs(webui, tmp_path):
    """The host's own trainer through its API: its pickle check and 200-on-failure are handled; on a torch
    whose Sampler refuses data_source (webui v1.10.1 with torch >= 2.14) it cannot start, and says so."""
    webui.use_model("sd1", "micro-sd.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "lib_ti", "bench", "quality", "--engine", "webui-builtin", "--webui-url", webui.base,
         "--webui-auth", f"{USER}:{PASSWORD}", "--steps", "4", "--eval-every", "2", "--renders", "2",
         "--out", str(webui.allowed / "bq-builtin"), "--json", str(tmp_path / "r.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if proc.returncode:
        assert "GroupedBatchSampler" in proc.stderr and "super().__init__()" in proc.stderr, proc.stderr + webui.tail()
        return
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["engine"] == "webui-builtin" and [r["label"] for r in report["rows"]][1:3] == ["step 2", "step 4"]
    assert report["host_train_settings"]["learn_rate"] == "0.005"


def _render(webui: Webui, prompt: str) -> tuple[dict, str]:
    code, out = webui.call("POST", "/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                                         "sampler_name": "Euler", "seed": 1})
    assert code == 200, out
    return json.loads(out["info"]), out["images"][0]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_pivotal_run_writes_a_lora_the_hosts_own_lora_code_uses(webui, dataset, family):
    from lib_ti.formats.lora import load_lora

    webui.use_model(family)
    name = f"{family}piv"
    _, before = _render(webui, "a photo of a cat")
    code, started = webui.call("POST", "/ti-trainer/v1/train", run_config(
        dataset, name, steps=4, save_every=2, preview_every=2, mode="pivotal", lora_learning_rate="0.05"))
    assert code == 202, started
    status = webui.wait_for_run(started["run_id"])
    assert status["state"] == "finished" and status["step"] == 4 and not status["warnings"], (status, webui.tail())
    lora = webui.data_dir / "models" / "Lora" / f"{name}.safetensors"
    assert lora.is_file() and (webui.data_dir / "embeddings" / f"{name}.safetensors").is_file()
    assert _render(webui, "a photo of a cat")[1] == before  # the adapters are gone: the host's model is as it was
    info, with_lora = _render(webui, f"<lora:{name}:1> a photo of {name}")
    extra = info.get("extra_generation_params", {})
    assert f"{name}: {load_lora(lora).metadata['sshs_model_hash'][:12]}" in extra.get("Lora hashes", ""), info
    assert f"{name}: " in extra.get("TI hashes", ""), info
    # the host's Lora code matched our keys onto its modules: the LoRA changes the render
    assert with_lora != _render(webui, f"a photo of {name}")[1]
