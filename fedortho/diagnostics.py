"""Per-sample gradient statistics of a private client round, taken before clipping.

They explain what DP-SGD does to a run: how often the clip binds, and how the gradient
norm of the LoRA matrices and of the head compare with the clip (the noise is calibrated to
the clip, so a clip far above the gradient norms adds noise for nothing; a head whose
gradients dominate the per-sample norm leaves the LoRA matrices little of it).

They are computed from private data without noise and are not covered by the accountant:
clients release them only in simulation, or when a node's config opts in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch


def squared_norms(grad_samples: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(LoRA, head) squared per-sample gradient norms, each (batch,), in float64.

    ``grad_samples`` maps adapter tensor names to per-sample gradients (batch, *shape);
    names containing ``lora_`` are LoRA matrices, the others the head.
    """
    batch = len(next(iter(grad_samples.values())))
    lora = torch.zeros(batch, dtype=torch.float64)
    head = torch.zeros(batch, dtype=torch.float64)
    for name, g in grad_samples.items():
        part = g.detach().reshape(batch, -1).double().pow(2).sum(dim=1)
        if "lora_" in name:
            lora += part
        else:
            head += part
    return lora, head


@dataclass
class GradientDiagnostics:
    """Collects per-sample norms over a client round; ``summary`` reduces them."""

    clip: float
    has_head: bool
    lora: list[torch.Tensor] = field(default_factory=list)
    head: list[torch.Tensor] = field(default_factory=list)

    def observe(self, grad_samples: Mapping[str, torch.Tensor]) -> None:
        lora, head = squared_norms(grad_samples)
        self.lora.append(lora)
        self.head.append(head)

    def summary(self) -> dict[str, float]:
        """``clipped-fraction``: share of samples whose whole gradient norm exceeded the clip
        (Opacus scales those down to it); ``lora-grad-norm``, ``head-grad-norm``: median
        per-sample norms; ``grad-samples``: how many samples they cover. Empty if none."""
        if not self.lora or sum(len(t) for t in self.lora) == 0:
            return {}
        lora, head = torch.cat(self.lora), torch.cat(self.head)
        total = (lora + head).sqrt()
        clipped = self.clip / (total + 1e-6) < 1.0  # Opacus' own test (its clip factor is below 1)
        out = {
            "clipped-fraction": float(clipped.double().mean()),
            "lora-grad-norm": float(np.median(lora.sqrt().numpy())),
            "grad-samples": len(total),
        }
        if self.has_head:
            out["head-grad-norm"] = float(np.median(head.sqrt().numpy()))
        return out
