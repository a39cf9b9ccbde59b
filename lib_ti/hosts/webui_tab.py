"""The Train Embedding tab.

Registered inside the host's Train tab when the host calls ``on_ui_train_tabs``, and as a top-level
tab otherwise. Training inside the webui against the loaded checkpoint is not wired yet (tracked
as its own issue); until then the tab says so and points to the headless trainer, rather than
offering controls that do nothing.
"""

from __future__ import annotations

TAB_TITLE = "Train Embedding"
ELEM_PREFIX = "ti_trainer"
_state = {"in_train_tab": False}

NOT_YET = (
    "### Train Embedding (sd-webui-ti-trainer)\n"
    "Training against the loaded checkpoint from this tab is not available in this version yet.\n\n"
    "The same trainer runs headless today: `python -m lib_ti train --model MODEL --data IMAGES --name NAME` "
    "from the extension folder (see its README). Copy the saved `.safetensors` into the webui's "
    "`embeddings` folder to use it in a prompt."
)


def element_id(name: str) -> str:
    return f"{ELEM_PREFIX}_{name}"


def _build():
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as block:
        gr.Markdown(NOT_YET, elem_id=element_id("notice"))
    return block


def on_ui_train_tabs(params) -> None:
    """Inside the host's Train tab: ``params.txt2img_preview_params`` is available here."""
    import gradio as gr

    _state["in_train_tab"] = True
    with gr.Tab(label=TAB_TITLE, id=element_id("tab")):
        gr.Markdown(NOT_YET, elem_id=element_id("notice"))


def on_ui_tabs():
    """A top-level tab only on hosts whose Train tab never called on_ui_train_tabs (it runs first in A1111)."""
    if _state["in_train_tab"]:
        return []
    return [(_build(), TAB_TITLE, element_id("top_tab"))]
