"""The Train Embedding tab (Gradio 3.41, the webui's version).

Registered inside the host's Train tab when the host calls ``on_ui_train_tabs``, and as a top-level
tab otherwise. The controls are generated from ``TrainConfig``'s fields, so every training setting of
the core config is here with its help text, and nothing is wired twice.

Two columns: the settings (the common ones on top, the rest folded under "Advanced settings") and a
run panel (buttons, messages, the host's progress bar, live preview, step/loss/ETA with the loss chart,
previews by step). A run lives in a thread of its own (``runner.start``), not in the request that
started it: the panel is polled from the server (``_poll``, clicked by the page's script while the tab
is visible), so reloading the page shows the active run again, and Stop works from any page.
"""

from __future__ import annotations

import html
import json
import typing
from dataclasses import fields
from pathlib import Path

from ..config import TrainConfig
from ..dataset.preflight import check
from ..errors import TIError, shown
from ..families import FAMILIES
from ..options import field_label, field_ui_help
from ..scoring.defaults import DEFAULT_CLIP
from ..templates import builtin_names
from . import compare, folders, gpu_queue, registry, runner, scoring, settings, webui_dataset
from .jobs import Job
from .widgets import keep_out_of_ui_config, sections, ui_fields, values_to_options, widget

TAB_TITLE = "Train Embedding"
ELEM_PREFIX = "ti_trainer"
_state = {"in_train_tab": False}

# The common path, on top: what a first run needs. Everything else is folded, by section.
COMMON_ROWS: list[tuple[str, ...]] = [("name", "init_text", "num_vectors", "overwrite"), ("data_dir", "template"),
                                      ("steps", "learning_rate", "width", "height")]
COMMON = [name for row in COMMON_ROWS for name in row]
SECTIONS: list[tuple[str, list[str]]] = [
    (title, names) for title in sections(TrainConfig)
    if (names := [f.name for f in ui_fields(TrainConfig, title) if f.name not in COMMON])]
FIELD_NAMES = COMMON + [name for _, names in SECTIONS for name in names]
# The host's UiTrainTabParams.txt2img_preview_params, in its order (modules/ui.py), and the fields they fill.
HOST_TXT2IMG_PARAMS = ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height")
TXT2IMG_FIELDS = [next(f.name for f in fields(TrainConfig) if f.metadata.get("txt2img") == param)
                  for param in HOST_TXT2IMG_PARAMS]
ENCODER_CHOICES = {"both": [], "clip_l": ["clip_l"], "clip_g": ["clip_g"]}
# The run's settings the panel lists (a run can outlive the form that started it).
PANEL_SETTINGS = ("data_dir", "template", "num_vectors", "init_text", "width", "height", "steps", "learning_rate",
                  "batch_size", "seed", "output_dir")


def element_id(name: str) -> str:
    return f"{ELEM_PREFIX}_{name}"


# ---------------------------------------------------------------------- callbacks
def on_ui_train_tabs(params) -> None:
    """Inside the host's Train tab: ``params.txt2img_preview_params`` feeds "previews from txt2img"."""
    import gradio as gr
    _state["in_train_tab"] = True
    with gr.Tab(label=TAB_TITLE, id=element_id("tab"), elem_id=element_id("tab")) as train_tab:
        build_controls(list(getattr(params, "txt2img_preview_params", []) or []))
    with gr.Tab(label=webui_dataset.TAB_TITLE, id=element_id("dataset_tab"),
                elem_id=element_id("dataset_tab")) as dataset_tab:
        webui_dataset.build_controls()
    keep_out_of_ui_config(train_tab)
    keep_out_of_ui_config(dataset_tab)


def on_ui_tabs():
    """A top-level tab only on hosts whose Train tab never called on_ui_train_tabs (it runs first in A1111)."""
    if _state["in_train_tab"]:
        return []
    return [(_build(), TAB_TITLE, element_id("top_tab"))]


