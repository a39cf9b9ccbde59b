"""The fake-host tier: the A1111 adapter, the runner, the API and the tabs on a fake ``modules`` package
around the tiny real SD1 model (tests/fake_webui.py), in plain pytest.

What this proves: our glue's own logic (the session puts the host back, publishing registers the files,
the API's status codes, the tabs' wiring from button to handler to run). What it cannot prove: that the
real webui behaves like the fake; tests/test_webui_real.py runs the same paths in a real A1111.
"""

from __future__ import annotations

import time
import types
import typing
from pathlib import Path

import fake_webui
import pytest
import torch
from fake_webui import RUN

from lib_ti.config import TrainConfig
from lib_ti.engine import PreviewRequest
from lib_ti.errors import TIError
from lib_ti.hosts import (
    a1111,
    captioner,
    folders,
    registry,
    runner,
    settings,
    webui_api,
    webui_dataset,
    webui_tab,
)


@pytest.fixture()
def webui(tmp_path, monkeypatch, engines, images):
    return fake_webui.ready(fake_webui.install(monkeypatch, tmp_path / "webui", engines("sd1")), monkeypatch, images)


def _train(webui, **changes):
    cfg = runner.resolve(TrainConfig(name="tok", data_dir=str(webui.root / "data"), **(RUN | changes)), resume=False)
    job = runner.new_job(cfg)
    runner.start(job, cfg, resume=False).join(300)
    return job


# ---------------------------------------------------------------------- the adapter on the loaded model
def test_the_running_webui_is_detected_as_a1111_and_its_model_read_without_loading(webui):
    host = registry.current_host()
    assert host is a1111.HOST and host.reason == ""
    assert host.loaded_model() == a1111.LoadedModel("sd1", 64)  # 8 latents x 2^3: the tiny model's own size
    webui.modules["modules.sd_models"].model_data.sd_model = None
    assert host.loaded_model() is None


def test_a_run_trains_publishes_and_puts_the_host_back(webui):
    model = webui.sd_model
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    job = _train(webui, gradient_checkpointing=True)
    assert job.state == "finished", job.error_detail or job.error
    embeddings = webui.root / "embeddings"
    assert sorted(p.name for p in (embeddings / "ti-trainer" / "tok").iterdir()) == \
        ["tok-2.preview.png", "tok-2.safetensors", "tok-4.preview.png", "tok-4.safetensors"]
    assert (embeddings / "tok.safetensors").is_file() and (embeddings / "tok.preview.png").is_file()
    words = webui.db.word_embeddings
    assert words["tok"].filename == str(embeddings / "tok.safetensors")  # the final file, not the live one
    assert words["tok-2"].vec.shape == (2, 32) and not words["tok"].vec.requires_grad
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert webui.checkpointing[0] == "add" and webui.checkpointing[-1] == "remove"
    state = webui.shared.state
    assert (state.job_no, state.job_count, state.textinfo) == (4, 4, "Training tok: step 4/4")
    assert state.time_start == 1000.0 and state.current_image is not None  # the host's start given back
    assert fake_webui.Txt2Img.cached_c == [None, None]  # no conditioning cached from the live vectors
    assert webui.tasks == [("queued", job.task_id), ("started", job.task_id), ("finished", job.task_id)]


def test_a_pivotal_run_publishes_its_lora_and_leaves_the_hosts_layers_as_they_were(webui):
    model = webui.sd_model
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    job = _train(webui, mode="pivotal", lora_targets=["attn", "text"], ti_fraction=0.5)
    assert job.state == "finished", job.error_detail or job.error
    assert (webui.root / "models" / "Lora" / "tok.safetensors").is_file()
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before  # the adapters are gone
    assert all(torch.equal(p, weights_before[n]) for n, p in model.named_parameters())


def test_the_hosts_interrupt_stops_a_run_and_the_live_embedding_goes_away(webui):
    webui.shared.state.interrupted = True
    job = _train(webui, steps=50)
    assert job.state == "stopped" and job.step < 50
    assert set(webui.db.word_embeddings) <= {"tok", f"tok-{job.step}"}
    assert webui.db.word_embeddings["tok"].filename  # the saved file, registered after the live one left
    assert not webui.shared.state.interrupted  # gpu_job clears it for the next generation


