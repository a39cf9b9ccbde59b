"""Embedding file formats: round trips, files as other tools write them, safety and atomicity (CPU, no network)."""

from __future__ import annotations

import argparse
import base64
import errno
import json
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from safetensors.torch import save_file

from lib_ti.cli import inspect as inspect_cmd
from lib_ti.embedding import Embedding
from lib_ti.errors import TIError, WriteError
from lib_ti.formats import embeddings as embedding_io
from lib_ti.formats.embeddings import load_embedding, load_embedding_details, save_embedding

FAMILIES = {
    "sd1": {"clip_l": 768},
    "sd2": {"clip_h": 1024},
    "sdxl": {"clip_l": 768, "clip_g": 1280},
}


def make_vectors(family: str, n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vecs = {k: torch.randn(n, w, generator=gen) for k, w in FAMILIES[family].items()}
    for v in vecs.values():  # values a lossy text format would mangle
        v[0, :4] = torch.tensor([-0.0, 1e-45, 3.4e38, 1 / 3])
    return vecs


def make_emb(family: str, name: str = "myemb", **kw) -> Embedding:
    return Embedding(name, make_vectors(family, **kw), step=1234, sd_checkpoint="a1b2c3d4e5f6",
                     sd_checkpoint_name="model-v1", extra={"trainer": "test", "lr": "0.005"})


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == torch.float32 and got[key].device.type == "cpu"
        assert got[key].shape == want[key].shape
        assert torch.equal(got[key].view(torch.int32), want[key].view(torch.int32)), key


# ---------------------------------------------------------------------------------------------------- round trips

# format id -> (file name, save kwargs, keeps name/step/checkpoint for one encoder, ... for SDXL, keeps extra)
ROUND_TRIPS = {
    "safetensors": ("myemb.safetensors", {}, True, True, True),
    "pt": ("myemb.pt", {}, True, False, False),
    "bin": ("myemb.bin", {}, True, False, False),
    "png": ("myemb.png", {}, True, True, True),
    "png-pixels": ("myemb.png", {"embed_pixels": True}, True, True, True),
    "webp": ("myemb.webp", {}, True, False, False),
    "diffusers": ("out", {"fmt": "diffusers"}, True, True, True),
    "diffusers-bin": ("learned_embeds.bin", {"fmt": "diffusers"}, False, False, False),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ROUND_TRIPS)
def test_round_trip_bit_exact(tmp_path, family, fmt):
    filename, kwargs, keeps_meta, keeps_meta_sdxl, keeps_extra = ROUND_TRIPS[fmt]
    emb = make_emb(family)
    written = save_embedding(emb, tmp_path / filename, **kwargs)
    back = load_embedding(written, name="myemb")
    assert_bit_exact(back.vectors, emb.vectors)
    assert back.name == "myemb"
    if keeps_meta_sdxl or (keeps_meta and family != "sdxl"):
        assert (back.step, back.sd_checkpoint, back.sd_checkpoint_name) == (1234, "a1b2c3d4e5f6", "model-v1")
    else:
        assert (back.step, back.sd_checkpoint, back.sd_checkpoint_name) == (0, None, None)
    assert back.extra == (emb.extra if keeps_extra else {})
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []  # no temp files left behind


@pytest.mark.parametrize("ext", ["safetensors", "pt", "png"])
def test_name_is_file_stem_except_inside_images(tmp_path, ext):
    """The webui prompts .pt/.safetensors by file stem, PNGs by the name stored inside."""
    path = save_embedding(make_emb("sd1", name="inner"), tmp_path / f"outer.{ext}")
    assert load_embedding(path).name == ("inner" if ext == "png" else "outer")
    assert load_embedding(path, name="override").name == "override"
    assert load_embedding_details(path).stored_name == "inner"


def test_safetensors_layout_is_what_hosts_expect(tmp_path):
    from safetensors import safe_open

    sdxl = save_embedding(make_emb("sdxl"), tmp_path / "xl.safetensors")
    sd2 = save_embedding(make_emb("sd2"), tmp_path / "two.safetensors")
    with safe_open(str(sdxl), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]  # exactly these two: the webui detaches every value
        meta = f.metadata()
    assert meta["name"] == "myemb" and meta["step"] == "1234" and meta["sd_checkpoint_name"] == "model-v1"
    assert meta[embedding_io.FORMAT_KEY] == embedding_io.FORMAT_VERSION and meta["trainer"] == "test"
    with safe_open(str(sd2), "pt") as f:
        assert list(f.keys()) == ["emb_params"]


def test_pt_layout_is_the_webui_one(tmp_path):
    one = torch.load(save_embedding(make_emb("sd1"), tmp_path / "a.pt"), weights_only=True)
    assert one["string_to_token"] == {"*": 265}
    assert list(one["string_to_param"]) == ["*"] and one["string_to_param"]["*"].shape == (3, 768)
    assert (one["name"], one["step"], one["sd_checkpoint"], one["sd_checkpoint_name"]) == (
        "myemb", 1234, "a1b2c3d4e5f6", "model-v1")
    xl = torch.load(save_embedding(make_emb("sdxl"), tmp_path / "b.pt"), weights_only=True)
    assert sorted(xl) == ["clip_g", "clip_l"]  # the webui rejects non-tensor values in an SDXL dict


def test_saved_tensors_are_contiguous_copies_not_views(tmp_path):
    big = torch.randn(10, 768)
    emb = Embedding("v", {"clip_l": big[2:4].t().contiguous().t()})  # a strided view into another tensor
    path = save_embedding(emb, tmp_path / "v.pt")
    assert path.stat().st_size < 10 * 768 * 4  # not the whole storage
    assert_bit_exact(load_embedding(path).vectors, {"clip_l": emb.vectors["clip_l"].contiguous()})


def test_png_with_given_image_and_placeholder(tmp_path):
    picture = Image.new("RGB", (64, 48), (10, 200, 30))
    path = save_embedding(make_emb("sd1"), tmp_path / "pic.png", image=picture)
    with Image.open(path) as img:
        assert img.size == (64, 48) and embedding_io.WEBUI_CHUNK in img.text
    card = save_embedding(make_emb("sdxl"), tmp_path / "card.png")
    with Image.open(card) as img:
        assert img.size == (384, 384)
        payload = json.loads(base64.b64decode(img.text[embedding_io.WEBUI_CHUNK]))
    assert sorted(payload) == ["clip_g", "clip_l"]


# ----------------------------------------------------------------------------------- files as other tools write them


def test_reads_webui_pt(tmp_path):
    vec = torch.randn(2, 768).requires_grad_(True)  # the webui saves the live training tensor
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "foo-500", "step": 499,
                "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5-pruned"}, tmp_path / "foo-500.pt")
    loaded = load_embedding_details(tmp_path / "foo-500.pt")
    emb = loaded.embedding
    assert (emb.name, emb.step, emb.sd_checkpoint) == ("foo-500", 499, "abcdef12")
    assert emb.sd_checkpoint_name == "v1-5-pruned"
    assert loaded.layout == "string_to_param" and not emb.vectors["clip_l"].requires_grad
    assert_bit_exact(emb.vectors, {"clip_l": vec.detach()})


