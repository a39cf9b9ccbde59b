"""Dataset preparation on real files in every tricky variant: what comes out, what is skipped and why."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps
from tricky_images import BLUE, GREEN, RED, UNICODE_NAME, draw_tricky, halves

from lib_ti.dataset.crops import cover_box, is_oversized, subject_box, tile_boxes
from lib_ti.dataset.prepare import PrepareOptions, output_stems, run, safe_stem
from lib_ti.errors import TIError
from lib_ti.images import discover

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tricky(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tricky")
    return folder, draw_tricky(folder)


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def mean_rgb(image: Image.Image, box=None) -> tuple[int, ...]:
    arr = np.asarray(image.convert("RGB").crop(box) if box else image.convert("RGB"), dtype=np.float64)
    return tuple(int(round(v)) for v in arr.reshape(-1, 3).mean(axis=0))


def near(a, b, tol=12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def prepare(src: Path, dst: Path, **kw):
    return run(PrepareOptions(src=str(src), dst=str(dst), **{"width": 64, "height": 64, **kw}))


def outputs(report, variant_path: Path) -> list[Image.Image]:
    return [Image.open(w.path) for w in report.written if w.source == variant_path]


# ---------------------------------------------------------------- every variant


def test_every_tricky_variant_is_written_or_skipped_with_its_reason(tricky, tmp_path):
    src, paths = tricky
    before = fingerprint(src)
    report = prepare(src, tmp_path / "out", split=True)
    reasons = {s.path.name: s.reason for s in report.skipped}
    assert set(reasons) == {"truncated.png", "notes.png", "dot.png", "copy.png"}
    assert "truncated" in reasons["truncated.png"] and "cannot read it as an image" in reasons["notes.png"]
    assert "1x1 px is below min_size=32" in reasons["dot.png"]
    assert reasons["copy.png"] == f"duplicate of {UNICODE_NAME} (same pixels)"
    written_from = {w.source.name for w in report.written}
    assert written_from == {"cmyk.jpg", "deep16.png", "palette.png", "rotated.jpg", "banner.png", UNICODE_NAME}
    assert all(Image.open(w.path).size == (64, 64) for w in report.written)
    assert fingerprint(src) == before  # the source folder is never modified
    text = report.format()
    assert all(f"skipped {name}: " in text for name in reasons) and "banner.png: split into 50 tiles" in text


def test_conversions_give_the_right_pixels(tricky, tmp_path):
    src, paths = tricky
    report = prepare(src, tmp_path / "out", background="#ff0000")
    (cmyk,) = outputs(report, paths["cmyk"])
    assert cmyk.mode == "RGB" and near(mean_rgb(cmyk), RED)
    (deep,) = outputs(report, paths["deep16"])
    # A 16-bit ramp keeps its range (PIL's own convert clips it to near-white).
    left, right = mean_rgb(deep, (0, 0, 8, 64)), mean_rgb(deep, (56, 0, 64, 64))
    assert left[0] < 60 and right[0] > 195 and left[0] == left[1] == left[2]
    (palette,) = outputs(report, paths["palette"])
    # Transparent half flattened onto the chosen background, the opaque half kept.
    assert palette.mode == "RGB" and near(mean_rgb(palette, (0, 0, 16, 64)), RED)
    assert near(mean_rgb(palette, (48, 0, 64, 64)), GREEN)


def test_alpha_is_kept_when_asked(tricky, tmp_path):
    src, paths = tricky
    (palette,) = outputs(prepare(src, tmp_path / "out", keep_alpha=True), paths["palette"])
    alpha = np.asarray(palette.getchannel("A"))
    assert palette.mode == "RGBA" and alpha[:, :16].max() == 0 and alpha[:, 48:].min() == 255


def test_exif_rotation_is_applied(tricky, tmp_path):
    src, paths = tricky
    (upright,) = outputs(prepare(src, tmp_path / "out", width=64, height=128), paths["rotated"])
    assert upright.size == (64, 128)
    assert near(mean_rgb(upright, (0, 0, 64, 56)), RED, 30) and near(mean_rgb(upright, (0, 72, 64, 128)), BLUE, 30)


def test_long_image_becomes_tiles_or_an_auto_sized_crop(tricky, tmp_path):
    src, paths = tricky
    tiles = outputs(prepare(src, tmp_path / "tiles", split=True), paths["banner"])
    assert len(tiles) == 50 and {t.size for t in tiles} == {(64, 64)}
    assert len({t.tobytes() for t in tiles}) == 50  # every tile shows a different part
    auto = prepare(src, tmp_path / "auto", width=128, height=128, auto_size=True)
    (crop,) = outputs(auto, paths["banner"])
    assert crop.size == (256, 64)  # the widest bucket for a 128x128 area: as near 40:1 as the limits allow
    assert [w.size for w in auto.written if w.source == paths["rotated"]] == [(64, 192)]  # 1:2 -> nearest bucket 1:3


def test_duplicates_are_written_once_even_in_another_format(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    halves((64, 64), RED, GREEN).save(src / "a.png")
    halves((64, 64), RED, GREEN).save(src / "b.bmp")
    halves((64, 64), GREEN, RED).save(src / "c.png")
    report = prepare(src, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    assert [(s.path.name, s.reason) for s in report.skipped] == [("b.bmp", "duplicate of a.png (same pixels)")]
    both = prepare(src, tmp_path / "all", dedupe=False)
    assert len(both.written) == 3


def test_unicode_names_and_captions_are_kept_and_flips_mirror(tricky, tmp_path):
    src, paths = tricky
    dst = tmp_path / "out"
    prepare(src, dst, flip=True)
    stem = Path(UNICODE_NAME).stem
    assert (dst / UNICODE_NAME).is_file() and (dst / f"{stem}-flip.png").is_file()
    assert (dst / f"{stem}.txt").read_text(encoding="utf-8") == "a cup of coffee"
    assert (dst / f"{stem}-flip.txt").read_text(encoding="utf-8") == "a cup of coffee"
    assert not (dst / "cmyk.txt").exists()  # no caption, none invented
    original, flipped = Image.open(dst / UNICODE_NAME), Image.open(dst / f"{stem}-flip.png")
    assert np.array_equal(np.asarray(ImageOps.mirror(original)), np.asarray(flipped))
    captions = {item.path.name: item.caption for item in discover(dst)}
    assert captions["rotated.png"] == "[name], red over blue"
    assert "rotated-flip.png" not in captions  # red over blue mirrors onto itself: no copy


def test_output_names_are_safe_unique_and_stable():
    assert safe_stem("café ☕") == "café ☕"
    assert safe_stem('a<b>c:d"e|f?g*h') == "a_b_c_d_e_f_g_h" and safe_stem("...") == "image"
    assert safe_stem("cafe\u0301") == "café"  # decomposed unicode is composed (NFC), so names compare equal
    paths = [Path("x/a.png"), Path("x/A.jpg"), Path("x/b.png")]
    stems = output_stems(paths)
    assert stems == {Path("x/A.jpg"): "A_jpg", Path("x/a.png"): "a_png", Path("x/b.png"): "b"}
    assert output_stems(list(reversed(paths))) == stems


def test_subject_crop_finds_the_detail_a_centre_crop_misses(tmp_path):
    im = Image.new("RGB", (300, 100), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    for i in range(6):
        for j in range(6):
            draw.rectangle([220 + i * 10, 20 + j * 10, 229 + i * 10, 29 + j * 10],
                           fill=(255, 255, 0) if (i + j) % 2 else (0, 0, 200))
    src = tmp_path / "src"
    src.mkdir()
    im.save(src / "subject.png")
    im.transpose(Image.Transpose.ROTATE_90).save(src / "tall.png")
    for w in prepare(src, tmp_path / "centre").written:
        assert np.asarray(Image.open(w.path)).std() < 1, w.source  # plain grey: the centre crop lost the subject
    subject = prepare(src, tmp_path / "subject", crop="subject")
    assert len(subject.written) == 2
    for w in subject.written:
        out = Image.open(w.path)
        assert np.asarray(out).std() > 50 and out.size == (64, 64), w.source


def test_crop_geometry():
    assert cover_box((300, 100), (64, 64)) == (100.0, 0.0, 200.0, 100.0)
    assert cover_box((300, 100), (64, 64), focus=(290, 50)) == (200.0, 0.0, 300.0, 100.0)  # clamped to the edge
    assert is_oversized((151, 100), (64, 64), 0.5) and not is_oversized((150, 100), (64, 64), 0.5)
    assert is_oversized((100, 151), (64, 64), 0.5)
    boxes = tile_boxes((200, 8000), (64, 64), 0.2)
    assert len(boxes) == 50 and boxes[0] == (0.0, 0.0, 200.0, 200.0) and boxes[-1][3] == pytest.approx(8000)
    overlap = boxes[0][3] - boxes[1][1]
    assert 0.15 * 200 < overlap < 0.25 * 200
    flat = Image.new("RGB", (300, 100), (10, 20, 30))
    assert subject_box(flat, (64, 64))[0] == pytest.approx(100, abs=3)  # nothing to find: stay near the centre


@pytest.mark.parametrize(("changes", "match"), [
    ({"width": 500}, "width=500"), ({"crop": "face"}, "crop='face'"), ({"split_overlap": 0.95}, "split_overlap"),
    ({"background": "not-a-colour"}, "background='not-a-colour'"),
    ({"bucket_min_side": 100}, "bucket_min_side=100"), ({"min_size": 0}, "min_size=0"),
    ({"auto_size": True, "bucket_min_side": 1024}, "lower bucket_min_side"),
])
def test_bad_options_are_named(changes, match, tmp_path):
    with pytest.raises(TIError, match=match):
        PrepareOptions(src=str(tmp_path), dst=str(tmp_path / "out"), **changes)


def test_folders_are_checked_before_any_work(tricky, tmp_path):
    src, _ = tricky
    with pytest.raises(TIError, match="never modified"):
        prepare(src, src / "inside")
    with pytest.raises(TIError, match="never modified"):
        prepare(src, src)
    with pytest.raises(TIError, match="src="):
        prepare(tmp_path / "missing", tmp_path / "out")
    used = tmp_path / "used"
    used.mkdir()
    halves((64, 64), RED, BLUE).save(used / "old.png")
    with pytest.raises(TIError, match="already holds 1 image"):
        prepare(src, used)
    assert not (src / "inside").exists() and len(list(used.iterdir())) == 1
    assert prepare(src, used, overwrite=True).written


def test_cli_prepare_shows_progress_and_the_report(tricky, tmp_path, cli):
    src, _ = tricky
    code, help_text, _ = cli("prepare", "--help")
    assert code == 0
    for flag in ("--src", "--dst", "--crop", "--auto-size", "--split", "--split-overlap", "--flip", "--keep-alpha",
                 "--background", "--no-dedupe", "--min-size", "--overwrite"):
        assert flag in help_text, flag
    code, out, err = cli("prepare", "--src", src, "--dst", tmp_path / "out", "--width", "64", "--height", "64",
                         "--flip")
    assert code == 0, err
    assert "10/10" in err and "image/s" in err  # the tqdm bar
    # 6 images plus 4 mirrored copies: the solid CMYK red and the red-over-blue crop mirror onto themselves
    assert "10 image(s) written from 6 of 10 source(s), 4 skipped" in out
    code, _, err = cli("prepare", "--src", src, "--dst", src)
    assert code == 2 and err.startswith("[TI Trainer] prepare dst=")


def test_progress_is_reported_and_a_stop_request_is_honoured(tricky, tmp_path):
    src, _ = tricky
    seen: list = []
    report = run(PrepareOptions(src=str(src), dst=str(tmp_path / "out"), width=64, height=64),
                 on_progress=lambda done, total, path: seen.append((done, total, path.name)),
                 should_stop=lambda: len(seen) >= 3)
    assert seen == [(1, 10, "banner.png"), (2, 10, UNICODE_NAME), (3, 10, "cmyk.jpg")]
    assert report.stopped and "(stopped early)" in report.format()
    assert {w.source.name for w in report.written} == {"banner.png", UNICODE_NAME, "cmyk.jpg"}


def test_a_symmetric_image_gets_no_flipped_copy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (64, 64), GREEN).save(src / "plain.png")
    halves((64, 64), RED, BLUE).save(src / "halves.png")
    report = prepare(src, tmp_path / "out", flip=True)
    assert sorted(w.path.name for w in report.written) == ["halves-flip.png", "halves.png", "plain.png"]
