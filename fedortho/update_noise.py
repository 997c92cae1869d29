"""What DP noise does to each optimizer's round update: the same batches with and without noise.

A client round under DP-SGD feeds its optimizer ``g_t + n_t``: the mean of the batch's
clipped per-sample gradients plus Gaussian noise of std ``sigma * clip / batch`` per
coordinate. The optimizers differ only in what they make of that stream, so the question
"why do they rank differently under DP" becomes: how much of each optimizer's round update
is signal, and is its mean still the update it makes without noise?

The analysis holds the model at one point (the gradients do not move with the parameters
within the round), samples ``draws`` rounds of ``steps`` batches from a pool of clipped
per-sample gradients, and runs each optimizer over each round twice, with and without the
noise (same batches). Per optimizer, over the draws:

- ``round-snr``: the norm of the mean noisy update over the std of one (the mean's norm from
  two independent halves of the draws, so that the noise does not inflate it). Averaging k
  such updates (clients, rounds) raises it by sqrt(k). ``round-snr-se``: its standard error.
- ``mean-vs-clean``: cosine of the mean noisy update with the mean clean one. Near 1: noise
  only adds variance; well below 1: the noise also changes where the optimizer goes on
  average.
- ``mean-vs-gradient``, ``clean-vs-gradient``: cosines of the mean noisy and the mean clean
  update with the descent direction, minus the pool's mean clipped gradient (SGD's update
  without noise).

Means are expected updates, estimated from the draws without the bias that noise gives the
norm of a sample mean (``_expected_cosine``).
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fedortho.diagnostics import squared_norms
from fedortho.optim import build_optimizer

Tensors = dict[str, torch.Tensor]


def clipped_per_sample_gradients(model: torch.nn.Module, dataset, names: Sequence[str], clip: float,
                                 batch_size: int = 32) -> Tensors:
    """Per-sample gradients of the ``names`` tensors over ``dataset``, each (n, *shape), clipped
    as Opacus clips them: the whole per-sample gradient scaled to norm at most ``clip``.
    Computed in training mode (dropout as in training); the model's mode and which of its
    tensors require gradients are restored afterwards."""
    from opacus import GradSampleModule
    from torch.utils.data import DataLoader

    from fedortho.lora import set_trainable
    from fedortho.train import _forward_loss

    was_training = model.training
    required = [(p, p.requires_grad) for p in model.parameters()]
    device = next(model.parameters()).device
    params = set_trainable(model, list(names))
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' notes on frozen modules and full backward hooks
        wrapped = GradSampleModule(model)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    try:
        for batch in DataLoader(dataset, batch_size=batch_size):
            for p in params:
                p.grad, p.grad_sample = None, None
            _forward_loss(wrapped, batch, device).backward()
            for name, p in zip(names, params):
                chunks[name].append(p.grad_sample.detach().cpu().clone())
    finally:
        wrapped._close()
        for p, flag in required:
            p.grad = None
            p.requires_grad_(flag)
        model.train(was_training)
    grads = {name: torch.cat(parts) for name, parts in chunks.items()}
    factor = (clip / (per_sample_norms(grads) + 1e-6)).clamp(max=1.0)  # Opacus' per-sample clip factor
    return {name: g * factor.to(g.dtype).view(-1, *([1] * (g.ndim - 1))) for name, g in grads.items()}


def per_sample_norms(grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's whole gradient norm over all ``grads`` (name -> (n, *shape)), in float64."""
    lora, head = squared_norms(grads)
    return (lora + head).sqrt()


def round_update(optimizer: str, lr: float, steps: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """The change one fresh ``optimizer`` makes to zero-initialized tensors, fed ``steps``
    (one gradient per tensor name per step) as their gradients."""
    first = steps[0]
    params = {name: torch.zeros_like(g, dtype=torch.float32, requires_grad=True) for name, g in first.items()}
    opt = build_optimizer(optimizer, list(params.items()), lr)
    for grads in steps:
        for name, p in params.items():
            p.grad = grads[name].to(torch.float32).clone()
        opt.step()
    return {name: p.detach().clone() for name, p in params.items()}


def _flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].reshape(-1).double() for k in sorted(tensors)])


def _mean_norm(updates: torch.Tensor) -> float:
    """Norm of the expected update, estimated without the bias the noise gives ``||mean||``:
    the inner product of the means of two independent halves (clamped at 0)."""
    half = len(updates) // 2
    return math.sqrt(max(float(updates[:half].mean(dim=0) @ updates[half:2 * half].mean(dim=0)), 0.0))


def _expected_cosine(updates: torch.Tensor, other: torch.Tensor) -> float:
    """Cosine of the expected update with ``other``'s expected update, each a stack of
    sampled updates, row i of both from the same draw (they may be correlated, as a noisy
    and a clean round on the same batches are). Every inner product pairs one half of the
    draws with the other half, so that no draw's noise meets itself: the estimate is free of
    the bias that shrinks a plain cosine of two sample means towards 0 (or, for correlated
    stacks, lifts it)."""
    if len(updates) != len(other):
        raise ValueError(f"stacks of {len(updates)} and {len(other)} updates: expected one per draw in each")
    half = len(updates) // 2
    first, second = slice(0, half), slice(half, 2 * half)
    cross = 0.5 * float(updates[first].mean(dim=0) @ other[second].mean(dim=0)
                        + updates[second].mean(dim=0) @ other[first].mean(dim=0))
    denominator = _mean_norm(updates) * _mean_norm(other)
    return cross / denominator if denominator > 0 else float("nan")


