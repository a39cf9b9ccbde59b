"""Every embedding file format, read and written in one place.

Reading (``load_embedding``) detects the format from the file's content, not its extension:

===========================  ==================================================================  =============
layout                       content                                                              written by
===========================  ==================================================================  =============
``string_to_param``          torch pickle ``{"string_to_param": {"*": [n, w]}, "name", "step",    A1111 webui,
                             "sd_checkpoint", "sd_checkpoint_name", ...}`` (also the torch 1.11   original TI
                             ``ParameterDict`` pickles, read through ``._parameters``)
``clip_l+clip_g``            ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (safetensors or torch) SDXL: kohya,
                                                                                                  OneTrainer, us
``emb_params``               ``{"emb_params": [n, w]}`` (``emp_params``: an old typo, also read)  kohya SD1/SD2
``diffusers``                ``{"<token>": [w] or [n, w]}``; an SDXL pair is                      diffusers
                             ``learned_embeds.safetensors`` + ``learned_embeds_2.safetensors``
image                        PNG ``sd-ti-embedding`` text chunk (base64 JSON, tensors as          A1111 webui
                             ``{"TORCHTENSOR": nested list}``), or the same JSON hidden in the
                             pixels (PNG or lossless WebP), holding one of the layouts above
===========================  ==================================================================  =============

Torch pickles are read with ``torch.load(weights_only=True)``: a file holding any other pickled
object is refused, never unpickled (unpickling can run arbitrary code). The one class allowed is
``torch.nn.ParameterDict`` (old files), and only on torch >= 2.5, which can allowlist it.

Names follow the webui: the file stem for ``.pt``/``.bin``/``.safetensors`` (so a checkpoint copy
``foo-500.pt`` is prompted as ``foo-500``) and ``data["name"]`` for images; ``name=`` overrides both.
The name written inside a file is still reported as ``LoadedEmbedding.stored_name``.
A single tensor goes to key ``clip_h`` when it is 1024 wide, otherwise ``clip_l``
(``embedding.match_to_model`` renames it for the model at hand).

Writing (``save_embedding``), format from ``fmt`` or the extension:

* ``safetensors`` (default): SDXL -> exactly ``clip_l`` and ``clip_g``; one encoder -> ``emb_params``.
  Name, step, checkpoint hash/name, a format marker and ``extra`` go into the header metadata.
  Keeps everything.
* ``pt`` (``.pt``/``.bin``): the webui dict for one encoder (keeps name, step, checkpoint; loses
  ``extra``); for SDXL only the two tensors, because the webui rejects anything else there (loses
  all metadata).
* ``png``: the webui text chunk (for SDXL only the two tensors, as above) plus our own
  ``ti-trainer-meta`` text chunk with the rest, so nothing is lost. ``embed_pixels=True`` also hides
  the data in the pixels like the webui does, which survives sites that strip text chunks.
* ``webp``: lossless WebP with the data in the pixels only (WebP has no text chunks): keeps what
  the ``pt`` format keeps.
* ``diffusers``: ``learned_embeds.safetensors`` ``{name: [n, w]}`` (SDXL: plus
  ``learned_embeds_2.safetensors`` for ``clip_g``), metadata in the header; a ``.bin`` path is written
  with ``torch.save`` and keeps no metadata. Read back, the name is the file stem (``learned_embeds``),
  as in the webui; pass ``name=``.

Every write is atomic and refuses to replace an existing file unless ``overwrite=True``.
Tensors round-trip bit-exactly in every format.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..embedding import Embedding
from ..errors import TIError
from ..families import SDXL_KEYS
from ..fileio import atomic_path, load_torch, save_torch, write_bytes
from . import EMBEDDING_FORMATS

FORMATS = EMBEDDING_FORMATS
_SUFFIX_FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".bin": "pt", ".png": "png", ".webp": "webp"}
_FORMAT_SUFFIXES = {
    "safetensors": (".safetensors",),
    "pt": (".pt", ".bin"),
    "png": (".png",),
    "webp": (".webp",),
    "diffusers": (".safetensors", ".bin", ""),
}
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")

WEBUI_CHUNK = "sd-ti-embedding"  # the webui's PNG text chunk
META_CHUNK = "ti-trainer-meta"  # ours: metadata the webui chunk cannot hold
FORMAT_KEY = "ti_trainer_format"  # safetensors metadata marker
FORMAT_VERSION = "embedding/1"
_FIELD_KEYS = ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
SINGLE_KEYS = ("emb_params", "emp_params")  # kohya, and a typo seen in the wild
DIFFUSERS_FILE = "learned_embeds"
_MAX_PIXEL_PAYLOAD = 256 * 1024 * 1024  # decompression cap for pixel-encoded data
MAX_IMAGE_PIXELS = 8192 * 8192  # an embedding image is a preview plus data columns: far smaller than this


@dataclass
class LoadedEmbedding:
    """An embedding plus what ``describe`` reports about the file it came from."""

    embedding: Embedding
    layout: str  # "string_to_param", "clip_l+clip_g", "emb_params", "emp_params", "diffusers"
    container: str  # "torch pickle", "safetensors", "PNG text chunk", "PNG pixels", ...
    stored_name: str | None = None  # the name written inside the file, if any
    keys: list[str] = field(default_factory=list)  # top-level keys of the file

    @property
    def format(self) -> str:
        return f"{self.layout} ({self.container})"


# ---------------------------------------------------------------------------------------------------------- reading


def load_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read an embedding in any supported format as float32 CPU tensors (see the module docstring)."""
    return load_embedding_details(path, name).embedding