def test_reads_webui_pt_with_none_fields_and_sd2_width(tmp_path):
    vec = torch.randn(4, 1024)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "x", "step": None,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "x.bin")
    emb = load_embedding(tmp_path / "x.bin")
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (0, None, None)
    assert_bit_exact(emb.vectors, {"clip_h": vec})


def test_reads_original_ti_parameterdict_pickle(tmp_path):
    """Original TI / torch 1.11 files pickle an nn.ParameterDict; the webui reads it via ._parameters."""
    vec = torch.randn(1, 768)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params}, tmp_path / "old.pt")
    assert_bit_exact(load_embedding(tmp_path / "old.pt").vectors, {"clip_l": vec})


@pytest.mark.parametrize("key", ["emb_params", "emp_params"])
@pytest.mark.parametrize("width", [768, 1024])
def test_reads_kohya_single_key(tmp_path, key, width):
    vec = torch.randn(5, width)
    save_file({key: vec.half()}, str(tmp_path / "k.safetensors"), metadata={"ss_output_name": "k", "name": "k2"})
    loaded = load_embedding_details(tmp_path / "k.safetensors")
    assert loaded.layout == key and loaded.stored_name == "k2"
    assert loaded.embedding.extra == {"ss_output_name": "k"}
    assert_bit_exact(loaded.embedding.vectors, {"clip_l" if width == 768 else "clip_h": vec.half().float()})


