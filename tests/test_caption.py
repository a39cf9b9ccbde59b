"""Captioning with a tiny random BLIP built here from a config: the captions are nonsense, but the
model loading, batching, generation and file writing are the real code paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from tricky_images import BLUE, GREEN, RED, UNICODE_NAME, halves

from lib_ti.dataset.blip import DEFAULT_MODEL, load_blip
from lib_ti.dataset.caption import CaptionOptions, caption_folder, compose, per_image, review_items, save_caption
from lib_ti.errors import TIError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a an the of on with and photo picture cat dog cup table red green blue small large sitting".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def build_tiny_blip(out: Path) -> Path:
    """A BLIP captioning model of the real architecture, 1 layer and 32 wide, with a ~25-word WordPiece vocabulary."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    out.mkdir(parents=True, exist_ok=True)
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")  # BLIP's decoder starts from [DEC], as the real one
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = dict(
        small,
        vocab_size=len(SPECIAL) + len(WORDS),
        encoder_hidden_size=32,
        max_position_embeddings=64,
        bos_token_id=ids["[DEC]"],
        pad_token_id=ids["[PAD]"],
        sep_token_id=ids["[SEP]"],
        eos_token_id=ids["[SEP]"],
    )
    config = BlipConfig(vision_config=dict(small, image_size=32, patch_size=16), text_config=text, projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    vocab.unlink()  # the processor saved its own copy; the model folder must stand alone
    return out


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="module")
def blip(blip_dir):
    return load_blip(str(blip_dir), num_beams=1, max_new_tokens=6)


def images_folder(folder: Path, count: int = 5) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [RED, GREEN, BLUE, (250, 250, 250), (20, 20, 20)]
    for i in range(count):
        halves((48 + 8 * i, 40), colours[i % 5], colours[(i + 2) % 5]).save(folder / f"{i:02d}.png")
    return folder


class Recording:
    """Wraps a captioner and records each call's batch size and captions."""

    def __init__(self, captioner) -> None:
        self.captioner, self.batches, self.captions = captioner, [], []

    def __call__(self, images: list[Image.Image]) -> list[str]:
        out = self.captioner(images)
        self.batches.append(len(images))
        self.captions += out
        return out


def caption_text(image: Path) -> str:
    return image.with_suffix(".txt").read_text(encoding="utf-8")


