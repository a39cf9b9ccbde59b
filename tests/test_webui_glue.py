"""Unit tests of the webui glue that needs no host: job status, the tab's value mapping, request checks.

The host's folders are monkeypatched here; that the integration works is the real-host tier's job
(tests/test_webui_real.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_ti import events
from lib_ti.config import TrainConfig
from lib_ti.errors import TIError
from lib_ti.hosts import a1111, runner, webui_tab
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


@pytest.fixture()
def host_folders(tmp_path, monkeypatch):
    """A webui data folder (``tmp_path/webui``) with its embeddings and a dataset, and the output root."""
    webui = tmp_path / "webui"
    for folder in ("embeddings", "data", "textual_inversion_templates"):
        (webui / folder).mkdir(parents=True)
    monkeypatch.setattr(a1111, "data_folder", lambda: webui)
    monkeypatch.setattr(a1111, "templates_dir", lambda: webui / "textual_inversion_templates")
    monkeypatch.setattr(a1111, "output_root", lambda: webui / "runs")
    monkeypatch.setattr(a1111, "embeddings_dir", lambda: webui / "embeddings")
    monkeypatch.setattr(a1111, "extra_read_roots", lambda: [])
    monkeypatch.setattr(a1111, "loaded_embedding_file", lambda name: None)
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
    monkeypatch.setattr(a1111, "extra_read_roots", lambda: [outside])  # the owner allows the folder
    assert runner.resolve(base.replace(data_dir=str(outside / "data")), resume=False)
    # The webui user's own tab reads anywhere unless others can reach the UI: not confined there.
    monkeypatch.setattr(a1111, "extra_read_roots", lambda: [])
    assert runner.resolve(base.replace(data_dir=str(outside / "data")), resume=False, confined=False)


def test_folder_settings_cannot_lead_outside_the_embeddings_folder(host_folders, monkeypatch):
    monkeypatch.setattr(a1111, "checkpoint_subdir", lambda: "../../elsewhere")
    with pytest.raises(TIError, match="checkpoint_subdir="):
        runner.checkpoint_folder(TrainConfig(name="tok"))
    assert set(a1111.PATH_SETTINGS) == {"output_dir", "checkpoint_subdir", "allowed_roots"}  # never set over the API


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
    assert runner.request_config({"name": "tok", "steps": 3}, resume=False).template == "object"  # a new run


def test_pivotal_run_publishes_its_lora_and_protects_an_existing_one(host_folders, monkeypatch, tmp_path):
    loras = host_folders / "models" / "Lora"
    monkeypatch.setattr(a1111, "lora_dir", lambda: loras)
    published: list[tuple[Path, Path]] = []
    monkeypatch.setattr(a1111, "publish", lambda path, target: published.append((path, target)) or target)
    monkeypatch.setattr(a1111, "publish_lora", lambda path, target: published.append((path, target)) or target)
    cfg = TrainConfig(name="tok", data_dir=str(host_folders / "data"), mode="pivotal")
    publisher = runner._Publisher(Job("tok-1", "tok"), cfg)
    monkeypatch.setattr(publisher, "_publish_checkpoint", lambda path: None)
    publisher.handle(events.Saved(4, tmp_path / "tok.safetensors", True, None, tmp_path / "tok-lora.safetensors"))
    publisher.publish_final()
    assert published == [(tmp_path / "tok.safetensors", host_folders / "embeddings" / "tok.safetensors"),
                         (tmp_path / "tok-lora.safetensors", loras / "tok.safetensors")]  # <lora:tok:1> and tok
    loras.mkdir(parents=True)
    (loras / "tok.safetensors").write_bytes(b"x")
    with pytest.raises(TIError, match="a LoRA named 'tok' already exists"):
        runner.resolve(cfg, resume=False)
    assert runner.resolve(cfg.replace(mode="embedding"), resume=False)  # an embedding run leaves it alone
    with pytest.raises(TIError, match="gradient_checkpointing=True is invalid with mode pivotal"):
        runner.resolve(cfg.replace(overwrite=True, gradient_checkpointing=True), resume=False)
