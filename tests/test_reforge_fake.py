"""The fake-host tier for reForge: the reForge adapter's glue on tests/fake_reforge.py (A1111's fake shell
with reForge's Forge parts under it, around the tiny real SD1 model), in plain pytest.

What this proves: the adapter is chosen by what the model offers, it asks the host's memory manager for the
checkpoint's own UNet and CLIP and lets the host's text encoder see them, it reads the VAE's distribution as
ordinary tensors where the host's encoder gives inference tensors, it calls the ldm_patched UNet as the host
does, renders get the script runner reForge's processing reads, and a run leaves the host's weights and
objects as they were. What it cannot prove: that real reForge behaves like the fake (tests/test_reforge_real.py).
"""

from __future__ import annotations

import hashlib

import fake_reforge
import fake_webui
import pytest
import torch
from fake_webui import RUN

from lib_ti.config import TrainConfig
from lib_ti.engine import PreviewRequest
from lib_ti.errors import TIError
from lib_ti.hosts import a1111, registry, runner


@pytest.fixture()
def reforge(tmp_path, monkeypatch, engines, images):
    return fake_webui.ready(fake_reforge.install(monkeypatch, tmp_path / "webui", engines("sd1")), monkeypatch, images)


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_a_model_with_forge_objects_beside_cond_stage_model_gets_the_reforge_adapter(reforge):
    from lib_ti.hosts import reforge as adapter

    host = registry.current_host()
    assert host is adapter.HOST and host.name == "reForge" and host.reason == ""
    assert isinstance(host.engine(), adapter.ReforgeEngine)
    assert host.loaded_model() == a1111.LoadedModel("sd1", 64)


def test_the_self_check_passes_with_the_checkpoints_own_clip_loaded(reforge):
    report = registry.current_host().self_check("a photo", "a {} on a table")
    assert report["ok"], report
    assert report["max_abs_diff"]["cond"] < 1e-6 and report["grad_norm"]["clip_l"] > 0
    # Ours first (the checkpoint's CLIP, asked of the manager with the UNet), then the host's own conditioning.
    assert ["unet", "clip"] in reforge.manager.loaded
    assert reforge.sd_model.cond_stage_model.clips_seen == ["clip", "clip+lora"]
    assert reforge.sd_model.forge_objects is reforge.lora  # the host's current objects given back
    assert "tiselfcheck" not in reforge.db.word_embeddings


def test_latents_are_the_hosts_own_but_ordinary_tensors_with_their_spread(reforge):
    engine = registry.current_host().engine()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = engine.encode_images(pixels)
    host = reforge.sd_model.encode_first_stage(pixels)
    assert host.is_inference() and not mean.is_inference() and not std.is_inference()
    assert mean.shape == host.shape == (2, 4, 8, 8) and torch.allclose(mean, host, atol=1e-5)
    assert float(std.min()) > 0 and ["vae"] in reforge.manager.loaded
    (mean * torch.ones_like(mean, requires_grad=True)).sum().backward()  # usable in autograd, unlike the host's


def test_the_unet_is_called_as_the_hosts_base_model_calls_it(reforge):
    engine = registry.current_host().engine()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    cond = engine.encode_prompts(["a cat"], "tok", engine.init_vectors("a photo", 1), (64, 64))
    with torch.no_grad():
        assert torch.equal(engine.predict(x, t, cond), reforge.sd_model.apply_model(x, t, cond))


def test_a_run_trains_renders_publishes_and_leaves_the_hosts_weights_and_objects(reforge):
    model = reforge.sd_model
    before, grads = _weights_hash(model), {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = runner.resolve(TrainConfig(name="tok", data_dir=str(reforge.root / "data"), **RUN), resume=False)
    job = runner.new_job(cfg)
    runner.start(job, cfg, resume=False).join(300)
    assert job.state == "finished" and not job.warnings, job.error_detail or job.error or job.warnings
    assert (reforge.root / "embeddings" / "tok.safetensors").is_file()
    assert reforge.db.word_embeddings["tok"].filename.endswith("tok.safetensors")
    assert len(reforge.script_runners) == 2  # one empty runner per preview (steps 2 and 4)
    assert _weights_hash(model) == before and {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert model.forge_objects is reforge.lora
    assert reforge.manager.loaded.count(["unet", "clip"]) >= 4  # before every step's conditioning


def test_renders_in_the_hosts_processing_use_the_registered_embedding(reforge):
    host = registry.current_host()
    request = PreviewRequest("a tok on a table", "", 2, 7.0, 1, 64, 64, "Euler")
    plain = host.txt2img(request).getpixel((0, 0))
    runner.create_embedding(TrainConfig(name="tok", init_text="red", num_vectors=1))
    assert host.txt2img(request).getpixel((0, 0)) != plain


def test_gradient_checkpointing_is_refused_with_the_option_to_change(reforge):
    cfg = runner.resolve(TrainConfig(name="tok", data_dir=str(reforge.root / "data"), gradient_checkpointing=True,
                                     **RUN), resume=False)
    job = runner.new_job(cfg)
    runner.start(job, cfg, resume=False).join(300)
    assert job.state == "failed" and "gradient_checkpointing" in job.error
    with pytest.raises(TIError, match="gradient_checkpointing to False"):
        registry.current_host().engine().set_gradient_checkpointing(True)
    assert "tok" not in reforge.db.word_embeddings
