"""The Train Embedding tab (Gradio 3.41, the webui's version).

Registered inside the host's Train tab when the host calls ``on_ui_train_tabs``, and as a top-level
tab otherwise. The controls are generated from ``TrainConfig``'s fields, so every training setting of
the core config is here with its help text, and nothing is wired twice.
"""

from __future__ import annotations

import typing
from dataclasses import fields

from ..config import BASICS, TrainConfig
from ..dataset.preflight import check
from ..errors import TIError
from ..options import field_help, field_label
from ..templates import builtin_names
from . import a1111, runner, webui_dataset
from .widgets import sections, ui_fields, values_to_options, widget

TAB_TITLE = "Train Embedding"
ELEM_PREFIX = "ti_trainer"
_state = {"in_train_tab": False}

# The controls, from TrainConfig's fields: the basics on top, then one folded section each.
SECTIONS: list[tuple[str, list[str]]] = [(title, [f.name for f in ui_fields(TrainConfig, title)])
                                         for title in sections(TrainConfig) if title != BASICS]
TOP_FIELDS = [f.name for f in ui_fields(TrainConfig, BASICS)]
FIELD_NAMES = TOP_FIELDS + [name for _, names in SECTIONS for name in names]
# The host's UiTrainTabParams.txt2img_preview_params, in its order (modules/ui.py), and the fields they fill.
HOST_TXT2IMG_PARAMS = ("prompt", "negative_prompt", "steps", "sampler_name", "cfg_scale", "seed", "width", "height")
TXT2IMG_FIELDS = [next(f.name for f in fields(TrainConfig) if f.metadata.get("txt2img") == param)
                  for param in HOST_TXT2IMG_PARAMS]
ENCODER_CHOICES = {"all": [], "clip_l": ["clip_l"], "clip_g": ["clip_g"]}


def element_id(name: str) -> str:
    return f"{ELEM_PREFIX}_{name}"


# ---------------------------------------------------------------------- callbacks
def on_ui_train_tabs(params) -> None:
    """Inside the host's Train tab: ``params.txt2img_preview_params`` feeds "previews from txt2img"."""
    import gradio as gr
    _state["in_train_tab"] = True
    with gr.Tab(label=TAB_TITLE, id=element_id("tab")):
        build_controls(list(getattr(params, "txt2img_preview_params", []) or []))
    with gr.Tab(label=webui_dataset.TAB_TITLE, id=element_id("dataset_tab")):
        webui_dataset.build_controls()


def on_ui_tabs():
    """A top-level tab only on hosts whose Train tab never called on_ui_train_tabs (it runs first in A1111)."""
    if _state["in_train_tab"]:
        return []
    return [(_build(), TAB_TITLE, element_id("top_tab"))]


def _build():
    import gradio as gr
    with gr.Blocks(analytics_enabled=False) as block:
        with gr.Tabs():
            with gr.Tab(label="Train"):
                build_controls([])
            with gr.Tab(label="Dataset"):
                webui_dataset.build_controls()
    return block


# ---------------------------------------------------------------------- the controls
def build_controls(txt2img_params: list) -> None:
    import gradio as gr
    defaults = TrainConfig().to_dict() | a1111.config_defaults()
    widgets: dict[str, typing.Any] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            gr.HTML("<p>Train a textual-inversion embedding on the checkpoint loaded above. Every checkpoint of the "
                    "embedding is saved into the embeddings folder and usable in txt2img at once.</p>")
            with gr.Row():
                for name in ("name", "init_text", "num_vectors"):
                    widgets[name] = _widget(name, defaults[name])
            with gr.Row():
                widgets["init_from"] = _widget("init_from", "", gr.Dropdown, choices=_names(), allow_custom_value=True)
                refresh = gr.Button(value="\U0001f504", elem_id=element_id("refresh"), scale=0, min_width=40)
                widgets["overwrite"] = _widget("overwrite", defaults["overwrite"])
            widgets["data_dir"] = _widget("data_dir", defaults["data_dir"])
            widgets["template"] = _widget("template", defaults["template"], gr.Dropdown, choices=builtin_names(),
                                          allow_custom_value=True, info=_help("template") + " (a file path works)")
            for title, names in SECTIONS:
                with gr.Accordion(title, open=title == "Training"):
                    for row in range(0, len(names), 3):
                        with gr.Row():
                            for name in names[row:row + 3]:
                                widgets[name] = _widget(name, defaults[name])
            from_txt2img = gr.Checkbox(label="Read preview parameters (prompt, sampler, seed, size, ...) from the "
                                             "txt2img tab", value=False, visible=bool(txt2img_params),
                                       elem_id=element_id("from_txt2img"))
            with gr.Row():
                check = gr.Button(value="Check", elem_id=element_id("check"))
                create = gr.Button(value="Create embedding", elem_id=element_id("create"))
                train = gr.Button(value="Train", variant="primary", elem_id=element_id("train"))
                resume = gr.Button(value="Resume", elem_id=element_id("resume"))
                stop = gr.Button(value="Stop", elem_id=element_id("stop"))
        with gr.Column(scale=2):
            task_id = gr.Text(elem_id=element_id("output"), value="", show_label=False)
            gallery = gr.Gallery(label="Previews", show_label=False, elem_id=element_id("gallery"), columns=4)
            # Written by the page's script while a run lasts, never a Gradio output (Gradio would re-render it).
            gr.HTML(elem_id=element_id("progress"), value="<div class='ti-trainer-live'></div>")
            outcome = gr.HTML(elem_id=element_id("outcome"), value="")

    inputs = [task_id, *[widgets[n] for n in FIELD_NAMES], from_txt2img, *txt2img_params]
    outputs = [gallery, outcome]
    train.click(fn=a1111.wrap_gpu_call(_train_clicked, [None]), _js="ti_trainer_start", inputs=inputs,
                outputs=outputs)
    resume.click(fn=a1111.wrap_gpu_call(_resume_clicked, [None]), _js="ti_trainer_start", inputs=inputs,
                 outputs=outputs)
    create.click(fn=a1111.wrap_gpu_call(_create_clicked, [None]), inputs=inputs, outputs=outputs)
    check.click(fn=_check_clicked, inputs=inputs, outputs=outputs)
    stop.click(fn=_stop_clicked, inputs=[], outputs=[outcome], queue=False)
    refresh.click(fn=lambda: gr.update(choices=_names()), inputs=[], outputs=[widgets["init_from"]], queue=False)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _widget(name: str, default, control=None, **overrides):
    """The field's control; ``control`` (a Gradio class) replaces the one its type implies."""
    import gradio as gr

    if name == "train_encoders":  # SDXL: both encoders, or one while the other keeps its init vectors
        control, default, overrides = gr.Dropdown, "all", {"choices": list(ENCODER_CHOICES)} | overrides
    if control is None:
        return widget(TrainConfig, _FIELDS[name], default, element_id(name), **overrides)
    kwargs = {"label": field_label(_FIELDS[name]), "info": field_help(_FIELDS[name]), "elem_id": element_id(name)}
    return control(value=default, **(kwargs | overrides))


