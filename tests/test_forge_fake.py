"""The fake-host tier for the Forge adapter: lib_ti/hosts/forge*.py, the runner, the API and the tab on a fake
Forge around the tiny real SD1 model (tests/fake_forge.py), in plain pytest.

What this proves: our Forge glue's own logic (conditioning through the host's inference-mode function with grad,
x0 turned back into eps, weights made autograd-safe and left bit-identical, every database registered, the
session putting the host back, the tab's Gradio 4 keyword). What it cannot prove: that real Forge behaves like
the fake; tests/test_forge_real.py runs the same paths in a real Forge.
"""

from __future__ import annotations

import shutil
import time

import fake_forge
import fake_webui
import pytest
import torch

from lib_ti.config import TrainConfig
from lib_ti.engine import PreviewRequest
from lib_ti.errors import TIError
from lib_ti.halves import weights_digest
from lib_ti.hosts import forge, forge_engine, gpu_queue, registry, runner, webui_tab

RUN = {"init_text": "a photo", "num_vectors": 2, "width": 64, "height": 64, "steps": 4, "save_every": 2,
       "preview_every": 2, "preview_steps": 2, "template": "name"}


@pytest.fixture()
def webui(tmp_path, monkeypatch, engines, images):
    fake = fake_forge.install(monkeypatch, tmp_path / "forge", engines("sd1"))
    shutil.copytree(images, fake.root / "data")
    monkeypatch.setattr(runner, "JOBS", {})
    monkeypatch.setattr(gpu_queue, "_clock", {})
    return fake


def _train(webui, **changes):
    cfg = runner.resolve(TrainConfig(name="tok", data_dir=str(webui.root / "data"), **(RUN | changes)), resume=False)
    job = runner.new_job(cfg)
    runner.start(job, cfg, resume=False).join(300)
    return job


def _weights(webui) -> str:
    engine = forge.HOST.engine()
    return weights_digest([*engine.modules(), engine.vae.first_stage_model])


def test_forge_is_detected_and_gets_its_adapter(webui):
    host = registry.current_host()
    assert host is forge.HOST and host.reason == ""
    assert host.loaded_model() == forge.LoadedModel("sd1", 512)
    webui.modules["modules.sd_models"].model_data.sd_model = None
    assert host.loaded_model() is None and host.loaded_embeddings() == {}
    with pytest.raises(TIError, match="no checkpoint is loaded"):
        host.engine()


def test_predict_turns_forges_x0_back_into_the_unets_own_epsilon(webui, engines):
    engine = forge.HOST.engine()
    tiny = engines("sd1")
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    a = engine.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    cond = torch.randn(2, 77, tiny.encoders[0].model.config.hidden_size)
    with torch.no_grad():
        ours = engine.predict(noisy, t, cond)
        unet = tiny.unet(noisy, t, encoder_hidden_states=cond).sample
    assert torch.allclose(ours, unet, atol=1e-4), float((ours - unet).abs().max())
    assert torch.allclose(engine.alphas_cumprod, tiny.alphas_cumprod, atol=1e-6)  # from the predictor's sigmas


def test_the_self_check_matches_forges_conditioning_and_reaches_the_vectors(webui):
    webui.notes["TI"] = "someone else's"
    report = registry.current_host().self_check("a photo", "a {} on a table", weights=True)
    assert report["ok"], report
    assert report["max_abs_diff"]["cond"] < 1e-5 and report["grad_norm"]["clip_l"] > 0
    assert report["replaced_inference_tensors"] > 0  # the fake's weights were built under inference mode
    assert "tiselfcheck" not in webui.db.word_embeddings
    assert webui.notes == {"TI": "someone else's"}  # the next generation's infotext is not ours
    assert registry.current_host().self_check(weights=True)["weights_digest"] == report["weights_digest"]


def test_a_run_trains_publishes_everywhere_and_leaves_the_weights_bit_identical(webui):
    before = _weights(webui)
    job = _train(webui)
    assert job.state == "finished", job.error_detail or job.error
    embeddings = webui.root / "embeddings"
    assert (embeddings / "tok.safetensors").is_file()
    words = webui.db.word_embeddings
    assert words["tok"].filename == str(embeddings / "tok.safetensors")  # the final file, not the live one
    assert not words["tok"].vec.requires_grad and "tok-2" in words
    assert webui.cards.loaded == ["tok-2.safetensors", "tok-4.safetensors", "tok.safetensors"]  # the cards list them
    assert _weights(webui) == before
    engine = forge.HOST.engine()
    assert not any(p.requires_grad and forge_engine._is_inference(p) for p in engine.kmodel.parameters())
    assert all(not m._forward_pre_hooks for m in engine.kmodel.modules())  # the LayerNorm copies are gone
    assert ["KModel", "CLIPTextModel"] in webui.loads and webui.loads[-1] == ["emptied"]  # via the memory manager
    assert fake_webui.Txt2Img.cached_c == [None, None, None]  # Forge's three-slot cache, emptied