def load_embedding_details(path: str | Path, name: str | None = None) -> LoadedEmbedding:
    """Like ``load_embedding``, plus the detected layout/container, stored name and keys."""
    path = _existing_file(Path(path))
    container, data, meta = _read_container(path)
    layout, vectors, fields = _interpret(data, path)
    if name is None:  # the webui's rule: the name inside an image, else the file stem
        name = str(fields.get("name") or path.stem) if _sniff(path) == "image" else path.stem
    for key, value in meta.items():  # our metadata fills what the payload lacks
        fields.setdefault(key, value)
    stored_name = fields.get("name")
    if layout == "diffusers" and len(vectors) == 1:
        vectors, container = _join_diffusers_pair(path, vectors, container)
    emb = Embedding(
        name=name,
        vectors=vectors,
        step=_as_int(fields.get("step")),
        sd_checkpoint=_as_str(fields.get("sd_checkpoint")),
        sd_checkpoint_name=_as_str(fields.get("sd_checkpoint_name")),
        extra=dict(fields.get("extra", {})),
    )
    return LoadedEmbedding(emb, layout, container, _as_str(stored_name), [str(k) for k in data])


def _existing_file(path: Path) -> Path:
    if path.is_dir():  # a diffusers output folder
        for candidate in (path / f"{DIFFUSERS_FILE}.safetensors", path / f"{DIFFUSERS_FILE}.bin"):
            if candidate.is_file():
                return candidate
        raise TIError(f"{path} is a folder without {DIFFUSERS_FILE}.safetensors or .bin: "
                      "pass the embedding file itself")
    if not path.is_file():
        raise TIError(f"embedding file {path} does not exist: check the path")
    if path.stat().st_size == 0:
        raise TIError(f"embedding file {path} is empty (0 bytes): it was not written completely; use another copy")
    return path


def _sniff(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"\x89PNG") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    # safetensors first: its 8-byte little-endian header length may itself start with 0x80
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size:
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"  # zip archive (torch >= 1.6) or a legacy pickle
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"  # JXL/AVIF, when a Pillow plugin can open them
    return "unknown"


