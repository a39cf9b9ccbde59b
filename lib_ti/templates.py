"""Prompt templates and caption rendering.

A template set is a list of lines such as ``"a photo of a [name], [filewords]"``.
Placeholders (the webui's two, plus the diffusers one):

* ``[name]`` and ``{}``: the embedding name (the token being trained);
* ``[filewords]``: the image's caption, split on commas into tags that can be
  dropped or shuffled.

Everything here is pure: the same template, caption and ``random.Random`` state
give the same prompt.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import TIError, warn

MAX_TEMPLATE_FILE = 1024 * 1024  # bytes: far more than any set of prompt lines
MAX_LINE = 10_000  # characters of one template line or caption: far more than any prompt

NAME = "[name]"
NAME_BRACES = "{}"
FILEWORDS = "[filewords]"

_OBJECT_PREFIXES = (
    "a photo of a", "a rendering of a", "a cropped photo of the", "the photo of a", "a photo of a clean",
    "a photo of a dirty", "a dark photo of the", "a photo of my", "a photo of the cool", "a close-up photo of a",
    "a bright photo of the", "a cropped photo of a", "a photo of the", "a good photo of the", "a photo of one",
    "a close-up photo of the", "a rendition of the", "a photo of the clean", "a rendition of a",
    "a photo of a nice", "a good photo of a", "a photo of the nice", "a photo of the small",
    "a photo of the weird", "a photo of the large", "a photo of a cool", "a photo of a small",
)
_STYLE_SUBJECTS = (
    "a painting", "a rendering", "a cropped painting", "the painting", "a clean painting", "a dirty painting",
    "a dark painting", "a picture", "a cool painting", "a close-up painting", "a bright painting",
    "a cropped painting", "a good painting", "a close-up painting", "a rendition", "a nice painting",
    "a small painting", "a weird painting", "a large painting",
)

BUILTIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    # webui subject.txt / diffusers imagenet_templates_small
    "object": tuple(f"{p} [name]" for p in _OBJECT_PREFIXES),
    # webui subject_filewords.txt
    "object_filewords": tuple(f"{p} [name], [filewords]" for p in _OBJECT_PREFIXES),
    # webui style.txt
    "style": tuple(f"{s}, art by [name]" for s in _STYLE_SUBJECTS),
    # webui style_filewords.txt
    "style_filewords": tuple(f"{s} of [filewords], art by [name]" for s in _STYLE_SUBJECTS),
    # the caption is the whole prompt; it must mention [name] (or the name itself)
    "captions": ("[filewords]",),
    "name": ("[name]",),
}

# The webui's file names for the same sets, so "subject_filewords.txt" just works.
_ALIASES = {"subject": "object", "subject_filewords": "object_filewords"}

# The default: a built-in set chosen from the dataset's captions (``resolve_template``).
AUTO = "auto"


def builtin_names() -> list[str]:
    return [AUTO, *BUILTIN_TEMPLATES]


def has_name(line: str) -> bool:
    return NAME in line or NAME_BRACES in line


def uses_filewords(templates: Sequence[str]) -> bool:
    """True when at least one line takes the per-image caption."""
    return any(FILEWORDS in line for line in templates)


def is_filewords_only(templates: Sequence[str]) -> bool:
    """True when no line names the embedding, so the captions must (the ``captions`` set)."""
    return not any(has_name(line) for line in templates) and all(FILEWORDS in line for line in templates)


def load_templates(spec: str) -> list[str]:
    """Template lines from a built-in set name (see ``BUILTIN_TEMPLATES``) or a text file.

    A file holds one template per line; blank lines are ignored (the webui keeps
    them and can train on an empty prompt). ``"style_filewords.txt"`` (the webui's
    file names) resolves to the built-in set unless such a file exists.
    """
    spec = str(spec).strip()
    builtin = _builtin(spec)
    if builtin is not None:
        return list(builtin)
    if is_auto(spec):
        raise TIError("template 'auto' picks a built-in set from the dataset's captions: resolve it first "
                      "(templates.resolve_template)")
    path = Path(spec).expanduser()
    if path.is_file():
        return _require_name(_read_lines(path), source=str(path))
    fallback = _builtin(path.stem) if path.suffix.lower() == ".txt" and len(path.parts) == 1 else None
    if fallback is not None:
        return list(fallback)
    raise TIError(
        f"prompt template {spec!r} is neither a built-in template set nor an existing file; "
        f"use one of {builtin_names()} or the path to a text file with one template per line"
    )


def is_builtin_template(spec: str) -> bool:
    """Whether ``load_templates(spec)`` gives a built-in set, reading no file (the webui's "subject.txt" names
    count, as load_templates reads them when no such file exists; ``auto`` picks one of them)."""
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if _builtin(spec) is not None or is_auto(spec):
        return True
    return path.suffix.lower() == ".txt" and len(path.parts) == 1 and _builtin(path.stem) is not None \
        and not path.is_file()


def is_auto(spec: str) -> bool:
    return str(spec).strip().lower() == AUTO


def resolve_template(spec: str, captions: Mapping[str, str | None], name: str) -> tuple[str, str | None]:
    """The template ``spec`` to train with, and for ``auto`` a note saying which set it chose and why.

    ``auto`` uses the captions when the dataset has them: ``captions`` (each caption is the whole prompt)
    when every image has one that names the embedding ("a red [name] on a blue background"), else
    ``object_filewords`` ("a photo of a [name], <caption>") when some images have one, else ``object``.
    Captions that describe everything but the concept keep the embedding from absorbing the training
    images' colours and backgrounds (measured: README, ``bench quality``).
    """
    if not is_auto(spec):
        return spec, None
    total = len(captions)
    captioned = [cap for cap in captions.values() if cap is not None and cap.strip()]
    if captioned and len(captioned) == total and all(names_embedding(cap, name) for cap in captioned):
        return "captions", (f"template auto: all {total} images have a caption naming {NAME} (or {name!r}), so each "
                            "caption is the training prompt (template 'captions')")
    if captioned:
        return "object_filewords", (f"template auto: {len(captioned)} of {total} images have a caption, not every "
                                    f"one naming {NAME}, so prompts are 'a photo of a {NAME}, <caption>' (template "
                                    "'object_filewords')")
    return "object", (f"template auto: no image has a caption (a .txt beside it or metadata.jsonl), so prompts are "
                      f"'a photo of a {NAME}' and the like (template 'object'); captions that name everything but "
                      f"the concept ('a red {NAME} on a blue background') help the embedding leave colours and "
                      "backgrounds to the prompt")


def names_embedding(caption: str, name: str) -> bool:
    return NAME in caption or name in caption


def _builtin(name: str) -> tuple[str, ...] | None:
    key = name.lower()
    return BUILTIN_TEMPLATES.get(_ALIASES.get(key, key))


def _read_lines(path: Path) -> list[str]:
    # Messages about a template file never quote it: a webui request may name a file it cannot read itself.
    try:
        size = path.stat().st_size
        if size > MAX_TEMPLATE_FILE:
            raise TIError(f"prompt template file {str(path)!r} is {size} bytes: a template file holds one prompt per "
                          f"line and is at most {MAX_TEMPLATE_FILE} bytes; is it the right file?")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise TIError(f"prompt template file {str(path)!r} is not UTF-8 text (at byte {e.start}); save it as "
                      "UTF-8") from None
    except OSError as e:
        raise TIError(f"cannot read prompt template file {str(path)!r} ({e.strerror or type(e).__name__})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    long = [n for n, line in enumerate(lines, start=1) if len(line) > MAX_LINE]
    if long:
        raise TIError(f"prompt template file {str(path)!r}: line {long[0]} is over {MAX_LINE} characters, longer "
                      "than any prompt; is it the right file?")
    return lines


def check_templates(templates: Sequence[str], *, source: str = "template set") -> list[str]:
    """Return ``templates`` as a list, or raise when the embedding would never be trained.

    Also warns about lines that use neither [name] nor [filewords] (steps that train nothing).
    """
    lines = _require_name(templates, source=source)
    unused = [n for n, line in enumerate(lines, start=1) if not has_name(line) and FILEWORDS not in line]
    if unused:
        warn(f"{source}: {len(unused)} of {len(lines)} template lines never use the embedding (line "
             f"{', '.join(map(str, unused[:5]))}{', ...' if len(unused) > 5 else ''})")
    return lines


def _require_name(templates: Sequence[str], *, source: str) -> list[str]:
    lines = list(templates)
    if not lines:
        raise TIError(f"{source} has no template lines; write one prompt per line, e.g. 'a photo of a [name]'")
    if is_filewords_only(lines):
        return lines
    if not any(has_name(line) for line in lines):
        raise TIError(
            f"{source}: no line contains [name] (or {{}}) in its {len(lines)} line(s), so the embedding would never "
            "appear in a prompt; add [name] where the embedding goes, e.g. 'a photo of a [name]'"
        )
    return lines


def check_captions(templates: Sequence[str], captions: Mapping[str, str | None], name: str) -> None:
    """Raise when a filewords-only template set meets captions that cannot train ``name``.

    ``captions`` maps an image label (e.g. its file name) to its caption or None.
    Missing captions with a ``[filewords]`` template only get a warning.
    """
    if not uses_filewords(templates):
        return
    missing = [label for label, cap in captions.items() if cap is None]
    if is_filewords_only(templates):
        _check_named_captions(captions, missing, name)
    elif missing:
        warn(f"{len(missing)} image(s) have no caption, so [filewords] is empty for them: {_few(missing)}")


def _check_named_captions(captions: Mapping[str, str | None], missing: list[str], name: str) -> None:
    if missing:
        raise TIError(
            f"the template uses only [filewords] but {len(missing)} image(s) have no caption: {_few(missing)}; "
            "add a caption file for each image or choose a template with [name] (e.g. 'object_filewords')"
        )
    unnamed = [label for label, cap in captions.items() if cap is not None and not names_embedding(cap, name)]
    if unnamed:
        raise TIError(
            f"the template uses only [filewords] but {len(unnamed)} caption(s) mention neither [name] nor "
            f"{name!r}: {_few(unnamed)}; put [name] in each caption where the embedding goes"
        )


def _few(labels: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(repr(s) for s in labels[:n])
    return shown + (f" and {len(labels) - n} more" if len(labels) > n else "")


def pick_template(templates: Sequence[str], rng: random.Random) -> str:
    return templates[rng.randrange(len(templates))]


def render_caption(
    template: str,
    *,
    name: str,
    filewords: str | None,
    rng: random.Random,
    shuffle_tags: bool = False,
    tag_dropout: float = 0.0,
    keep_tokens: int = 0,
) -> str:
    """Fill one template line: ``[name]``/``{}`` -> ``name``, ``[filewords]`` -> the processed caption.

    The caption is split on commas into tags; after the first ``keep_tokens`` tags
    (kept in place), each tag is dropped with probability ``tag_dropout`` (never
    all of them) and the rest optionally shuffled. ``[name]`` inside the caption is
    replaced too. A missing caption renders as empty and its separator is tidied.
    """
    _check_render_args(tag_dropout, keep_tokens)
    prompt = template.replace(NAME, name).replace(NAME_BRACES, name)
    if FILEWORDS not in prompt:
        return prompt
    tags = process_tags(filewords or "", rng, shuffle=shuffle_tags, dropout=tag_dropout, keep=keep_tokens)
    words = ", ".join(tags).replace(NAME, name)
    prompt = prompt.replace(FILEWORDS, words)
    return _tidy(prompt) if not words else prompt


def _check_render_args(tag_dropout: float, keep_tokens: int) -> None:
    if isinstance(tag_dropout, bool) or not isinstance(tag_dropout, (int, float)) or not 0 <= tag_dropout <= 1:
        raise TIError(f"tag dropout must be a number in [0, 1], got {tag_dropout!r}; "
                      "0 disables it, 0.1 drops 10% of tags")
    if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int) or keep_tokens < 0:
        raise TIError(f"keep_tokens must be an integer >= 0, got {keep_tokens!r}")


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def process_tags(caption: str, rng: random.Random, *, shuffle: bool, dropout: float, keep: int) -> list[str]:
    """Split, drop and shuffle the caption's tags; the first ``keep`` stay fixed in front."""
    tags = split_tags(caption)
    fixed, rest = tags[:keep], tags[keep:]
    if dropout > 0 and rest:
        kept = [t for t in rest if rng.random() >= dropout]
        if not kept and not fixed:
            # Dropping every tag would train on an empty caption: keep one at random.
            kept = [rest[rng.randrange(len(rest))]]
        rest = kept
    if shuffle:
        rng.shuffle(rest)
    return fixed + rest


def _tidy(prompt: str) -> str:
    """Remove the separators an empty [filewords] leaves behind ("a photo of a x, " -> "a photo of a x")."""
    parts = [" ".join(p.split()) for p in prompt.split(",")]
    return ", ".join(p for p in parts if p)
