"""Fit ROOT's Newton-Schulz coefficients for LoRA shapes: ``python -m fedortho.optim.root_fit``.

ROOT (He et al., 2025) replaces Muon's fixed quintic (3.4445, -4.7750, 2.0315) by one per
matrix shape, chosen so that five steps map the normalized singular values of matrices of
that shape closest to 1. Its reference code lists four large shapes (2048 x 2048 up to
2048 x 16384) and falls back to Muon's quintic for every other, which covers no LoRA
matrix: B is (out, r) and A is (r, in) with r of 4 to 64.

The criterion here is the paper's, mean squared distance from 1 of the singular values after
five steps, over two families of matrices of each shape, weighted alike:

* Gaussian matrices, then clamped as ROOT clamps them: what a DP-SGD step's momentum looks
  like when noise dominates it (the regime this product runs in);
* matrices with singular values spread log-uniformly over two decades: momentum whose
  signal is concentrated in a few directions, so that the fit does not trade those away.

Each matrix is Frobenius-normalized first, as the iteration normalizes it. A quintic only
sees each singular value alone, so the fit works on the values, not on the matrices.
"""

from __future__ import annotations

import numpy as np
import torch

from fedortho.optim.orthogonal import NS_COEFFS, NS_STEPS, root_clamp

FITTED_SHAPES = [(r, n) for r in (4, 8, 16) for n in (384, 768, 1024)]
SAMPLES_PER_FAMILY = 256


def singular_values(shape: tuple[int, int], count: int = SAMPLES_PER_FAMILY, seed: int = 0) -> np.ndarray:
    """The normalized singular values of ``count`` matrices of each family (one flat array)."""
    r, n = shape
    gen = torch.Generator().manual_seed(seed)
    gaussian = root_clamp(torch.randn(count, r, n, generator=gen, dtype=torch.float64))
    u = torch.linalg.qr(torch.randn(count, r, r, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(count, n, r, generator=gen, dtype=torch.float64))[0]
    spread = 10.0 ** (-2.0 * torch.rand(count, r, generator=gen, dtype=torch.float64))
    structured = (u * spread.unsqueeze(-2)) @ v.transpose(-1, -2)
    values = []
    for family in (gaussian, structured):
        normalized = family / torch.linalg.matrix_norm(family, keepdim=True)
        values.append(torch.linalg.svdvals(normalized).flatten().numpy())
    return np.concatenate(values)


def after_steps(coeffs, s: np.ndarray, steps: int = NS_STEPS) -> np.ndarray:
    """Where ``steps`` quintic steps take each singular value."""
    a, b, c = coeffs
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def criterion(coeffs, s: np.ndarray) -> float:
    """Mean squared distance from 1 after the steps (what the coefficients are fitted for)."""
    out = after_steps(coeffs, s)
    return float(np.mean((out - 1.0) ** 2)) if np.all(np.isfinite(out)) else float("inf")


def fit(shape: tuple[int, int], seed: int = 0) -> tuple[float, float, float]:
    """The quintic for ``shape`` (rows <= cols) minimizing ``criterion``, from Muon's."""
    from scipy.optimize import minimize

    s = singular_values(shape, seed=seed)
    result = minimize(criterion, np.array(NS_COEFFS), args=(s,), method="Nelder-Mead",
                      options={"xatol": 1e-6, "fatol": 1e-12, "maxiter": 20000, "maxfev": 20000})
    return tuple(round(float(x), 4) for x in result.x)


def spread_after(coeffs, s: np.ndarray, above: float = 0.05) -> tuple[float, float]:
    """(lowest, highest) value the steps take the singular values above ``above`` to: how
    far from orthogonal the result is (values near 0 are noise the steps need not lift)."""
    out = after_steps(coeffs, s[s > above])
    return float(out.min()), float(out.max())


def main() -> None:
    print("shape        a        b        c     criterion: fitted / Muon's   "
          "singular values above 0.05 after the steps: fitted / Muon's")
    for shape in FITTED_SHAPES:
        coeffs = fit(shape)
        s = singular_values(shape, seed=1)  # other matrices than the fit's
        (lo, hi), (muon_lo, muon_hi) = spread_after(coeffs, s), spread_after(NS_COEFFS, s)
        print(f"{str(shape):10s} {coeffs[0]:8.4f} {coeffs[1]:8.4f} {coeffs[2]:8.4f}     "
              f"{criterion(coeffs, s):.5f} / {criterion(NS_COEFFS, s):.5f}     "
              f"[{lo:.2f}, {hi:.2f}] / [{muon_lo:.2f}, {muon_hi:.2f}]")


if __name__ == "__main__":
    main()