def test_renders_use_the_registered_file_at_once(webui):
    host = registry.current_host()
    request = PreviewRequest("a tok on a table", "", 2, 7.0, 1, 64, 64, "Euler")
    plain = host.txt2img(request).getpixel((0, 0))
    path = runner.create_embedding(TrainConfig(name="tok", init_text="red", num_vectors=1))
    assert host.loaded_embeddings()["tok"] == str(path) and webui.cards.loaded == ["tok.safetensors"]
    assert host.txt2img(request).getpixel((0, 0)) != plain
    webui.db.expected_shape = 768
    with pytest.raises(TIError, match="has width 32, the loaded checkpoint expects 768"):
        host.register_file(path)


def test_what_cannot_train_in_forge_is_refused_in_one_sentence(webui, monkeypatch):
    kmodel = webui.sd_model.forge_objects.unet.model
    monkeypatch.setattr(kmodel, "storage_dtype", "nf4", raising=False)
    with pytest.raises(TIError, match="stored as nf4"):
        forge.HOST.engine()
    monkeypatch.setattr(kmodel, "storage_dtype", torch.float16, raising=False)
    monkeypatch.setattr(kmodel.predictor, "prediction_type", "const")
    with pytest.raises(TIError, match="predicts const"):
        forge.HOST.engine()
    monkeypatch.setattr(kmodel.predictor, "prediction_type", "epsilon")
    monkeypatch.setattr(webui.sd_model, "is_sd1", False)
    monkeypatch.setattr(webui.sd_model, "is_sd3", True)
    with pytest.raises(TIError, match="SD3: training in Forge supports SD1.x and SDXL"):
        forge.HOST.engine()
    monkeypatch.setattr(webui.sd_model, "is_sd3", False)
    monkeypatch.setattr(webui.sd_model, "is_sd1", True)
    job = _train(webui, mode="pivotal")
    assert job.state == "failed" and "mode pivotal (embedding + LoRA) is not available in Forge" in job.error
    assert "tok" not in webui.db.word_embeddings


def test_gradient_checkpointing_runs_forges_blocks_through_torch_checkpoint_and_comes_off(webui, monkeypatch):
    calls: list[int] = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = forge.HOST.engine()
    unet = torch.nn.Module()  # Forge's UNet layout: input_blocks, middle_block, output_blocks
    unet.input_blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3)])
    unet.middle_block, unet.output_blocks = torch.nn.Linear(3, 3), torch.nn.ModuleList([torch.nn.Linear(3, 3)])
    engine.kmodel.diffusion_model = unet
    x = torch.randn(2, 3, requires_grad=True)
    plain = unet.output_blocks[0](unet.middle_block(unet.input_blocks[0](x)))
    engine.set_gradient_checkpointing(True)
    assert all("forward" in b.__dict__ for b in (unet.input_blocks[0], unet.middle_block, unet.output_blocks[0]))
    out = unet.output_blocks[0](unet.middle_block(unet.input_blocks[0](x)))
    assert torch.equal(out, plain) and len(calls) == 3
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    engine.release()
    assert not any("forward" in b.__dict__ for b in (unet.input_blocks[0], unet.middle_block, unet.output_blocks[0]))


def test_the_tab_builds_with_gradio_4s_js_keyword(webui, monkeypatch):
    gradio = fake_webui.install_gradio(monkeypatch)
    monkeypatch.setattr(gradio.module, "__version__", "4.40.0")
    monkeypatch.setitem(webui_tab._state, "in_train_tab", False)
    (_block, title, _id), = webui_tab.on_ui_tabs()
    assert title == "Train Embedding" and not [c for c in gradio.all if c.elem_id == "ti_trainer_unsupported"]
    (event,) = gradio.by_id("ti_trainer_train").events
    assert event.kwargs.get("js") == "ti_trainer_start" and "_js" not in event.kwargs
    assert gradio.by_id("ti_trainer_width").current() == 512  # the loaded SD1 model's size


def test_the_api_trains_on_forge(webui):
    fastapi = pytest.importorskip("fastapi", reason="the API tests need fastapi and httpx (requirements-dev.txt)")
    from fastapi.testclient import TestClient

    from lib_ti.hosts import webui_api

    app = fastapi.FastAPI()
    webui_api.mount(app)
    client = TestClient(app)
    assert client.post("/ti-trainer/v1/selfcheck").json()["ok"]
    response = client.post("/ti-trainer/v1/train", json={"name": "tok", "data_dir": str(webui.root / "data"), **RUN})
    assert response.status_code == 202, response.text
    for _ in range(600):
        status = client.get("/ti-trainer/v1/status", params={"run_id": response.json()["run_id"]}).json()
        if not status["active"]:
            break
        time.sleep(0.1)
    assert status["state"] == "finished" and status["step"] == 4, status
