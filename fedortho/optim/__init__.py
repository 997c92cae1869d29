"""Client optimizers. ``build_optimizer`` is the one place a new optimizer is registered.

Opacus wraps exactly one optimizer, so every optimizer here is a single
``torch.optim.Optimizer`` over all trainable parameters. The orthogonalized optimizers update
the LoRA matrices; the other trainable tensors (the classification head) go to their AdamW
group.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Named = Sequence[tuple[str, torch.nn.Parameter]]

DEFAULT_LR = {"sgd": 0.5, "adamw": 1e-3, "auon": 0.05, "hybrid-auon": 0.05, "muon": 0.02, "normuon": 0.02}
HEAD_ADAMW_LR = 5e-3  # the non-matrix group of the orthogonal optimizers
OPTIMIZERS = tuple(DEFAULT_LR)


def _orthogonal(cls_name: str) -> Callable[[Named, float], torch.optim.Optimizer]:
    def build(named: Named, lr: float) -> torch.optim.Optimizer:
        from fedortho.optim import optimizers

        matrices = [p for n, p in named if "lora_" in n and p.ndim == 2]
        others = [p for n, p in named if not ("lora_" in n and p.ndim == 2)]
        groups = [{"params": matrices, "orthogonal": True}]
        if others:
            groups.append({"params": others, "orthogonal": False})
        return getattr(optimizers, cls_name)(groups, lr=lr, adamw_lr=HEAD_ADAMW_LR)

    return build


_BUILDERS: dict[str, Callable[[Named, float], torch.optim.Optimizer]] = {
    "sgd": lambda named, lr: torch.optim.SGD([p for _, p in named], lr=lr),
    "adamw": lambda named, lr: torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0),
    "auon": _orthogonal("AuON"),
    "hybrid-auon": _orthogonal("HybridAuON"),
    "muon": _orthogonal("Muon"),
    "normuon": _orthogonal("NorMuon"),
}


def build_optimizer(name: str, named_params: Named, lr: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``(name, parameter)`` pairs; ``lr = 0`` takes its default."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")
    return _BUILDERS[name](list(named_params), lr or DEFAULT_LR[name])
