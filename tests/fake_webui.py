"""A fake AUTOMATIC1111 ``modules`` package around a tiny real SD1 or SDXL model, for the fake-host tier.

What it fakes is the host's *surface* as ``lib_ti/hosts`` uses it (v1.10.1 names): ``shared`` with its
job state, options and flags; the global embedding database and its prompt splice; ``processing``'s
txt2img; the GPU queue; the folders. The model underneath is real (the project's tiny SD1 or SDXL:
diffusers UNet, VAE and CLIP text models), so the adapter's training, conditioning and gradients are computed,
not stubbed. Whether the real host behaves like this fake is the real-host tier's question
(tests/test_webui_real.py), not this one's.
"""

from __future__ import annotations

import shutil
import sys
import threading
import types
from pathlib import Path

import torch
from PIL import Image

from lib_ti.splice import layout_prompts, name_pattern, spliced


# ---------------------------------------------------------------------- the model: ldm's surface on tiny parts
class FakeEmbedder(torch.nn.Module):
    """ldm's hijacked FrozenCLIPEmbedder: prompts -> context, registered embeddings spliced in by name."""

    def __init__(self, text_model, tokenizer, db, key: str = "clip_l") -> None:
        super().__init__()
        self.wrapped = types.SimpleNamespace(transformer=text_model)  # where a1111_engine finds the token table
        self.text_model, self.tokenizer, self.db, self.key = text_model, tokenizer, db, key
        self.is_trainable = False

    def encode_embedding_init_text(self, text: str, n: int) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids[:n]
        table = self.text_model.get_input_embeddings()
        return table(torch.tensor(ids, dtype=torch.long))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(prompts).last_hidden_state

    def encode(self, prompts: list[str]):
        # The host matches an embedding by its name's tokens; here by the whole word, one embedding per batch.
        emb = next((e for name, e in sorted(self.db.word_embeddings.items(), key=lambda kv: -len(kv[0]))
                    if any(name_pattern(name).search(p) for p in prompts)), None)
        if emb is None:
            ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 return_tensors="pt").input_ids
            return self.text_model(ids, output_hidden_states=True)
        vec = emb.vec[self.key] if isinstance(emb.vec, dict) else emb.vec
        layout = layout_prompts(self.tokenizer, prompts, emb.name, vec.shape[0], self.tokenizer.model_max_length)
        with spliced(self.text_model.get_input_embeddings(), layout, vec):
            return self.text_model(layout.ids, output_hidden_states=True)


class FakeLdm(torch.nn.Module):
    """ldm's LatentDiffusion as A1111 holds it: ``model.diffusion_model``, ``cond_stage_model``, ``apply_model``."""

    is_sd1, is_sd2, is_sdxl, parameterization = True, False, False, "eps"

    def __init__(self, engine, db) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = engine.unet
        self.first_stage_model = engine.vae
        self.cond_stage_model = FakeEmbedder(engine.encoders[0].model, engine.encoders[0].tokenizer, db)
        self.register_buffer("alphas_cumprod", engine.alphas_cumprod.clone())
        self.scale_factor = engine.vae.config.scaling_factor
        self.image_size = engine.unet.config.sample_size
        self.first_stage_model.encoder.num_resolutions = len(engine.vae.config.block_out_channels)
        self.sd_checkpoint_info = types.SimpleNamespace(name="tiny-sd1.safetensors", name_for_extra="tiny-sd1",
                                                        shorthash="0123456789")
        self.lowvram = False

    def encode_first_stage(self, x: torch.Tensor):
        return self.first_stage_model.encode(x).latent_dist

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.diffusion_model(x, t, encoder_hidden_states=cond).sample