@pytest.mark.parametrize("ext", ["safetensors", "pt"])
def test_reads_kohya_sdxl(tmp_path, ext):
    vecs = {"clip_g": torch.randn(2, 1280), "clip_l": torch.randn(2, 768)}
    path = tmp_path / f"xl.{ext}"
    save_file(vecs, str(path)) if ext == "safetensors" else torch.save(vecs, path)
    loaded = load_embedding_details(path)
    assert loaded.layout == "clip_l+clip_g" and loaded.embedding.is_sdxl and loaded.embedding.name == "xl"
    assert_bit_exact(loaded.embedding.vectors, vecs)


def test_reads_diffusers_learned_embeds(tmp_path):
    one_d = torch.randn(768)  # old diffusers scripts save [dim]
    torch.save({"<cat-toy>": one_d}, tmp_path / "learned_embeds.bin")
    loaded = load_embedding_details(tmp_path / "learned_embeds.bin")
    assert loaded.layout == "diffusers" and loaded.keys == ["<cat-toy>"] and loaded.embedding.name == "learned_embeds"
    assert_bit_exact(loaded.embedding.vectors, {"clip_l": one_d.unsqueeze(0)})
    two_d = torch.randn(4, 1024)
    save_file({"<x>": two_d}, str(tmp_path / "sd2.safetensors"), metadata={"format": "pt"})
    assert_bit_exact(load_embedding(tmp_path / "sd2.safetensors").vectors, {"clip_h": two_d})