def test_a_failed_run_reports_its_error_and_leaves_no_live_embedding(webui, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(webui.sd_model, "apply_model", broken)
    job = _train(webui)
    assert job.state == "failed" and "device-side assert" in job.error
    assert "tok" not in webui.db.word_embeddings


def test_the_self_check_finds_the_hosts_conditioning_and_the_gradient(webui):
    report = registry.current_host().self_check("a photo", "a {} on a table")
    assert report["ok"], report
    assert report["family"] == "sd1" and report["vectors"] == 2 and report["grad_norm"]["clip_l"] > 0
    assert "tiselfcheck" not in webui.db.word_embeddings


def test_created_embeddings_and_renders_use_the_registered_vectors(webui):
    host = registry.current_host()
    request = PreviewRequest("a tok on a table", "", 2, 7.0, 1, 64, 64, "Euler")
    plain = host.txt2img(request).getpixel((0, 0))
    path = runner.create_embedding(TrainConfig(name="tok", init_text="red", num_vectors=1))
    assert path == webui.root / "embeddings" / "tok.safetensors" and host.loaded_embeddings()["tok"] == str(path)
    assert host.txt2img(request).getpixel((0, 0)) != plain  # the registered embedding is in the prompt
    with pytest.raises(TIError, match="already exists"):
        runner.create_embedding(TrainConfig(name="tok", init_text="red"))
    webui.db.expected_shape = 768
    with pytest.raises(TIError, match="has width 32, the loaded checkpoint expects 768"):
        host.register_file(path)


def test_where_training_cannot_work_it_is_refused_before_any_work(webui):
    host = registry.current_host()
    webui.shared.cmd_opts.lowvram = True
    with pytest.raises(TIError, match="--lowvram"):
        host.engine()
    webui.shared.cmd_opts.lowvram = False
    webui.sd_model.is_sd1, webui.sd_model.is_sd3 = False, True
    with pytest.raises(TIError, match="the loaded checkpoint is SD3"):
        host.engine()
    webui.shared.sd_model = None
    with pytest.raises(TIError, match="no checkpoint is loaded"):
        host.engine()
    with pytest.raises(TIError, match="no checkpoint is loaded"):
        host.txt2img(PreviewRequest("x", "", 2, 7.0, 1, 64, 64, "Euler"))


def test_medvram_hooks_are_lifted_for_the_run_and_put_back(webui):
    def send_me_to_gpu(module, _inputs):
        return None

    webui.sd_model.lowvram = True
    layer = webui.sd_model.cond_stage_model.text_model.get_input_embeddings()
    handle = layer.register_forward_pre_hook(send_me_to_gpu)
    try:
        engine = registry.current_host().engine()
        with registry.current_host().session(engine, "tok"):
            assert handle.id not in layer._forward_pre_hooks
        assert layer._forward_pre_hooks[handle.id] is send_me_to_gpu
    finally:
        handle.remove()


@pytest.fixture()
def sdxl_webui(tmp_path, monkeypatch, engines, images):
    fake = fake_webui.ready(fake_webui.install(monkeypatch, tmp_path / "webui", engines("sdxl")), monkeypatch, images)
    yield fake
    for block in fake.sd_model.model.diffusion_model.down_blocks:  # the tiny engine is shared by the module
        del block.use_checkpoint


def test_sdxl_self_check_reaches_both_encoders_through_the_hosts_no_grad_conditioner(sdxl_webui):
    """hosts.md §2.1 (3): sgm runs non-trainable embedders under no_grad; the engine must lift that for a step."""
    report = registry.current_host().self_check("a photo", "a {} on a table")
    assert report["ok"], report
    assert set(report["grad_norm"]) == {"clip_l", "clip_g"} and min(report["grad_norm"].values()) > 0
    assert not any(e.is_trainable for e in sdxl_webui.sd_model.conditioner.embedders)  # put back


def test_an_sdxl_run_trains_one_encoder_and_gives_back_the_blocks_checkpointing(sdxl_webui):
    job = _train(sdxl_webui, train_encoders=["clip_g"], gradient_checkpointing=False, steps=2, save_every=2)
    assert job.state == "finished", job.error_detail or job.error
    published = sdxl_webui.db.word_embeddings["tok"]
    assert set(published.vec) == {"clip_l", "clip_g"} and published.filename.endswith("tok.safetensors")
    assert all(block.use_checkpoint for block in sdxl_webui.sd_model.model.diffusion_model.down_blocks)
    assert sdxl_webui.checkpointing == []  # SDXL's own flags, never ldm's checkpoint patch


# ---------------------------------------------------------------------- settings, folders, publishing
def test_settings_are_registered_prefixed_and_folder_settings_closed_to_the_api(webui, monkeypatch):
    gradio = fake_webui.install_gradio(monkeypatch)
    settings.register_settings()
    labels = webui.shared.opts.data_labels
    assert set(labels) >= {f"ti_trainer_{key}" for key in settings.HOST_SETTINGS}
    assert labels["ti_trainer_output_dir"].restrict_api and labels["ti_trainer_output_dir"].section[0] == "ti_trainer"
    assert webui.shared.restricted_opts == {f"ti_trainer_{key}" for key in settings.PATH_SETTINGS}
    assert labels["ti_trainer_precision"].component is gradio.module.Radio
    webui.shared.opts.data["ti_trainer_save_every"] = 250
    assert settings.config_defaults()["save_every"] == 250


def test_the_output_root_follows_flag_then_setting_then_the_data_folder(webui, tmp_path):
    assert folders.output_root() == webui.root / "textual_inversion" / "ti-trainer"
    webui.shared.opts.data["ti_trainer_output_dir"] = str(tmp_path / "setting")
    assert folders.output_root() == tmp_path / "setting"
    webui.shared.cmd_opts.ti_trainer_output_dir = str(tmp_path / "flag")
    assert folders.output_root() == tmp_path / "flag"
    webui.shared.cmd_opts.ti_trainer_allowed_roots = f"/a{folders.os.pathsep}/b"
    webui.shared.opts.data["ti_trainer_allowed_roots"] = "/c\n /d "
    assert folders.extra_read_roots() == [Path("/a"), Path("/b"), Path("/c"), Path("/d")]
    assert folders.lora_dir() == webui.root / "models" / "Lora" and folders.checkpoint_subdir() == "ti-trainer"


def test_a_published_lora_is_listed_by_the_hosts_lora_extension_at_once(webui, monkeypatch, tmp_path):
    listed = []
    monkeypatch.setitem(fake_webui.sys.modules, "networks", types.SimpleNamespace(
        list_available_networks=lambda: listed.append(True)))
    source = tmp_path / "tok-lora.safetensors"
    source.write_bytes(b"lora")
    target = folders.publish_lora(source, folders.lora_dir() / "tok.safetensors")
    assert target.read_bytes() == b"lora" and listed == [True]


# ---------------------------------------------------------------------- the API
@pytest.fixture()
def api(webui):
    fastapi = pytest.importorskip("fastapi", reason="the API tests need fastapi and httpx (requirements-dev.txt)")
    from fastapi.testclient import TestClient

    def client(auth: str | None = None):
        webui.shared.cmd_opts.api_auth = auth
        app = fastapi.FastAPI()
        webui_api.mount(app)
        webui_api.mount(app)  # on_app_started fires again after a UI reload: mounted once
        return TestClient(app)

    return client


def _wait(client, run_id: str, auth=None) -> dict:
    for _ in range(600):
        status = client.get("/ti-trainer/v1/status", params={"run_id": run_id}, auth=auth).json()
        if not status["active"]:
            return status
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} still active")


