"""FedSVD refactorization: thin QR + small-core SVD vs the full SVD of each (out, in) product.

Shapes of the FedSVD paper's setting: RoBERTa-large, LoRA r=8 on query and value of 24 layers,
48 adapters of B (1024, 8) and A (8, 1024). Both ways run in this one process, float32 and
float64, per adapter call and (for the thin way) batched over all 48 adapters. Prints a table.

    python benchmarks/bench_refactorize.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fedortho.fedsvd import refactorize, refactorize_full_svd

ADAPTERS, OUT, IN, RANK = 48, 1024, 1024, 8


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{ADAPTERS} adapters B ({OUT}x{RANK}) A ({RANK}x{IN}); best of {args.repeats}")
    rows = []
    for dtype in (torch.float32, torch.float64):
        bs = torch.randn(ADAPTERS, OUT, RANK, dtype=dtype)
        as_ = torch.randn(ADAPTERS, RANK, IN, dtype=dtype)
        full = best_of(lambda: [refactorize_full_svd(bs[i], as_[i]) for i in range(ADAPTERS)], args.repeats)
        thin = best_of(lambda: [refactorize(bs[i], as_[i]) for i in range(ADAPTERS)], args.repeats)
        batched = best_of(lambda: refactorize(bs, as_), args.repeats)
        b1, a1 = refactorize(bs[0], as_[0])
        b2, a2 = refactorize_full_svd(bs[0], as_[0])
        err = float((b1 @ a1 - b2 @ a2).norm() / (b2 @ a2).norm())
        rows.append((str(dtype).replace("torch.", ""), full / ADAPTERS, thin / ADAPTERS, batched / ADAPTERS, err))
    print(f"{'dtype':<8} {'full SVD/adapter':>17} {'thin/adapter':>13} {'thin batched/adapter':>21} "
          f"{'speedup':>9} {'batched speedup':>16} {'rel. product diff':>18}")
    for name, full, thin, batched, err in rows:
        print(f"{name:<8} {full * 1e3:>14.2f} ms {thin * 1e3:>10.3f} ms {batched * 1e3:>18.3f} ms "
              f"{full / thin:>8.0f}x {full / batched:>15.0f}x {err:>18.1e}")


if __name__ == "__main__":
    main()
