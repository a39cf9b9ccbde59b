import random

import pytest

from lib_ti.errors import TIError
from lib_ti.templates import (
    BUILTIN_TEMPLATES,
    check_captions,
    check_templates,
    is_builtin_template,
    is_filewords_only,
    load_templates,
    pick_template,
    render_caption,
    resolve_template,
    uses_filewords,
)


def render(template, filewords=None, seed=0, **kw):
    return render_caption(template, name="tok", filewords=filewords, rng=random.Random(seed), **kw)


# ---------------------------------------------------------------- built-ins and loading


def test_builtin_sets_have_the_expected_lines():
    assert set(BUILTIN_TEMPLATES) >= {"object", "object_filewords", "style", "style_filewords", "captions", "name"}
    assert load_templates("object")[0] == "a photo of a [name]"
    assert len(load_templates("object")) == 27
    assert load_templates("object_filewords")[0] == "a photo of a [name], [filewords]"
    assert load_templates("style")[0] == "a painting, art by [name]"
    assert len(load_templates("style")) == 19
    assert load_templates("style_filewords")[0] == "a painting of [filewords], art by [name]"
    assert load_templates("captions") == ["[filewords]"]
    assert load_templates("name") == ["[name]"]


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_every_builtin_set_is_valid(name):
    assert check_templates(load_templates(name)) == list(BUILTIN_TEMPLATES[name])


def test_webui_file_names_resolve_to_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_templates("subject_filewords.txt") == load_templates("object_filewords")
    assert load_templates("Style.txt") == load_templates("style")
    assert load_templates("subject") == load_templates("object")


def test_existing_file_wins_over_builtin_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "style.txt").write_text("my [name] style\n", encoding="utf-8")
    assert load_templates("style.txt") == ["my [name] style"]


