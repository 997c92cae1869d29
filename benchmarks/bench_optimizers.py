"""Per-step time of the client optimizers on CPU, side by side in one run.

Parameter sets: the embedded default's LoRA B matrices (12 of 384x8, plus the 2x384 head and
its bias in the AdamW group) and RoBERTa-large's (48 of 1024x8). Baseline:
``torch.optim.AdamW(foreach=True)``. Each orthogonal optimizer runs batched (one call per
shape) and as a per-parameter loop; Muon, NorMuon and ROOT also with ``orthogonalize =
exact``. Prints a table of milliseconds per step and ratios, then the orthogonalization
alone: Newton-Schulz (Muon's and ROOT's coefficients) against the exact polar factor, in
time per stack and in distance from orthogonal (the singular values' largest distance from
1), on Gaussian stacks and on stacks whose singular values spread over two decades.

    python benchmarks/bench_optimizers.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fedortho.optim.optimizers import ROOT, AuON, HybridAuON, Muon, NorMuon
from fedortho.optim.orthogonal import NS_COEFFS, exact_polar, newton_schulz, root_coefficients

SETS = {
    "MiniLM (12 x 384x8 + head)": ([(384, 8)] * 12, [(2, 384), (2,)]),
    "RoBERTa-large (48 x 1024x8)": ([(1024, 8)] * 48, []),
}


def make_params(shapes):
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.01) for s in shapes]


def prepare(build, matrices, others):
    mats, rest = make_params(matrices), make_params(others)
    opt = build(mats, rest)
    g = torch.Generator().manual_seed(1)
    for p in mats + rest:
        p.grad = torch.randn(p.shape, generator=g)
    for _ in range(5):  # warm up (state allocation)
        opt.step()
    return opt


def time_all(optimizers: dict, steps: int, repeats: int) -> dict[str, float]:
    """Best time per step of each optimizer; the runs are interleaved so that drifts in the
    machine's speed touch all of them alike."""
    best = {name: float("inf") for name in optimizers}
    for _ in range(repeats):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
    return best


def orthogonal(cls, batched, orthogonalize="newton-schulz"):
    def build(mats, rest):
        groups = [{"params": mats, "orthogonal": True}] + ([{"params": rest, "orthogonal": False}] if rest else [])
        return cls(groups, batched=batched, orthogonalize=orthogonalize)
    return build


def stacks(shape, count):
    """(Gaussian, spread) stacks of ``count`` matrices of ``shape``: the second with singular
    values log-uniform over two decades."""
    g = torch.Generator().manual_seed(2)
    m, n = shape
    gaussian = torch.randn(count, m, n, generator=g)
    left = torch.linalg.qr(torch.randn(count, m, min(m, n), generator=g))[0]
    right = torch.linalg.qr(torch.randn(count, n, min(m, n), generator=g))[0]
    values = 10.0 ** (-2.0 * torch.rand(count, min(m, n), generator=g))
    return gaussian, (left * values.unsqueeze(-2)) @ right.transpose(-1, -2)


def orthogonalization_table(steps: int, repeats: int) -> None:
    print("\nOrthogonalization alone, one stack per shape (max |singular value - 1| over the stack)")
    print(f"{'stack':<16} {'method':<26} {'ms/call':>9} {'vs NS':>7} {'Gaussian':>9} {'spread':>9}")
    for shape, count in (((384, 8), 12), ((1024, 8), 48)):
        gaussian, spread = stacks(shape, count)
        methods = {"Newton-Schulz (Muon's)": lambda u: newton_schulz(u),
                   "Newton-Schulz (ROOT's)": lambda u: newton_schulz(u, coeffs=root_coefficients(*shape)),
                   "exact polar factor": exact_polar}
        times = time_all({name: _Caller(f, gaussian) for name, f in methods.items()}, steps, repeats)
        for name, f in methods.items():
            errors = [float((torch.linalg.svdvals(f(u).double()) - 1).abs().max()) for u in (gaussian, spread)]
            print(f"{count} x {shape[0]}x{shape[1]:<7} {name:<26} {times[name] * 1e3:>9.3f} "
                  f"{times[name] / times['Newton-Schulz (Muon' + chr(39) + 's)']:>6.2f}x {errors[0]:>9.2e} {errors[1]:>9.2e}")
    assert root_coefficients(8, 384) != NS_COEFFS


class _Caller:
    """An object with ``step()``, so that ``time_all`` times a function call."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def step(self):
        self.function(self.argument)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"best of {args.repeats} interleaved runs of {args.steps} steps; ratio = time / AdamW(foreach) time")
    builders = {
        "AdamW (foreach)": lambda m, r: torch.optim.AdamW(m + r, lr=1e-3, foreach=True),
        "SGD": lambda m, r: torch.optim.SGD(m + r, lr=0.5),
    }
    for name, cls in [("AuON", AuON), ("Hybrid-AuON", HybridAuON), ("Muon", Muon), ("NorMuon", NorMuon),
                      ("ROOT", ROOT)]:
        builders[name] = orthogonal(cls, True)
        builders[f"{name} per-param loop"] = orthogonal(cls, False)
    for name, cls in [("Muon", Muon), ("NorMuon", NorMuon), ("ROOT", ROOT)]:
        builders[f"{name} exact"] = orthogonal(cls, True, "exact")
    for set_name, (matrices, others) in SETS.items():
        optimizers = {name: prepare(b, matrices, others) for name, b in builders.items()}
        times = time_all(optimizers, args.steps, args.repeats)
        base = times["AdamW (foreach)"]
        print(f"\n{set_name}")
        print(f"{'optimizer':<26} {'ms/step':>9} {'vs AdamW':>9} {'loop/batched':>13}")
        for name, t in times.items():
            loop = times.get(f"{name} per-param loop")
            print(f"{name:<26} {t * 1e3:>9.3f} {t / base:>8.2f}x {(f'{loop / t:.1f}x' if loop else ''):>13}")
    orthogonalization_table(args.steps, args.repeats)


if __name__ == "__main__":
    main()
