"""Keeping optimizer state across a FedSVD refactorization.

The server replaces (B, A) by (B T, A_new) with B A = B T A_new, where T = A_old A_new^T
(A_new has orthonormal rows; T is orthogonal once A_old has them too). A client that keeps
its optimizer state for B must move the state into the new coordinates, M' = M T, or the
momentum points the wrong way. Per-row statistics (NorMuon's second moment) are unchanged
by an orthogonal T, and elementwise Adam moments have no exact rotated form: they are
rotated for their first moment and kept for the second.
"""

from __future__ import annotations

import torch


def transition(a_old: torch.Tensor, a_new: torch.Tensor) -> torch.Tensor:
    """T (r, r) with B_old A_old = (B_old T) A_new for B in the row space of A_new."""
    return a_old.to(torch.float64) @ a_new.to(torch.float64).T


@torch.no_grad()
def rotate_momentum(optimizer: torch.optim.Optimizer, transitions: dict) -> None:
    """Right-multiply the momentum-like state of each B parameter by its transition T."""
    for param, t in transitions.items():
        state = optimizer.state.get(param, {})
        for key in ("momentum_buffer", "exp_avg"):
            if key in state:
                state[key].copy_((state[key].to(torch.float64) @ t).to(state[key].dtype))


def rotate_saved_state(tensors: dict, a_old: dict, a_new: dict) -> dict:
    """``rotate_momentum`` for state exported by ``fedortho.optim.state``: every momentum-like
    entry of a ``...lora_B...`` parameter is multiplied by T = A_old A_new^T of its adapter."""
    rotated = dict(tensors)
    for flat, value in tensors.items():
        key, name = flat.split("::", 1)
        if key in ("momentum_buffer", "exp_avg") and "lora_B" in name:
            a_name = name.replace("lora_B", "lora_A")
            if a_name in a_old and a_name in a_new:
                t = transition(a_old[a_name], a_new[a_name])
                rotated[flat] = (value.to(torch.float64) @ t).to(value.dtype)
    return rotated
