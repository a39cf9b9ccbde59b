"""Turn training events into a console progress bar (tqdm) and messages."""

from __future__ import annotations

import sys

from .. import events
from ..errors import PREFIX


class ConsoleProgress:
    def __init__(self) -> None:
        self.bar = None

    def __enter__(self) -> ConsoleProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, event: object) -> None:
        from tqdm import tqdm

        if isinstance(event, events.Started):
            for note in event.notes:
                tqdm.write(f"{PREFIX} note: {note}", file=sys.stderr)
            tqdm.write(f"{PREFIX} {event.num_images} images ({event.num_samples} cached samples), ready in "
                       f"{event.seconds_to_ready:.1f}s", file=sys.stderr)
            self.bar = tqdm(total=event.total_steps, initial=event.start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        elif isinstance(event, events.Step) and self.bar is not None:
            self.bar.update(event.step - self.bar.n)
            postfix = {"lr": f"{event.lr:.3g}", "img/s": f"{event.images_per_s:.2f}"}
            if event.loss is not None:
                postfix["loss"] = f"{event.loss:.4f}"
                self.bar.set_postfix(postfix, refresh=False)
        elif isinstance(event, events.Saved):
            lora = f" and {event.lora}" if event.lora is not None else ""
            tqdm.write(f"{PREFIX} saved step {event.step}: {event.path}{lora}", file=sys.stderr)
        elif isinstance(event, events.Preview):
            tqdm.write(f"{PREFIX} preview at step {event.step}: {event.path}", file=sys.stderr)
        elif isinstance(event, events.Warning):
            tqdm.write(f"{PREFIX} warning: {event.message}", file=sys.stderr)
        elif isinstance(event, events.Result) and self.bar is not None:
            self.bar.close()  # the run is over: later output must not mix with the bar
            self.bar = None