def _build():
    import gradio as gr
    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Tabs():
            with gr.Tab(label="Train", elem_id=element_id("tab")):
                build_controls([])
            with gr.Tab(label="Dataset", elem_id=element_id("dataset_tab")):
                webui_dataset.build_controls()
    keep_out_of_ui_config(block)
    return block


# ---------------------------------------------------------------------- the controls
def form_defaults() -> dict[str, typing.Any]:
    """The form's starting values: the config's defaults, the owner's Settings, the loaded model's size."""
    defaults = TrainConfig().to_dict() | settings.config_defaults()
    model = registry.current_host().loaded_model()
    if model is not None:
        defaults["width"] = defaults["height"] = model.training_size
    defaults["train_encoders"] = _encoder_choice(defaults["train_encoders"])
    return defaults


def build_controls(txt2img_params: list) -> None:
    import gradio as gr
    host = registry.current_host()
    if host.reason:  # a webui no adapter serves: one sentence saying what is missing, never a traceback
        gr.HTML(_error_html(host.reason), elem_id=element_id("unsupported"))
        return
    defaults: dict[str, typing.Any] = form_defaults()
    # The size fits the model loaded when the page loads (Gradio calls a callable value then): the webui
    # builds the page while its first checkpoint is still loading.
    defaults["width"] = lambda: form_defaults()["width"]
    defaults["height"] = lambda: form_defaults()["height"]
    widgets: dict[str, typing.Any] = {}
    with gr.Row(equal_height=False, elem_id=element_id("main")):
        with gr.Column(scale=3, elem_id=element_id("settings")):
            for row in COMMON_ROWS:
                with gr.Row():
                    for name in row:
                        widgets[name] = _widget(name, defaults[name])
            with gr.Row(elem_id=element_id("load_row")):
                runs = gr.Dropdown(label="Saved run", choices=_run_choices(), value=None, elem_id=element_id("runs"),
                                   info="a run in the extension's output folder: Load run puts its settings in the "
                                        "form (then Resume continues it, or Train starts a new run from them)")
                refresh_runs = gr.Button(value="\U0001f504", elem_id=element_id("refresh_runs"), scale=0,
                                         min_width=40)
                load = gr.Button(value="Load run", elem_id=element_id("load"), scale=0, min_width=110)
            with gr.Accordion("Advanced settings", open=False, elem_id=element_id("advanced")):
                for title, names in SECTIONS:
                    with gr.Accordion(title, open=True):
                        for first in range(0, len(names), 3):
                            with gr.Row():
                                for name in names[first:first + 3]:
                                    widgets[name] = _widget(name, defaults[name])
                with gr.Row():
                    refresh = gr.Button(value="Refresh the embedding list", elem_id=element_id("refresh"))
                    from_txt2img = gr.Checkbox(label="Read preview parameters (prompt, sampler, seed, size, ...) "
                                                     "from the txt2img tab", value=False, visible=bool(txt2img_params),
                                               elem_id=element_id("from_txt2img"))
        with gr.Column(scale=2, elem_id=element_id("panel")):
            with gr.Row(elem_id=element_id("buttons")):
                train = gr.Button(value="Train", variant="primary", elem_id=element_id("train"))
                resume = gr.Button(value="Resume", elem_id=element_id("resume"))
                stop = gr.Button(value="Stop", variant="stop", elem_id=element_id("stop"))
            with gr.Row(elem_id=element_id("tools")):
                check = gr.Button(value="Check", elem_id=element_id("check"))
                create = gr.Button(value="Create embedding", elem_id=element_id("create"))
            message = gr.HTML(elem_id=element_id("message"), value="")
            # The host's progress bar is inserted before this anchor, its live preview into the box below;
            # both are written by the page's script, never Gradio outputs (Gradio would re-render them).
            gr.HTML(elem_id=element_id("progressbar"), value="")
            gr.HTML(elem_id=element_id("live"), value="")
            panel = gr.HTML(elem_id=element_id("run"), value=panel_html(None))
            gallery = gr.Gallery(label="Previews by step", show_label=True, elem_id=element_id("gallery"), columns=4)
            with gr.Accordion("Compare checkpoints", open=False, elem_id=element_id("compare_box")):
                compare_prompts = gr.Textbox(label="Prompts", lines=3, elem_id=element_id("compare_prompts"),
                                             placeholder="one a line, [name] where the embedding goes; empty: the "
                                                         "run's preview prompt")
                compare_checkpoints = gr.Textbox(label="Checkpoints", elem_id=element_id("compare_checkpoints"),
                                                 placeholder="e.g. my-embedding-500, my-embedding; empty: every "
                                                             "published checkpoint of the name above")
                compare_button = gr.Button(value="Comparison grid", elem_id=element_id("compare"))
                grid = gr.Image(label="Comparison grid", type="filepath", interactive=False,
                                elem_id=element_id("grid"))
            with gr.Accordion("Score checkpoints", open=False, elem_id=element_id("score_box")):
                score_clip = gr.Textbox(label="CLIP model", value=DEFAULT_CLIP, elem_id=element_id("score_clip"),
                                        info="a local folder, or a model id in the local Hugging Face cache; never "
                                             "downloaded. Scores the run chosen in Saved run, else the form's")
                score_button = gr.Button(value="Score checkpoints", elem_id=element_id("score"))
                score_table = gr.Markdown(elem_id=element_id("score_table"), value="")
                score_grid = gr.Image(label="Scored checkpoints", type="filepath", interactive=False,
                                      elem_id=element_id("score_grid"))
            task_id = gr.Textbox(visible=False, elem_id=element_id("task"), value="")
            status = gr.Textbox(visible=False, elem_id=element_id("status"), value="{}")
            poll = gr.Button(visible=False, elem_id=element_id("poll"))

    inputs = [task_id, *[widgets[n] for n in FIELD_NAMES], from_txt2img, *txt2img_params]
    quick = {"queue": False, "show_progress": "hidden"}
    start_js = js_kwarg("ti_trainer_start")
    train.click(fn=_train_clicked, inputs=inputs, outputs=[message, runs], **start_js, **quick)
    resume.click(fn=_resume_clicked, inputs=inputs, outputs=[message, runs], **start_js, **quick)
    stop.click(fn=_stop_clicked, inputs=[], outputs=[message], **quick)
    poll.click(fn=_poll, inputs=[status], outputs=[status, panel, gallery], **quick)
    # The host's GPU-call wrapper appends its timing to the last output, and puts None first on an error.
    create.click(fn=gpu_queue.wrap_gpu_call(_create_clicked, [_update()]), inputs=inputs, outputs=[task_id, message])
    compare_button.click(fn=gpu_queue.wrap_gpu_call(_compare_clicked, [_update()]),
                         inputs=[compare_prompts, compare_checkpoints, *inputs], outputs=[grid, message])
    # On an error the host's wrapper answers its extra outputs and the message: one per output before the message.
    score_button.click(fn=gpu_queue.wrap_gpu_call(_score_clicked, [_update(), _update()]),
                       inputs=[runs, score_clip, *inputs], outputs=[score_grid, score_table, message])
    check.click(fn=_check_clicked, inputs=inputs, outputs=[message])
    load.click(fn=_load_clicked, inputs=[runs], outputs=[message, *[widgets[n] for n in FIELD_NAMES]], **quick)
    refresh_runs.click(fn=lambda: _update(choices=_run_choices()), inputs=[], outputs=[runs], **quick)
    refresh.click(fn=lambda: _update(choices=_names()), inputs=[], outputs=[widgets["init_from"]], **quick)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def js_kwarg(function: str) -> dict[str, str]:
    """An event's page-side function: ``_js=`` in Gradio 3 (A1111, reForge), ``js=`` in Gradio 4 (Forge, which
    would also rename ``_js`` itself, but drops unknown keywords with only a warning)."""
    import gradio as gr

    major = int(str(getattr(gr, "__version__", "3")).split(".")[0] or 3)
    return {"js" if major >= 4 else "_js": function}