def test_the_api_trains_reports_and_lists_runs(webui, api):
    client = api()
    assert client.get("/ti-trainer/v1/status").status_code == 404
    assert client.post("/ti-trainer/v1/stop").status_code == 409
    response = client.post("/ti-trainer/v1/train", json={"name": "tok", "data_dir": str(webui.root / "data"), **RUN})
    assert response.status_code == 202, response.text
    status = _wait(client, response.json()["run_id"])
    assert status["state"] == "finished" and status["step"] == 4, status
    assert status["final_path"] == str(webui.root / "embeddings" / "tok.safetensors")
    with_preview = client.get("/ti-trainer/v1/status", params={"preview": True}).json()
    assert with_preview["last_preview_png"].startswith("iVBOR")  # a PNG, base64
    runs = client.get("/ti-trainer/v1/runs").json()
    assert [r["name"] for r in runs["session"]] == ["tok"] and runs["on_disk"][0]["checkpoint_steps"] == [2, 4]
    again = client.post("/ti-trainer/v1/train", json={"name": "tok", "data_dir": str(webui.root / "data"), **RUN})
    assert again.status_code == 422 and "already exists" in again.json()["detail"]
    more = client.post("/ti-trainer/v1/train", params={"resume": True}, json={"name": "tok", "steps": 6})
    assert more.status_code == 202, more.text
    assert _wait(client, more.json()["run_id"])["step"] == 6


