"""Piecewise schedules in the webui's syntax: ``0.05:10, 0.02:20, 0.005:200``.

Each piece ``value:step`` means "use ``value`` while fewer than ``step`` optimizer steps
are done". A bare ``value`` or ``value:-1`` means "until the end" and must come last.

Decisions (the webui's own parser is lenient and silent; we are strict and explicit):

* Malformed pieces (``0.05:abc``), empty pieces (``0.05:10,,``), values <= 0, step 0 or other
  negative steps, and steps that do not increase are errors naming the piece.
* A schedule whose last piece ends before ``max_steps`` ends training there, as in the
  webui, but never silently: ``Schedule.end_step`` is what the trainer plans for, and
  ``describe_end`` gives the sentence the trainer reports up front.
* Used for the clip threshold, a schedule keeps its last value after its last piece
  (``value_at`` never runs out), which is also the webui's behaviour.
* The value is a pure function of the step, so a resumed run picks up mid-schedule exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import TIError


@dataclass(frozen=True)
class Piece:
    value: float
    end: float  # first step at which this piece no longer applies; inf for "until the end"


@dataclass(frozen=True)
class Schedule:
    text: str
    pieces: tuple[Piece, ...]

    @property
    def end_step(self) -> float:
        """The step at which the schedule runs out (``inf`` when it runs to the end)."""
        return self.pieces[-1].end

    def value_at(self, step: int) -> float:
        """The value for the optimizer step that starts with ``step`` steps done."""
        for piece in self.pieces:
            if step < piece.end:
                return piece.value
        return self.pieces[-1].value

    def planned_steps(self, max_steps: int) -> int:
        """How many steps training runs: max_steps, or fewer if the schedule ends first."""
        return int(min(max_steps, self.end_step))

    def describe_end(self, max_steps: int) -> str | None:
        """A sentence for the user when the schedule stops training before max_steps."""
        if self.end_step >= max_steps:
            return None
        return (
            f"the learning-rate schedule {self.text!r} ends at step {int(self.end_step)}, before the {max_steps} "
            f"max steps, so training stops at step {int(self.end_step)} (as in the webui); end the schedule with "
            f"a bare rate or ':-1' to train to {max_steps}"
        )


def parse_schedule(text: str, *, what: str = "learning rate") -> Schedule:
    """Parse ``text``; raise TIError naming the bad piece and the expected form."""
    pieces: list[Piece] = []
    raw_pieces = [p.strip() for p in str(text).split(",")]
    if not any(raw_pieces):
        raise TIError(f"{what} schedule is empty: write a value such as '0.005' or '0.05:10, 0.005:200'")
    if not all(raw_pieces):  # "0.05:10,," is a typo, not a schedule: silently dropping pieces hides it
        raise TIError(f"{what} schedule {text!r} has an empty piece (piece {raw_pieces.index('') + 1}); remove the "
                      "extra comma, or write the missing 'value:step'")
    for raw in raw_pieces:
        if pieces and math.isinf(pieces[-1].end):
            raise TIError(
                f"{what} schedule {text!r}: {raw!r} follows a piece that already runs to the end; "
                "a bare value or 'value:-1' must be the last piece"
            )
        piece = _parse_piece(raw, text, what)
        if pieces and piece.end <= pieces[-1].end:
            raise TIError(
                f"{what} schedule {text!r}: step {int(piece.end)} in {raw!r} does not come after step "
                f"{int(pieces[-1].end)}; steps must increase"
            )
        pieces.append(piece)
    return Schedule(str(text), tuple(pieces))


def _parse_piece(raw: str, text: str, what: str) -> Piece:
    value_text, sep, step_text = raw.partition(":")
    value = _number(value_text, raw, text, what)
    if not math.isfinite(value) or value <= 0:
        raise TIError(f"{what} schedule {text!r}: value {value_text.strip()!r} in {raw!r} must be a positive number")
    if not sep:
        return Piece(value, math.inf)
    try:
        step = int(step_text.strip())
    except ValueError:
        raise TIError(
            f"{what} schedule {text!r}: step {step_text.strip()!r} in {raw!r} is not a whole number; "
            "write 'value:step' such as '0.005:200', or 'value:-1' for 'until the end'"
        ) from None
    if step == -1:
        return Piece(value, math.inf)
    if step <= 0:
        raise TIError(f"{what} schedule {text!r}: step {step} in {raw!r} must be positive (or -1 for 'until the end')")
    return Piece(value, float(step))


def _number(value_text: str, raw: str, text: str, what: str) -> float:
    try:
        return float(value_text.strip())
    except ValueError:
        raise TIError(
            f"{what} schedule {text!r}: {value_text.strip()!r} in {raw!r} is not a number; "
            "write 'value:step' pieces such as '0.05:10, 0.005:200'"
        ) from None
