"""Caption a folder of images, and read/write single captions for a review grid.

The captioner is any callable ``list[PIL.Image] -> list[str]``: ``blip.load_blip(...)`` headless, or
one built on the webui's own BLIP interrogator (``per_image(shared.interrogator.generate_caption)``),
so this module never needs to know which model runs. Captions are ``<stem>.txt`` beside each image
(what the trainer and the webui read), written atomically; existing ones are kept unless asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import PREFIX, TIError, warn
from ..fileio import write_text
from ..images import UNREADABLE, discover, read_caption_file, read_image, unreadable_reason
from ..options import option
from .reports import Skipped, skip, skipped_lines

Captioner = Callable[[list[Image.Image]], list[str]]
Progress = Callable[[int, int, Path], None]  # (images done, images to caption, the last one done)

@dataclass
class CaptionOptions:
    overwrite: bool = option(False, "replace existing caption files (they are kept otherwise)",
                             label="Overwrite existing captions")
    prefix: str = option("", 'text put verbatim before each caption, e.g. "photo of "')
    suffix: str = option("", 'text put verbatim after each caption, e.g. ", studio light"')
    trigger: str = option("", 'put this first in each caption unless it is there already, e.g. "[name]" or the '
                          "embedding name")
    batch_size: int = option(4, "images per captioning call", ui=False)
    caption_extension: str = option(".txt", "caption file extension, beside each image", ui=False)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise TIError(f"caption batch_size={self.batch_size!r} is invalid: use a whole number >= 1")
        for name in ("prefix", "suffix", "trigger"):
            if not isinstance(getattr(self, name), str) or "\n" in getattr(self, name):
                raise TIError(f"caption {name}={getattr(self, name)!r} is invalid: use one line of text")


@dataclass
class CaptionReport:
    folder: Path
    written: list[Path] = field(default_factory=list)  # caption files written
    kept: list[Path] = field(default_factory=list)  # images whose existing caption was kept
    skipped: list[Skipped] = field(default_factory=list)
    stopped: bool = False  # should_stop() asked to stop before every image was done

    def format(self) -> str:
        head = (f"{PREFIX} captions in {str(self.folder)!r}: {len(self.written)} written, {len(self.kept)} existing "
                f"kept, {len(self.skipped)} skipped" + (" (stopped early)" if self.stopped else ""))
        return "\n".join([head, *skipped_lines(self.skipped)])


def caption_folder(folder: str | Path, captioner: Captioner, opts: CaptionOptions | None = None,
                   on_progress: Progress | None = None, should_stop: Callable[[], bool] = lambda: False
                   ) -> CaptionReport:
    """Write a caption file for each image of ``folder`` that has none (every one with ``overwrite``).

    ``should_stop`` is asked before each batch (the webui's Interrupt button); captions already
    written stay.
    """
    opts = opts or CaptionOptions()
    items = discover(folder, caption_extension=opts.caption_extension)
    report = CaptionReport(Path(folder))
    todo: list[Path] = []
    for item in items:
        has_caption = caption_path(item.path, opts.caption_extension).is_file()
        (report.kept if has_caption and not opts.overwrite else todo).append(item.path)
    if todo and (Path(folder) / "metadata.jsonl").is_file():
        warn(f"{folder}/metadata.jsonl exists: its captions take precedence over the {opts.caption_extension} files "
             "written now")
    for start in range(0, len(todo), opts.batch_size):
        if should_stop():
            report.stopped = True
            break
        chunk = todo[start:start + opts.batch_size]
        _caption_batch(chunk, captioner, opts, report)
        if on_progress is not None:
            on_progress(start + len(chunk), len(todo), chunk[-1])
    return report


def _caption_batch(paths: Sequence[Path], captioner: Captioner, opts: CaptionOptions, report: CaptionReport) -> None:
    readable, images = [], []
    for path in paths:
        try:
            images.append(read_image(path)[0])
            readable.append(path)
        except UNREADABLE as e:
            skip(report.skipped, path, unreadable_reason(e))
    if not images:
        return
    captions = captioner(images)
    if not isinstance(captions, (list, tuple)) or len(captions) != len(images):
        raise TIError(f"the captioner returned {captions!r} for {len(images)} image(s); it must return one string "
                      "per image")
    for path, text in zip(readable, captions, strict=True):
        report.written.append(save_caption(path, compose(str(text), opts), opts.caption_extension))


def compose(caption: str, opts: CaptionOptions) -> str:
    """``prefix + caption + suffix``, with the trigger in front unless the text already has it."""
    text = f"{opts.prefix}{caption.strip()}{opts.suffix}".strip()
    if opts.trigger and opts.trigger not in text:
        text = f"{opts.trigger}, {text}" if text else opts.trigger
    return text


def per_image(caption_one: Callable[[Image.Image], str]) -> Captioner:
    """A captioner from a one-image function, e.g. the webui's ``shared.interrogator.generate_caption``."""
    return lambda images: [caption_one(image) for image in images]


# ---------------------------------------------------------------------- review
@dataclass(frozen=True)
class ReviewItem:
    image: Path
    caption: str  # "" when the image has no caption file yet
    caption_file: Path


def review_items(folder: str | Path, caption_extension: str = ".txt") -> list[ReviewItem]:
    """Every image of ``folder`` (as the trainer lists them) with the text of its caption file."""
    out = []
    for item in discover(folder, caption_extension=caption_extension):
        path = caption_path(item.path, caption_extension)
        text = read_caption_file(path) if path.is_file() else ""
        out.append(ReviewItem(item.path, text, path))
    return out


def save_caption(image: str | Path, text: str, caption_extension: str = ".txt") -> Path:
    """Write ``text`` (one line) as ``image``'s caption file, atomically; return the file's path."""
    image = Path(image)
    if not image.is_file():
        raise TIError(f"cannot save a caption for {str(image)!r}: the image does not exist (was it moved or renamed?)")
    path = caption_path(image, caption_extension)
    write_text(path, " ".join(str(text).split()))  # one line: the trainer reads the whole file as the caption
    return path


def caption_path(image: Path, caption_extension: str = ".txt") -> Path:
    return image.with_suffix(caption_extension)