def test_the_api_refuses_bad_requests_with_the_reason(webui, api, tmp_path):
    client = api()
    for body, match in [({"name": "tok", "steps": 0}, "steps=0"), ({"name": "tok", "data_dir": str(tmp_path)},
                                                                   "requests may read only inside"),
                        ({"name": "tok", "model": "x.ckpt"}, "model=")]:
        response = client.post("/ti-trainer/v1/train", json=body)
        assert response.status_code == 422 and match in response.json()["detail"], response.text
        assert "Traceback" not in response.text


def test_the_api_creates_and_self_checks_behind_the_hosts_api_auth(webui, api):
    client = api("ana:secret,bo:pw")
    assert client.post("/ti-trainer/v1/create", json={"name": "tok"}).status_code == 401
    assert client.get("/ti-trainer/v1/runs", auth=("ana", "wrong")).status_code == 401
    created = client.post("/ti-trainer/v1/create", json={"name": "tok", "init_text": "red"}, auth=("bo", "pw"))
    assert created.status_code == 200 and created.json()["path"] == str(webui.root / "embeddings" / "tok.safetensors")
    check = client.post("/ti-trainer/v1/selfcheck", auth=("ana", "secret"))
    assert check.status_code == 200 and check.json()["ok"], check.text
    webui.shared.sd_model = None
    assert client.post("/ti-trainer/v1/selfcheck", auth=("ana", "secret")).status_code == 409


# ---------------------------------------------------------------------- the tabs, wired as the page wires them
@pytest.fixture()
def page(webui, monkeypatch):
    gradio = fake_webui.install_gradio(monkeypatch)
    monkeypatch.setitem(webui_tab._state, "in_train_tab", False)
    webui_tab.on_ui_train_tabs(types.SimpleNamespace(txt2img_preview_params=[]))
    return gradio


def _click(page, elem_id: str, **values):
    """Press a button: its handler gets the page's current values, with ``values`` typed in (by field name)."""
    (event,) = page.by_id(elem_id).events
    typed = {webui_tab.element_id(name): value for name, value in values.items()}
    args = [typed.get(c.elem_id, c.current()) for c in event.inputs]
    return event.fn(*args)


def test_the_train_tab_starts_follows_and_stops_a_run(webui, page):
    assert webui_tab.on_ui_tabs() == []  # inside the host's Train tab: no top-level tab as well
    assert page.by_id("ti_trainer_tab").do_not_save_to_config
    assert page.by_id("ti_trainer_width").current() == 64  # the loaded model's own size
    message, _ = _click(page, "ti_trainer_train", name="tok", data_dir=str(webui.root / "data"), **RUN)
    assert "Training tok" in message, message
    status = "{}"
    for _ in range(600):
        status, panel, gallery = _click(page, "ti_trainer_poll")
        if '"active": false' in status:
            break
        time.sleep(0.1)
    assert "finished" in panel and "tok" in panel and len(gallery["value"]) == 2
    assert "No training run is active" in _click(page, "ti_trainer_stop")


def test_the_tabs_check_create_compare_and_load_buttons_answer(webui, page):
    report = _click(page, "ti_trainer_check", name="tok", data_dir=str(webui.root / "data"), **RUN)
    assert "ti-trainer-report" in report and "images: 4 usable, 0 skipped" in report, report
    assert "RAM (the run computes on the CPU)" in report  # the fake webui computes on the CPU
    _, created = _click(page, "ti_trainer_create", name="tok", init_text="red", num_vectors=1)
    assert "Created" in created and (webui.root / "embeddings" / "tok.safetensors").is_file()
    grid, message = _click(page, "ti_trainer_compare", name="tok", width=64, height=64, preview_steps=2)
    assert Path(grid).is_file() and "Grid saved" in message, message
    message, *_ = _click(page, "ti_trainer_load", **{"runs": ""})
    assert "choose a run folder" in message