def _widget(name: str, default, control=None, **overrides):
    """The field's control; ``control`` (a Gradio class) replaces the one its type implies."""
    import gradio as gr

    if name == "train_encoders":  # SDXL: both encoders, or one while the other keeps its init vectors
        control, overrides = gr.Dropdown, {"choices": list(ENCODER_CHOICES)} | overrides
    elif name == "template":
        control = gr.Dropdown
        overrides = {"choices": builtin_names(), "allow_custom_value": True,
                     "info": field_ui_help(_FIELDS[name]) + " (a file path works)"} | overrides
    elif name == "init_from":
        control, overrides = gr.Dropdown, {"choices": _names(), "allow_custom_value": True} | overrides
    if control is None:
        return widget(TrainConfig, _FIELDS[name], default, element_id(name), **overrides)
    kwargs = {"label": field_label(_FIELDS[name]), "info": field_ui_help(_FIELDS[name]), "elem_id": element_id(name)}
    return control(value=default, **(kwargs | overrides))


def _update(**changes: typing.Any) -> dict[str, typing.Any]:
    """What ``gr.update(**changes)`` returns in Gradio 3.x, without importing Gradio: the handlers stay
    testable where no Gradio is installed (CI)."""
    return {"__type__": "update", **changes}


def _names() -> list[str]:
    return ["", *registry.current_host().loaded_embeddings()]