def _help(name: str) -> str:
    return field_help(_FIELDS[name])


def _names() -> list[str]:
    return [""] + a1111.loaded_embedding_names()


# ---------------------------------------------------------------------- handlers
def config_from_values(values: list, from_txt2img: bool, txt2img: list) -> TrainConfig:
    """The tab's values as a validated config (numbers come back from Gradio as floats)."""
    data = dict(zip(FIELD_NAMES, values, strict=True))
    if from_txt2img and txt2img:
        data.update(zip(TXT2IMG_FIELDS, txt2img, strict=False))  # hosts may pass fewer
    data["train_encoders"] = ENCODER_CHOICES.get(data.get("train_encoders") or "all", [])
    return TrainConfig.from_dict(values_to_options(TrainConfig, data))


def _split(args: tuple) -> tuple[TrainConfig, str]:
    n = len(FIELD_NAMES)
    task_id, values, from_txt2img, txt2img = args[0], list(args[1:n + 1]), args[n + 1], list(args[n + 2:])
    return config_from_values(values, bool(from_txt2img), txt2img), task_id


def _train_clicked(*args):
    return _run(args, resume=False)


def _resume_clicked(*args):
    return _run(args, resume=True)


def _run(args: tuple, *, resume: bool):
    try:
        cfg, _ = _split(args)
        if resume:  # the run's own settings; from the form only what may change on resume
            kept = {f.name: getattr(cfg, f.name) for f in fields(TrainConfig) if f.metadata.get("resume")}
            cfg = runner.request_config({"name": cfg.name, **kept}, resume=True)
        # Paths typed here are the webui user's own, as in the host's Train tab: confined like API requests only
        # when others can reach the UI (a1111.ui_exposed).
        cfg = runner.resolve(cfg, resume=resume, confined=a1111.ui_exposed())
        job = runner.new_job(cfg)
    except TIError as exc:
        return None, _error_html(str(exc))
    runner.run(job, cfg, resume=resume)
    return [str(path) for _, path in job.previews], job.outcome_html() + job.summary_html()


def _create_clicked(*args):
    try:
        cfg, _ = _split(args)
        path = runner.create_embedding(cfg)
    except TIError as exc:
        return None, _error_html(str(exc))
    return None, f"<p>Created {path}: type <code>{cfg.name}</code> in a prompt to use it.</p>"


def _check_clicked(*args):
    """The pre-flight check: images usable and skipped, captions, trigger, sizes, memory, learning rate."""
    import html

    try:
        cfg, _ = _split(args)
        if a1111.ui_exposed():
            runner.check_readable(cfg)
        report = check(cfg, family=a1111.loaded_family())
    except TIError as exc:
        return None, _error_html(str(exc))
    cls = "ti-trainer-report" if report.ok else "error"
    return None, f"<pre class='{cls}'>{html.escape(report.format())}</pre>"


def _stop_clicked():
    job = runner.current_job()
    if job is None:
        return "<p>No training run is active.</p>"
    job.request_stop()
    return f"<p>Stopping {job.name} after the current step; it will be saved.</p>"


def _error_html(message: str) -> str:
    import html

    return f"<div class='error'>{html.escape(message)}</div>"
