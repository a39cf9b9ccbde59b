"""loss.csv: one row per log point. Losses stay on the device between log points (no per-step sync)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from .fileio import write_text

HEADER = ["step", "loss", "learning_rate"]


class LossLog:
    def __init__(self, path: Path, *, truncate_after: int = 0) -> None:
        """Open ``path``; rows after step ``truncate_after`` (left by an interrupted run) are dropped."""
        self.path = Path(path)
        self.pending: list[torch.Tensor] = []
        self.last_loss: float | None = None
        self.rows = [r for r in self._read() if int(r[0]) <= truncate_after]
        self._write()

    def add(self, step: int, loss: torch.Tensor, lr: float, *, every: int, force: bool = False) -> float | None:
        """Record a step's loss; every ``every`` steps write the mean since the last row and return it."""
        self.pending.append(loss.detach())
        if step % every and not force:
            return None
        mean = torch.stack(self.pending).float().mean().item()  # the one host sync per log point
        self.pending.clear()
        self.last_loss = mean
        self.rows.append([str(step), f"{mean:.7f}", f"{lr:.8g}"])
        self._write()
        return mean

    def pending_values(self) -> list[float]:
        """Losses since the last row (one host sync); a checkpoint keeps them so a resumed log matches."""
        return [float(v) for v in torch.stack(self.pending).float().cpu()] if self.pending else []

    def restore_pending(self, values: list[float]) -> None:
        self.pending = [torch.tensor(v) for v in values]

    def losses(self) -> list[tuple[int, float]]:
        return [(int(r[0]), float(r[1])) for r in self.rows]

    def _read(self) -> list[list[str]]:
        if not self.path.is_file():
            return []
        rows = list(csv.reader(self.path.read_text(encoding="utf-8", errors="replace").splitlines()))
        return [r for r in rows[1:] if len(r) == len(HEADER) and r[0].isdigit() and _is_number(r[1])]

    def _write(self) -> None:
        # Rewritten whole and atomically: a crash never leaves a torn row, and the file is small.
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(self.rows)
        write_text(self.path, buf.getvalue())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
