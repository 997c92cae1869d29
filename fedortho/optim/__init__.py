"""Client optimizers. ``build_optimizer`` is the one place a new optimizer is registered.

Opacus wraps exactly one optimizer, so every optimizer here is a single
``torch.optim.Optimizer`` over all trainable parameters. The orthogonalized optimizers update
the LoRA matrices; the other trainable tensors (the classification head) go to their SGD
group.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Named = Sequence[tuple[str, torch.nn.Parameter]]

DEFAULT_LR = {"sgd": 0.5, "adamw": 1e-3, "auon": 0.05, "hybrid-auon": 0.05, "muon": 0.02, "normuon": 0.02,
              "root": 0.02}
# The non-matrix group (the head) of the orthogonal optimizers trains as under plain SGD, so
# that comparing optimizers compares what they do to the LoRA matrices. Under DP, SGD also
# suits the head better than AdamW, whose per-coordinate scaling magnifies the noise.
HEAD_SGD_LR = DEFAULT_LR["sgd"]  # when head_lr is 0
OPTIMIZERS = tuple(DEFAULT_LR)
EXACT_CAPABLE = ("muon", "normuon", "root")  # their direction is a polar factor: orthogonalize = exact


def _orthogonal(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(named: Named, lr: float, head_lr: float, orthogonalize: str = "newton-schulz") -> torch.optim.Optimizer:
        from fedortho.optim import optimizers

        matrices = [p for n, p in named if "lora_" in n and p.ndim == 2]
        others = [p for n, p in named if not ("lora_" in n and p.ndim == 2)]
        groups = [{"params": matrices, "orthogonal": True}]
        if others:
            groups.append({"params": others, "orthogonal": False})
        return getattr(optimizers, cls_name)(groups, lr=lr, other="sgd", other_lr=head_lr or HEAD_SGD_LR,
                                             orthogonalize=orthogonalize)

    return build


_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda named, lr, head_lr, orthogonalize="newton-schulz": torch.optim.SGD([p for _, p in named], lr=lr),
    "adamw": lambda named, lr, head_lr, orthogonalize="newton-schulz": torch.optim.AdamW(
        [p for _, p in named], lr=lr, weight_decay=0.0),
    "auon": _orthogonal("AuON"),
    "hybrid-auon": _orthogonal("HybridAuON"),
    "muon": _orthogonal("Muon"),
    "normuon": _orthogonal("NorMuon"),
    "root": _orthogonal("ROOT"),
}


def build_optimizer(name: str, named_params: Named, lr: float = 0.0, head_lr: float = 0.0,
                    orthogonalize: str = "newton-schulz") -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``(name, parameter)`` pairs; ``lr = 0`` takes its default.

    ``head_lr`` is the SGD rate of the non-LoRA trainables under the orthogonal optimizers
    (0: SGD's default); ``sgd`` and ``adamw`` use ``lr`` for everything. ``orthogonalize``:
    "newton-schulz" or "exact" for the optimizers of ``EXACT_CAPABLE``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown optimizer '{name}' (choose from {', '.join(OPTIMIZERS)})")
    if orthogonalize != "newton-schulz" and name not in EXACT_CAPABLE:
        raise ValueError(f"orthogonalize {orthogonalize} needs one of {', '.join(EXACT_CAPABLE)}, not {name}")
    return _BUILDERS[name](list(named_params), lr or DEFAULT_LR[name], head_lr, orthogonalize)
