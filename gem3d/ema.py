"""Exponential moving average of a module's trainable parameters, as a module (so the shadow lives in the owner's
``state_dict`` and a resumed run restores it): ``shadow <- shadow - (1 - decay_n) * (shadow - param)`` with the
warm-up ``decay_n = min(decay, (1 + n) / (10 + n))``, ``n`` the updates so far.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def shadow_key(name: str) -> str:
    """Parameter name -> buffer name (buffers may not contain dots)."""
    return name.replace(".", "__")


class EMA(nn.Module):
    """Shadow copies of ``model``'s trainable (``requires_grad``) parameters; ``decay`` in (0, 1), asymptotic."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        super().__init__()
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        self.names: list[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        for name in self.names:
            self.register_buffer(shadow_key(name), model.get_parameter(name).detach().clone())

    def current_decay(self) -> float:
        """Decay used by the next update (after the warm-up rule)."""
        n = int(self.num_updates)
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _pairs(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(model.named_parameters())
        for name in self.names:
            if name not in params:
                raise KeyError(f"EMA tracks parameter {name!r} which the model does not have")
            yield self.get_buffer(shadow_key(name)), params[name]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current parameters."""
        decay = self.current_decay()
        self.num_updates += 1
        for shadow, param in self._pairs(model):
            shadow.sub_((1.0 - decay) * (shadow - param.detach().to(shadow.dtype)))

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """Context in which ``model`` holds the EMA weights; its own are put back on exit."""
        pairs = list(self._pairs(model))
        saved = [param.detach().clone() for _, param in pairs]
        with torch.no_grad():
            for shadow, param in pairs:
                param.copy_(shadow)
        try:
            yield model
        finally:
            with torch.no_grad():
                for value, (_, param) in zip(saved, pairs):
                    param.copy_(value)
