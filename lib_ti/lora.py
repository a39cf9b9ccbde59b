"""LoRA adapters of our own, on any ``nn.Linear`` of any host model (diffusers, ldm, sgm, transformers).

An adapter adds ``up(down(dropout(x))) * alpha / rank`` to a frozen linear layer's output, through a forward
hook: the host's module tree, its state dict and its weights are never touched, and removing the hooks
gives back exactly the model that was there (peft and the webui's own Lora code replace or patch the
modules instead). ``down`` and ``up`` are float32 leaf tensors of ours, like the embedding's vectors:
``down`` starts Kaiming-uniform (as peft and kohya start it), ``up`` at zero, so a new adapter changes
nothing until it has trained.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .errors import TIError
from .formats.lora import LoraModule


class Adapters:
    """One adapter per named module (kohya names, sorted: the optimizer's parameter order)."""

    def __init__(self, modules: dict[str, torch.nn.Linear], weights: dict[str, LoraModule], dropout: float) -> None:
        missing = sorted(set(modules) ^ set(weights))
        if missing:
            raise TIError(f"LoRA weights and model modules differ at {missing[0]} ({len(missing)} in all): resume with "
                          "the model and LoRA targets the run was trained with")
        self.names = sorted(modules)
        self.modules = modules
        self.dropout = dropout
        self.down: dict[str, torch.Tensor] = {}
        self.up: dict[str, torch.Tensor] = {}
        self.scale: dict[str, float] = {}
        for name in self.names:
            module, w = modules[name], weights[name]
            device = module.weight.device
            expected = (module.out_features, module.in_features)
            if (w.up.shape[0], w.down.shape[1]) != expected:
                raise TIError(f"LoRA module {name} is {w.up.shape[0]}x{w.down.shape[1]}, the model's layer is "
                              f"{expected[0]}x{expected[1]}: it was trained on another model")
            self.down[name] = w.down.detach().to(device, torch.float32).clone().requires_grad_(True)
            self.up[name] = w.up.detach().to(device, torch.float32).clone().requires_grad_(True)
            self.scale[name] = w.alpha / w.rank
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def new(cls, modules: dict[str, torch.nn.Linear], *, rank: int, alpha: float, dropout: float,
            seed: int) -> Adapters:
        """Fresh adapters: ``down`` Kaiming-uniform from ``seed`` (the same seed, the same start), ``up`` zero."""
        generator = torch.Generator().manual_seed(seed)
        weights = {}
        for name in sorted(modules):
            module = modules[name]
            bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and peft use
            down = (torch.rand(rank, module.in_features, generator=generator) * 2 - 1) * bound
            weights[name] = LoraModule(down, torch.zeros(module.out_features, rank), alpha)
        return cls(modules, weights, dropout)

    # ------------------------------------------------------------------ the model with adapters
    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Inside the block every adapted module's output includes its adapter; outside, nothing of ours is left."""
        if self.handles:
            raise RuntimeError("adapters attached twice")
        try:
            for name in self.names:
                self.handles.append(self.modules[name].register_forward_hook(self._hook(name)))
            yield
        finally:
            for handle in self.handles:
                handle.remove()
            self.handles.clear()

    def _hook(self, name: str):
        down, up, scale = self.down[name], self.up[name], self.scale[name]

        def add_adapter(_module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            # Dropout only while training (grad enabled), from the global RNG: the trainer seeds it per step, and
            # gradient checkpointing's recomputation replays it (torch.utils.checkpoint saves the RNG state).
            if self.dropout and torch.is_grad_enabled():
                x = F.dropout(x, self.dropout, training=True)
            # Under autocast the matmuls run in the autocast dtype; without it, in float32 (the adapters' own).
            delta = F.linear(F.linear(x.to(down.dtype) if not torch.is_autocast_enabled() else x, down), up)
            return output + (delta * scale).to(output.dtype)

        return add_adapter

    # ------------------------------------------------------------------ as parameters and as files
    def parameters(self) -> list[torch.Tensor]:
        return [t for name in self.names for t in (self.down[name], self.up[name])]

    def weights(self) -> dict[str, LoraModule]:
        """Float32 CPU copies, by kohya name: what a LoRA file holds."""
        return {n: LoraModule(self.down[n].detach().cpu().clone(), self.up[n].detach().cpu().clone(),
                              self.scale[n] * self.down[n].shape[0]) for n in self.names}

    def finite(self) -> torch.Tensor:
        """On the device, no sync: every adapter weight is finite."""
        return torch.stack([torch.isfinite(t).all() for t in self.parameters()]).all()

    def problem(self) -> str | None:
        """Why the adapters must not be saved (a non-finite weight), or None."""
        for name in self.names:
            if not (bool(torch.isfinite(self.down[name]).all()) and bool(torch.isfinite(self.up[name]).all())):
                return f"the LoRA module {name} holds NaN or infinite values"
        return None
