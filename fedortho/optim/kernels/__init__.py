"""Dispatch: CUDA tensors go to the Triton kernels, everything else to the torch code path.

``FEDORTHO_TRITON=1`` routes CPU tensors through the Triton kernels as well, which only
works under ``TRITON_INTERPRET=1`` (set before Triton is imported): that is how the kernels
are tested on a machine without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from fedortho.optim import orthogonal


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    if not triton_available():
        return False
    return t.is_cuda or os.environ.get("FEDORTHO_TRITON") == "1"


def triton_fits(t: torch.Tensor) -> bool:
    """The kernels target tall-thin matrices (LoRA's B); larger small sides stay with cuBLAS."""
    return min(t.shape[-2], t.shape[-1]) <= 128


def newton_schulz(u: torch.Tensor) -> torch.Tensor:
    if use_triton(u):
        from fedortho.optim.kernels import triton_kernels

        return triton_kernels.newton_schulz(u)
    return orthogonal.newton_schulz(u)


def auon_direction(u: torch.Tensor) -> torch.Tensor:
    """AuON's direction; ``u`` is scratch (the torch path computes in place in it)."""
    if use_triton(u):
        from fedortho.optim.kernels import triton_kernels

        return triton_kernels.auon_direction(u)
    return orthogonal.auon_direction_(u)


def hybrid_auon_direction(u: torch.Tensor) -> torch.Tensor:
    if use_triton(u):
        from fedortho.optim.kernels import triton_kernels

        return triton_kernels.hybrid_auon_direction(u)
    return orthogonal.hybrid_auon_direction(u)


def normuon_direction(u: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    if use_triton(u):
        from fedortho.optim.kernels import triton_kernels

        o = triton_kernels.newton_schulz(u)
        return orthogonal.normuon_from_orthogonal(o, second_moment, beta2)
    return orthogonal.normuon_direction(u, second_moment, beta2)
