"""The state every probe must leave alone, and the guard that checks it.

A probe may run the model in another mode, but afterwards parameters, buffers (BN running statistics,
``num_batches_tracked``), ``training`` flags, ``requires_grad``, ``.grad`` and the global RNG state are
exactly as before. :class:`ModelState` snapshots all of them; :func:`preserved` restores them on exit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["BN_MODES", "ModelState", "eval_mode", "is_batch_dependent", "norm_mode", "preserved"]

#: How batch-dependent norm layers normalize during a probe (DESIGN.md).
BN_MODES = ("batch", "running")


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 - the global state is what a probe must not touch
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@dataclass(frozen=True)
class ModelState:
    """A deep snapshot of everything a probe must not change."""

    parameters: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    grads: dict[str, torch.Tensor | None]
    rng: dict[str, Any]

    @classmethod
    def capture(cls, model: nn.Module) -> ModelState:
        params = dict(model.named_parameters(remove_duplicate=False))
        return cls(
            parameters={n: p.detach().clone() for n, p in params.items()},
            buffers={n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)},
            training={n: m.training for n, m in model.named_modules()},
            requires_grad={n: p.requires_grad for n, p in params.items()},
            grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()},
            rng=_rng_state(),
        )

    def differences(self, model: nn.Module) -> list[str]:
        """What differs between this snapshot and ``model`` now (empty when nothing changed)."""
        now = ModelState.capture(model)
        diffs = []
        for kind in ("parameters", "buffers", "grads"):
            before, after = getattr(self, kind), getattr(now, kind)
            if before.keys() != after.keys():
                diffs.append(f"{kind}: names changed")
                continue
            for name in before:
                a, b = before[name], after[name]
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    diffs.append(f"{kind}: {name}")
        for kind in ("training", "requires_grad"):
            before, after = getattr(self, kind), getattr(now, kind)
            diffs += [f"{kind}: {n}" for n in before if before[n] != after.get(n)]
        if not torch.equal(self.rng["torch"], now.rng["torch"]):
            diffs.append("rng: torch")
        a, b = self.rng["numpy"], now.rng["numpy"]
        if a[0] != b[0] or not np.array_equal(a[1], b[1]) or a[2:] != b[2:]:
            diffs.append("rng: numpy")
        if self.rng["python"] != now.rng["python"]:
            diffs.append("rng: python")
        return diffs

    def restore(self, model: nn.Module) -> None:
        """Put ``model`` and the global RNGs back exactly as captured."""
        with torch.no_grad():
            params = dict(model.named_parameters(remove_duplicate=False))
            for name, p in params.items():
                p.copy_(self.parameters[name])
                p.requires_grad_(self.requires_grad[name])
                saved = self.grads[name]
                p.grad = None if saved is None else saved.clone()
            for name, b in model.named_buffers(remove_duplicate=False):
                b.copy_(self.buffers[name])
        for name, m in model.named_modules():
            m.training = self.training[name]
        torch.set_rng_state(self.rng["torch"])
        np.random.set_state(self.rng["numpy"])  # noqa: NPY002
        random.setstate(self.rng["python"])
        if "cuda" in self.rng:
            torch.cuda.set_rng_state_all(self.rng["cuda"])


@contextmanager
def preserved(model: nn.Module) -> Iterator[ModelState]:
    """Run a block, then restore the model's state and the RNGs exactly as they were before it."""
    state = ModelState.capture(model)
    try:
        yield state
    finally:
        state.restore(model)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode for the block; each module's own flag restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def is_batch_dependent(module: nn.Module) -> bool:
    """A layer that normalizes with batch statistics in training: torch's BatchNorm and whybn's zoo alike.

    Both follow torch.nn.BatchNorm's convention of a ``track_running_stats`` attribute.
    """
    return hasattr(module, "track_running_stats")


@contextmanager
def norm_mode(model: nn.Module, bn: str = "batch") -> Iterator[nn.Module]:
    """Run the block with batch-dependent norms in mode ``bn`` and every random layer off.

    ``bn="batch"``: batch-dependent layers normalize with the current batch's statistics (the loss the
    optimizer sees) and update no running statistic (``training=True, track_running_stats=False``);
    ``bn="running"``: they use their running statistics (eval mode). All other modules are in eval mode
    (dropout and injected noise off). Flags are restored on exit.
    """
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}, got {bn!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    try:
        for m in model.modules():
            batch = bn == "batch" and is_batch_dependent(m)
            m.training = batch
            if batch:
                m.track_running_stats = False
        yield model
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track
