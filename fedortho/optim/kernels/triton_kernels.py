"""Triton kernels for the orthogonalized optimizers (GPU path; tested with TRITON_INTERPRET=1).

Shapes: a stack of ``k`` matrices, each tall-thin ``(m, r)`` with ``r <= MAX_SMALL_SIDE``
(LoRA's B). Wide stacks are transposed by the callers; stacks with a larger small side go
to the torch path (cuBLAS), where these kernels would not help.

- ``gram``: G = Y^T Y per matrix, (k, r, r), one program per matrix looping over rows.
- ``ns_apply``: Y <- a Y + Y P per matrix (P = b G + c G^2 from the tiny Gram), the quintic
  Newton-Schulz step written for the tall side.
- AuON in two passes over memory: pass 1 updates the momentum and accumulates sum(u^2) and
  sum(u^4) of the Nesterov mix u per matrix; pass 2 recomputes u, normalizes it and scales
  it by 1 / sqrt(mean(cosh(X)^2)), evaluated from those sums as 1 + S2/N + S4/(3N) (the
  series of cosh^2; the first omitted term is below (2/45) max(X^2) S4/N, i.e. ~1e-9 for
  real gradients and < 1e-4 relative even for a one-hot u).

Matrix products use ``input_precision="ieee"`` (no TF32) and float32 accumulation; inputs
are cast to float32 inside the kernels (bf16 ``tl.dot`` is wrong in the interpreter).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fedortho.optim.orthogonal import EPS, NS_COEFFS, NS_STEPS

MAX_SMALL_SIDE = 128
BLOCK_M = 64
BLOCK = 1024
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot needs dimensions >= 16


@triton.jit
def _gram_kernel(y_ptr, g_ptr, m, r, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    k = tl.program_id(0)
    cols = tl.arange(0, R_PAD)
    acc = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
    base = y_ptr + k * m * r
    for start in range(0, m, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < m) & (cols[None, :] < r)
        y = tl.load(base + rows[:, None] * r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(y), y, input_precision="ieee")
    out_mask = (cols[:, None] < r) & (cols[None, :] < r)
    tl.store(g_ptr + k * r * r + cols[:, None] * r + cols[None, :], acc, mask=out_mask)


@triton.jit
def _ns_apply_kernel(y_ptr, p_ptr, out_ptr, m, r, a, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    k = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, R_PAD)
    mask = (rows[:, None] < m) & (cols[None, :] < r)
    y = tl.load(y_ptr + k * m * r + rows[:, None] * r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    p_mask = (cols[:, None] < r) & (cols[None, :] < r)
    p = tl.load(p_ptr + k * r * r + cols[:, None] * r + cols[None, :], mask=p_mask, other=0.0).to(tl.float32)
    out = a * y + tl.dot(y, p, input_precision="ieee")
    tl.store(out_ptr + k * m * r + rows[:, None] * r + cols[None, :], out, mask=mask)


@triton.jit
def _power_sums_kernel(u_ptr, stats_ptr, n, BLOCK: tl.constexpr):
    """stats[k] += (sum u^2, sum u^4) over one block of matrix k."""
    k = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(u_ptr + k * n + offs, mask=offs < n, other=0.0).to(tl.float32)
    u2 = u * u
    tl.atomic_add(stats_ptr + 2 * k, tl.sum(u2, axis=0))
    tl.atomic_add(stats_ptr + 2 * k + 1, tl.sum(u2 * u2, axis=0))


@triton.jit
def _cosh_scale(stats_ptr, k, n, NORMALIZE: tl.constexpr, eps):
    """(multiplier of u, 1/r): with NORMALIZE, X = u/||u||_F; r^2 = mean(cosh(X)^2) by its series."""
    s2 = tl.load(stats_ptr + 2 * k)
    s4 = tl.load(stats_ptr + 2 * k + 1)
    if NORMALIZE:
        norm = tl.sqrt(s2) + eps
        inv = 1.0 / norm
        sum_x2 = s2 * inv * inv
        sum_x4 = s4 * inv * inv * inv * inv
    else:
        inv = 1.0
        sum_x2 = s2
        sum_x4 = s4
    r = tl.sqrt(1.0 + sum_x2 / n + sum_x4 / (3.0 * n))
    return inv, 1.0 / r


@triton.jit
def _cosh_apply_kernel(u_ptr, stats_ptr, out_ptr, n, eps, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    inv, inv_r = _cosh_scale(stats_ptr, k, n, NORMALIZE, eps)
    u = tl.load(u_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + k * n + offs, u * (inv * inv_r), mask=mask)


@triton.jit
def _auon_pass1_kernel(g_ptr, m_ptr, stats_ptr, n, beta, BLOCK: tl.constexpr):
    """M <- lerp(M, G, 1 - beta); u = lerp(G, M, beta); stats += (sum u^2, sum u^4)."""
    k = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
    mom = tl.load(m_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
    mom = mom + (1.0 - beta) * (g - mom)
    tl.store(m_ptr + k * n + offs, mom, mask=mask)
    u = g + beta * (mom - g)
    u2 = u * u
    tl.atomic_add(stats_ptr + 2 * k, tl.sum(u2, axis=0))
    tl.atomic_add(stats_ptr + 2 * k + 1, tl.sum(u2 * u2, axis=0))


@triton.jit
def _auon_pass2_kernel(g_ptr, m_ptr, p_ptr, stats_ptr, n, beta, step, eps, BLOCK: tl.constexpr):
    """p <- p - step * X / r, recomputing u from G and the updated M."""
    k = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    inv, inv_r = _cosh_scale(stats_ptr, k, n, True, eps)
    g = tl.load(g_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
    mom = tl.load(m_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
    u = g + beta * (mom - g)
    p = tl.load(p_ptr + k * n + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_ptr + k * n + offs, p - step * u * (inv * inv_r), mask=mask)


# -- host-side wrappers ------------------------------------------------------------------------
def supports(u: torch.Tensor) -> bool:
    return min(u.shape[-2], u.shape[-1]) <= MAX_SMALL_SIDE


def _as_tall(u: torch.Tensor) -> tuple[torch.Tensor, bool]:
    wide = u.shape[-2] < u.shape[-1]
    return (u.transpose(-1, -2) if wide else u).contiguous().to(torch.float32), wide


def gram(y: torch.Tensor) -> torch.Tensor:
    """Y^T Y for a contiguous float32 stack of tall matrices (k, m, r)."""
    k, m, r = y.shape
    out = torch.empty(k, r, r, dtype=torch.float32, device=y.device)
    _gram_kernel[(k,)](y, out, m, r, R_PAD=_pad(r), BLOCK_M=BLOCK_M)
    return out


def ns_apply(y: torch.Tensor, p: torch.Tensor, a: float) -> torch.Tensor:
    k, m, r = y.shape
    out = torch.empty_like(y)
    _ns_apply_kernel[(k, triton.cdiv(m, BLOCK_M))](y, p.contiguous(), out, m, r, a, R_PAD=_pad(r), BLOCK_M=BLOCK_M)
    return out


def _ns_steps(y: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = NS_COEFFS
    for _ in range(steps):
        g = gram(y)
        y = ns_apply(y, b * g + c * (g @ g), a)  # the (r, r) polynomial is negligible work
    return y


def newton_schulz(u: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    if not supports(u):
        from fedortho.optim.orthogonal import newton_schulz as torch_newton_schulz

        return torch_newton_schulz(u, steps)
    y, wide = _as_tall(u)
    y = y / (torch.linalg.matrix_norm(y, keepdim=True) + EPS)
    y = _ns_steps(y, steps)
    return (y.transpose(-1, -2) if wide else y).to(u.dtype)


def _cosh_scaled(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    k = x.shape[0]
    flat = x.reshape(k, -1).contiguous().to(torch.float32)
    n = flat.shape[1]
    stats = torch.zeros(k, 2, dtype=torch.float32, device=x.device)
    grid = (k, triton.cdiv(n, BLOCK))
    _power_sums_kernel[grid](flat, stats, n, BLOCK=BLOCK)
    out = torch.empty_like(flat)
    _cosh_apply_kernel[grid](flat, stats, out, n, EPS, NORMALIZE=normalize, BLOCK=BLOCK)
    return out.reshape(x.shape).to(x.dtype)


def auon_direction(u: torch.Tensor) -> torch.Tensor:
    return _cosh_scaled(u, normalize=True)


def hybrid_auon_direction(u: torch.Tensor) -> torch.Tensor:
    if not supports(u):
        from fedortho.optim.orthogonal import hybrid_auon_direction as torch_hybrid

        return torch_hybrid(u)
    y, wide = _as_tall(u)
    y = _ns_steps(y / (torch.linalg.matrix_norm(y, keepdim=True) + EPS), 1)
    x = y.transpose(-1, -2) if wide else y
    return _cosh_scaled(x, normalize=False).to(u.dtype)


def fused_auon_step(params: torch.Tensor, grads: torch.Tensor, momentum: torch.Tensor, beta: float,
                    step: float) -> None:
    """One whole AuON step on stacked float32 buffers (k, m, n), in place, in two passes."""
    k = params.shape[0]
    n = params[0].numel()
    stats = torch.zeros(k, 2, dtype=torch.float32, device=params.device)
    grid = (k, triton.cdiv(n, BLOCK))
    _auon_pass1_kernel[grid](grads, momentum, stats, n, beta, BLOCK=BLOCK)
    _auon_pass2_kernel[grid](grads, momentum, params, stats, n, beta, step, EPS, BLOCK=BLOCK)
