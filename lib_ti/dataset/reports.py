"""What dataset preparation, captioning and the pre-flight check tell the user about each file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import warn


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str  # a sentence a user can act on: "cannot read it as an image (OSError: ...)"

    def __str__(self) -> str:
        return f"{self.path.name}: {self.reason}"


def skip(skipped: list[Skipped], path: Path, reason: str) -> None:
    """Record a skipped file and warn about it at once (a long run should not hide it until the end)."""
    skipped.append(Skipped(path, reason))
    warn(f"skipping {str(path)!r}: {reason}")


def skipped_lines(skipped: Sequence[Skipped], indent: str = "  ") -> list[str]:
    return [f"{indent}skipped {s}" for s in skipped]