def _run_choices() -> list[str]:
    try:
        return [run["output_dir"] for run in runner.runs_on_disk()]
    except Exception:  # an unreadable output folder must not break building the page
        return []


def _encoder_choice(encoders: list[str]) -> str:
    return next((k for k, v in ENCODER_CHOICES.items() if sorted(v) == sorted(encoders)), "both")


# ---------------------------------------------------------------------- form <-> config
def config_from_values(values: list, from_txt2img: bool, txt2img: list) -> TrainConfig:
    """The tab's values as a validated config (numbers come back from Gradio as floats)."""
    data = dict(zip(FIELD_NAMES, values, strict=True))
    if from_txt2img and txt2img:
        data.update(zip(TXT2IMG_FIELDS, txt2img, strict=False))  # hosts may pass fewer
    data["train_encoders"] = ENCODER_CHOICES.get(data.get("train_encoders") or "both", [])
    return TrainConfig.from_dict(values_to_options(TrainConfig, data))


def values_from_config(cfg: TrainConfig) -> list:
    """The form's values for a saved run's config, in FIELD_NAMES order (the run folder relative to the root)."""
    data = cfg.to_dict()
    data["train_encoders"] = _encoder_choice(cfg.train_encoders)
    if cfg.output_dir:
        root = folders.output_root().resolve()
        folder = Path(cfg.output_dir).resolve()
        data["output_dir"] = folder.relative_to(root).as_posix() if folder.is_relative_to(root) else cfg.output_dir
    return [data[name] for name in FIELD_NAMES]


def _split(args: tuple) -> tuple[TrainConfig, str]:
    n = len(FIELD_NAMES)
    task_id, values, from_txt2img, txt2img = args[0], list(args[1:n + 1]), args[n + 1], list(args[n + 2:])
    return config_from_values(values, bool(from_txt2img), txt2img), task_id


