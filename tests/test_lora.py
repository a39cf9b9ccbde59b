"""LoRA adapters and files without a diffusion model: names, files, hooks and the config's LoRA options."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

from lib_ti.config import LORA_TARGETS, TrainConfig
from lib_ti.errors import TIError
from lib_ti.formats.embeddings import safetensors_bytes
from lib_ti.formats.lora import (
    REAL_LAYOUT,
    TARGETS,
    LoraModule,
    load_lora,
    matches,
    save_lora,
    text_kohya_name,
    unet_kohya_name,
)
from lib_ti.lora import Adapters


def test_config_and_files_name_the_same_targets():
    assert LORA_TARGETS == TARGETS


@pytest.mark.parametrize(("diffusers", "kohya"), [
    # The webui's own conversion (networks.convert_diffusers_name_to_compvis) gives the same block numbers for the
    # real models' layout: input 1 + 3 * level + j, output 3 * level + j, middle 1.
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_2_1_transformer_blocks_0_attn1_to_q"),
    ("down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_out.0",
     "lora_unet_input_blocks_4_1_transformer_blocks_3_attn2_to_out_0"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
     "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj"),
    ("up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_v",
     "lora_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_v"),
])
def test_diffusers_unet_paths_become_kohya_names(diffusers, kohya):
    assert unet_kohya_name(diffusers, REAL_LAYOUT) == kohya


def test_text_encoder_names_and_targets():
    # transformers 5 dropped "text_model." from CLIPTextModel's paths; kohya names always carry it
    assert text_kohya_name("lora_te1", "encoder.layers.0.self_attn.q_proj") == \
        text_kohya_name("lora_te1", "text_model.encoder.layers.0.self_attn.q_proj") == \
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert matches(["attn"], "input_blocks.1.1.transformer_blocks.0.attn2.to_k")
    assert not matches(["attn"], "input_blocks.1.1.transformer_blocks.0.ff.net.2")
    assert matches(["ff"], "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2")
    assert not matches(["attn", "ff"], "down_blocks.0.attentions.0.proj_in")
    assert matches(["text"], "text_model.encoder.layers.11.self_attn.out_proj")
    assert not matches(["text"], "text_model.encoder.layers.11.mlp.fc1")


def _modules(seed: int = 0) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_unet_a_to_q": LoraModule(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), 2.0),
            "lora_te1_text_model_b": LoraModule(torch.randn(2, 5, generator=g), torch.randn(5, 2, generator=g), 2.0)}


def test_kohya_file_round_trips_bit_exactly_with_its_metadata(tmp_path):
    modules = _modules()
    path = save_lora(modules, tmp_path / "x.safetensors", {"ss_network_dim": "4"})
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    back = load_lora(path)
    assert back.format == "kohya" and back.modules.keys() == modules.keys()
    for name, m in modules.items():
        assert torch.equal(back.modules[name].down, m.down) and torch.equal(back.modules[name].up, m.up)
        assert back.modules[name].alpha == 2.0
    assert back.metadata["ss_network_dim"] == "4"
    assert back.metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    from safetensors.torch import load_file

    assert set(load_file(str(path))) == {f"{n}.{part}" for n in modules
                                         for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    with pytest.raises(TIError, match="already exists"):
        save_lora(modules, path, {})


def test_non_finite_lora_is_never_written(tmp_path):
    modules = _modules()
    modules["lora_unet_a_to_q"].up[0, 0] = float("nan")
    with pytest.raises(TIError, match="lora_unet_a_to_q holds NaN"):
        save_lora(modules, tmp_path / "x.safetensors", {})
    assert not (tmp_path / "x.safetensors").exists()


def test_diffusers_peft_file_is_read_with_kohya_names(tmp_path):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    tensors = {
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q.lora_B.weight": b,
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora.down.weight": a.clone(),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora.up.weight": b.clone(),
    }
    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {}))
    read = load_lora(path, text_prefixes=("lora_te",))
    assert read.format == "diffusers"
    assert sorted(read.modules) == ["lora_te_text_model_encoder_layers_0_self_attn_k_proj",
                                    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q"]
    module = read.modules["lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q"]
    assert torch.equal(module.down, a) and torch.equal(module.up, b) and module.alpha == 4.0  # diffusers: alpha = rank


def test_a_file_without_lora_weights_is_refused(tmp_path):
    path = tmp_path / "emb.safetensors"
    path.write_bytes(safetensors_bytes({"emb_params": torch.zeros(1, 8)}, {}))
    with pytest.raises(TIError, match="holds no LoRA weights"):
        load_lora(path)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(8, 6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.to_q(x)))


def test_adapters_change_the_output_only_while_attached():
    torch.manual_seed(0)
    net = _Net().requires_grad_(False)
    x = torch.randn(5, 8)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    plain = net(x)
    adapters = Adapters.new({"q": net.to_q, "o": net.out}, rank=2, alpha=2.0, dropout=0.0, seed=3)
    with adapters.attached():
        assert torch.equal(net(x), plain)  # up starts at zero: a new adapter changes nothing
        optimizer = torch.optim.SGD(adapters.parameters(), lr=0.5)
        net(x).pow(2).sum().backward()
        optimizer.step()
        assert not torch.allclose(net(x), plain)
        assert all(p.grad is None for p in net.parameters())
    assert torch.equal(net(x), plain)  # removed: bit-identical again
    assert not net.to_q._forward_hooks and not net.out._forward_hooks
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(t.dtype == torch.float32 and t.is_leaf for t in adapters.parameters())


def test_adapters_scale_by_alpha_over_rank_and_start_from_the_seed():
    net = _Net()
    one = Adapters.new({"q": net.to_q}, rank=4, alpha=2.0, dropout=0.0, seed=7)
    two = Adapters.new({"q": net.to_q}, rank=4, alpha=2.0, dropout=0.0, seed=7)
    assert torch.equal(one.down["q"], two.down["q"]) and one.scale["q"] == 0.5
    assert not torch.equal(one.down["q"], Adapters.new({"q": net.to_q}, rank=4, alpha=2.0, dropout=0.0,
                                                       seed=8).down["q"])
    with torch.no_grad():
        one.up["q"].fill_(1.0)
    x = torch.randn(2, 8)
    with one.attached():
        out = net.to_q(x)
    expected = net.to_q(x) + 0.5 * (x @ one.down["q"].T @ one.up["q"].T)
    assert torch.allclose(out, expected, atol=1e-6)


def test_weights_of_another_shape_are_refused():
    net = _Net()
    wrong = {"q": LoraModule(torch.zeros(2, 5), torch.zeros(6, 2), 2.0)}
    with pytest.raises(TIError, match="trained on another model"):
        Adapters({"q": net.to_q}, wrong, 0.0)
    with pytest.raises(TIError, match="differ at o"):
        Adapters({"q": net.to_q, "o": net.out}, {"q": LoraModule(torch.zeros(2, 8), torch.zeros(6, 2), 2.0)}, 0.0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"mode": "lora"}, "mode='lora' is invalid"),
    ({"lora_rank": 0}, "lora_rank=0 is invalid"),
    ({"lora_alpha": -1.0}, "lora_alpha=-1.0 is invalid"),
    ({"lora_dropout": 1.0}, "lora_dropout=1.0 is invalid"),
    ({"lora_targets": []}, "lora_targets=\\[\\] is invalid"),
    ({"lora_targets": ["attn", "conv"]}, "name one or more of attn, ff, text"),
    ({"ti_fraction": 0.0}, "ti_fraction=0.0 is invalid"),
    ({"noise_offset": -0.1}, "noise_offset=-0.1 is invalid"),
    ({"lora_learning_rate": "1e-4:abc"}, "LoRA learning rate"),
])
def test_lora_options_are_checked_before_any_work(changes, message):
    with pytest.raises(TIError, match=message):
        TrainConfig(**changes)


def test_lora_alpha_zero_means_the_rank():
    assert TrainConfig(lora_rank=8).lora_scale_alpha == 8.0
    assert TrainConfig(lora_rank=8, lora_alpha=1.0).lora_scale_alpha == 1.0


def test_an_existing_lora_is_never_replaced_unless_asked(tmp_path):
    from lib_ti.runfolder import check_new_run

    cfg = TrainConfig(name="tok", output_dir=str(tmp_path), mode="pivotal")
    (tmp_path / "tok-lora.safetensors").write_bytes(b"x")
    with pytest.raises(TIError, match="a LoRA of 'tok' already exists"):
        check_new_run(cfg)
    check_new_run(cfg.replace(overwrite=True))