class FakeConditioner(torch.nn.Module):
    """sgm's GeneralConditioner: every embedder whose ``is_trainable`` is False runs under no_grad (the quirk
    hosts.md §2.1 names: through the host's own SDXL conditioning no gradient reaches the vectors unless it is set)."""

    def __init__(self, engine, db) -> None:
        super().__init__()
        self.embedders = torch.nn.ModuleList([FakeEmbedder(e.model, e.tokenizer, db, e.key) for e in engine.encoders])

    def forward(self, batch) -> dict[str, torch.Tensor]:
        states, pooled = [], None
        for embedder in self.embedders:
            with torch.set_grad_enabled(embedder.is_trainable and torch.is_grad_enabled()):
                out = embedder.encode(list(batch))
            states.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
            pooled = getattr(out, "text_embeds", pooled)
        h, w = getattr(batch, "height", 1024) or 1024, getattr(batch, "width", 1024) or 1024
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(len(batch), 1)
        return {"crossattn": torch.cat(states, dim=-1), "vector": pooled, "time_ids": time_ids}


class FakeSgm(FakeLdm):
    """sgm's DiffusionEngine as A1111 patches it (sd_models_xl): ``conditioner`` (also ``cond_stage_model``),
    ``get_learned_conditioning`` of an ``SdConditioning``, ``apply_model`` of the dict it returns."""

    is_sd1, is_sdxl = False, True

    def __init__(self, engine, db) -> None:
        super().__init__(engine, db)
        self.conditioner = self.cond_stage_model = FakeConditioner(engine, db)
        for block in engine.unet.down_blocks:  # sgm's config asks every block to checkpoint itself
            block.use_checkpoint = True

    def get_learned_conditioning(self, batch) -> dict[str, torch.Tensor]:
        return self.conditioner(batch)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        added = {"text_embeds": cond["vector"], "time_ids": cond["time_ids"]}
        return self.model.diffusion_model(x, t, encoder_hidden_states=cond["crossattn"], added_cond_kwargs=added).sample


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None) -> None:
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height


# ---------------------------------------------------------------------- textual_inversion and sd_hijack
class Embedding:
    def __init__(self, vec, name: str, step=None) -> None:
        self.vec, self.name, self.step = vec, name, step
        first = next(iter(vec.values())) if isinstance(vec, dict) else vec
        self.shape, self.vectors = first.shape[-1], first.shape[0]
        self.filename: str | None = None


def create_embedding_from_data(data: dict, name: str, filename: str = "", filepath: str = "") -> Embedding:
    """The host's loader: ``string_to_param`` (.pt), one tensor (single key), or a dict of encoders (SDXL)."""
    if "string_to_param" in data:
        vec = next(iter(data["string_to_param"].values()))
    elif len(data) == 1:
        vec = next(iter(data.values()))
    else:
        vec = dict(data)
    emb = Embedding(vec, name)
    emb.filename = filepath
    return emb


class EmbeddingDatabase:
    def __init__(self) -> None:
        self.word_embeddings: dict[str, Embedding] = {}
        self.expected_shape = -1

    def register_embedding(self, embedding: Embedding, model) -> Embedding:
        self.word_embeddings[embedding.name] = embedding
        return embedding

    def register_embedding_by_name(self, embedding: Embedding | None, model, name: str):
        if embedding is None:
            self.word_embeddings.pop(name, None)
        else:
            self.word_embeddings[name] = embedding


# ---------------------------------------------------------------------- shared.state and processing
class State:
    def __init__(self) -> None:
        self.job, self.job_no, self.job_count, self.textinfo = "", 0, 0, None
        self.sampling_step = self.sampling_steps = 0
        self.processing_has_refined_job_count = False
        self.time_start: float | None = None
        self.interrupted = self.skipped = self.stopping_generation = False
        self.current_image = None
        self.begun: list[str] = []

    def begin(self, job: str = "") -> None:
        self.job, self.time_start = job, 1000.0
        self.begun.append(job)

    def end(self) -> None:
        self.job = ""

    def assign_current_image(self, image) -> None:
        self.current_image = image


