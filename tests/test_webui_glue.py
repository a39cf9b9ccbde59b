"""Unit tests of the webui glue that needs no host: job status, the tab's value mapping, request checks.

The host's folders and its model side (a ``PlainHost``) are monkeypatched here; the fake-host tier
(tests/test_webui_fake.py) runs the adapter itself on fake ``modules``, and the real-host tier
(tests/test_webui_real.py) proves the integration.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_ti import events
from lib_ti.config import TrainConfig
from lib_ti.errors import TIError
from lib_ti.hosts import folders, gpu_queue, host, registry, runner, settings, webui_tab
from lib_ti.hosts.jobs import Job, loss_chart_svg


def test_job_follows_the_trainers_events():
    job = Job("tok-1", "tok")
    job.handle(events.Started(0, 10, 4, 4, ["the schedule ends at step 10"]))
    assert job.state == "running" and job.total_steps == 10
    job.handle(events.Step(1, 10, None, 0.01, 2.0, 0.5, 4.5))
    job.handle(events.Step(2, 10, 0.25, 0.01, 2.0, 1.0, 4.0))
    job.handle(events.Saved(2, Path("ckpt/tok-2.safetensors")))
    job.handle(events.Preview(2, Path("previews/tok-2.png"), image=None))
    status = job.status()
    assert status["step"] == 2 and status["loss"] == 0.25 and status["last_preview"].endswith("tok-2.png")
    assert status["saved"] == [str(Path("ckpt/tok-2.safetensors"))]
    html = job.summary_html()
    assert "2 / 10" in html and "0.2500" in html and "tok-2.safetensors" in html and "the schedule ends" in html


def test_stop_request_is_seen_by_the_loop_and_the_state():
    job = Job("tok-1", "tok", state="running")
    assert not job.should_stop()
    job.request_stop()
    assert job.should_stop() and job.state == "stopping" and job.active
    job.finish(stopped=True)
    assert job.state == "stopped" and not job.active


def test_a_failure_reports_the_real_error_never_finished():
    job = Job("tok-1", "tok", state="running")
    try:
        raise RuntimeError("CUDA out of memory")
    except RuntimeError as exc:
        job.fail(exc)
    assert job.state == "failed" and job.status()["error"] == "RuntimeError: CUDA out of memory"
    assert "CUDA out of memory" in job.outcome_html() and "finished" not in job.outcome_html()
    job.fail(TIError("config steps=0 is invalid"))
    assert job.error == "[TI Trainer] config steps=0 is invalid"


def test_loss_chart_scales_to_the_data_and_skips_non_finite_points():
    assert loss_chart_svg([(1, 0.5)]) == ""
    svg = loss_chart_svg([(1, 0.5), (2, float("nan")), (3, 0.1), (4, 0.3)])
    assert svg.startswith("<svg") and svg.count(",") == 3  # three finite points on the polyline
    assert ">0.5<" in svg and ">0.1<" in svg and "step 1" in svg


def test_tab_values_become_a_validated_config():
    defaults = TrainConfig().to_dict()
    values = [defaults[name] for name in webui_tab.FIELD_NAMES]
    values[webui_tab.FIELD_NAMES.index("train_encoders")] = "clip_g"  # the tab's dropdown value
    values[webui_tab.FIELD_NAMES.index("steps")] = 250.0  # Gradio numbers arrive as floats
    values[webui_tab.FIELD_NAMES.index("name")] = "cat toy"
    txt2img = ["a cat toy on a table", "blurry", 12.0, "DPM++ 2M", 6.5, 42.0, 512.0, 640.0]
    cfg = webui_tab.config_from_values(values, True, txt2img)
    assert cfg.steps == 250 and cfg.name == "cat toy" and cfg.train_encoders == ["clip_g"]
    assert (cfg.preview_prompt, cfg.preview_sampler, cfg.preview_steps, cfg.preview_height) == \
        ("a cat toy on a table", "DPM++ 2M", 12, 640)
    cfg = webui_tab.config_from_values(values, False, txt2img)
    assert cfg.preview_prompt == "" and cfg.preview_sampler == ""
    values[webui_tab.FIELD_NAMES.index("width")] = 100.0
    with pytest.raises(TIError, match="width=100"):
        webui_tab.config_from_values(values, False, [])


def test_every_config_field_has_a_tab_control():
    names = set(TrainConfig().to_dict())
    assert set(webui_tab.FIELD_NAMES) == names - {"model"}  # the webui trains the checkpoint it has loaded
    assert set(webui_tab.TXT2IMG_FIELDS) <= names
    assert len(webui_tab.FIELD_NAMES) == len(set(webui_tab.FIELD_NAMES))


class PlainHost:
    """A ``Host`` with nothing loaded: records what is registered, renders with ``render``."""

    name, reason = "plain", ""

    def __init__(self) -> None:
        self.registered: list[str] = []
        self.render = None
        self.model: host.LoadedModel | None = None

    def register_file(self, path: Path) -> None:
        self.registered.append(path.name)

    def loaded_embeddings(self) -> dict[str, str | None]:
        return {}

    def txt2img(self, request):
        return self.render(request)

    def loaded_model(self):
        return self.model


@pytest.fixture()
def plain_host(monkeypatch) -> PlainHost:
    fake = PlainHost()
    monkeypatch.setattr(registry, "current_host", lambda: fake)
    return fake


@pytest.fixture()
def host_folders(tmp_path, monkeypatch, plain_host):
    """A webui data folder (``tmp_path/webui``) with its embeddings and a dataset, and the output root."""
    webui = tmp_path / "webui"
    for folder in ("embeddings", "data", "textual_inversion_templates"):
        (webui / folder).mkdir(parents=True)
    monkeypatch.setattr(folders, "data_folder", lambda: webui)
    monkeypatch.setattr(folders, "templates_dir", lambda: webui / "textual_inversion_templates")
    monkeypatch.setattr(folders, "output_root", lambda: webui / "runs")
    monkeypatch.setattr(folders, "embeddings_dir", lambda: webui / "embeddings")
    monkeypatch.setattr(folders, "extra_read_roots", lambda: [])
    monkeypatch.setattr(folders, "ui_exposed", lambda: False)
    return webui


def test_requests_cannot_write_outside_the_output_folders(host_folders):
    base = TrainConfig(name="tok", data_dir=str(host_folders / "data"))
    cfg = runner.resolve(base, resume=False)
    assert Path(cfg.output_dir) == host_folders / "runs" / "tok"
    assert Path(runner.resolve(base.replace(output_dir="exp/1"), resume=False).output_dir) == \
        host_folders / "runs" / "exp" / "1"
    for bad in ("../up", "/abs/path", "a/../../b"):
        with pytest.raises(TIError, match="output_dir"):
            runner.resolve(base.replace(output_dir=bad), resume=False)
    with pytest.raises(TIError, match="init_from"):
        runner.resolve(base.replace(init_from="/etc/hostname"), resume=False)
    with pytest.raises(TIError, match="model"):
        runner.resolve(base.replace(model="x.safetensors"), resume=False)


def test_existing_embeddings_are_protected_and_resume_needs_a_checkpoint(host_folders):
    import torch

    from lib_ti.embedding import Embedding
    from lib_ti.formats.embeddings import save_embedding

    base = TrainConfig(name="tok", data_dir=str(host_folders / "data"))
    save_embedding(Embedding("tok", {"clip_l": torch.zeros(1, 8)}), host_folders / "embeddings" / "tok.safetensors")
    with pytest.raises(TIError, match="already exists"):
        runner.resolve(base, resume=False)
    assert runner.resolve(base.replace(overwrite=True), resume=False).overwrite
    continuing = base.replace(init_from=str(host_folders / "embeddings" / "tok.safetensors"))
    assert runner.resolve(continuing, resume=False)  # training an embedding in place is allowed
    with pytest.raises(TIError, match="nothing to resume"):
        runner.resolve(base, resume=True)


def test_requests_read_only_inside_the_allowed_folders(host_folders, tmp_path, monkeypatch):
    outside = tmp_path / "elsewhere"
    (outside / "data").mkdir(parents=True)
    (outside / "t.txt").write_text("root:x:0:0:secret [name]\n")
    base = TrainConfig(name="tok", data_dir=str(host_folders / "data"))
    template = host_folders / "textual_inversion_templates" / "mine.txt"
    template.write_text("a photo of [name]\n")
    assert runner.resolve(base.replace(template=str(template)), resume=False).template == str(template)
    assert runner.resolve(base.replace(template="subject_filewords.txt"), resume=False)  # a built-in set
    # Refused whether the path exists or not, so a refusal tells nothing about files outside.
    for field, value in [("data_dir", outside / "data"), ("data_dir", outside / "nothing"),
                         ("template", outside / "t.txt"), ("template", "/etc/passwd"), ("init_from", "/etc/passwd"),
                         ("init_from", outside / "no.pt")]:
        with pytest.raises(TIError, match=f"config {field}=.* requests may read only inside") as err:
            runner.resolve(base.replace(**{field: str(value)}), resume=False)
        assert "root:x" not in str(err.value) and "secret" not in str(err.value)
    (host_folders / "data" / "link").symlink_to(outside / "data")  # a link inside that leads outside
    with pytest.raises(TIError, match="config data_dir="):
        runner.resolve(base.replace(data_dir=str(host_folders / "data" / "link")), resume=False)
    monkeypatch.setattr(folders, "extra_read_roots", lambda: [outside])  # the owner allows the folder
    assert runner.resolve(base.replace(data_dir=str(outside / "data")), resume=False)
    # The webui user's own tab reads anywhere unless others can reach the UI: not confined there.
    monkeypatch.setattr(folders, "extra_read_roots", lambda: [])
    assert runner.resolve(base.replace(data_dir=str(outside / "data")), resume=False, confined=False)


def test_folder_settings_cannot_lead_outside_the_embeddings_folder(host_folders, monkeypatch):
    monkeypatch.setattr(folders, "checkpoint_subdir", lambda: "../../elsewhere")
    with pytest.raises(TIError, match="checkpoint_subdir="):
        runner.checkpoint_folder(TrainConfig(name="tok"))
    assert set(settings.PATH_SETTINGS) == {"output_dir", "checkpoint_subdir", "allowed_roots"}  # never set over the API


def test_a_user_error_carries_no_traceback_to_the_api():
    job = Job("tok-1", "tok", state="running")
    try:
        raise TIError("template 'x' has no [name]") from UnicodeDecodeError("utf-8", b"\xffsecret", 0, 1, "bad")
    except TIError as exc:
        job.fail(exc)
    assert job.status()["error_detail"] is None and "secret" not in str(job.status())


def test_only_one_run_at_a_time(host_folders, monkeypatch):
    monkeypatch.setattr(runner, "JOBS", {})
    first = runner.new_job(TrainConfig(name="one"))
    first.state = "running"
    with pytest.raises(TIError, match="already active"):
        runner.new_job(TrainConfig(name="two"))
    assert runner.current_job() is first
    first.finish(stopped=False)
    again = runner.new_job(TrainConfig(name="one"))  # same name, same second: its own run id
    assert again.run_id != first.run_id and runner.JOBS[first.run_id] is first


def test_a_resume_request_continues_the_runs_own_config(host_folders):
    import torch

    from lib_ti.checkpoints import TrainingState, save_checkpoint
    from lib_ti.embedding import Embedding

    run_dir = host_folders / "runs" / "tok"
    saved = TrainConfig(name="tok", data_dir=str(host_folders / "data"), output_dir=str(run_dir), width=64, height=64,
                        steps=10, seed=7, template="style")
    vectors = {"clip_l": torch.zeros(1, 8)}
    save_checkpoint(run_dir, Embedding("tok", vectors, 5), TrainingState(5, vectors, {}, None, saved.to_dict(), []),
                    "safetensors", keep_last=0)
    cfg = runner.request_config({"name": "tok", "steps": 20}, resume=True)
    assert (cfg.steps, cfg.seed, cfg.template, cfg.width) == (20, 7, "style", 64)
    assert runner.resolve(cfg, resume=True).output_dir == str(run_dir)
    with pytest.raises(TIError, match="seed: run 7, given 1"):
        runner.request_config({"name": "tok", "seed": 1}, resume=True)
    with pytest.raises(TIError, match="nothing to resume"):
        runner.request_config({"name": "other"}, resume=True)
    assert runner.request_config({"name": "tok", "steps": 3}, resume=False).template == "auto"  # a new run


# ---------------------------------------------------------------------- the host's progress and stop flags
@pytest.fixture()
def fake_shared(monkeypatch):
    """``modules.shared`` with the job-state fields gpu_queue reads and writes (no webui installed in CI)."""
    import sys
    import types

    state = types.SimpleNamespace(job="", job_no=0, job_count=0, textinfo=None, sampling_step=0, sampling_steps=0,
                                  processing_has_refined_job_count=False, time_start=1000.0, interrupted=False,
                                  skipped=False, stopping_generation=False)
    shared = types.SimpleNamespace(state=state, total_tqdm="the host's bar")
    modules = types.ModuleType("modules")
    modules.shared = shared  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    monkeypatch.setattr(gpu_queue, "_clock", {})
    return shared


def _host_eta(state, now: float) -> float:
    """The host's own ETA (modules/progress.py progressapi, v1.10.1) from the job state."""
    progress = state.job_no / state.job_count
    if state.sampling_steps > 0:
        progress += state.sampling_step / state.sampling_steps / state.job_count
    progress = min(progress, 1)
    elapsed = now - state.time_start
    return elapsed / progress - elapsed


