"""The TI Dataset tab: prepare images, caption them (the host's BLIP or a local transformers BLIP),
and review or edit the captions. The work is done by ``lib_ti.prepare`` and ``lib_ti.caption``;
this module only builds the controls and reports into them.
"""

from __future__ import annotations

import html

from ..errors import TIError

TAB_TITLE = "TI Dataset"
HOST_BLIP = "webui BLIP (interrogator)"


def element_id(name: str) -> str:
    return f"ti_trainer_ds_{name}"


def build_controls() -> None:
    import gradio as gr

    from . import a1111

    with gr.Row(equal_height=False):
        with gr.Column():
            with gr.Accordion("Prepare images", open=True):
                gr.HTML("<p>Writes resized, cropped, flipped and converted copies into a new folder; the source "
                        "folder is never modified. Captions beside the images are copied along.</p>")
                src = gr.Textbox(label="Source folder", elem_id=element_id("src"))
                dst = gr.Textbox(label="Output folder", elem_id=element_id("dst"))
                with gr.Row():
                    width = gr.Number(label="Width", value=512, precision=0)
                    height = gr.Number(label="Height", value=512, precision=0)
                    crop = gr.Dropdown(label="Crop", choices=["center", "subject"], value="center",
                                       info="subject: a crop around the detail/saliency centre")
                with gr.Row():
                    auto_size = gr.Checkbox(label="Auto-size near each image's aspect", value=False)
                    split = gr.Checkbox(label="Split oversized images into tiles", value=False)
                    flip = gr.Checkbox(label="Add flipped copies", value=False)
                    dedupe = gr.Checkbox(label="Drop duplicates", value=True)
                    overwrite_prep = gr.Checkbox(label="Overwrite outputs", value=False)
                prepare = gr.Button("Prepare", variant="primary", elem_id=element_id("prepare"))
            with gr.Accordion("Caption with BLIP", open=True):
                folder = gr.Textbox(label="Image folder", elem_id=element_id("folder"))
                model = gr.Dropdown(label="Captioning model", choices=[HOST_BLIP], value=HOST_BLIP,
                                    allow_custom_value=True, info="the webui's BLIP, or a local transformers BLIP "
                                    "model folder / cached model id")
                with gr.Row():
                    prefix = gr.Textbox(label="Prefix")
                    suffix = gr.Textbox(label="Suffix")
                    trigger = gr.Textbox(label="Trigger", info='put first, e.g. "[name]"')
                overwrite_cap = gr.Checkbox(label="Overwrite existing captions", value=False)
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

    prep_inputs = [src, dst, width, height, crop, auto_size, split, flip, dedupe, overwrite_prep]
    prepare.click(fn=a1111.wrap_gpu_call(_prepare, []), inputs=prep_inputs, outputs=[report])
    caption.click(fn=a1111.wrap_gpu_call(_caption, []),
                  inputs=[folder, model, prefix, suffix, trigger, overwrite_cap], outputs=[report])
    load.click(fn=_load_review, inputs=[review_folder], outputs=[gallery, table, report])
    save.click(fn=_save_review, inputs=[review_folder, table], outputs=[report])


# ---------------------------------------------------------------------- handlers
def _prepare(src, dst, width, height, crop, auto_size, split, flip, dedupe, overwrite):
    from .. import prepare
    from . import a1111

    try:
        opts = prepare.PrepareOptions(src=src, dst=dst, width=int(width), height=int(height), crop=crop,
                                      auto_size=auto_size, split=split, flip=flip, dedupe=dedupe, overwrite=overwrite)
        report = prepare.run(opts, on_progress=a1111.progress_count, should_stop=a1111.host_interrupted)
    except TIError as exc:
        return (_pre(str(exc), error=True),)
    return (_pre(report.format()),)


def _caption(folder, model, prefix, suffix, trigger, overwrite):
    from ..caption import CaptionOptions, caption_folder
    from . import a1111

    try:
        opts = CaptionOptions(overwrite=overwrite, prefix=prefix or "", suffix=suffix or "", trigger=trigger or "")
        with a1111.captioner(None if model == HOST_BLIP else model) as captioner:
            report = caption_folder(folder, captioner, opts, on_progress=a1111.progress_count,
                                    should_stop=a1111.host_interrupted)
    except TIError as exc:
        return (_pre(str(exc), error=True),)
    return (_pre(report.format()),)


def _load_review(folder):
    from ..caption import review_items

    try:
        items = review_items(folder)
    except TIError as exc:
        return None, None, _pre(str(exc), error=True)
    rows = [[item.image.name, item.caption] for item in items]
    missing = sum(1 for item in items if not item.caption)
    note = f"{len(items)} image(s), {missing} without a caption. Edit the captions in the table, then save."
    return [(str(item.image), item.caption) for item in items], rows, _pre(note)


def _save_review(folder, table):
    from pathlib import Path

    from ..caption import save_caption

    from ..caption import caption_path

    rows = table.values.tolist() if hasattr(table, "values") else list(table or [])
    saved = 0
    try:
        for name, text in rows:
            image = Path(folder) / str(name or "")
            if name and (str(text or "").strip() or caption_path(image).is_file()):  # no empty files for blanks
                save_caption(image, str(text or ""))
                saved += 1
    except TIError as exc:
        return _pre(str(exc), error=True)
    return _pre(f"saved {saved} caption file(s) in {folder}")


def _pre(text: str, error: bool = False) -> str:
    cls = "error" if error else "ti-trainer-report"
    return f"<pre class='{cls}'>{html.escape(text)}</pre>"
