"""Per-step time of the client optimizers on CPU, side by side in one run.

Parameter sets: the embedded default's LoRA B matrices (12 of 384x8, plus the 2x384 head and
its bias in the AdamW group) and RoBERTa-large's (48 of 1024x8). Baseline:
``torch.optim.AdamW(foreach=True)``. Each orthogonal optimizer runs batched (one call per
shape) and as a per-parameter loop. Prints a table of milliseconds per step and ratios.

    python benchmarks/bench_optimizers.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fedortho.optim.optimizers import AuON, HybridAuON, Muon, NorMuon

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


def orthogonal(cls, batched):
    def build(mats, rest):
        groups = [{"params": mats, "orthogonal": True}] + ([{"params": rest, "orthogonal": False}] if rest else [])
        return cls(groups, batched=batched)
    return build


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
    for name, cls in [("AuON", AuON), ("Hybrid-AuON", HybridAuON), ("Muon", Muon), ("NorMuon", NorMuon)]:
        builders[name] = orthogonal(cls, True)
        builders[f"{name} per-param loop"] = orthogonal(cls, False)
    for set_name, (matrices, others) in SETS.items():
        optimizers = {name: prepare(b, matrices, others) for name, b in builders.items()}
        times = time_all(optimizers, args.steps, args.repeats)
        base = times["AdamW (foreach)"]
        print(f"\n{set_name}")
        print(f"{'optimizer':<26} {'ms/step':>9} {'vs AdamW':>9} {'loop/batched':>13}")
        for name, t in times.items():
            loop = times.get(f"{name} per-param loop")
            print(f"{name:<26} {t * 1e3:>9.3f} {t / base:>8.2f}x {(f'{loop / t:.1f}x' if loop else ''):>13}")


if __name__ == "__main__":
    main()