def test_the_host_bar_shows_plain_text_and_the_runs_own_eta(fake_shared, monkeypatch):
    import time

    clock = [5000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    gpu_queue.progress_begin(100, 40, "tok")  # a resumed run: 40 steps were done before, data loading took long
    state = fake_shared.state
    assert state.job_count == 0 and "step 40/100" in state.textinfo  # no fraction yet: the host's ETA would be 0 s
    clock[0] += 30.0
    gpu_queue.progress_step(50, 100, "tok")
    assert state.job_no == 50 and state.job_count == 100
    assert "<" not in state.textinfo and "\n" not in state.textinfo and "step 50/100" in state.textinfo
    gpu_queue.progress_eta(150.0)
    assert _host_eta(state, clock[0]) == pytest.approx(150.0)
    state.sampling_step, state.sampling_steps = 5, 10  # a preview render: the host counts its sampling steps too
    gpu_queue.progress_eta(120.0)
    assert _host_eta(state, clock[0]) == pytest.approx(120.0)
    gpu_queue.progress_end()
    assert state.time_start == 1000.0  # the host logs the job's real duration


def test_eta_is_left_to_the_host_before_the_first_step_and_at_the_end(fake_shared):
    assert gpu_queue.host_time_start(10.0, 5.0, 0.0) is None
    assert gpu_queue.host_time_start(10.0, 5.0, 1.0) is None
    assert gpu_queue.host_time_start(10.0, 9.0, 0.5) == pytest.approx(1.0)
    gpu_queue.progress_begin(100, 0, "tok")
    gpu_queue.progress_eta(None)  # no step timed yet
    assert fake_shared.state.time_start == 1000.0


@pytest.mark.parametrize("flag", gpu_queue.STOP_FLAGS)
def test_interrupt_skip_and_stop_after_image_each_stop_a_run(fake_shared, flag):
    assert not gpu_queue.host_interrupted()
    setattr(fake_shared.state, flag, True)
    assert gpu_queue.host_interrupted()


def test_a_preview_render_keeps_the_training_job_and_the_stop_requests(fake_shared):
    state = fake_shared.state
    state.job_count, state.job_no, state.textinfo, state.skipped = 100, 42, "Training tok: step 42/100", True
    with gpu_queue.job_state_kept(state), gpu_queue.quiet_total_progress(fake_shared):
        # what the host's txt2img does: one image of 20 steps, Skip cleared at the image's start
        state.job_count, state.job_no, state.sampling_steps, state.skipped = 1, 1, 20, False
        fake_shared.total_tqdm.update()
        fake_shared.total_tqdm.updateTotal(2000)
        fake_shared.total_tqdm.clear()
        state.interrupted = True  # Interrupt pressed during the render
    assert (state.job_count, state.job_no, state.sampling_steps) == (100, 42, 0)
    assert state.textinfo == "Training tok: step 42/100"
    assert state.skipped and state.interrupted  # both still stop the run after the render
    assert fake_shared.total_tqdm == "the host's bar"


# ---------------------------------------------------------------------- the tab: runs outlive the page
def _form_args(**changes) -> tuple:
    """The Train/Resume buttons' arguments: task id, the form's values, "previews from txt2img"."""
    values = dict(zip(webui_tab.FIELD_NAMES, webui_tab.values_from_config(TrainConfig()), strict=True))
    values.update(changes)
    return ("task(abc)", *[values[name] for name in webui_tab.FIELD_NAMES], False)


@pytest.fixture()
def no_jobs(monkeypatch):
    monkeypatch.setattr(runner, "JOBS", {})
    started: list = []
    monkeypatch.setattr(runner, "start", lambda job, cfg, resume: started.append((job, cfg, resume)))
    return started


def test_train_while_a_run_is_active_is_refused_at_once_naming_it(host_folders, no_jobs):
    active = runner.new_job(TrainConfig(name="first"))
    active.state, active.step, active.total_steps = "running", 40, 100
    message, _ = webui_tab._train_clicked(*_form_args(name="second", data_dir=str(host_folders / "data")))
    assert "ti-trainer-error" in message and "first" in message and "step 40 of 100" in message
    assert not no_jobs and list(runner.JOBS.values()) == [active]  # nothing queued to start later


def test_train_answers_at_once_and_the_run_goes_on_in_its_own_thread(host_folders, no_jobs):
    message, _ = webui_tab._train_clicked(*_form_args(name="tok", data_dir=str(host_folders / "data")))
    assert "ti-trainer-error" not in message, message
    ((job, cfg, resume),) = no_jobs
    assert job.task_id == "task(abc)" and cfg.name == "tok" and not resume and job.active
    assert job.settings["data_dir"] == str(host_folders / "data")


def test_runner_start_holds_the_gpu_lock_under_the_runs_task_id(monkeypatch):
    import contextlib

    seen = []

    @contextlib.contextmanager
    def gpu_job(task_id):
        seen.append(("lock", task_id))
        yield
        seen.append(("unlock", task_id))

    monkeypatch.setattr(gpu_queue, "gpu_job", gpu_job)
    monkeypatch.setattr(runner, "run", lambda job, cfg, resume: seen.append(("run", job.name, resume)))
    job = Job("tok-1", "tok", task_id="task(xyz)")
    runner.start(job, TrainConfig(name="tok"), resume=True).join(5)
    assert seen == [("lock", "task(xyz)"), ("run", "tok", True), ("unlock", "task(xyz)")]


def test_the_run_panel_is_polled_from_the_server_after_a_reload(host_folders, no_jobs):
    import json

    status, panel, gallery = webui_tab._poll("{}")
    assert status == "{}" and "No run" in panel and gallery == {"__type__": "update"}
    job = runner.new_job(TrainConfig(name="tok", width=64, height=64, data_dir="/data/tok"), "task(abc)")
    job.handle(events.Started(0, 100, 4, 4, []))
    job.handle(events.Step(10, 100, 0.125, 0.005, 2.0, 5.0, 45.0))
    job.handle(events.Preview(10, Path("previews/tok-10.png"), image=None))
    status, panel, gallery = webui_tab._poll("{}")  # a fresh page: no state of its own
    assert json.loads(status) == {"run_id": job.run_id, "task_id": "task(abc)", "state": "running", "active": True,
                                  "previews": 1}
    assert "tok" in panel and "10 / 100" in panel and "0.1250" in panel and "ETA" in panel and "/data/tok" in panel
    assert gallery["value"] == [(str(Path("previews/tok-10.png")), "step 10")]
    assert webui_tab._poll(status)[2] == {"__type__": "update"}  # previews unchanged: the gallery is left alone
    assert "Stopping tok" in webui_tab._stop_clicked() and job.should_stop()  # Stop from the reloaded page
    job.fail(TIError("the data folder is empty"))
    status, panel, _ = webui_tab._poll(status)
    assert json.loads(status)["active"] is False and "ti-trainer-failed" in panel and "data folder is empty" in panel


def _saved_run(host_folders, **settings) -> TrainConfig:
    import torch

    from lib_ti.checkpoints import TrainingState, save_checkpoint
    from lib_ti.embedding import Embedding

    run_dir = host_folders / "runs" / "tok"
    saved = TrainConfig(name="tok", data_dir=str(host_folders / "data"), output_dir=str(run_dir), **settings)
    vectors = {"clip_l": torch.zeros(1, 8)}
    save_checkpoint(run_dir, Embedding("tok", vectors, 5), TrainingState(5, vectors, {}, None, saved.to_dict(), []),
                    "safetensors", keep_last=0)
    saved.save(run_dir / "config.yaml")
    return saved


def test_resume_continues_the_saved_run_and_refuses_other_differences(host_folders, no_jobs):
    _saved_run(host_folders, width=64, height=64, steps=10, template="style", seed=7)
    data = str(host_folders / "data")
    message, runs = webui_tab._resume_clicked(*_form_args(name="tok", data_dir=data))  # a reloaded page's defaults
    assert "ti-trainer-error" in message and not no_jobs
    assert "Width: run 64, form 512" in message and "Prompt template: run &#x27;style&#x27;" in message
    assert "Seed: run 7, form 0" in message and "Load run" in message and runs["value"] == "tok"
    args = _form_args(name="tok", data_dir=data, width=64, height=64, template="style", seed=7, steps=30.0,
                      learning_rate="0.002")
    message, _ = webui_tab._resume_clicked(*args)
    ((job, cfg, resume),) = no_jobs
    assert resume and (cfg.steps, cfg.learning_rate, cfg.width, cfg.seed) == (30, "0.002", 64, 7)


def test_load_run_fills_the_form_with_the_saved_config(host_folders, no_jobs):
    saved = _saved_run(host_folders, width=64, height=64, steps=10, template="captions", train_encoders=["clip_g"],
                       learning_rate="0.05:10, 0.005")
    assert webui_tab._run_choices() == ["tok"]
    message, *values = webui_tab._load_clicked("tok")
    assert "Loaded the settings of tok" in message
    form = dict(zip(webui_tab.FIELD_NAMES, values, strict=True))
    assert (form["width"], form["template"], form["train_encoders"], form["output_dir"]) == (64, "captions", "clip_g",
                                                                                            "tok")
    loaded = webui_tab.config_from_values(values, False, [])
    assert loaded.replace(output_dir=saved.output_dir) == saved
    message, *values = webui_tab._load_clicked("")
    assert "ti-trainer-error" in message and values == [{"__type__": "update"}] * len(webui_tab.FIELD_NAMES)
    with pytest.raises(TIError, match="output_dir"):
        runner.load_run("../elsewhere")


@pytest.mark.parametrize(("family", "parameterization", "latent", "levels", "side"), [
    ("sd1", "eps", 64, 4, 512), ("sd2", "v", 96, 4, 768), ("sd2", "eps", 64, 4, 512), ("sdxl", "eps", 0, 4, 1024),
    ("sd1", "eps", 8, 4, 64)])  # the last: the micro model (8 latents, a 4-level VAE)
def test_default_size_fits_the_loaded_model(family, parameterization, latent, levels, side, monkeypatch, plain_host):
    assert host.training_size(family, parameterization, latent, levels) == side
    monkeypatch.setattr(settings, "config_defaults", lambda: {})
    plain_host.model = host.LoadedModel(family, side)
    assert (webui_tab.form_defaults()["width"], webui_tab.form_defaults()["height"]) == (side, side)


# ---------------------------------------------------------------------- checkpoints in txt2img
def test_published_checkpoints_stay_and_carry_their_previews(host_folders, monkeypatch):
    from lib_ti.checkpoints import checkpoint_dir

    registered = registry.current_host().registered
    monkeypatch.setattr(folders, "checkpoint_subdir", lambda: "ti-trainer")
    monkeypatch.setattr(gpu_queue, "progress_image", lambda image: None)
    cfg = runner.resolve(TrainConfig(name="tok", data_dir=str(host_folders / "data"), keep_last=1), resume=False)
    job = Job("tok-1", "tok")
    publisher = runner._Publisher(job, cfg, registry.current_host())
    folder = checkpoint_dir(cfg.run_dir)
    folder.mkdir(parents=True)
    (cfg.run_dir / "previews").mkdir()
    for step in (3, 6):
        ckpt = folder / f"tok-{step}.safetensors"
        ckpt.write_bytes(b"embedding %d" % step)
        publisher.handle(events.Saved(step, ckpt, checkpoint=ckpt))
        preview = cfg.run_dir / "previews" / f"tok-{step}.png"  # the loop saves first, then renders the preview
        preview.write_bytes(b"png %d" % step)
        publisher.handle(events.Preview(step, preview, image=None))
        if step == 3:
            ckpt.unlink()  # keep_last=1 prunes the run folder's checkpoint; its published copy must stay
    final = cfg.run_dir / "tok.safetensors"
    final.write_bytes(b"final")
    publisher.handle(events.Saved(6, final, is_final=True, checkpoint=folder / "tok-6.safetensors"))
    publisher.publish_final()
    copies = host_folders / "embeddings" / "ti-trainer" / "tok"
    assert (copies / "tok-3.safetensors").read_bytes() == b"embedding 3"  # still resolvable as tok-3
    assert (copies / "tok-3.preview.png").read_bytes() == b"png 3"
    assert (copies / "tok-6.preview.png").read_bytes() == b"png 6"
    assert (host_folders / "embeddings" / "tok.preview.png").read_bytes() == b"png 6"
    assert registered[-1] == "tok.safetensors" and "tok-3.safetensors" in registered


def test_a_stopped_runs_last_checkpoint_shows_the_runs_last_preview(host_folders, monkeypatch):
    """A stop between previews: its checkpoint (the final embedding's vectors) gets the card preview the
    final embedding gets, never "NO PREVIEW" next to cards that have one."""
    from lib_ti.checkpoints import checkpoint_dir

    monkeypatch.setattr(folders, "checkpoint_subdir", lambda: "ti-trainer")
    monkeypatch.setattr(gpu_queue, "progress_image", lambda image: None)
    cfg = runner.resolve(TrainConfig(name="tok", data_dir=str(host_folders / "data")), resume=False)
    publisher = runner._Publisher(Job("tok-1", "tok"), cfg, registry.current_host())
    folder = checkpoint_dir(cfg.run_dir)
    folder.mkdir(parents=True)
    (cfg.run_dir / "previews").mkdir()
    preview = cfg.run_dir / "previews" / "tok-20.png"
    preview.write_bytes(b"png 20")
    publisher.handle(events.Preview(20, preview, image=None))
    ckpt = folder / "tok-23.safetensors"  # stopped at step 23
    ckpt.write_bytes(b"embedding 23")
    final = cfg.run_dir / "tok.safetensors"
    final.write_bytes(b"final")
    publisher.handle(events.Saved(23, final, is_final=True, checkpoint=ckpt))
    publisher.publish_final()
    copies = host_folders / "embeddings" / "ti-trainer" / "tok"
    assert (copies / "tok-23.preview.png").read_bytes() == b"png 20"
    assert (host_folders / "embeddings" / "tok.preview.png").read_bytes() == b"png 20"


# ---------------------------------------------------------------------- the comparison grid
def test_grid_prompts_name_each_checkpoint():
    from lib_ti.hosts import compare

    cfg = TrainConfig(name="tok", preview_prompt="a tok on a table")
    assert compare.prompts_from("", cfg) == ["a tok on a table"]
    assert compare.prompts_from("a [name] toy\n\n a photo of tok ", cfg) == ["a [name] toy", "a photo of tok"]
    with pytest.raises(TIError, match="do not name the embedding"):
        compare.prompts_from("a cat\na tokamak", cfg)  # "tokamak" is another word
    assert compare.prompt_for("a [name] toy, tok style", "tok", "tok-500") == "a tok-500 toy, tok-500 style"
    assert compare.prompt_for("a tok-100 and tok", "tok", "tok-500") == "a tok-100 and tok-500"
    with pytest.raises(TIError, match="at most"):
        compare.prompts_from("\n".join(["[name]"] * (compare.MAX_PROMPTS + 1)), cfg)


def test_grid_renders_prompts_by_checkpoints_with_the_runs_preview_parameters(host_folders, no_jobs, monkeypatch):
    from PIL import Image

    from lib_ti.hosts import compare

    monkeypatch.setattr(folders, "checkpoint_subdir", lambda: "ti-trainer")
    copies = host_folders / "embeddings" / "ti-trainer" / "tok"
    copies.mkdir(parents=True)
    for step in (100, 20):
        (copies / f"tok-{step}.safetensors").write_bytes(b"x")
    (copies / "tok-20.preview.png").write_bytes(b"png")  # a card preview is no checkpoint
    (host_folders / "embeddings" / "tok.safetensors").write_bytes(b"x")
    cfg = TrainConfig(name="tok", width=64, height=64, preview_steps=7, preview_seed=3, preview_sampler="DDIM")
    assert compare.published_checkpoints(cfg) == ["tok-20", "tok-100", "tok"]
    with pytest.raises(TIError, match="no published checkpoint named 'tok-30'"):
        compare.checkpoints_from("tok-30", cfg)
    shades = {"tok-20": 40, "tok-100": 120, "tok": 200}
    requests = []

    def txt2img(request):
        requests.append(request)
        name = next(n for n in sorted(shades, key=len, reverse=True) if n in request.prompt)
        return Image.new("RGB", (request.width, request.height), (shades[name], 0, 0))

    registry.current_host().render = txt2img
    path = compare.render_grid(cfg, "a [name] toy\na tok photo", "tok-20, tok")
    assert [r.prompt for r in requests] == ["a tok-20 toy", "a tok toy", "a tok-20 photo", "a tok photo"]
    assert {(r.steps, r.seed, r.sampler_name, r.width) for r in requests} == {(7, 3, "DDIM", 64)}
    grid = Image.open(path)
    left = grid.width - 2 * 64
    assert grid.size == (left + 128, compare.LABEL_HEIGHT + 128)
    assert grid.getpixel((left + 32, compare.LABEL_HEIGHT + 96))[0] == 40  # row 2, column tok-20
    assert grid.getpixel((left + 96, compare.LABEL_HEIGHT + 32))[0] == 200  # row 1, column tok
    assert path.parent == host_folders / "runs" / "tok" / "grids"
    active = runner.new_job(TrainConfig(name="other"))
    active.state = "running"
    _, message = webui_tab._compare_clicked("", "", *_form_args(name="tok"))
    assert "already active" in message and len(requests) == 4  # refused at once, nothing rendered


def test_scoring_in_the_webui_waits_for_training_and_tables_the_scores(tmp_path, monkeypatch):
    from lib_ti.hosts import scoring
    from lib_ti.scoring.score import CheckpointScore, ScoreReport

    job = runner.new_job(TrainConfig(name="busy"))
    job.state = "running"
    try:
        with pytest.raises(TIError, match="a training run is active \\(busy\\)"):
            scoring.score_run_folder(tmp_path)
    finally:
        job.finish(stopped=True)
    with pytest.raises(TIError, match="not a training run folder"):  # before the host's model is touched
        scoring.score_run_folder(tmp_path)
    rows = [CheckpointScore(100, "a/tok-100.safetensors", 0.61, 0.28, 1.0),
            CheckpointScore(200, "a/tok-200.safetensors", 0.66, 0.27, 1.3)]
    table = scoring.report_markdown(ScoreReport("a", "tok", "clip", "a photo of a tok", ["x [name]"], 2, 5, rows, 200))
    assert "| 100 | 0.610 | 0.280 | 1.00 |" in table and "| **200** (recommended) | **0.660** |" in table
    assert "Recommended: step 200, `a/tok-200.safetensors`" in table


def test_score_button_scores_the_chosen_run_and_says_how_to_get_a_clip(host_folders, no_jobs, monkeypatch):
    from lib_ti.hosts import scoring
    from lib_ti.scoring.score import CheckpointScore, ScoreReport

    for name in ("tok", "other"):  # two runs on disk: the form names one, Saved run the other
        run = host_folders / "runs" / name
        (run / "checkpoints").mkdir(parents=True)
        TrainConfig(name=name, data_dir=str(host_folders / "data")).save(run / "config.yaml")
        (run / "checkpoints" / f"{name}-100.safetensors").write_bytes(b"x")
    monkeypatch.setattr(registry, "current_host", lambda: pytest.fail("the host was touched before CLIP was found"))
    grid, table, message = webui_tab._score_clicked(None, str(host_folders / "no-clip"), *_form_args(name="tok"))
    assert "ti-trainer-error" in message and "no CLIP model" in message and "hf download" in message
    assert "CLIP model (Score checkpoints" in message and "--clip" not in message  # the tab's box, not the CLI flag
    scored = []

    def score_run_folder(folder, *, clip):
        scored.append((Path(folder), clip))
        rows = [CheckpointScore(100, "c/tok-100.safetensors", 0.6, 0.3, 1.0),
                CheckpointScore(200, "c/tok-200.safetensors", 0.7, 0.25, 1.2)]
        return ScoreReport(str(folder), "tok", clip, "a tok", ["a [name]"], 2, 5, rows, 200, grid="g/grid.png")

    monkeypatch.setattr(scoring, "score_run_folder", score_run_folder)
    grid, table, message = webui_tab._score_clicked("other", " ", *_form_args(name="tok"))
    assert scored == [(host_folders / "runs" / "other", scoring.DEFAULT_CLIP)]  # Saved run wins; empty box: default
    assert grid == "g/grid.png" and "**200** (recommended)" in table and "step 200 recommended" in message
    webui_tab._score_clicked("", "my/clip", *_form_args(name="tok"))
    assert scored[-1] == (host_folders / "runs" / "tok", "my/clip")  # no Saved run: the form's run
    active = runner.new_job(TrainConfig(name="busy"))
    active.state = "running"
    _, _, message = webui_tab._score_clicked("", "my/clip", *_form_args(name="tok"))
    assert "already active" in message and len(scored) == 2  # refused at once, nothing scored


def test_pivotal_run_publishes_its_lora_and_protects_an_existing_one(host_folders, monkeypatch, tmp_path):
    loras = host_folders / "models" / "Lora"
    monkeypatch.setattr(folders, "lora_dir", lambda: loras)
    published: list[tuple[Path, Path]] = []
    monkeypatch.setattr(folders, "publish", lambda host, path, target: published.append((path, target)) or target)
    monkeypatch.setattr(folders, "publish_lora", lambda path, target: published.append((path, target)) or target)
    cfg = TrainConfig(name="tok", data_dir=str(host_folders / "data"), mode="pivotal")
    publisher = runner._Publisher(Job("tok-1", "tok"), cfg, registry.current_host())
    monkeypatch.setattr(publisher, "_publish_checkpoint", lambda step, path, is_final: None)
    publisher.handle(events.Saved(4, tmp_path / "tok.safetensors", True, None, tmp_path / "tok-lora.safetensors"))
    publisher.publish_final()
    publisher.job.finish(stopped=False)
    outcome = publisher.job.outcome_html()  # the run panel names both files and how a prompt uses them
    assert str(loras / "tok.safetensors") in outcome and "&lt;lora:tok:1&gt;" in outcome
    assert publisher.job.status()["lora_path"] == str(loras / "tok.safetensors")
    assert published == [(tmp_path / "tok.safetensors", host_folders / "embeddings" / "tok.safetensors"),
                         (tmp_path / "tok-lora.safetensors", loras / "tok.safetensors")]  # <lora:tok:1> and tok
    loras.mkdir(parents=True)
    (loras / "tok.safetensors").write_bytes(b"x")
    with pytest.raises(TIError, match="a LoRA named 'tok' already exists"):
        runner.resolve(cfg, resume=False)
    assert runner.resolve(cfg.replace(mode="embedding"), resume=False)  # an embedding run leaves it alone
    with pytest.raises(TIError, match="gradient_checkpointing=True is invalid with mode pivotal"):
        runner.resolve(cfg.replace(overwrite=True, gradient_checkpointing=True), resume=False)


def test_tab_controls_are_kept_out_of_the_webuis_ui_config():
    """The webui keys ui-config.json by tab and label: ours would take the host's "Max steps" 100000."""
    import types

    from lib_ti.hosts.widgets import keep_out_of_ui_config

    leaf = types.SimpleNamespace()
    row = types.SimpleNamespace(children=[leaf, types.SimpleNamespace(children=[])])
    tab = types.SimpleNamespace(children=[row])
    keep_out_of_ui_config(tab)
    assert tab.do_not_save_to_config and row.do_not_save_to_config and leaf.do_not_save_to_config
    assert row.children[1].do_not_save_to_config
