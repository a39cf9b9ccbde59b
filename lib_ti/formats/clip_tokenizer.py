"""CLIP tokenizer files built offline from the BPE vocabulary that open_clip_torch ships.

Every SD family tokenizes with the same 49408-token CLIP BPE vocabulary; the only
difference is the padding token (SD1 and SDXL's first encoder pad with
``<|endoftext|>``, the OpenCLIP encoders of SD2 and SDXL pad with ``!``, id 0).
Tests and tiny models need those tokenizer files without a network, so we derive
them from ``bpe_simple_vocab_16e6.txt.gz`` exactly as OpenAI's ``clip/simple_tokenizer.py``
builds its vocabulary.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from ..errors import TIError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
MAX_LENGTH = 77
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header).
_NUM_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> Path:
    """Return the path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed open_clip package.

    The package is located with ``find_spec`` and never imported: importing open_clip
    needs torchvision, which we do not depend on.
    """
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise TIError(
        f"the CLIP BPE vocabulary {BPE_FILE} was not found (open_clip package: {locations or 'not installed'}); "
        "install it with `pip install --no-deps open_clip_torch`"
    )


def bytes_to_unicode() -> dict[int, str]:
    """Map each byte to a printable unicode character, as GPT-2 / CLIP do (order matters: it fixes the ids)."""
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = [b for lo, hi in ranges for b in range(ord(lo), ord(hi) + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


@lru_cache(maxsize=1)
def merges_and_vocab() -> tuple[tuple[str, ...], dict[str, int]]:
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : _NUM_MERGES + 1])
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise TIError(
            f"{bpe_vocab_path()} gives {len(tokens)} tokens instead of {VOCAB_SIZE}; "
            "reinstall it with `pip install --no-deps --force-reinstall open_clip_torch`"
        )
    return merges, {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(out_dir: str | Path, *, pad_token: str = EOS) -> Path:
    """Write HF ``CLIPTokenizer`` files (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) into ``out_dir`` and return it.

    ``pad_token`` is ``"<|endoftext|>"`` for SD1 / SDXL's first encoder and ``"!"`` for
    the OpenCLIP encoders (SD2, SDXL's second encoder). The files are plain JSON/text so
    old transformers (the webui pins 4.30) read them as well as new ones.
    """
    merges, vocab = merges_and_vocab()
    if pad_token not in vocab:
        raise TIError(
            f"pad_token {pad_token!r} is not in the CLIP vocabulary; use '{EOS}' (SD1) or '!' (SD2/SDXL OpenCLIP)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        **special,
        "add_prefix_space": False,
        "errors": "replace",
        "do_lower_case": True,
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out
