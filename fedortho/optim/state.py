"""Optimizer state in and out of a flat, name-keyed form a client can keep between rounds.

``export_state`` gives ``({"<key>::<param name>": tensor}, {"<key>::<param name>": number})``;
``import_state`` puts it back into a fresh optimizer over the same named parameters.
"""

from __future__ import annotations

from typing import Sequence

import torch

SEPARATOR = "::"


def export_state(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, torch.nn.Parameter]]):
    tensors, scalars = {}, {}
    for name, param in named:
        for key, value in optimizer.state.get(param, {}).items():
            if value is None:
                continue
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                tensors[f"{key}{SEPARATOR}{name}"] = value.detach().to("cpu", copy=True)
            else:
                scalars[f"{key}{SEPARATOR}{name}"] = float(value)
    return tensors, scalars


def import_state(optimizer: torch.optim.Optimizer, named: Sequence[tuple[str, torch.nn.Parameter]],
                 tensors: dict, scalars: dict) -> None:
    by_name = dict(named)
    for flat, value in list(tensors.items()) + list(scalars.items()):
        key, name = flat.split(SEPARATOR, 1)
        if name not in by_name:
            raise KeyError(f"saved optimizer state names an unknown parameter '{name}'")
        param = by_name[name]
        if isinstance(value, torch.Tensor):
            value = value.to(dtype=param.dtype, device=param.device).clone()
        elif key == "step":  # torch's AdamW counts in a tensor, the orthogonal optimizers in an int
            value = torch.tensor(value, dtype=torch.float32) if isinstance(optimizer, torch.optim.AdamW) else int(value)
        optimizer.state[param][key] = value