def test_reads_diffusers_sdxl_pair_from_either_file_or_folder(tmp_path):
    clip_l, clip_g = torch.randn(2, 768), torch.randn(2, 1280)
    save_file({"<tok>": clip_l}, str(tmp_path / "learned_embeds.safetensors"), metadata={"format": "pt"})
    save_file({"<tok>": clip_g}, str(tmp_path / "learned_embeds_2.safetensors"), metadata={"format": "pt"})
    for path in (tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors", tmp_path):
        assert_bit_exact(load_embedding(path).vectors, {"clip_l": clip_l, "clip_g": clip_g})


def _webui_b64(data: dict) -> str:
    """The webui's embedding_to_b64: tensors as {"TORCHTENSOR": nested list}, JSON, base64."""
    def encode(obj):
        return {"TORCHTENSOR": obj.cpu().detach().numpy().tolist()}
    return base64.b64encode(json.dumps(data, default=encode).encode()).decode()


def _webui_key_stream(count: int) -> np.ndarray:
    seed, out = 0, []
    for _ in range(count):
        seed = (1664525 * seed + 1013904223) % 2**32
        out.append(seed % 255)
    return np.array(out).astype(np.uint8)


def _webui_dots(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw, i = ImageDraw.Draw(im), 0
    for x in range(-6, im.size[0], 8):
        for row, y in enumerate(range(-6, im.size[1], 8)):
            off, shade = (4 if row % 2 == 0 else 0), int(shades[i % len(shades)])
            draw.ellipse((x + off, y, x + 6 + off, y + 6), fill=(shade, shade, shade))
            i += 1
    return block ^ (np.array(im).astype(np.uint8) & 0xF0)


def _webui_pixel_image(image: Image.Image, data: dict) -> Image.Image:
    """An independent re-implementation of the webui's insert_image_data_embed (image_embedding.py, §4.7)."""
    raw = np.frombuffer(zlib.compress(json.dumps(data, default=lambda t: {"TORCHTENSOR": t.tolist()}).encode(), 9),
                        np.uint8)
    h = image.size[1]
    size = raw.size + (h - raw.size % h)
    size += h * 3 - size % (h * 3)
    first = next(iter(data["string_to_param"].values()))[0][:1024].abs().numpy()
    shades = (first / first.max() * 255).astype(np.uint8)
    blocks = []
    for nibbles, seq in ((raw & 0x0F, shades), (raw >> 4, shades[::-1])):
        block = _webui_dots(np.resize(nibbles, size).reshape(h, -1, 3), seq)
        key = _webui_key_stream(block.size).reshape(block.shape)
        blocks.append(Image.fromarray(block.astype(np.uint8) ^ (key & 0x0F)))
    low, high = blocks
    canvas = Image.new("RGB", (image.size[0] + low.size[0] + high.size[0] + 2, h), (0, 0, 0))
    canvas.paste(low, (0, 0))
    canvas.paste(image, (low.size[0] + 1, 0))
    canvas.paste(high, (low.size[0] + 1 + image.size[0] + 1, 0))
    return canvas


def _webui_data(vec: torch.Tensor) -> dict:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "pngname", "step": 300,
            "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "anything-v3"}


def test_reads_webui_png_text_chunk(tmp_path):
    vec = torch.randn(2, 768)
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", _webui_b64(_webui_data(vec)))
    Image.new("RGB", (32, 32), "white").save(tmp_path / "preview-300.png", pnginfo=info)
    loaded = load_embedding_details(tmp_path / "preview-300.png")
    emb = loaded.embedding
    assert loaded.container == "PNG text chunk" and emb.name == "pngname"
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (300, "0123abcd", "anything-v3")
    assert_bit_exact(emb.vectors, {"clip_l": vec})


@pytest.mark.parametrize("ext", ["png", "webp"])
def test_reads_webui_pixel_encoded_image(tmp_path, ext):
    """Sites strip text chunks; the webui then reads the copy hidden in the pixels (extract_image_data_embed)."""
    vec = torch.randn(2, 768)
    image = _webui_pixel_image(Image.new("RGB", (40, 40), (250, 240, 200)), _webui_data(vec))
    kwargs = {"lossless": True, "exact": True} if ext == "webp" else {}
    image.save(tmp_path / f"shared.{ext}", **kwargs)
    loaded = load_embedding_details(tmp_path / f"shared.{ext}")
    assert loaded.container.endswith("pixels") and loaded.embedding.name == "pngname"
    assert_bit_exact(loaded.embedding.vectors, {"clip_l": vec})


def _webui_extract(image: Image.Image) -> dict:
    """An independent re-implementation of the webui's extract_image_data_embed."""
    pixels = np.array(image.convert("RGB"))
    lit = (pixels > 0).all(2)
    cols, rows = lit.any(0), lit.any(1)
    pixels = pixels[rows.argmax():len(rows) - rows[::-1].argmax(), cols.argmax():len(cols) - cols[::-1].argmax()] & 0x0F
    black = np.where(pixels.sum(axis=(0, 2)) == 0)[0]
    lower, upper = pixels[:, :black.min()], pixels[:, black.max() + 1:]
    key = _webui_key_stream(lower.size).reshape(lower.shape) & 0x0F
    raw = ((upper ^ key) << 4) | (lower ^ key)
    return json.loads(zlib.decompress(raw.astype(np.uint8).flatten().tobytes()),
                      object_hook=lambda d: torch.from_numpy(np.array(d["TORCHTENSOR"])) if "TORCHTENSOR" in d else d)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_own_pixel_encoding_is_webui_readable(tmp_path, family):
    """Our embed_pixels PNG decodes with the webui's algorithm, and by us once text chunks are stripped."""
    emb = make_emb(family)
    path = save_embedding(emb, tmp_path / "px.png", embed_pixels=True)
    with Image.open(path) as img:
        data = _webui_extract(img)
        img.convert("RGB").save(tmp_path / "stripped.png")  # what an upload site leaves
    webui_vectors = data if family == "sdxl" else {"clip_l": data["string_to_param"]["*"]}
    assert_bit_exact({k: v.float() for k, v in webui_vectors.items()}, emb.vectors)
    loaded = load_embedding_details(tmp_path / "stripped.png")
    assert loaded.container == "PNG pixels"
    assert_bit_exact(loaded.embedding.vectors, emb.vectors)


def test_key_stream_matches_webui_reference():
    """The first values and the 100 000-value sum are the webui's own self-test numbers."""
    reference = _webui_key_stream(100_100)
    assert reference[:5].tolist() == [253, 242, 127, 44, 157] and int(reference[100:].astype(int).sum()) == 12731374
    assert np.array_equal(embedding_io._lcg_nibbles(100_100), reference & 0x0F)


# ------------------------------------------------------------------------------------------------- safety, errors


class _CreatesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "name": _CreatesFile(marker)}, evil)
    with pytest.raises(TIError) as err:
        load_embedding(evil)
    assert not marker.exists()
    assert str(evil) in str(err.value) and "not loaded" in str(err.value)
    assert "GLOBAL io.open" in str(err.value)  # names what was refused (builtins.open pickles as io.open)
    # control: the payload is live, so the test above proves something
    control = tmp_path / "control"
    torch.save({"x": _CreatesFile(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)["x"].close()  # unpickling opened the file
    assert control.exists()


def test_legacy_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps({"emb_params": _CreatesFile(marker)}, protocol=2))
    with pytest.raises(TIError):
        load_embedding(evil)
    assert not marker.exists()


def test_unrecognised_content_names_file_and_keys(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2), "lora_unet_down.alpha": torch.zeros(1)}, str(lora))
    with pytest.raises(TIError, match=r"\[TI Trainer\].*lora\.safetensors.*'lora_unet_down\.weight'"):
        load_embedding(lora)


