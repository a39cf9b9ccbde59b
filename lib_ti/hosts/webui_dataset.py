"""The TI Dataset tab: prepare images, caption them (the host's BLIP or a local transformers BLIP),
and review or edit the captions. The work is done by ``lib_ti.prepare`` and ``lib_ti.caption``;
this module only builds the controls and reports into them.
"""

from __future__ import annotations

import html
from pathlib import Path

from ..dataset.caption import CaptionOptions, caption_folder, caption_path, review_items, save_caption
from ..dataset.prepare import COMMON, MORE, PrepareOptions
from ..dataset.prepare import run as prepare_folder
from ..errors import TIError
from . import folders, gpu_queue, runner
from .captioner import captioner as host_captioner
from .widgets import ui_fields, values_to_options, widget

TAB_TITLE = "TI Dataset"
HOST_BLIP = "webui BLIP (interrogator)"


def element_id(name: str) -> str:
    return f"ti_trainer_ds_{name}"


def build_controls() -> None:
    import gradio as gr
    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Accordion(COMMON, open=True):
                gr.HTML("<p>Writes resized, cropped, flipped and converted copies into a new folder; the source "
                        "folder is never modified. Captions beside the images are copied along.</p>")
                prep = _controls(PrepareOptions, ui_fields(PrepareOptions, COMMON))
                with gr.Accordion(MORE, open=False):
                    prep |= _controls(PrepareOptions, ui_fields(PrepareOptions, MORE))
                prepare = gr.Button("Prepare", variant="primary", elem_id=element_id("prepare"))
            with gr.Accordion("Caption with BLIP", open=True):
                folder = gr.Textbox(label="Image folder", elem_id=element_id("folder"))
                model = gr.Dropdown(label="Captioning model", choices=[HOST_BLIP], value=HOST_BLIP,
                                    allow_custom_value=True, info="the webui's BLIP, or a local transformers BLIP "
                                    "model folder / cached model id")
                cap = _controls(CaptionOptions, ui_fields(CaptionOptions), "cap_")
                caption = gr.Button("Caption", variant="primary", elem_id=element_id("caption"))
            report = gr.HTML(elem_id=element_id("report"))
        with gr.Column():
            with gr.Row():
                review_folder = gr.Textbox(label="Review captions of folder", elem_id=element_id("review_folder"))
                load = gr.Button("Load", elem_id=element_id("load"))
            gallery = gr.Gallery(label="Images", show_label=False, columns=4, elem_id=element_id("gallery"))
            table = gr.Dataframe(headers=["image", "caption"], datatype=["str", "str"], interactive=True,
                                 wrap=True, elem_id=element_id("table"))
            save = gr.Button("Save captions", elem_id=element_id("save"))

    prepare.click(fn=gpu_queue.wrap_gpu_call(_prepare_handler(list(prep)), []), inputs=list(prep.values()),
                  outputs=[report])
    caption.click(fn=gpu_queue.wrap_gpu_call(_caption_handler(list(cap)), []), inputs=[folder, model, *cap.values()],
                  outputs=[report])
    load.click(fn=_load_review, inputs=[review_folder], outputs=[gallery, table, report])
    save.click(fn=_save_review, inputs=[review_folder, table], outputs=[report])


# ---------------------------------------------------------------------- controls and handlers
def _controls(cls: type, chosen: list, prefix: str = "") -> dict:
    """One control per field, three to a row; returns {field name: control} in order."""
    import gradio as gr

    controls = {}
    for row in range(0, len(chosen), 3):
        with gr.Row():
            for f in chosen[row:row + 3]:
                controls[f.name] = widget(cls, f, f.default, element_id(f"{prefix}{f.name}"))
    return controls


def _confined(*paths: str) -> None:
    """When others can reach the UI (``folders.ui_exposed``), the folders it reads and writes lie inside the
    allowed folders, as for API requests; otherwise they are the webui user's own choice."""
    if folders.ui_exposed():
        for folder in paths:
            runner.readable("folder", str(folder))


def _prepare_handler(names: list[str]):
    def handler(*values):
        try:
            opts = PrepareOptions(**values_to_options(PrepareOptions, dict(zip(names, values, strict=True))))
            _confined(opts.src, opts.dst)
            report = prepare_folder(opts, on_progress=gpu_queue.progress_count,
                                    should_stop=gpu_queue.host_interrupted)
        except TIError as exc:
            return (_pre(str(exc), error=True),)
        return (_pre(report.format()),)

    return handler


def _caption_handler(names: list[str]):
    def handler(folder, model, *values):
        try:
            opts = CaptionOptions(**values_to_options(CaptionOptions, dict(zip(names, values, strict=True))))
            _confined(folder)
            with host_captioner(None if model == HOST_BLIP else model) as captioner:
                report = caption_folder(folder, captioner, opts, on_progress=gpu_queue.progress_count,
                                        should_stop=gpu_queue.host_interrupted)
        except TIError as exc:
            return (_pre(str(exc), error=True),)
        return (_pre(report.format()),)

    return handler


def _load_review(folder):
    try:
        _confined(folder)
        items = review_items(folder)
    except TIError as exc:
        return None, None, _pre(str(exc), error=True)
    rows = [[item.image.name, item.caption] for item in items]
    missing = sum(1 for item in items if not item.caption)
    note = f"{len(items)} image(s), {missing} without a caption. Edit the captions in the table, then save."
    return [(str(item.image), item.caption) for item in items], rows, _pre(note)


def _save_review(folder, table):
    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    saved = 0
    try:
        _confined(folder)
        for name, text in rows:
            image = Path(folder) / str(name or "")
            if name and (str(text or "").strip() or caption_path(image).is_file()):  # no empty files for blanks
                save_caption(image, str(text or ""))
                saved += 1
    except TIError as exc:
        return _pre(str(exc), error=True)
    return _pre(f"saved {saved} caption file(s) in {folder}")


def _pre(text: str, error: bool = False) -> str:
    cls = "ti-trainer-report ti-trainer-error error" if error else "ti-trainer-report"  # wrapped, never wider
    return f"<pre class='{cls}'>{html.escape(text)}</pre>"