def test_template_file_ignores_blank_lines_and_bom(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffa photo of [name]\n\n   \n  {} in the snow  \r\n".encode("utf-8"))
    assert load_templates(str(path)) == ["a photo of [name]", "{} in the snow"]


def test_filewords_only_file_is_accepted(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("[filewords]\nphoto, [filewords]\n", encoding="utf-8")
    assert load_templates(str(path)) == ["[filewords]", "photo, [filewords]"]


def test_file_without_name_placeholder_is_rejected(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a secret photo\n[filewords] picture\n", encoding="utf-8")
    with pytest.raises(TIError, match=r"\[TI Trainer\].*no line contains \[name\]") as e:
        load_templates(str(path))
    assert "t.txt" in str(e.value)
    assert "secret" not in str(e.value)  # never echoes the file: a webui request may name a file it cannot read


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TIError, match="no template lines"):
        load_templates(str(path))


def test_non_utf8_file_is_rejected(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9 [name]".encode("latin-1"))
    with pytest.raises(TIError, match="UTF-8"):
        load_templates(str(path))


@pytest.mark.parametrize("spec", ["nope", "missing/file.txt", "/no/such/templates.txt"])
def test_unknown_name_or_missing_file_lists_builtins(spec):
    with pytest.raises(TIError) as e:
        load_templates(spec)
    msg = str(e.value)
    assert msg.startswith("[TI Trainer]") and repr(spec) in msg
    for name in BUILTIN_TEMPLATES:
        assert name in msg


def test_lines_that_never_use_the_embedding_warn(capsys):
    check_templates(["a photo of [name]", "just a picture"])
    err = capsys.readouterr().err
    assert "1 of 2 template lines" in err and "(line 2)" in err and "just a picture" not in err


def test_loading_and_checking_a_file_warns_once(tmp_path, capsys):
    path = tmp_path / "t.txt"
    path.write_text("a photo of [name]\nplain\n", encoding="utf-8")
    check_templates(load_templates(str(path)), source=str(path))
    assert capsys.readouterr().err.count("never use the embedding") == 1


def test_set_predicates():
    assert uses_filewords(["x [filewords]"]) and not uses_filewords(["x [name]"])
    assert is_filewords_only(["[filewords]"]) and not is_filewords_only(["[name], [filewords]"])
    assert not is_filewords_only(["[filewords]", "plain"])


# ---------------------------------------------------------------- rendering


def test_name_placeholders_are_replaced():
    assert render("a photo of a [name]") == "a photo of a tok"
    assert render("a photo of a {}") == "a photo of a tok"
    assert render("[name] and [name]") == "tok and tok"


def test_filewords_are_inserted_and_normalised():
    assert render("a photo of a [name], [filewords]", "red,  hat ,,blue") == "a photo of a tok, red, hat, blue"


def test_name_inside_the_caption_is_replaced():
    assert render("[filewords]", "[name] on a beach, sunset") == "tok on a beach, sunset"


def test_missing_caption_leaves_no_dangling_separator():
    assert render("a photo of a [name], [filewords]", None) == "a photo of a tok"
    assert render("a photo of a [name], [filewords]", "") == "a photo of a tok"


def test_dropout_never_drops_every_tag():
    for seed in range(200):
        out = render("[filewords]", "a, b, c", seed=seed, tag_dropout=0.99)
        assert out in {"a", "b", "c"}
    assert render("[filewords]", "only", tag_dropout=1.0) == "only"


def test_dropout_drops_about_the_right_share():
    tags = ", ".join(f"t{i}" for i in range(1000))
    kept = render("[filewords]", tags, tag_dropout=0.3).split(", ")
    assert 600 < len(kept) < 800
    assert kept == sorted(kept, key=lambda t: int(t[1:]))  # no shuffle: order kept


def test_keep_tokens_stay_first_and_are_never_dropped():
    caption = "tok, 1girl, red hair, hat, smile, outdoors"
    for seed in range(50):
        tags = render("[filewords]", caption, seed=seed, shuffle_tags=True, tag_dropout=0.9, keep_tokens=2).split(", ")
        assert tags[:2] == ["tok", "1girl"]
        assert set(tags[2:]) <= {"red hair", "hat", "smile", "outdoors"}


def test_keep_tokens_alone_may_leave_only_the_kept_tags():
    outs = {render("[filewords]", "a, b", seed=s, tag_dropout=1.0, keep_tokens=1) for s in range(20)}
    assert outs == {"a"}


def test_shuffle_is_a_deterministic_permutation():
    caption = ", ".join(f"t{i}" for i in range(12))
    a = render("[filewords]", caption, seed=7, shuffle_tags=True)
    assert a == render("[filewords]", caption, seed=7, shuffle_tags=True)
    assert sorted(a.split(", ")) == sorted(caption.split(", "))
    outs = {render("[filewords]", caption, seed=s, shuffle_tags=True) for s in range(10)}
    assert len(outs) > 1


@pytest.mark.parametrize("kw", [{"tag_dropout": -0.1}, {"tag_dropout": 1.5}, {"tag_dropout": "0.1"},
                                {"keep_tokens": -1}, {"keep_tokens": 1.5}])
def test_bad_render_options_are_rejected(kw):
    with pytest.raises(TIError):
        render("[filewords]", "a, b", **kw)


def test_caption_draws_depend_only_on_seed_step_and_micro_batch():
    from lib_ti.trainer import step_seed

    def rng(seed, step, micro=0):  # how the trainer seeds a step's caption choices
        return random.Random(step_seed(seed, step, micro, "caption"))

    assert rng(1, 5).random() == rng(1, 5).random()
    assert rng(1, 5).random() != rng(1, 6).random()
    assert rng(1, 5).random() != rng(1, 5, 1).random()
    assert rng(1, 5).random() != rng(2, 5).random()
    assert pick_template(["a", "b", "c"], rng(3, 3)) == pick_template(["a", "b", "c"], rng(3, 3))


# ---------------------------------------------------------------- captions vs. template set


def test_filewords_only_needs_every_caption_to_name_the_embedding():
    check_captions(["[filewords]"], {"a.png": "tok in a hat", "b.png": "[name] smiling"}, "tok")
    with pytest.raises(TIError, match="no caption.*'b.png'"):
        check_captions(["[filewords]"], {"a.png": "tok", "b.png": None}, "tok")
    with pytest.raises(TIError, match="mention neither.*'b.png'"):
        check_captions(["[filewords]"], {"a.png": "tok", "b.png": "a hat"}, "tok")


def test_missing_captions_with_a_named_template_only_warn(capsys):
    check_captions(["a [name], [filewords]"], {"a.png": None}, "tok")
    assert "'a.png'" in capsys.readouterr().err
    check_captions(["a [name]"], {"a.png": None}, "tok")
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------- auto: the default, chosen from the captions


@pytest.mark.parametrize(("captions", "chosen"), [
    ({"a.png": "a red [name] on a blue background", "b.png": "tok in the snow"}, "captions"),
    ({"a.png": "a red [name] on a blue background", "b.png": "a dog"}, "object_filewords"),  # b does not name it
    ({"a.png": "a dog", "b.png": None}, "object_filewords"),
    ({"a.png": "[name] here", "b.png": "  "}, "object_filewords"),  # a blank caption is no caption
    ({"a.png": None, "b.png": None}, "object"),
])
def test_auto_uses_captions_when_there_are_and_says_which_set(captions, chosen):
    template, note = resolve_template("auto", captions, "tok")
    assert template == chosen
    assert note is not None and note.startswith("template auto:") and f"'{chosen}'" in note
    assert load_templates(template)  # a built-in set the loader knows


def test_other_templates_resolve_to_themselves_without_a_note():
    assert resolve_template("style", {"a.png": "[name]"}, "tok") == ("style", None)
    assert resolve_template("my.txt", {}, "tok") == ("my.txt", None)
    assert is_builtin_template("auto") and is_builtin_template("AUTO ")
    with pytest.raises(TIError, match="resolve it first"):
        load_templates("auto")
