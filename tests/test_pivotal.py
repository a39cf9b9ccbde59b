"""Pivotal tuning end to end on tiny SD1 / SDXL models: the embedding and a LoRA trained together, on CPU."""

from __future__ import annotations

import pytest
import torch

from lib_ti import events
from lib_ti.checkpoints import lora_checkpoint_path
from lib_ti.cli.inspect import describe
from lib_ti.config import TrainConfig
from lib_ti.data import prepare_data
from lib_ti.embedding import match_to_model
from lib_ti.errors import TIError
from lib_ti.formats.embeddings import load_embedding
from lib_ti.formats.lora import TEXT_PREFIXES, load_lora
from lib_ti.lora import Adapters
from lib_ti.trainer import evaluate_loss, train

pytestmark = pytest.mark.slow
FAMILIES = ["sd1", "sdxl"]


def config(tmp_path, images, **changes) -> TrainConfig:
    base = {"name": "tok", "init_text": "a photo", "num_vectors": 2, "data_dir": str(images),
            "output_dir": str(tmp_path / "run"), "width": 64, "height": 64, "steps": 8, "batch_size": 2,
            "learning_rate": "0.05", "lora_learning_rate": "0.01", "mode": "pivotal", "save_every": 0,
            "preview_every": 0, "log_every": 4}
    return TrainConfig(**{**base, **changes})


def adapters_from_file(engine, cfg: TrainConfig, path) -> Adapters:
    """The run's LoRA read back from its file, on the engine's layers: what another tool would load."""
    read = load_lora(path, unet_config=engine.unet.config, text_prefixes=TEXT_PREFIXES[engine.family])
    return Adapters(engine.lora_modules(cfg.lora_targets), read.modules, 0.0)


