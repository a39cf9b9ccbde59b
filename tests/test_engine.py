"""The standalone engine's conditioning and the diffusion math, against diffusers and transformers themselves."""

from __future__ import annotations

import pytest
import torch

from lib_ti.engine import add_noise, min_snr_weights, training_target
from lib_ti.engines.standalone import StandaloneEngine
from lib_ti.errors import TIError
from lib_ti.splice import layout_prompts


@pytest.fixture(scope="module")
def engine_for(tiny_model):
    cache = {}

    def get(family, single_file=False):
        if (family, single_file) not in cache:
            cache[family, single_file] = StandaloneEngine.load(tiny_model(family, single_file=single_file))
        return cache[family, single_file]

    return get


def plain_conditioning(engine, prompt):
    """What diffusers' own pipelines feed the UNet for ``prompt`` (no embedding involved)."""
    states, pooled = [], None
    for enc in engine.encoders:
        ids = enc.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = enc.model(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2] if engine.family == "sdxl" else out.last_hidden_state)
        pooled = getattr(out, "text_embeds", pooled)
    return torch.cat(states, dim=-1), pooled


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_vectors_equal_to_init_tokens_give_the_plain_prompts_conditioning(family, engine_for):
    engine = engine_for(family)
    vectors = engine.init_vectors("red car", 2)  # two tokens, two vectors: exactly the words' embeddings
    cond = engine.encode_prompts(["a photo of a tok on grass"], "tok", vectors, (64, 64))
    hidden, pooled = plain_conditioning(engine, "a photo of a red car on grass")
    torch.testing.assert_close(cond.hidden, hidden, rtol=0, atol=1e-6)
    if family == "sdxl":
        torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=1e-6)
        assert cond.time_ids.tolist() == [[64, 64, 0, 0, 64, 64]]
    else:
        assert cond.pooled is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_gradient_reaches_every_encoders_vectors(family, engine_for):
    engine = engine_for(family)
    vectors = {k: v.clone().requires_grad_(True) for k, v in engine.init_vectors("cat", 3).items()}
    cond = engine.encode_prompts(["tok", "a tok, painted"], "tok", vectors, (64, 64))
    latents = torch.randn(2, 4, 8, 8)
    loss = engine.predict(latents, torch.tensor([10, 500]), cond).square().mean()
    loss.backward()
    for key, vec in vectors.items():
        assert vec.grad is not None and vec.grad.abs().sum() > 0, key
        assert (vec.grad.abs().sum(dim=1) > 0).all(), f"every one of the {key} vectors gets gradient"


def test_prompt_layout_slots_and_truncation(engine_for):
    tok = engine_for("sd1").encoders[0].tokenizer
    layout = layout_prompts(tok, ["a Tok and tok", "no name here"], "tok", 2)
    assert layout.ids.shape == (2, 77)
    assert layout.batch_index.tolist() == [0, 0, 0, 0]
    assert layout.position.tolist() == [2, 3, 5, 6]  # BOS, "a", slot, slot, "and", slot, slot
    assert layout.vector_index.tolist() == [0, 1, 0, 1]
    assert layout.ids[0, 7].item() == tok.eos_token_id
    long = layout_prompts(tok, [" ".join(["word"] * 80) + " tok"], "tok", 1)
    assert long.position.numel() == 0 and long.ids[0, -1].item() == tok.eos_token_id  # truncated like diffusers
    assert layout_prompts(tok, ["tokens tok_x mytok"], "tok", 1).position.numel() == 0  # whole words only


def test_missing_encoder_vectors_are_an_error_not_a_silent_literal(engine_for):
    engine = engine_for("sdxl")
    with pytest.raises(TIError, match="match the embedding to the model"):
        engine.encode_prompts(["tok"], "tok", {"clip_l": torch.zeros(1, 32)}, (64, 64))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@torch.no_grad()
def test_single_file_checkpoint_loads_to_the_same_model(family, engine_for):
    folder, single = engine_for(family), engine_for(family, single_file=True)
    assert (single.family, single.prediction_type, single.encoder_widths) == (
        folder.family, folder.prediction_type, folder.encoder_widths)
    vectors = folder.init_vectors("a dog", 2)
    a = folder.encode_prompts(["tok in snow"], "tok", vectors, (64, 64))
    b = single.encode_prompts(["tok in snow"], "tok", vectors, (64, 64))
    torch.testing.assert_close(a.hidden, b.hidden, rtol=0, atol=0)
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(folder.predict(x, torch.tensor([3]), a), single.predict(x, torch.tensor([3]), b))
    assert single.checkpoint_hash and single.checkpoint_hash != folder.checkpoint_hash


def test_sd2_tiny_is_v_prediction_and_families_are_detected(engine_for):
    assert engine_for("sd1").prediction_type == "epsilon" and engine_for("sd1").family == "sd1"
    assert engine_for("sd2").prediction_type == "v_prediction" and engine_for("sd2").family == "sd2"
    assert list(engine_for("sd2").encoder_widths) == ["clip_h"]
    assert list(engine_for("sdxl").encoder_widths) == ["clip_l", "clip_g"]


def test_noise_target_and_snr_match_diffusers():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    alphas = sched.alphas_cumprod.float()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 420, 999])
    torch.testing.assert_close(add_noise(alphas, x0, noise, t), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(training_target("v_prediction", alphas, x0, noise, t), sched.get_velocity(x0, noise, t))
    assert training_target("epsilon", alphas, x0, noise, t) is noise
    with pytest.raises(TIError, match="unknown prediction type 'sample'"):
        training_target("sample", alphas, x0, noise, t)
    snr = alphas[t] / (1 - alphas[t])
    torch.testing.assert_close(min_snr_weights("epsilon", alphas, t, 5.0), torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(min_snr_weights("v_prediction", alphas, t, 5.0), torch.clamp(snr, max=5) / (snr + 1))
