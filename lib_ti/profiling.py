"""Opt-in profile of a few training steps, for finding where a step's time goes (issue 15: inside a host
the same step can be slower than headless). ``TI_TRAINER_PROFILE=N`` in the environment of the process
that trains (the webui's too) profiles steps 3 to 2 + N with ``torch.profiler`` and writes the table of
operators by self CPU time, and the call sites of the costliest, to ``<run folder>/profile.txt`` (or
``TI_TRAINER_PROFILE_OUT``). Off (no cost) when the variable is unset."""

from __future__ import annotations

import os
from pathlib import Path

import torch

FIRST_STEP = 3  # steps 1-2 warm up (allocator, oneDNN primitive caches)


class StepProfiler:
    def __init__(self, run_dir: Path, modules: list[torch.nn.Module] | None = None) -> None:
        self.modules = modules or []
        self.steps = int(os.environ.get("TI_TRAINER_PROFILE") or 0)
        self.path = Path(os.environ.get("TI_TRAINER_PROFILE_OUT") or run_dir / "profile.txt")
        self.profile: torch.profiler.profile | None = None
        self.conv_inputs: dict[str, str] = {}  # conv layer -> its input and weight layouts, where they differ
        self.hooks: list = []

    def before(self, step: int) -> None:
        """Call before step ``step`` (1-based) runs."""
        if self.steps and step == FIRST_STEP:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                  record_shapes=True, with_stack=True)
            self.profile.__enter__()
            self.hooks = [layer.register_forward_pre_hook(_layout_recorder(self.conv_inputs, name))
                          for m in self.modules for name, layer in m.named_modules()
                          if isinstance(layer, torch.nn.Conv2d)]

    def after(self, step: int) -> None:
        """Call after step ``step`` ran."""
        if self.profile is not None and step == FIRST_STEP + self.steps - 1:
            self.profile.__exit__(None, None, None)
            for hook in self.hooks:
                hook.remove()
            table = self.profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
            self.path.write_text(f"threads {torch.get_num_threads()}, steps {FIRST_STEP}-{step}\n{table}\n"
                                 f"{_top_stacks(self.profile)}\n{_layouts(self.modules)}\n"
                                 f"{_conv_input_report(self.conv_inputs)}\n")
            self.profile = None


def _top_stacks(profile: torch.profiler.profile, count: int = 8) -> str:
    """The Python call sites of the operators that took the most self CPU time, with their input shapes."""
    rows = sorted((e for e in profile.key_averages(group_by_input_shape=True, group_by_stack_n=6)
                   if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return "\n".join(f"{e.key} {e.count} calls, self {e.self_cpu_time_total / 1e6:.3f}s, shapes {e.input_shapes}\n  "
                     + "\n  ".join(e.stack or []) for e in rows)


def _layouts(modules: list[torch.nn.Module]) -> str:
    """The weights that are neither contiguous nor channels-last (a run on a CPU holds conv weights
    channels-last, ``layouts``): the CPU's native convolution copies those per call."""
    odd = [(name, tuple(p.shape), p.stride(), p.dtype) for m in modules for name, p in m.named_parameters()
           if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last))]
    return f"weights in an odd layout: {len(odd)}" + "".join(f"\n  {o}" for o in odd[:10])


def _layout_of(x: torch.Tensor) -> str:
    return ("contiguous" if x.is_contiguous() else
            "channels_last" if x.is_contiguous(memory_format=torch.channels_last) else "strided")


def _same_layout(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Both in one memory format (a 1x1 conv's weight is in both at once)."""
    return any(x.is_contiguous(memory_format=f) and weight.is_contiguous(memory_format=f)
               for f in (torch.contiguous_format, torch.channels_last))


def _layout_recorder(seen: dict[str, str], name: str):
    """A forward pre-hook noting a conv's input and weight layouts: when they differ the CPU convolution
    reorders one of them on every forward and backward, the whole weight when the input is channels-last
    (issue 15: 44 % of a webui step before runs held the weights channels-last)."""
    def hook(layer: torch.nn.Module, args: tuple) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        weight = getattr(layer, "weight", None)
        if x is not None and x.dim() == 4 and isinstance(weight, torch.Tensor):
            seen[name] = "" if _same_layout(x, weight) else (
                f"input {_layout_of(x)} {tuple(x.shape)} {x.stride()}, weight {_layout_of(weight)}")
    return hook


def _conv_input_report(seen: dict[str, str]) -> str:
    """How many conv layers got an input in another layout than their weight, and which (in call order)."""
    odd = [f"{n}: {mismatch}" for n, mismatch in seen.items() if mismatch]
    return (f"conv inputs in another layout than their weight: {len(odd)} of {len(seen)}"
            + "".join(f"\n  {line}" for line in odd[:12]))