class Txt2Img:
    cached_c = cached_uc = cached_hr_c = cached_hr_uc = ["cached", "cached"]

    def __init__(self, **kwargs) -> None:
        self.__dict__.update(kwargs)

    def close(self) -> None:
        self.closed = True


def process_images(p) -> types.SimpleNamespace:
    """One image whose colour is a function of the prompt's conditioning: the registered vectors show."""
    state = sys.modules["modules.shared"].state
    state.job_count, state.job_no, state.sampling_steps, state.skipped = 1, 0, p.steps, False  # the host resets
    with torch.no_grad():
        cond = p.sd_model.cond_stage_model([p.prompt])
    cond = cond["crossattn"] if isinstance(cond, dict) else cond
    shade = int(abs(float(cond.mean())) * 1e4) % 256
    return types.SimpleNamespace(images=[Image.new("RGB", (p.width, p.height), (shade, 0, 0))])


# ---------------------------------------------------------------------- the package
def module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None) -> None:
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = None


class Options:
    def __init__(self) -> None:
        self.data: dict[str, object] = {}
        self.data_labels: dict[str, OptionInfo] = {}

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info


def options_section(section, options: dict) -> dict:
    for info in options.values():
        info.section = section
    return options


# A short run the fake tiers (this host's and reForge's) train: 4 steps at 64 px, saving and previewing every 2.
RUN = {"init_text": "a photo", "num_vectors": 2, "width": 64, "height": 64, "steps": 4, "save_every": 2,
       "preview_every": 2, "preview_steps": 2, "template": "name"}


def ready(fake: types.SimpleNamespace, monkeypatch, images: Path) -> types.SimpleNamespace:
    """An installed fake host with the test images in ``<root>/data``, and no job or GPU-queue clock left by an
    earlier test (the runner's are module globals)."""
    from lib_ti.hosts import gpu_queue, runner

    shutil.copytree(images, fake.root / "data")
    monkeypatch.setattr(runner, "JOBS", {})
    monkeypatch.setattr(gpu_queue, "_clock", {})
    return fake


