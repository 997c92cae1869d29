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


def newton_schulz_step(x: torch.Tensor, coeffs: tuple[float, float, float] = NS_COEFFS) -> torch.Tensor:
    """One quintic step X <- aX + (bA + cA^2)X with A = X X^T, for wide X (rows <= cols)."""
    a, b, c = coeffs
    gram = x @ x.transpose(-1, -2)
    return a * x + (b * gram + c * gram @ gram) @ x


def newton_schulz(u: torch.Tensor, steps: int = NS_STEPS,
                  coeffs: tuple[float, float, float] = NS_COEFFS) -> torch.Tensor:
    """Approximate the orthogonal polar factor of ``u`` (singular values pushed into ~[0.7, 1.2]).

    Iterates on the smaller side: a tall (m > n) matrix is transposed, so the Gram matrix is
    (n, n) — for LoRA's B (out, r) that is the tiny (r, r) Gram.
    """
    tall = u.shape[-2] > u.shape[-1]
    x = frobenius_normalize(u.transpose(-1, -2) if tall else u)
    for _ in range(steps):
        x = newton_schulz_step(x, coeffs)
    return x.transpose(-1, -2) if tall else x


# Below this share of the largest singular value a direction counts as absent: the exact
# polar factor of a rank-deficient matrix is taken on its range (zero elsewhere), as the
# Newton-Schulz iteration leaves vanishing directions near zero too.
POLAR_RANK_TOLERANCE = 1e-6


def exact_polar(u: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U V^T of each matrix of ``u`` (..., m, n), exactly.

    For a wide X (r, n), r <= n: X X^T = Q diag(l) Q^T (an r x r eigendecomposition), and
    U V^T = Q diag(l^-1/2) Q^T X. For LoRA (r <= 64) that costs two thin products and one
    tiny symmetric eigendecomposition, less than five Newton-Schulz steps, and leaves every
    singular value at exactly 1 (0 for directions below ``POLAR_RANK_TOLERANCE``). The r x r
    part runs in float64, where squaring the condition number costs no accuracy that float32
    inputs have.
    """
    tall = u.shape[-2] > u.shape[-1]
    x = u.transpose(-1, -2) if tall else u
    x64 = x.double()
    values, vectors = torch.linalg.eigh(x64 @ x64.transpose(-1, -2))
    floor = (POLAR_RANK_TOLERANCE ** 2) * values.amax(dim=-1, keepdim=True).clamp_min(1e-300)
    inverse_root = torch.where(values > floor, values.clamp_min(1e-300).rsqrt(), torch.zeros_like(values))
    polar = (vectors * inverse_root.unsqueeze(-2)) @ vectors.transpose(-1, -2) @ x64
    polar = polar.to(u.dtype)
    return polar.transpose(-1, -2) if tall else polar


# ROOT's Newton-Schulz coefficients by matrix shape (rows <= cols). The four large shapes are
# the ROOT reference code's; the LoRA shapes are fitted by its criterion (five steps map the
# normalized singular values closest to 1) in ``fedortho.optim.root_fit``, which prints this
# table. Other shapes fall back to Muon's quintic, as in the reference code.
ROOT_COEFFS: dict[tuple[int, int], tuple[float, float, float]] = {
    (2048, 2048): (3.4916, -4.8224, 2.1095),
    (2048, 3072): (3.4509, -4.5790, 1.9325),
    (2048, 8192): (2.9794, -3.6674, 1.6207),
    (2048, 16384): (3.1943, -3.8221, 1.5322),
    (4, 384): (2.9437, -3.1260, 1.1768),
    (4, 768): (2.5997, -2.9596, 1.3595),
    (4, 1024): (2.9462, -3.1278, 1.1756),
    (8, 384): (2.6740, -3.1567, 1.4800),
    (8, 768): (2.6459, -3.1033, 1.4557),
    (8, 1024): (2.6720, -3.1404, 1.4659),
    (16, 384): (2.7403, -3.2968, 1.5461),
    (16, 768): (2.7576, -3.3264, 1.5566),
    (16, 1024): (2.7409, -3.2957, 1.5437),
}


def root_coefficients(m: int, n: int) -> tuple[float, float, float]:
    return ROOT_COEFFS.get((min(m, n), max(m, n)), NS_COEFFS)


ROOT_QUANTILE = 0.9
ROOT_THRESHOLD_EPS = 1e-9


def root_clamp(u: torch.Tensor) -> torch.Tensor:
    """ROOT's outlier suppression for each matrix of ``u``: the soft-thresholded part
    sign(u) max(|u| - t, 0) removed, with t the 0.9-quantile of |u| (+1e-9), which is u
    clamped to [-t, t]."""
    t = quantile_of_magnitudes(u, ROOT_QUANTILE) + ROOT_THRESHOLD_EPS
    return torch.maximum(torch.minimum(u, t), -t)


def quantile_of_magnitudes(u: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of |u| per matrix, shape (..., 1, 1), interpolated linearly between
    order statistics (torch.quantile's default). A selection of the top n - low entries and
    the two smallest of those, instead of a sort: 7x faster for LoRA's 1024 x 8 on CPU."""
    flat = u.abs().flatten(-2)
    n = flat.shape[-1]
    position = q * (n - 1)
    low = int(position)
    top = torch.topk(flat, n - low, dim=-1, sorted=False).values  # order statistics low .. n-1
    pair = torch.topk(top, min(2, n - low), dim=-1, largest=False, sorted=True).values
    below, above = pair[..., 0], pair[..., -1]  # statistics low and low + 1 (low alone at the top)
    return torch.lerp(below, above, position - low)[..., None, None]


def root_direction(u: torch.Tensor, coeffs: tuple[float, float, float], exact: bool = False) -> torch.Tensor:
    """ROOT: clamp the outliers, then orthogonalize (Newton-Schulz with ``coeffs``, or exactly)."""
    clamped = root_clamp(u)
    return exact_polar(clamped) if exact else newton_schulz(clamped, coeffs=coeffs)


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