def resume_config(form: TrainConfig) -> TrainConfig:
    """The saved run's own config, with only the resumable settings taken from the form; any other difference
    is refused, listing each one with the run's and the form's values."""
    saved, placed, diffs = runner.resume_differences(form)
    if diffs:
        listed = "; ".join(f"{field_label(_FIELDS[name])}: run {shown(old)}, form {shown(new)}"
                           for name, old, new in diffs)
        raise ResumeMismatch(
            f"Resume continues {form.name!r} with its own saved settings, and the form differs from them in: "
            f"{listed}. Only the steps, the learning-rate and clipping schedules, and the saving, logging and "
            "preview settings may change on resume. Press Load run (the run is selected) to put its settings in "
            "the form, then Resume; or give another name to train a new run with these settings.",
            output_dir=placed.output_dir)
    kept = {f.name: getattr(placed, f.name) for f in fields(TrainConfig) if f.metadata.get("resume")}
    return saved.resumed(kept)[0]


class ResumeMismatch(TIError):
    def __init__(self, message: str, output_dir: str) -> None:
        super().__init__(message)
        self.output_dir = output_dir


# ---------------------------------------------------------------------- handlers
def _train_clicked(*args):
    return _start(args, resume=False)


def _resume_clicked(*args):
    return _start(args, resume=True)


def _start(args: tuple, *, resume: bool):
    """Checks, then the run in its own thread; the answer comes at once (the panel follows the run)."""
    try:
        runner.refuse_if_active()  # at once, before any check: never queued to start by itself later
        cfg, task_id = _split(args)
        if resume:
            cfg = resume_config(cfg)
        # Paths typed here are the webui user's own, as in the host's Train tab: confined like API requests only
        # when others can reach the UI (folders.ui_exposed).
        cfg = runner.resolve(cfg, resume=resume, confined=folders.ui_exposed())
        job = runner.new_job(cfg, task_id)
    except ResumeMismatch as exc:
        return _error_html(str(exc)), _update(choices=_run_choices(), value=_relative_run(exc.output_dir))
    except TIError as exc:
        return _error_html(str(exc)), _update()
    runner.start(job, cfg, resume=resume)
    verb = "Resuming" if resume else "Training"
    return f"<p class='ti-trainer-info'>{verb} {html.escape(cfg.name)}: the run panel below follows it.</p>", \
        _update(choices=_run_choices())


def _relative_run(output_dir: str) -> str | None:
    root = folders.output_root().resolve()
    folder = Path(output_dir).resolve()
    return folder.relative_to(root).as_posix() if folder.is_relative_to(root) else None


def _stop_clicked():
    job = runner.current_job()
    if job is None:
        return "<p class='ti-trainer-info'>No training run is active.</p>"
    job.request_stop()
    return f"<p class='ti-trainer-info'>Stopping {html.escape(job.name)} after the current step; it will be saved.</p>"


def _load_clicked(output_dir: str | None):
    try:
        cfg = runner.load_run(output_dir or "")
    except TIError as exc:
        return [_error_html(str(exc)), *[_update() for _ in FIELD_NAMES]]
    note = (f"<p class='ti-trainer-info'>Loaded the settings of {html.escape(cfg.name)} "
            f"({html.escape(output_dir or '')}). Resume continues it; Train starts a new run (another name, or "
            "Overwrite).</p>")
    return [note, *values_from_config(cfg)]


def _poll(seen: str | None):
    """The run panel: the active run (else this session's last), its previews only when they changed."""
    job = runner.latest_job()
    if job is None:
        return "{}", panel_html(None), _update()
    status = {"run_id": job.run_id, "task_id": job.task_id, "state": job.state, "active": job.active,
              "previews": len(job.previews)}
    try:
        before = json.loads(seen or "{}")
    except ValueError:
        before = {}
    changed = (before.get("run_id"), before.get("previews")) != (job.run_id, len(job.previews))
    gallery = _update(value=gallery_items(job)) if changed else _update()
    return json.dumps(status), panel_html(job), gallery


def gallery_items(job: Job) -> list[tuple[str, str]]:
    return [(str(path), f"step {step}") for step, path in job.previews]