def install(monkeypatch, root: Path, engine) -> types.SimpleNamespace:
    """Put the fake ``modules`` into ``sys.modules`` (undone by ``monkeypatch``), folders under ``root``."""
    for folder in ("embeddings", "textual_inversion_templates", "models/Lora", "models/BLIP"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    db = EmbeddingDatabase()
    sd_model = (FakeSgm if engine.family == "sdxl" else FakeLdm)(engine, db)
    cmd_opts = types.SimpleNamespace(
        embeddings_dir=str(root / "embeddings"),
        textual_inversion_templates_dir=str(root / "textual_inversion_templates"),
        lowvram=False, medvram=False, api=True, nowebui=False, api_auth=None, disable_extension_access=False,
        lora_dir=None, no_half=True, ti_trainer_output_dir=None, ti_trainer_allowed_roots=None)
    tasks: list[tuple[str, str]] = []
    checkpointing: list[str] = []
    shared = module("modules.shared", state=State(), opts=Options(), cmd_opts=cmd_opts, sd_model=sd_model,
                    OptionInfo=OptionInfo, options_section=options_section, restricted_opts=set(),
                    total_tqdm="the host's bar", interrogator=None)
    parts = {
        "modules.shared": shared,
        "modules.devices": module("modules.devices", device=torch.device("cpu"), dtype_vae=torch.float32,
                                  device_interrogate=torch.device("cpu")),
        "modules.sd_hijack": module("modules.sd_hijack", model_hijack=types.SimpleNamespace(
            embedding_db=db, clear_comments=lambda: None)),
        "modules.sd_hijack_checkpoint": module("modules.sd_hijack_checkpoint", add=lambda: checkpointing.append("add"),
                                               remove=lambda: checkpointing.append("remove")),
        "modules.lowvram": module("modules.lowvram", send_everything_to_cpu=lambda: None, module_in_gpu=None,
                                  cpu=torch.device("cpu")),
        "modules.textual_inversion": module("modules.textual_inversion"),
        "modules.textual_inversion.textual_inversion": module(
            "modules.textual_inversion.textual_inversion", Embedding=Embedding,
            create_embedding_from_data=create_embedding_from_data),
        "modules.prompt_parser": module("modules.prompt_parser", SdConditioning=SdConditioning),
        "modules.processing": module("modules.processing", StableDiffusionProcessing=Txt2Img,
                                     StableDiffusionProcessingTxt2Img=Txt2Img, process_images=process_images),
        "modules.call_queue": module("modules.call_queue", queue_lock=threading.Lock(),
                                     wrap_gradio_gpu_call=lambda fn, extra_outputs=None: fn),
        "modules.progress": module("modules.progress", add_task_to_queue=lambda t: tasks.append(("queued", t)),
                                   start_task=lambda t: tasks.append(("started", t)),
                                   finish_task=lambda t: tasks.append(("finished", t))),
        "modules.paths": module("modules.paths", models_path=str(root / "models")),
        "modules.paths_internal": module("modules.paths_internal", data_path=str(root)),
        "modules.sd_models": module("modules.sd_models", model_data=types.SimpleNamespace(sd_model=sd_model)),
    }
    package = module("modules", __path__=[])
    for name, mod in parts.items():
        setattr(package, name.split(".")[1], mod)
        monkeypatch.setitem(sys.modules, name, mod)
    parts["modules.textual_inversion"].textual_inversion = parts["modules.textual_inversion.textual_inversion"]
    monkeypatch.setitem(sys.modules, "modules", package)
    return types.SimpleNamespace(root=root, shared=shared, db=db, sd_model=sd_model, tasks=tasks,
                                 checkpointing=checkpointing, modules=parts)


# ---------------------------------------------------------------------- gradio: the layout as a tree of records
class Component:
    """Any Gradio block or component: keeps its arguments, its children and the events wired to it."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs
        self.value = kwargs.get("value")
        self.elem_id = kwargs.get("elem_id")
        self.children: list[Component] = []
        self.events: list[types.SimpleNamespace] = []
        if _PARENTS:
            _PARENTS[-1].children.append(self)
        _ALL.append(self)

    def __enter__(self):
        _PARENTS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _PARENTS.pop()

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        self.events.append(types.SimpleNamespace(fn=fn, inputs=list(inputs or []), outputs=list(outputs or []),
                                                 kwargs=kwargs))

    change = submit = click

    def current(self):
        """The value the page would send: a callable value is evaluated at page load, as Gradio does."""
        return self.value() if callable(self.value) else self.value


_PARENTS: list[Component] = []
_ALL: list[Component] = []
GRADIO_NAMES = ("Blocks", "Row", "Column", "Tab", "Tabs", "Accordion", "Group", "HTML", "Markdown", "Button",
                "Textbox", "Number", "Slider", "Checkbox", "CheckboxGroup", "Dropdown", "Radio", "Gallery", "Image",
                "Dataframe", "File")


def install_gradio(monkeypatch) -> types.SimpleNamespace:
    """A ``gradio`` module whose components record the layout; ``by_id(elem_id)`` finds one."""
    _PARENTS.clear()
    _ALL.clear()
    gradio = module("gradio", __version__="3.41.2-fake", update=lambda **kw: {"__type__": "update", **kw},
                    **{name: type(name, (Component,), {}) for name in GRADIO_NAMES})
    monkeypatch.setitem(sys.modules, "gradio", gradio)

    def by_id(elem_id: str) -> Component:
        found = [c for c in _ALL if c.elem_id == elem_id]
        assert len(found) == 1, f"{len(found)} components with elem_id {elem_id!r}"
        return found[0]

    return types.SimpleNamespace(module=gradio, all=_ALL, by_id=by_id)