def _read_container(path: Path) -> tuple[str, dict, dict[str, Any]]:
    """(container description, top-level dict, metadata fields) of the file."""
    kind = _sniff(path)
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(path)
        return "safetensors", tensors, _fields_from_metadata(metadata)
    if kind == "torch":
        return "torch pickle", _read_torch(path), {}
    if kind == "image":
        return _read_image(path)
    raise TIError(
        f"{path} is not an embedding file this trainer can read (not safetensors, a torch file or a PNG/WebP): "
        "use a .safetensors, .pt, .bin or .png embedding"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise TIError(f"{path} could not be read as safetensors ({e}): the file is damaged or incomplete") from e


def _read_torch(path: Path) -> dict:
    import pickle

    # ParameterDict: original-TI / torch 1.11 embeddings pickle one; allowing it only lets its state be set, it
    # runs no code. torch < 2.5 (webui default 2.1) cannot allowlist it, so there such files are refused.
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([torch.nn.ParameterDict]) if allow else contextlib.nullcontext():
            data = load_torch(path)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise TIError(f"{path} could not be unpickled ({e}): the file is damaged or incomplete") from e
        found = re.search(r"(GLOBAL [\w.]+|Unsupported class [\w.]+|unrecognized function [^\n]+|got <[^>]+>)", str(e))
        detail = f" ({found.group(1).strip()})" if found else ""
        raise TIError(
            f"{path} contains pickled Python objects other than tensors and plain values{detail}, so it was not "
            "loaded: unpickling them could run arbitrary code. If you trust its source, re-save it as .safetensors "
            "with the tool that made it"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise TIError(f"{path} could not be read as a torch file ({e}): the file is damaged or incomplete") from e
    if isinstance(data, torch.Tensor):
        return {path.stem: data}  # a bare tensor: treat it like a one-token diffusers file
    if not isinstance(data, dict):
        raise TIError(f"{path} holds a {type(data).__name__}, not a dict of tensors: it is not an embedding")
    return data


def _read_image(path: Path) -> tuple[str, dict, dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise TIError(f"{path} is a {img.width}x{img.height} image, far larger than an embedding image "
                              f"(at most {MAX_IMAGE_PIXELS} pixels): it is not one; use the embedding file itself")
            img.load()
            text = dict(getattr(img, "text", None) or {})
            container = f"{img.format or 'image'}"
            meta = _parse_meta_chunk(text.get(META_CHUNK), path)
            if WEBUI_CHUNK in text:
                return f"{container} text chunk", _decode_b64_payload(text[WEBUI_CHUNK], path), meta
            data = extract_pixel_payload(img)
    except Image.DecompressionBombError:
        raise TIError(f"{path} declares an image of over {Image.MAX_IMAGE_PIXELS} pixels, far larger than an "
                      "embedding image: it is not one (or is damaged); use the embedding file itself") from None
    except (UnidentifiedImageError, OSError) as e:
        raise TIError(f"{path} could not be opened as an image ({e}): is the file complete?") from e
    if data is None:
        raise TIError(
            f"{path} holds no embedding: it has no {WEBUI_CHUNK!r} text chunk and no embedding hidden in its pixels "
            "(the webui treats such images as previews); use the embedding file itself"
        )
    return f"{container} pixels", data, meta


def _decode_b64_payload(text: str, path: Path) -> dict:
    try:
        data = json.loads(base64.b64decode(text), object_hook=_tensor_hook)
    except (ValueError, TypeError) as e:
        raise TIError(f"{path}: its {WEBUI_CHUNK!r} text chunk is damaged ({e}); use another copy") from e
    if not isinstance(data, dict):
        raise TIError(f"{path}: its {WEBUI_CHUNK!r} text chunk holds no embedding dict")
    return data


def _tensor_hook(d: dict) -> Any:
    if "TORCHTENSOR" in d:
        # float64 like the webui; the float32 -> JSON -> float64 -> float32 trip is exact
        return torch.from_numpy(np.asarray(d["TORCHTENSOR"], dtype=np.float64))
    return d


def _parse_meta_chunk(text: str | None, path: Path) -> dict[str, Any]:
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except ValueError:
        return {}  # our own optional chunk: a damaged one only costs metadata
    return _fields_from_metadata({str(k): str(v) for k, v in meta.items()}) if isinstance(meta, dict) else {}


def _fields_from_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    fields: dict[str, Any] = {k: metadata[k] for k in _FIELD_KEYS if k in metadata}
    extra = {k: v for k, v in metadata.items() if k not in _FIELD_KEYS and k != FORMAT_KEY and isinstance(v, str)}
    if extra:
        fields["extra"] = extra
    return fields


def _interpret(data: dict, path: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(layout, encoder key -> float32 [n, w], fields) for a decoded file, following the webui's order."""
    fields = {k: data[k] for k in _FIELD_KEYS if isinstance(data.get(k), (str, int)) and not isinstance(data[k], bool)}
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # torch 1.11 ParameterDict pickles
        if not isinstance(params, dict) or len(params) != 1:
            count = len(params) if isinstance(params, dict) else type(params).__name__
            raise TIError(f"{path}: 'string_to_param' must hold exactly one tensor, found {count}; "
                          "it is not a single embedding")
        (tensor,) = params.values()
        if isinstance(tensor, dict) and set(SDXL_KEYS) <= set(tensor):
            return "string_to_param", _sdxl_vectors(tensor, path), fields
        return "string_to_param", _single_vector(tensor, path, "string_to_param"), fields
    if "clip_l" in data and "clip_g" in data:
        return "clip_l+clip_g", _sdxl_vectors(data, path), fields
    tensors = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
    if len(data) == 1 and len(tensors) == 1:
        key = tensors[0]
        layout = key if key in SINGLE_KEYS else "diffusers"
        return layout, _single_vector(data[key], path, key), fields
    shown = ", ".join(repr(str(k)) for k in list(data)[:12]) + (f", ... ({len(data)} keys)" if len(data) > 12 else "")
    raise TIError(
        f"{path} is not a textual-inversion embedding: it has keys [{shown}], expected 'string_to_param', "
        "'clip_l' + 'clip_g', 'emb_params' or a single '<token>' tensor. A LoRA or checkpoint goes in its own folder"
    )


def _sdxl_vectors(data: dict, path: Path) -> dict[str, torch.Tensor]:
    return {key: _as_matrix(data[key], path, key) for key in SDXL_KEYS}


def _single_vector(tensor: Any, path: Path, key: str) -> dict[str, torch.Tensor]:
    vec = _as_matrix(tensor, path, key)
    return {"clip_h" if vec.shape[1] == 1024 else "clip_l": vec}


def _as_matrix(tensor: Any, path: Path, key: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TIError(f"{path}: {key!r} holds a {type(tensor).__name__}, not a tensor; it is not an embedding")
    if not (tensor.is_floating_point() and tensor.ndim in (1, 2) and tensor.numel() > 0):
        raise TIError(f"{path}: {key!r} is a {tensor.dtype} tensor of shape {tuple(tensor.shape)}; an embedding "
                      "is a float [vectors, width] tensor")
    vec = tensor.detach().to("cpu", torch.float32)
    return (vec.unsqueeze(0) if vec.ndim == 1 else vec).contiguous()


def _diffusers_partner(path: Path) -> tuple[Path, bool]:
    """The other file of a diffusers SDXL pair, and whether ``path`` is the first (clip_l) one."""
    if path.stem.endswith("_2"):
        return path.with_name(path.stem[:-2] + path.suffix), False
    return path.with_name(path.stem + "_2" + path.suffix), True


def _join_diffusers_pair(path: Path, vectors: dict, container: str) -> tuple[dict[str, torch.Tensor], str]:
    """Join ``learned_embeds`` (768) with ``learned_embeds_2`` (1280) into one SDXL embedding, if both are there."""
    partner, is_first = _diffusers_partner(path)
    vec = next(iter(vectors.values()))
    if vec.shape[1] != (768 if is_first else 1280) or not partner.is_file():
        return vectors, container
    if _sniff(partner) not in ("safetensors", "torch"):
        return vectors, container
    try:
        _, data, _ = _read_container(partner)
        layout, other_vectors, _ = _interpret(data, partner)
    except TIError:
        return vectors, container
    other = next(iter(other_vectors.values()))
    if layout != "diffusers" or other.shape != (vec.shape[0], 1280 if is_first else 768):
        return vectors, container
    clip_l, clip_g = (vec, other) if is_first else (other, vec)
    return {"clip_l": clip_l, "clip_g": clip_g}, f"{container} pair with {partner.name}"


def _as_int(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0


def _as_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


# ---------------------------------------------------------------------------------------------------------- writing


def save_embedding(
    emb: Embedding,
    path: str | Path,
    *,
    fmt: str | None = None,
    overwrite: bool = False,
    image: Any = None,
    embed_pixels: bool = False,
) -> Path:
    """Write ``emb`` atomically in ``fmt`` (default: from the extension) and return the path written.

    ``image`` (a PIL image) is the picture for ``png``/``webp``; without one a placeholder card is drawn.
    ``embed_pixels`` also hides the data in a PNG's pixels, as the webui does. For ``diffusers`` ``path``
    is a folder (``learned_embeds.safetensors`` is written in it) or a ``.safetensors``/``.bin`` file.
    """
    path = Path(path)
    fmt = _resolve_format(path, fmt)
    vectors = _checked_vectors(emb, path)
    emb = Embedding(emb.name, vectors, int(emb.step or 0), emb.sd_checkpoint, emb.sd_checkpoint_name, dict(emb.extra))
    targets = _targets(path, fmt, emb)
    for target in targets:
        if target.exists() and not overwrite:
            raise TIError(f"{target} already exists: pick another file name or pass overwrite=True "
                          "(--overwrite on the command line) to replace it")
    if fmt == "safetensors":
        _write_safetensors(targets[0], _safetensors_tensors(emb), _metadata(emb))
    elif fmt == "pt":
        save_torch(_webui_payload(emb), targets[0])
    elif fmt in ("png", "webp"):
        _write_image(emb, targets[0], fmt, image, embed_pixels or fmt == "webp")
    else:
        _write_diffusers(emb, targets)
    return targets[0]


def _resolve_format(path: Path, fmt: str | None) -> str:
    suffix = path.suffix.lower()
    if fmt is None:
        if suffix not in _SUFFIX_FORMATS:
            raise TIError(f"cannot tell the embedding format from {path.name!r}: use one of the extensions "
                          f"{', '.join(_SUFFIX_FORMATS)} or pass fmt= (one of {', '.join(FORMATS)})")
        return _SUFFIX_FORMATS[suffix]
    if fmt not in FORMATS:
        raise TIError(f"unknown embedding format {fmt!r}: use one of {', '.join(FORMATS)}")
    if suffix not in _FORMAT_SUFFIXES[fmt] and not (fmt == "diffusers" and path.is_dir()):
        # hosts pick the loader by extension: a mismatch would be a file nobody can load
        wanted = " or ".join(s or "a folder" for s in _FORMAT_SUFFIXES[fmt])
        raise TIError(f"format {fmt!r} needs a file ending in {wanted}, got {path.name!r}: rename the output")
    return fmt


def _checked_vectors(emb: Embedding, path: Path) -> dict[str, torch.Tensor]:
    if len(emb.vectors) != 1 and set(emb.vectors) != set(SDXL_KEYS):
        raise TIError(f"embedding {emb.name!r} has encoders {sorted(emb.vectors)}; only one encoder (SD1/SD2) or "
                      f"clip_l + clip_g (SDXL) can be saved to {path.name}")
    # contiguous float32 copies: safetensors needs contiguity, and torch.save of a view would store its whole storage
    vectors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in emb.vectors.items()}
    broken = [k for k, v in vectors.items() if not bool(torch.isfinite(v).all())]
    if broken:  # a NaN or infinite vector breaks every prompt it is used in: such a file is never written
        raise TIError(f"embedding {emb.name!r} has non-finite values (NaN or infinity) in {', '.join(broken)}: "
                      f"{path.name} was not written")
    return vectors


def _targets(path: Path, fmt: str, emb: Embedding) -> list[Path]:
    if fmt != "diffusers":
        return [path]
    first = path if path.suffix.lower() in (".safetensors", ".bin") else path / f"{DIFFUSERS_FILE}.safetensors"
    return [first, _diffusers_partner(first)[0]] if emb.is_sdxl else [first]


def _sdxl_or_single(emb: Embedding) -> dict[str, torch.Tensor] | torch.Tensor:
    return {k: emb.vectors[k] for k in SDXL_KEYS} if emb.is_sdxl else next(iter(emb.vectors.values()))


def _safetensors_tensors(emb: Embedding) -> dict[str, torch.Tensor]:
    vec = _sdxl_or_single(emb)
    return vec if isinstance(vec, dict) else {"emb_params": vec}


def _metadata(emb: Embedding) -> dict[str, str]:
    """String metadata: ``extra`` first, so the fixed fields win over an ``extra`` entry of the same name."""
    meta = {str(k): str(v) for k, v in emb.extra.items()}
    meta.update({"name": emb.name, "step": str(emb.step), FORMAT_KEY: FORMAT_VERSION})
    for key in ("sd_checkpoint", "sd_checkpoint_name"):
        meta.pop(key, None)
        if getattr(emb, key) is not None:
            meta[key] = str(getattr(emb, key))
    return meta


def _write_safetensors(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    # Through our own atomic write, not safetensors' save_file: that one writes through a temp file of its own
    # (left behind by a crash) and resets the mode to 0600, which a webui running as another user cannot read.
    write_bytes(target, safetensors_bytes(tensors, metadata))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata: the header's keys are sorted.

    The library writes its metadata in a random order per process, so identical runs would give files of
    different hashes (the webui's "TI hashes" in infotexts). Only the JSON header is rewritten: the tensor
    offsets it holds are relative to the data, which stays as the library wrote it.
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.dumps(json.loads(raw[8:8 + length]), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = header.encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library pads it
    return struct.pack("<Q", len(text)) + text + raw[8 + length:]


def _webui_payload(emb: Embedding) -> dict[str, Any]:
    """What the webui's ``Embedding.save`` writes; for SDXL the two tensors alone (the webui loader accepts no more)."""
    vec = _sdxl_or_single(emb)
    if isinstance(vec, dict):
        return vec
    return {
        "string_to_token": {"*": 265},  # a dummy token id, as the webui writes; never read
        "string_to_param": {"*": vec},
        "name": emb.name,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
    }


def _write_diffusers(emb: Embedding, targets: list[Path]) -> None:
    parts = [emb.vectors["clip_l"], emb.vectors["clip_g"]] if emb.is_sdxl else list(emb.vectors.values())
    for target, vec in zip(targets, parts, strict=True):
        if target.suffix.lower() == ".bin":
            save_torch({emb.name: vec}, target)
        else:
            _write_safetensors(target, {emb.name: vec}, _metadata(emb))


# ----------------------------------------------------------------------------------------------------------- images


def _write_image(emb: Embedding, target: Path, fmt: str, image: Any, embed_pixels: bool) -> None:
    from PIL import PngImagePlugin

    payload = _webui_payload(emb)
    picture = image if image is not None else placeholder_card(emb)
    picture = picture.convert("RGB") if embed_pixels or picture.mode not in ("RGB", "RGBA", "L") else picture
    if embed_pixels:
        picture = insert_pixel_payload(picture, payload)
    with atomic_path(target) as tmp:
        if fmt == "webp":
            picture.save(tmp, format="WEBP", lossless=True, quality=100, exact=True)
            return
        info = PngImagePlugin.PngInfo()
        info.add_text(WEBUI_CHUNK, base64.b64encode(json.dumps(payload, default=_tensor_to_json).encode()).decode())
        info.add_text(META_CHUNK, json.dumps(_metadata(emb)))
        picture.save(tmp, format="PNG", pnginfo=info)


def _tensor_to_json(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return {"TORCHTENSOR": obj.detach().cpu().numpy().tolist()}
    raise TypeError(f"cannot write a {type(obj).__name__} into an embedding image")


def placeholder_card(emb: Embedding, size: tuple[int, int] = (384, 384)) -> Any:
    """A plain card showing the name, step and shape, for PNG embeddings saved without a preview image."""
    from PIL import Image, ImageDraw, ImageFont

    card = Image.new("RGB", size, (40, 44, 52))
    draw = ImageDraw.Draw(card)
    try:
        title, body = ImageFont.load_default(size=28), ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        title = body = ImageFont.load_default()
    draw.rectangle((8, 8, size[0] - 9, size[1] - 9), outline=(200, 170, 90), width=3)
    draw.text((24, 28), emb.name or "(unnamed)", font=title, fill=(240, 240, 240))
    lines = [f"{emb.num_vectors} vector{'s' * (emb.num_vectors != 1)}",
             " + ".join(f"{k} {w}" for k, w in emb.widths.items()), f"step {emb.step}"]
    if emb.sd_checkpoint_name:
        lines.append(emb.sd_checkpoint_name[:32])
    for i, line in enumerate(lines):
        draw.text((24, 90 + 30 * i), line, font=body, fill=(200, 200, 200))
    draw.text((24, size[1] - 44), "textual inversion embedding", font=body, fill=(140, 140, 140))
    return card


def _lcg_nibbles(count: int) -> np.ndarray:
    """The webui's key stream: x = (1664525 x + 1013904223) mod 2^32 from x = 0, each value % 255, low nibble.

    Computed by doubling (x[k + L] = A_L x[k] + C_L) instead of a Python loop, so large images stay fast.
    """
    m, a, c = 2**32, 1664525, 1013904223
    seq = np.array([c], dtype=np.uint64)
    step_a, step_c = a, c
    while seq.size < count:
        # A_L < 2^32 and seq < 2^32, so A_L * seq + C_L < 2^64: no uint64 overflow
        seq = np.concatenate([seq, (np.uint64(step_a) * seq + np.uint64(step_c)) % np.uint64(m)])
        step_a, step_c = step_a * step_a % m, (step_a * step_c + step_c) % m
    return ((seq[:count] % np.uint64(255)) & np.uint64(0x0F)).astype(np.uint8)


def insert_pixel_payload(image: Any, payload: dict) -> Any:
    """The webui's pixel encoding (``insert_image_data_embed``): ``[low nibbles][black][image][black][high nibbles]``.

    The zlib-compressed JSON is split into nibbles, each stream repeated to fill ``height x k x 3`` and XORed with
    the key stream. Upper bits of data pixels are decoration only; here they are a constant, which keeps every data
    pixel non-black so the reader's border cropping cannot eat a data column.
    """
    from PIL import Image

    data = np.frombuffer(zlib.compress(json.dumps(payload, default=_tensor_to_json).encode(), 9), np.uint8)
    height = image.size[1]
    size = data.size + (height - data.size % height)  # same padding arithmetic as the webui
    size += height * 3 - size % (height * 3)
    key = _lcg_nibbles(size)
    blocks = []
    for nibbles, decoration in ((data & 0x0F, 0x50), (data >> 4, 0xA0)):
        block = (np.resize(nibbles, size) ^ key) | decoration
        blocks.append(Image.fromarray(block.astype(np.uint8).reshape(height, -1, 3)))  # uint8 HxWx3: RGB
    low, high = blocks
    canvas = Image.new("RGB", (image.size[0] + low.size[0] + high.size[0] + 2, height), (0, 0, 0))
    canvas.paste(low, (0, 0))
    canvas.paste(image.convert("RGB"), (low.size[0] + 1, 0))
    canvas.paste(high, (low.size[0] + 1 + image.size[0] + 1, 0))
    return canvas


def extract_pixel_payload(image: Any) -> dict | None:
    """Read data hidden by the webui's ``insert_image_data_embed``; None when the image holds none."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = np.all(pixels > 0, axis=2)  # crop black borders, as the webui does
    cols, rows = np.flatnonzero(np.any(lit, axis=0)), np.flatnonzero(np.any(lit, axis=1))
    if cols.size == 0 or rows.size == 0:
        return None
    low_bits = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] & 0x0F
    black = np.flatnonzero(low_bits.sum(axis=(0, 2)) == 0)
    if black.size < 2:
        return None
    lower, upper = low_bits[:, :black.min()], low_bits[:, black.max() + 1:]
    if lower.shape != upper.shape or lower.size == 0:
        return None
    key = _lcg_nibbles(lower.size)
    raw = ((upper.reshape(-1) ^ key) << 4) | (lower.reshape(-1) ^ key)
    try:
        text = zlib.decompressobj().decompress(raw.astype(np.uint8).tobytes(), _MAX_PIXEL_PAYLOAD)
        data = json.loads(text, object_hook=_tensor_hook)
    except (zlib.error, ValueError):
        return None
    return data if isinstance(data, dict) else None
