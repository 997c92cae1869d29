"""The update directions of the orthogonalized momentum optimizers, as pure batched functions.

Every function takes a stack of matrices ``(..., m, n)`` and treats each matrix alone.
Constants and formulas follow Muon (Keller Jordan) and the AuON paper; float64 references in
the tests are written from the same formulas independently.
"""

from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients (Muon): chosen to push all singular values of a
# Frobenius-normalized matrix towards ~1 within 5 steps, trading exactness for speed.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7


def frobenius_normalize(u: torch.Tensor) -> torch.Tensor:
    return u / (torch.linalg.matrix_norm(u, keepdim=True) + EPS)


def shape_scale(m: int, n: int) -> float:
    """sqrt(max(1, m/n)): keeps the per-entry step size comparable across shapes."""
    return max(1.0, m / n) ** 0.5


def newton_schulz_step(x: torch.Tensor) -> torch.Tensor:
    """One quintic step X <- aX + (bA + cA^2)X with A = X X^T, for wide X (rows <= cols)."""
    a, b, c = NS_COEFFS
    gram = x @ x.transpose(-1, -2)
    return a * x + (b * gram + c * gram @ gram) @ x


def newton_schulz(u: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximate the orthogonal polar factor of ``u`` (singular values pushed into ~[0.7, 1.2]).

    Iterates on the smaller side: a tall (m > n) matrix is transposed, so the Gram matrix is
    (n, n) — for LoRA's B (out, r) that is the tiny (r, r) Gram.
    """
    tall = u.shape[-2] > u.shape[-1]
    x = frobenius_normalize(u.transpose(-1, -2) if tall else u)
    for _ in range(steps):
        x = newton_schulz_step(x)
    return x.transpose(-1, -2) if tall else x


def cosh_rms(x: torch.Tensor) -> torch.Tensor:
    """r = sqrt(mean(cosh(X)^2)) per matrix, shape (..., 1, 1): ||cosh(X)||_F / sqrt(m n)."""
    return torch.linalg.matrix_norm(torch.cosh(x), keepdim=True) / (x.shape[-2] * x.shape[-1]) ** 0.5


def auon_direction(u: torch.Tensor) -> torch.Tensor:
    """AuON (paper version): X = u / ||u||_F, divided by sqrt(mean(cosh(X)^2))."""
    return auon_direction_(u.clone())


def auon_direction_(u: torch.Tensor) -> torch.Tensor:
    """``auon_direction`` computed in ``u`` itself (returned): AuON needs only two scalars per
    matrix, so the optimizer's step needs no temporaries beyond the cosh."""
    u.div_(torch.linalg.matrix_norm(u, keepdim=True).add_(EPS))
    return u.div_(cosh_rms(u))


def hybrid_auon_direction(u: torch.Tensor) -> torch.Tensor:
    """Hybrid-AuON: one Newton-Schulz step on the normalized u, then AuON's cosh scaling."""
    tall = u.shape[-2] > u.shape[-1]
    x = frobenius_normalize(u.transpose(-1, -2) if tall else u)
    x = newton_schulz_step(x)
    x = x.transpose(-1, -2) if tall else x
    return x / cosh_rms(x)


def normuon_direction(u: torch.Tensor, second_moment: torch.Tensor, beta2: float,
                      eps: float = 1e-8) -> torch.Tensor:
    """NorMuon: Muon's output with per-row adaptive scaling, rescaled to its own norm.

    ``second_moment`` (..., m, 1) is updated in place: v <- lerp(v, mean_cols(O^2), 1 - beta2).
    """
    return normuon_from_orthogonal(newton_schulz(u), second_moment, beta2, eps)


def normuon_from_orthogonal(o: torch.Tensor, second_moment: torch.Tensor, beta2: float,
                            eps: float = 1e-8) -> torch.Tensor:
    """NorMuon's row normalization of a Newton-Schulz output ``o``."""
    second_moment.lerp_(o.square().mean(dim=-1, keepdim=True), 1 - beta2)
    scaled = o / (second_moment.sqrt() + eps)
    return scaled * (torch.linalg.matrix_norm(o, keepdim=True) /
                     (torch.linalg.matrix_norm(scaled, keepdim=True) + EPS))