SNR_GROUPS = 8


def _snr(updates: torch.Tensor) -> float:
    """Norm of the expected update over the std of one update (the root of the trace of
    their covariance)."""
    draws = len(updates)
    spread = math.sqrt(float((updates - updates.mean(dim=0)).pow(2).sum(dim=1).mean()) * draws / (draws - 1))
    return _mean_norm(updates) / spread if spread > 0 else math.inf


@dataclass(frozen=True)
class NoiseSetting:
    noise_multiplier: float
    clip: float
    batch_size: int
    steps: int  # optimizer steps in a round
    draws: int  # rounds sampled (even: the signal norm is taken from two halves)
    divisor: int = 0  # what the clipped sum and the noise are divided by (0: batch_size)

    @classmethod
    def as_opacus(cls, noise_multiplier: float, clip: float, batch_size: int, steps: int, draws: int,
                  num_examples: int) -> "NoiseSetting":
        """Opacus' Poisson loader divides by its expected batch size, int(n / len(loader)),
        which is below ``batch_size`` when the last batch is short (5,123 examples in
        batches of 16: 15); the batches drawn hold the expected count, rounded."""
        batches = math.ceil(num_examples / batch_size)
        return cls(noise_multiplier, clip, round(num_examples / batches), steps, draws,
                   int(num_examples / batches))


def sampled_rounds(pool: Mapping[str, torch.Tensor], setting: NoiseSetting, seed: int):
    """``draws`` rounds, each a (clean, noisy) pair of ``steps``-long gradient streams: batches'
    sums of the pool's clipped per-sample gradients over the divisor, and the same plus DP
    noise of std ``noise_multiplier * clip / divisor``."""
    gen = torch.Generator().manual_seed(seed)
    n = len(next(iter(pool.values())))
    divisor = setting.divisor or setting.batch_size
    std = setting.noise_multiplier * setting.clip / divisor
    for _ in range(setting.draws):
        clean, noisy = [], []
        for _ in range(setting.steps):
            pick = torch.randperm(n, generator=gen)[:setting.batch_size]
            mean = {name: g[pick].double().sum(dim=0) / divisor for name, g in pool.items()}
            clean.append(mean)
            noisy.append({name: m + std * torch.randn(m.shape, generator=gen, dtype=torch.float64)
                          for name, m in mean.items()})
        yield clean, noisy


def compare_optimizers(pool: Mapping[str, torch.Tensor], optimizers: Mapping[str, float], setting: NoiseSetting,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """The module's four measures per optimizer (name -> learning rate), every optimizer fed
    the same sampled rounds."""
    if setting.draws < 4 or setting.draws % 2:
        raise ValueError(f"draws must be even and at least 4, got {setting.draws}")
    # Every update moves against the gradient: compare with the descent direction.
    descent = -_flat({name: g.double().mean(dim=0) for name, g in pool.items()})
    clean: dict[str, list[torch.Tensor]] = {name: [] for name in optimizers}
    noisy: dict[str, list[torch.Tensor]] = {name: [] for name in optimizers}
    for clean_steps, noisy_steps in sampled_rounds(pool, setting, seed):
        for name, lr in optimizers.items():
            clean[name].append(_flat(round_update(name, lr, clean_steps)))
            noisy[name].append(_flat(round_update(name, lr, noisy_steps)))
    results = {}
    for name in optimizers:
        updates, clean_updates = torch.stack(noisy[name]), torch.stack(clean[name])
        groups = [_snr(part) for part in updates.chunk(SNR_GROUPS)] if setting.draws >= 4 * SNR_GROUPS else []
        # ``descent`` is one fixed vector: a stack of copies of it has no noise to remove
        fixed = descent.expand(setting.draws, -1)
        results[name] = {
            "round-snr": _snr(updates),
            # from the spread of the SNRs of SNR_GROUPS disjoint groups of draws (nan: too few)
            "round-snr-se": statistics.stdev(groups) / math.sqrt(len(groups)) if groups else math.nan,
            "mean-vs-clean": _expected_cosine(updates, clean_updates),
            "mean-vs-gradient": _expected_cosine(updates, fixed),
            "clean-vs-gradient": _expected_cosine(clean_updates, fixed),
        }
    return results


def top_direction_share(pool: Mapping[str, torch.Tensor]) -> float:
    """Mean over the LoRA matrices of the share of the mean clipped gradient's energy (squared
    Frobenius norm) in its top singular direction: 1 for a rank-1 signal, 1/r for a flat one."""
    shares = []
    for name, g in pool.items():
        if g.ndim == 3 and "lora_" in name:
            s = torch.linalg.svdvals(g.double().mean(dim=0))
            shares.append(float(s[0] ** 2 / s.pow(2).sum()))
    return sum(shares) / len(shares) if shares else float("nan")
