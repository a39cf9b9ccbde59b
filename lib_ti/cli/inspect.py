"""``python -m lib_ti inspect FILE [--to OUT] [--format F] [--overwrite] [--json]``: show or convert an embedding;
show a LoRA file (kohya or diffusers/peft format).

``add_arguments(parser)`` fills an argparse (sub)parser and ``run(args)`` executes it, returning the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import TIError
from ..families import label_of_widths
from ..formats import EMBEDDING_FORMATS


def describe(path: str | Path) -> dict[str, Any]:
    """What an embedding (or LoRA) file holds, as JSON-ready plain values."""
    from ..formats.embeddings import load_embedding_details  # torch: imported when a file is read, not for --help
    from ..formats.lora import is_lora_file

    if is_lora_file(path):
        return describe_lora(path)
    loaded = load_embedding_details(path)
    emb = loaded.embedding
    return {
        "path": str(path),
        "format": loaded.format,
        "layout": loaded.layout,
        "container": loaded.container,
        "keys": loaded.keys,
        "name": emb.name,
        "stored_name": loaded.stored_name,
        "num_vectors": emb.num_vectors,
        "widths": emb.widths,
        "model_family": label_of_widths(emb.widths),
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
        "norms": {k: [round(float(n), 4) for n in v.norm(dim=1)] for k, v in emb.vectors.items()},
        "extra": dict(emb.extra),
    }


def describe_lora(path: str | Path) -> dict[str, Any]:
    """What a LoRA file holds: its modules by kohya name (a diffusers file's renamed for the real models' layout)."""
    from ..formats.lora import load_lora

    lora = load_lora(path)
    ranks = sorted({m.rank for m in lora.modules.values()})
    alphas = sorted({m.alpha for m in lora.modules.values()})
    parts: dict[str, int] = {}
    for name in lora.modules:
        part = name.split("_")[1]  # unet, te, te1, te2
        parts[part] = parts.get(part, 0) + 1
    return {"path": str(path), "kind": "lora", "format": lora.format, "modules": len(lora.modules),
            "parts": parts, "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": alphas[0] if len(alphas) == 1 else alphas, "names": list(lora.modules),
            "metadata": dict(sorted(lora.metadata.items()))}


def format_description(d: dict[str, Any]) -> str:
    """``describe``'s dict as readable lines."""
    if d.get("kind") == "lora":
        return _format_lora(d)
    widths = " + ".join(f"{k} {w}" for k, w in d["widths"].items())
    name = d["name"] + (f" (stored name {d['stored_name']!r})" if d.get("stored_name") not in (None, d["name"]) else "")
    checkpoint = d.get("sd_checkpoint_name") or "unknown"
    if d.get("sd_checkpoint"):
        checkpoint += f" [{d['sd_checkpoint']}]"
    lines = [
        f"file:        {d['path']}",
        f"format:      {d['format']}",
        f"name:        {name}",
        f"vectors:     {d['num_vectors']}",
        f"widths:      {widths} ({d['model_family']})",
        f"step:        {d['step']}",
        f"checkpoint:  {checkpoint}",
    ]
    for key, norms in d["norms"].items():
        lines.append(f"norms {key}: " + ", ".join(f"{n:.4f}" for n in norms))
    for key, value in sorted(d.get("extra", {}).items()):
        shown = value if len(value) <= 80 else value[:77] + "..."
        lines.append(f"extra {key}: {shown}")
    return "\n".join(lines)


def _format_lora(d: dict[str, Any]) -> str:
    lines = [f"file:        {d['path']}", f"LoRA:        {d['format']} format, {d['modules']} modules (" +
             ", ".join(f"{part} {count}" for part, count in d["parts"].items()) + ")",
             f"rank:        {d['rank']}", f"alpha:       {d['alpha']}"]
    for key, value in d["metadata"].items():
        shown = value if len(value) <= 80 else value[:77] + "..."
        lines.append(f"meta {key}: {shown}")
    return "\n".join(lines)


def convert(src: str | Path, dst: str | Path, *, overwrite: bool = False, fmt: str | None = None) -> Path:
    """Read ``src`` in any supported format and write it to ``dst`` (format from ``fmt`` or ``dst``'s extension).

    The embedding keeps the name it was read with (``src``'s stem, or the name inside an image).
    """
    from ..formats.embeddings import load_embedding, save_embedding

    return save_embedding(load_embedding(src), dst, fmt=fmt, overwrite=overwrite)


def add_parser(sub) -> None:
    parser = sub.add_parser("inspect", help="show or convert an embedding file",
                            description="Print what an embedding file holds; convert it with --to.")
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``inspect`` arguments to ``parser``."""
    parser.add_argument("file", help="embedding file: .safetensors, .pt, .bin, .png or .webp (format found by content)")
    parser.add_argument("--to", metavar="OUT", help="also convert it and write OUT; the format follows OUT's "
                        "extension (.safetensors, .pt, .bin, .png, .webp) unless --format is given")
    parser.add_argument("--format", choices=EMBEDDING_FORMATS, help="output format for --to; 'diffusers' writes "
                        "OUT/learned_embeds.safetensors (OUT a folder) or OUT itself (.safetensors/.bin)")
    parser.add_argument("--overwrite", action="store_true", help="let --to replace an existing OUT")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")


def run(args: argparse.Namespace) -> int:
    """Describe ``args.file`` and, with ``--to``, convert it. Returns the exit code (1 on a user error)."""
    try:
        d = describe(args.file)
        if args.to and d.get("kind") == "lora":
            raise TIError("--to converts embeddings; a LoRA file is only shown")
        written = convert(args.file, args.to, overwrite=args.overwrite, fmt=args.format) if args.to else None
    except TIError as e:
        print(e, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**d, "written": str(written) if written else None}, indent=2))
    else:
        print(format_description(d))
        if written:
            print(f"written:     {written}")
    return 0
