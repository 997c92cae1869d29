"""FedSVD refactorization, and the checks and weighted mean every aggregation rule uses.

A LoRA adapter is a pair ``b: (out, r)``, ``a: (r, in)`` whose product ``b @ a`` is the
weight update. FedSVD re-expresses the product as ``b_new @ a_new`` with ``a_new`` having
orthonormal rows, without ever forming the ``(out, in)`` product.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

Tensors = dict[str, torch.Tensor]


class AggregationError(ValueError):
    """Client updates that cannot be combined (wrong keys, shapes or non-finite values)."""


def refactorize(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(b_new, a_new)`` with ``b_new @ a_new == b @ a`` and orthonormal rows in ``a_new``.

    Shapes: ``b: (..., out, r)``, ``a: (..., r, in)`` with ``r <= in``; leading dims batch
    several adapters of one shape into one call. Cost O((out + in) r^2 + r^3) per adapter:
    a QR of ``a^T`` (``a = ra^T qa^T``), then a thin SVD of the ``(out, r)`` factor ``b ra^T``.
    ``a_new`` holds the right singular vectors of ``b @ a`` (singular values in descending
    order, folded into ``b_new``); its rows lie in the row space of ``a``. Signs are fixed so
    that the largest-magnitude entry of each row of ``a_new`` is positive, which makes the
    result deterministic. Works for rank-deficient and zero ``b``. Computed in the input's
    precision (float32 at least) and returned in the input dtype.
    """
    if b.shape[-1] != a.shape[-2]:
        raise ValueError(f"refactorize: b {tuple(b.shape)} and a {tuple(a.shape)} do not share the rank dimension")
    r, n_in = a.shape[-2], a.shape[-1]
    if r > n_in:
        raise ValueError(f"refactorize: rank {r} exceeds the input dimension {n_in}; a cannot have orthonormal rows")
    dtype = b.dtype
    # float32 and float64 inputs are factorized in their own precision (the orthogonal QR and
    # SVD steps lose only a few ulps); half precisions are lifted to float32.
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    b, a = b.to(work), a.to(work)
    qa, ra = torch.linalg.qr(a.transpose(-1, -2))  # (in, r), (r, r): a = ra^T qa^T
    m = b @ ra.transpose(-1, -2)                   # (out, r): b a = m qa^T, same singular values
    # Thin SVD of the tall (out, r) factor; when out < r, vh must still be a full (r, r) rotation.
    u, s, vh = torch.linalg.svd(m, full_matrices=m.shape[-2] < r)
    a_new = vh @ qa.transpose(-1, -2)              # (r, in), orthonormal rows
    # Sign convention: flipping a row of a_new and the matching column of b_new leaves the
    # product unchanged; make each row's largest-magnitude entry positive. sign: (r, 1), never
    # 0 since each row of a_new is a unit vector.
    sign = torch.gather(a_new, -1, a_new.abs().argmax(dim=-1, keepdim=True)).sign()
    a_new = a_new * sign
    b_new = u[..., :, : s.shape[-1]] * s.unsqueeze(-2)
    if b_new.shape[-1] < r:  # out < r: b_new's trailing r - out columns are zero
        b_new = torch.cat([b_new, b_new.new_zeros(*b_new.shape[:-1], r - b_new.shape[-1])], dim=-1)
    b_new = b_new * sign.transpose(-1, -2)
    return b_new.to(dtype), a_new.to(dtype)


def refactorize_full_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the (out, in) product and its full SVD, as in the FedSVD paper's code.

    O(out * in * min(out, in)) per adapter; kept for tests and benchmarks only.
    """
    r = a.shape[-2]
    u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
    return u[..., :, :r] * s[..., None, :r], vh[..., :r, :]


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Mean of equally shaped tensors weighted by ``weights`` (e.g. example counts), in float64."""
    total = float(sum(weights))
    if total <= 0:
        raise AggregationError("aggregation weights sum to zero (no client reported examples)")
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += t.to(torch.float64) * (float(w) / total)
    return acc.to(tensors[0].dtype)


def check_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], who: str) -> None:
    """Reject an update whose keys or shapes differ from ``expected`` or that holds NaN/inf."""
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        raise AggregationError(f"{who}: update keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in update.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AggregationError(f"{who}: '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if not torch.isfinite(v).all():
            raise AggregationError(f"{who}: '{k}' contains NaN or inf")


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Pair every ``...lora_B...`` key with its ``...lora_A...`` key."""
    pairs = []
    for name in sorted(names):
        if "lora_B" in name:
            a_name = name.replace("lora_B", "lora_A")
            if a_name not in names:
                raise KeyError(f"adapter '{name}' has no matching lora_A")
            pairs.append((name, a_name))
    return pairs


def refactorize_all(state: Mapping[str, torch.Tensor]) -> Tensors:
    """Refactorize every (B, A) pair of ``state``; adapters of one shape share one batched call."""
    new = dict(state)
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for b_name, a_name in lora_pairs(list(state)):
        groups.setdefault((tuple(state[b_name].shape), tuple(state[a_name].shape)), []).append((b_name, a_name))
    for members in groups.values():
        bs = torch.stack([state[b] for b, _ in members])
        as_ = torch.stack([state[a] for _, a in members])
        b_new, a_new = refactorize(bs, as_)
        for i, (b_name, a_name) in enumerate(members):
            new[b_name], new[a_name] = b_new[i].contiguous(), a_new[i].contiguous()
    return new