def test_tiny_blip_captions_batches_and_writes_every_image(blip, tmp_path):
    folder = images_folder(tmp_path / "imgs")
    recording = Recording(blip)
    report = caption_folder(folder, recording, CaptionOptions(batch_size=2))
    assert recording.batches == [2, 2, 1]
    assert all(isinstance(c, str) for c in recording.captions) and any(recording.captions)
    assert set(" ".join(recording.captions).split()) <= set(WORDS)  # decoded from the tiny vocabulary
    images = sorted(folder.glob("*.png"))
    assert [caption_text(p) for p in images] == [c.strip() for c in recording.captions]
    assert report.written == [p.with_suffix(".txt") for p in images] and not report.kept
    assert not list(folder.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_existing_captions_are_kept_unless_overwrite(blip, tmp_path):
    folder = images_folder(tmp_path / "imgs", 3)
    (folder / "01.txt").write_text("my own caption", encoding="utf-8")
    recording = Recording(blip)
    report = caption_folder(folder, recording, CaptionOptions(batch_size=8))
    assert recording.batches == [2] and report.kept == [folder / "01.png"]
    assert caption_text(folder / "01.png") == "my own caption"
    again = Recording(blip)
    caption_folder(folder, again, CaptionOptions(overwrite=True, batch_size=8))
    assert again.batches == [3] and caption_text(folder / "01.png") == again.captions[1].strip()


def test_prefix_suffix_and_trigger(blip, tmp_path):
    folder = images_folder(tmp_path / "imgs", 2)
    recording = Recording(blip)
    opts = CaptionOptions(prefix="photo of ", suffix=", studio light", trigger="[name]")
    caption_folder(folder, recording, opts)
    for image, raw in zip(sorted(folder.glob("*.png")), recording.captions, strict=True):
        assert caption_text(image) == f"[name], photo of {raw.strip()}, studio light"
    assert compose("a cat", CaptionOptions(trigger="my-cat")) == "my-cat, a cat"
    assert compose("my-cat on a table", CaptionOptions(trigger="my-cat")) == "my-cat on a table"  # not twice
    assert compose("", CaptionOptions(trigger="[name]")) == "[name]"


def test_unreadable_images_are_skipped_and_named(blip, tmp_path):
    folder = images_folder(tmp_path / "imgs", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = caption_folder(folder, blip, CaptionOptions(batch_size=4))
    assert [(s.path.name, "cannot read it as an image" in s.reason) for s in report.skipped] == [("broken.png", True)]
    assert len(report.written) == 2 and not (folder / "broken.txt").exists()
    assert "skipped broken.png: cannot read it as an image" in report.format()


def test_a_captioner_that_miscounts_is_an_error(tmp_path):
    folder = images_folder(tmp_path / "imgs", 2)
    with pytest.raises(TIError, match="one string per image"):
        caption_folder(folder, lambda images: ["only one"], CaptionOptions(batch_size=2))


def test_one_image_function_works_as_a_captioner(tmp_path):
    """The webui side passes per_image(shared.interrogator.generate_caption); any one-image function works."""
    folder = images_folder(tmp_path / "imgs", 3)
    caption_folder(folder, per_image(lambda im: f"{im.width} wide"), CaptionOptions(batch_size=2))
    assert [caption_text(p) for p in sorted(folder.glob("*.png"))] == ["48 wide", "56 wide", "64 wide"]


def test_missing_model_says_what_is_missing_and_how_to_get_it(tmp_path):
    with pytest.raises(TIError) as e:
        load_blip("nobody/no-such-blip-model")
    message = str(e.value)
    assert message.startswith("[TI Trainer] no BLIP captioning model 'nobody/no-such-blip-model'")
    assert "Nothing is downloaded" in message and "Hugging Face cache (" in message
    assert f"hf download {DEFAULT_MODEL} --local-dir models/blip-base" in message and "huggingface-cli" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(TIError, match="could not be loaded from .*empty.*config.json"):
        load_blip(str(tmp_path / "empty"))


def test_review_items_and_saving_a_caption(tmp_path):
    folder = images_folder(tmp_path / "imgs", 2)
    halves((40, 40), RED, BLUE).save(folder / UNICODE_NAME)
    (folder / "00.txt").write_text("\ufeffa caption\n", encoding="utf-8")
    items = review_items(folder)
    assert [(i.image.name, i.caption) for i in items] == [("00.png", "a caption"), ("01.png", ""),
                                                         (UNICODE_NAME, "")]
    path = save_caption(items[2].image, "  [name] with\na cup  ")
    assert path == folder / "café ☕.txt" and path.read_text(encoding="utf-8") == "[name] with a cup"
    assert review_items(folder)[2].caption == "[name] with a cup"
    with pytest.raises(TIError, match="does not exist"):
        save_caption(folder / "gone.png", "x")


def test_cli_captions_with_a_model_id_from_the_local_cache(blip_dir, tmp_path, monkeypatch, cli):
    cache = tmp_path / "hf-cache"
    snapshot = cache / "models--local--tiny-blip" / "snapshots" / ("0" * 40)
    shutil.copytree(blip_dir, snapshot)
    (cache / "models--local--tiny-blip" / "refs").mkdir()
    (cache / "models--local--tiny-blip" / "refs" / "main").write_text("0" * 40)
    folder = images_folder(tmp_path / "imgs", 3)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE in the environment sets
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, out, err = cli("caption", "--data", folder, "--model", "local/tiny-blip", "--num-beams", "1",
                         "--batch-size", "2", "--trigger", "[name]", "--device", "cpu")
    assert code == 0, err
    assert "3 written, 0 existing kept, 0 skipped" in out and "3/3" in err
    assert all(caption_text(p).startswith("[name]") for p in folder.glob("*.png"))
    code, _, err = cli("caption", "--data", folder)
    assert code == 2  # the default model is not in this cache
    assert f"no model id {DEFAULT_MODEL!r} in the local Hugging Face cache ({cache})" in err


def test_progress_is_reported_and_a_stop_request_is_honoured(tmp_path):
    folder = images_folder(tmp_path / "imgs", 5)
    seen: list = []
    report = caption_folder(folder, per_image(lambda im: "x"), CaptionOptions(batch_size=2),
                            on_progress=lambda done, total, path: seen.append((done, total, path.name)),
                            should_stop=lambda: len(seen) >= 2)
    assert seen == [(2, 5, "01.png"), (4, 5, "03.png")]
    assert report.stopped and len(report.written) == 4 and not (folder / "04.txt").exists()
