"""Client optimizers. ``build_optimizer`` is the one place a new optimizer is registered.

Opacus wraps exactly one optimizer, so every optimizer here is a single
``torch.optim.Optimizer`` over all trainable parameters.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

_BUILDERS: dict[str, Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
}
OPTIMIZERS = tuple(_BUILDERS)


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name not in _BUILDERS:
        raise ValueError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")
    return _BUILDERS[name](list(params), lr)