def model_state(engine) -> dict[str, torch.Tensor]:
    modules = {"unet": engine.unet, "vae": engine.vae, **{e.key: e.model for e in engine.encoders}}
    return {f"{m}.{k}": v.clone() for m, module in modules.items() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_pivotal_loss_goes_down_with_the_lora_read_back(family, engines, images, tmp_path):
    engine = engines(family)
    cfg = config(tmp_path, images, steps=30, batch_size=16, learning_rate="0.02", lora_learning_rate="0.01",
                 lora_targets=["attn", "ff", "text"])
    data = prepare_data(cfg)
    before = evaluate_loss(engine, cfg, data, engine.init_vectors(cfg.init_text, cfg.num_vectors), draws=16)
    result = train(engine, cfg, data=data)
    trained = match_to_model(load_embedding(result.final_path), engine.encoder_widths)
    with adapters_from_file(engine, cfg, result.lora_path).attached():
        after = evaluate_loss(engine, cfg, data, trained.vectors, draws=16)
    without_lora = evaluate_loss(engine, cfg, data, trained.vectors, draws=16)
    assert after < before, (before, after)
    assert after < without_lora, (without_lora, after)  # the LoRA file holds part of what was learned


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_is_bit_identical_after_a_pivotal_run(family, engines, images, tmp_path):
    engine = engines(family)
    before = model_state(engine)
    modules = [engine.unet, engine.vae, *(e.model for e in engine.encoders)]
    flags = [p.requires_grad for m in modules for p in m.parameters()]
    train(engine, config(tmp_path, images, steps=3, lora_targets=["attn", "ff", "text"], lora_dropout=0.2,
                         lora_learning_rate="0.1"))
    after = model_state(engine)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.grad is None for m in modules for p in m.parameters())
    assert [p.requires_grad for m in modules for p in m.parameters()] == flags
    # transformers adds hooks of its own at a first forward; none of ours is left
    assert not [h for m in modules for sub in m.modules() for h in sub._forward_hooks.values()
                if h.__name__ == "add_adapter"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pivotal_resume_reproduces_the_uninterrupted_run(family, engines, images, tmp_path):
    engine = engines(family)
    # grad_accum, dropout and a stop past the embedding's last step (ti_fraction 0.5 of 8 = 4): every RNG use
    cfg = config(tmp_path, images, grad_accum=2, save_every=3, lora_dropout=0.3, clip_mode="norm", clip_value="1",
                 lora_learning_rate="0.02:4, 0.01", noise_offset=0.1)
    full = train(engine, cfg.replace(output_dir=str(tmp_path / "full")))
    stops = iter([False] * 6 + [True])
    first = train(engine, cfg.replace(output_dir=str(tmp_path / "split")), should_stop=lambda: next(stops))
    assert first.stopped_early and first.steps_done == 6
    resumed = train(engine, cfg.replace(output_dir=str(tmp_path / "split")), resume=True)
    assert resumed.steps_done == full.steps_done == 8
    assert resumed.lora_path.read_bytes() == full.lora_path.read_bytes()
    assert resumed.final_path.read_bytes() == full.final_path.read_bytes()
    assert (tmp_path / "full" / "loss.csv").read_text() == (tmp_path / "split" / "loss.csv").read_text()


def test_embedding_stops_after_ti_fraction_and_the_lora_keeps_training(engines, images, tmp_path):
    engine = engines("sd1")
    seen: list = []
    cfg = config(tmp_path, images, steps=6, ti_fraction=0.5, save_every=1, keep_last=0)
    train(engine, cfg, on_event=seen.append)
    saved = {e.step: e for e in seen if isinstance(e, events.Saved)}
    vec = {s: load_embedding(saved[s].checkpoint).vectors for s in (2, 3, 4, 6)}
    lora = {s: load_lora(lora_checkpoint_path(cfg.run_dir, "tok", s)).modules for s in (3, 6)}
    key, module = next(iter(vec[3])), next(iter(lora[3]))
    assert not torch.equal(vec[2][key], vec[3][key])  # steps 1-3 train the embedding
    assert torch.equal(vec[3][key], vec[4][key]) and torch.equal(vec[3][key], vec[6][key])  # then it is frozen
    assert not torch.equal(lora[3][module].up, lora[6][module].up)  # and the LoRA goes on
    started = next(e for e in seen if isinstance(e, events.Started))
    assert any("first 3 of 6 steps" in note for note in started.notes)


def test_gradient_checkpointing_gives_the_same_run(engines, images, tmp_path):
    engine = engines("sd1")
    cfg = config(tmp_path, images, steps=2, lora_dropout=0.2, lora_targets=["attn", "ff"])
    plain = train(engine, cfg.replace(output_dir=str(tmp_path / "plain")))
    checkpointed = train(engine, cfg.replace(output_dir=str(tmp_path / "gc"), gradient_checkpointing=True))
    a, b = load_lora(plain.lora_path).modules, load_lora(checkpointed.lora_path).modules
    for name in a:  # the recomputed forward replays the same dropout: the same gradients, up to float rounding
        assert torch.allclose(a[name].up, b[name].up, atol=1e-6), name


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_file_has_kohya_keys_and_metadata(family, engines, images, tmp_path):
    engine = engines(family)
    cfg = config(tmp_path, images, steps=1, lora_targets=["attn", "text"], lora_rank=2, lora_alpha=1.0)
    result = train(engine, cfg)
    info = describe(result.lora_path)
    assert info["kind"] == "lora" and info["rank"] == 2 and info["alpha"] == 1.0
    meta = info["metadata"]
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert meta["ss_base_model_version"] == {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    names = set(load_lora(result.lora_path).modules)
    # the module names of the original (ldm / sgm) layout, as kohya names SDXL's and the webui maps SD1's
    unet = {n for n in names if n.startswith("lora_unet_")}
    assert unet and all("_1_transformer_blocks_" in n for n in unet)
    assert any(n.startswith("lora_unet_input_blocks_") for n in unet)
    assert any(n.startswith("lora_unet_middle_block_1_") for n in unet)
    prefixes = {"sd1": {"lora_te"}, "sdxl": {"lora_te1", "lora_te2"}}[family]
    text = {n.split("_text_model_")[0] for n in names - unet}
    assert text == prefixes
    assert info["modules"] == len(names) == len(engine.lora_modules(cfg.lora_targets))


def test_resuming_a_pivotal_run_as_an_embedding_run_is_refused(engines, images, tmp_path):
    engine = engines("sd1")
    cfg = config(tmp_path, images, steps=2, save_every=1)
    train(engine, cfg)
    with pytest.raises(TIError, match="mode: run 'pivotal', given 'embedding'"):
        train(engine, cfg.replace(mode="embedding", steps=3), resume=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pivotal_mixed_precision_keeps_float32_adapters(precision, engines, images, tmp_path):
    result = train(engines("sd1"), config(tmp_path, images, steps=2, precision=precision, lora_targets=["attn", "text"],
                                          lora_learning_rate="0.05"))
    modules = load_lora(result.lora_path).modules
    assert all(m.down.dtype == torch.float32 and torch.isfinite(m.up).all() for m in modules.values())
    assert any(m.up.abs().sum() > 0 for m in modules.values())  # the adapters trained under autocast