@pytest.mark.parametrize("case", ["missing", "empty", "text", "plain-png", "two-terms", "int-tensor", "3d"])
def test_bad_files_give_clear_errors(tmp_path, case):
    path = tmp_path / "bad.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello, not an embedding")
    elif case == "plain-png":
        path = tmp_path / "bad.png"
        Image.new("RGB", (16, 16), (120, 130, 140)).save(path)
    elif case == "two-terms":
        torch.save({"string_to_param": {"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}}, path)
    elif case == "int-tensor":
        torch.save({"emb_params": torch.zeros(1, 768, dtype=torch.int64)}, path)
    elif case == "3d":
        torch.save({"emb_params": torch.zeros(1, 2, 768)}, path)
    with pytest.raises(TIError) as err:
        load_embedding(path)
    assert str(err.value).startswith("[TI Trainer]") and path.name in str(err.value)


FORMAT_FILES = {"safetensors": "e.safetensors", "pt": "e.pt", "png": "e.png", "webp": "e.webp", "diffusers": "d"}


@pytest.mark.parametrize("fmt", FORMAT_FILES)
def test_refuses_to_overwrite(tmp_path, fmt):
    path = tmp_path / FORMAT_FILES[fmt]
    first = save_embedding(make_emb("sd1", seed=1), path, fmt=fmt)
    before = first.read_bytes()
    with pytest.raises(TIError, match="already exists.*overwrite") as err:
        save_embedding(make_emb("sd1", seed=2), path, fmt=fmt)
    assert str(first) in str(err.value) and first.read_bytes() == before
    save_embedding(make_emb("sd1", seed=2), path, fmt=fmt, overwrite=True)
    assert_bit_exact(load_embedding(first).vectors, make_vectors("sd1", seed=2))


def _fail_midway(target, *_args, **_kwargs) -> None:
    with open(target, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def _disk_fills_up(monkeypatch, fmt: str) -> None:
    """The next write of a ``fmt`` file fails midway, as on a full disk."""
    if fmt == "png":
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: _fail_midway(fp))
    else:
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: _fail_midway(self))


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "png"])
def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch, fmt):
    path = save_embedding(make_emb("sdxl", seed=1), tmp_path / f"e.{fmt}")
    before = path.read_bytes()
    _disk_fills_up(monkeypatch, fmt)
    with pytest.raises(WriteError) as err:
        save_embedding(make_emb("sdxl", seed=2), path, overwrite=True)
    assert str(err.value) == (f"[TI Trainer] could not write {str(path)!r}: the disk is full; free some space and try "
                              "again")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    _disk_fills_up(monkeypatch, "safetensors")
    with pytest.raises(WriteError, match="new.safetensors"):
        save_embedding(make_emb("sd1"), tmp_path / "new.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("path", "fmt", "match"), [
    ("e.txt", None, "cannot tell the embedding format"),
    ("e.png", "safetensors", "needs a file ending in .safetensors"),
    ("e.safetensors", "onnx", "unknown embedding format"),
])
def test_bad_output_names(tmp_path, path, fmt, match):
    with pytest.raises(TIError, match=match):
        save_embedding(make_emb("sd1"), tmp_path / path, fmt=fmt)