def panel_html(job: Job | None) -> str:
    """The run panel: state, step/loss/lr/ETA with the loss chart, notes, the outcome, the run's settings."""
    if job is None:
        return ("<div class='ti-trainer-idle'>No run in this session yet. Fill in the settings and press Train, "
                "or choose a saved run and press Load run to resume it.</div>")
    state = {"queued": "waiting for the GPU (a generation is running)", "running": "training",
             "stopping": "stopping after this step", "finished": "finished", "stopped": "stopped",
             "failed": "failed"}.get(job.state, job.state)
    head = (f"<div class='ti-trainer-head'><b>{html.escape(job.name)}</b> "
            f"<span class='ti-trainer-state ti-trainer-{job.state}'>{html.escape(state)}</span></div>")
    outcome = "" if job.active else job.outcome_html()
    settings = "".join(f"<tr><th>{html.escape(field_label(_FIELDS[k]))}</th><td>{html.escape(str(job.settings[k]))}"
                       "</td></tr>" for k in PANEL_SETTINGS if k in job.settings)
    details = f"<details class='ti-trainer-settings'><summary>Settings of this run</summary><table>{settings}</table>" \
              "</details>" if settings else ""
    return f"<div class='ti-trainer-run'>{head}{outcome}{job.summary_html()}{details}</div>"


def _create_clicked(*args):
    try:
        cfg, _ = _split(args)
        path = runner.create_embedding(cfg)
    except TIError as exc:
        return _update(), _error_html(str(exc))
    return _update(), f"<p class='ti-trainer-info'>Created {html.escape(str(path))}: type " \
                      f"<code>{html.escape(cfg.name)}</code> in a prompt to use it.</p>"


def _compare_clicked(prompts: str, checkpoints: str, *args):
    """Prompts x checkpoints through the host's txt2img, with the form's (a loaded run's) preview parameters."""
    try:
        runner.refuse_if_active()  # the GPU is the run's until it ends: refused now, not queued
        cfg, _ = _split(args)
        path = compare.render_grid(cfg, prompts, checkpoints)
    except TIError as exc:
        return _update(), _error_html(str(exc))
    return str(path), f"<p class='ti-trainer-info'>Grid saved as {html.escape(str(path))}.</p>"


def _score_clicked(run: str | None, clip: str, *args):
    """Fidelity and editability of every checkpoint of the chosen run (Saved run, else the form's), on the loaded
    checkpoint: the table with the recommended step marked, and the grid."""
    try:
        runner.refuse_if_active()
        cfg, _ = _split(args)
        folder = runner.resolve_run_dir(cfg.replace(output_dir=run) if run else cfg)
        report = scoring.score_run_folder(folder, clip=(clip or "").strip() or DEFAULT_CLIP)
    except TIError as exc:
        return _update(), _update(), _error_html(str(exc))
    return report.grid, scoring.report_markdown(report), \
        f"<p class='ti-trainer-info'>Scored {len(report.rows)} checkpoints of {html.escape(report.name)}: step " \
        f"{report.recommended} recommended; table and grid in {html.escape(str(Path(report.grid).parent))}.</p>"


def _check_clicked(*args):
    """The pre-flight check: images usable and skipped, captions, trigger, sizes, memory, learning rate."""
    try:
        cfg, _ = _split(args)
        if folders.ui_exposed():
            runner.check_readable(cfg)
        model = registry.current_host().loaded_model()
        family = model.family if model is not None and model.family in FAMILIES else None
        report = check(cfg, family=family, on_cpu=gpu_queue.computes_on_cpu())
    except TIError as exc:
        return _error_html(str(exc))
    cls = "ti-trainer-report" if report.ok else "ti-trainer-report ti-trainer-error"
    return f"<pre class='{cls}'>{html.escape(report.format())}</pre>"


def _error_html(message: str) -> str:
    return f"<div class='ti-trainer-error error'>{html.escape(message)}</div>"