def test_the_dataset_tab_prepares_captions_and_reviews(webui, page):
    src, dst = webui.root / "data", webui.root / "prepared"
    (report,) = _click(page, "ti_trainer_ds_prepare", **{"ds_src": str(src), "ds_dst": str(dst)})
    assert "error" not in report and len(list(dst.glob("*.png"))) == 4, report
    (report,) = _click(page, "ti_trainer_ds_caption", **{"ds_folder": str(dst)})
    assert "BLIP captioner needs its weights" in report
    webui.shared.interrogator = _FakeInterrogator()
    (webui.root / "models" / "BLIP" / "model_base_caption_capfilt_large.pth").write_bytes(b"")
    (report,) = _click(page, "ti_trainer_ds_caption", **{"ds_folder": str(dst)})
    assert "error" not in report, report
    gallery, rows, note = webui_dataset._load_review(str(dst))
    assert len(gallery) == 4 and all(caption == "a small test image" for _, caption in rows), note
    rows[0][1] = "a red square"
    assert "saved 4 caption file(s)" in webui_dataset._save_review(str(dst), rows)
    assert (dst / rows[0][0]).with_suffix(".txt").read_text() == "a red square"
    assert webui.shared.interrogator.blip_model is None  # back to RAM after the job


class _FakeInterrogator:
    """The host's BLIP interrogator: loads a model, captions one image, goes back to RAM."""

    blip_model = None
    running_on_cpu = True

    def load_blip_model(self):
        return torch.nn.Linear(1, 1)

    def generate_caption(self, image) -> str:
        return "a small test image"

    def send_blip_to_ram(self) -> None:
        self.blip_model = None


def test_the_dataset_captioner_refuses_a_host_blip_that_cannot_load(webui):
    host = _FakeInterrogator()
    host.load_blip_model = lambda: (_ for _ in ()).throw(OSError("bert-base-uncased not found"))
    webui.shared.interrogator = host
    (webui.root / "models" / "BLIP" / "model_base_caption_capfilt_large.pth").write_bytes(b"")
    with pytest.raises(TIError, match="could not load \\(OSError: bert-base-uncased"), captioner.captioner(None):
        pass


def test_an_unsupported_webui_gets_one_sentence_in_the_tab_and_the_api(webui, monkeypatch, api):
    # Forge: its own engine as the model, no global embedding database (hosts.md §2.2)
    forge = types.SimpleNamespace(forge_objects=object(), cond_stage_model=None, text_processing_engine=object())
    webui.modules["modules.sd_models"].model_data.sd_model = forge
    monkeypatch.setitem(fake_webui.sys.modules, "backend.memory_management", types.ModuleType("x"))
    gradio = fake_webui.install_gradio(monkeypatch)
    monkeypatch.setitem(webui_tab._state, "in_train_tab", False)
    webui_tab.on_ui_tabs()
    (sentence,) = [c for c in gradio.all if c.elem_id == "ti_trainer_unsupported"]
    assert "cannot train in Forge" in sentence.args[0]
    assert not [c for c in gradio.all if c.elem_id == "ti_trainer_train"]
    response = api().post("/ti-trainer/v1/train", json={"name": "tok", "data_dir": str(webui.root / "data")})
    assert response.status_code == 422 and "cannot train in Forge" in response.json()["detail"]


def test_the_entry_script_registers_the_settings_and_mounts_the_api_only_with_the_hosts_api(webui, monkeypatch):
    import importlib.util

    fastapi = pytest.importorskip("fastapi", reason="the API tests need fastapi and httpx (requirements-dev.txt)")
    registered: dict[str, typing.Any] = {}

    def hook(name: str):
        return lambda fn, **_: registered.setdefault(name, fn)

    callbacks = fake_webui.module("modules.script_callbacks", **{f"on_{name}": hook(name) for name in (
        "ui_train_tabs", "ui_tabs", "ui_settings", "app_started")})
    monkeypatch.setitem(fake_webui.sys.modules, "modules.script_callbacks", callbacks)
    spec = importlib.util.spec_from_file_location("ti_trainer_entry", Path(__file__).parents[1] / "scripts" /
                                                  "ti_trainer.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    fake_webui.install_gradio(monkeypatch)
    registered["ui_settings"]()
    assert "ti_trainer_output_dir" in webui.shared.opts.data_labels
    routes = {}
    for api in (True, False):
        webui.shared.cmd_opts.api = api
        app = fastapi.FastAPI()
        registered["app_started"](None, app)
        routes[api] = {path for path in app.openapi()["paths"] if path.startswith(webui_api.PREFIX)}  # as /docs lists
    assert f"{webui_api.PREFIX}/train" in routes[True] and routes[False] == set()