# ------------------------------------------------------------------------------------------------ inspect, convert


def test_describe_reports_widths_and_metadata(tmp_path):
    path = save_embedding(make_emb("sdxl", n=2), tmp_path / "xl.safetensors")
    d = inspect_cmd.describe(path)
    assert d["widths"] == {"clip_l": 768, "clip_g": 1280} and d["model_family"] == "SDXL"
    assert d["num_vectors"] == 2 and d["step"] == 1234 and d["sd_checkpoint"] == "a1b2c3d4e5f6"
    assert d["format"] == "clip_l+clip_g (safetensors)" and len(d["norms"]["clip_g"]) == 2
    text = inspect_cmd.format_description(d)
    assert "clip_l 768 + clip_g 1280 (SDXL)" in text and "model-v1 [a1b2c3d4e5f6]" in text
    assert json.loads(json.dumps(d)) == d
    sd2 = inspect_cmd.describe(save_embedding(make_emb("sd2"), tmp_path / "two.pt"))
    assert sd2["widths"] == {"clip_h": 1024} and sd2["model_family"] == "SD2.x"


def test_convert_chain_is_bit_exact(tmp_path):
    emb = make_emb("sd1", name="chain")
    src = save_embedding(emb, tmp_path / "chain.pt")
    for i, ext in enumerate(("safetensors", "png", "webp", "bin", "safetensors")):
        dst = tmp_path / f"step{i}" / f"chain.{ext}"
        inspect_cmd.convert(src, dst)
        assert_bit_exact(load_embedding(dst).vectors, emb.vectors)
        src = dst
    with pytest.raises(TIError, match="already exists"):
        inspect_cmd.convert(src, dst)


def test_convert_sdxl_to_diffusers_pair(tmp_path):
    emb = make_emb("sdxl", name="xl")
    src = save_embedding(emb, tmp_path / "xl.safetensors")
    out = inspect_cmd.convert(src, tmp_path / "diff", fmt="diffusers")
    assert out == tmp_path / "diff" / "learned_embeds.safetensors"
    assert (out.parent / "learned_embeds_2.safetensors").exists()
    assert_bit_exact(load_embedding(out.parent).vectors, emb.vectors)


def _cli(argv):
    parser = argparse.ArgumentParser()
    inspect_cmd.add_arguments(parser)
    return inspect_cmd.run(parser.parse_args(argv))


def test_cli_run(tmp_path, capsys):
    src = save_embedding(make_emb("sd1"), tmp_path / "cli.safetensors")
    assert _cli([str(src)]) == 0
    assert "clip_l 768 (SD1.x)" in capsys.readouterr().out
    assert _cli([str(src), "--json", "--to", str(tmp_path / "cli.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["widths"] == {"clip_l": 768} and out["written"] == str(tmp_path / "cli.png")
    assert _cli([str(src), "--to", str(tmp_path / "cli.png")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert _cli([str(src), "--to", str(tmp_path / "cli.png"), "--overwrite"]) == 0
