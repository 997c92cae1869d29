"""Seconds per private (DP-SGD) client step, train-precision float32 against bfloat16, side by side.

The embedded default model (all-MiniLM-L6-v2), max-length 48, the default LoRA (r 8 on
query and value), the default private run (epsilon 6, clip 2, SGD). Two client rounds: the
default run's (trained head, batch 32, 3 steps) and the regime's (frozen zero-shot head,
batch 16, 20 steps, LoRA dropout 0.05). Each repetition times one ``train.train_client``
round of Opacus steps (Poisson batches; the round's set-up included, the noise plan made
beforehand; seconds per step are the round's divided by its steps) per setting and precision, with the
same seed for both precisions (same batches, same noise), alternating which goes first;
the table has medians over repetitions and the speed-up float32 / bfloat16, and the same
ratio of the fastest rounds (less sensitive to other work on the machine).

The error column: per-sample gradient norms (over all trainable tensors) under bfloat16
against float32 on one fixed batch of the setting's size, through the same forward and
backward code (``train.forward_backward`` inside ``train.float32_adapters``) with
Opacus' per-sample hooks, dropout off (in training the two would draw different masks):
median and largest relative error over the batch.

    python benchmarks/bench_precision.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from fedortho import data
from fedortho.config import RunConfig
from fedortho.lora import adapter_state, load_adapter_state, set_trainable
from fedortho.privacy import NoisePlanner
from fedortho.rules import trainable_names
from fedortho.train import float32_adapters, forward_backward, train_client
from fedortho.worker import build_model

SETTINGS = {  # a client round of the default run, and of the regime (experiments/precision.toml)
    "default run: trained head, batch 32, 3 steps": {"local_steps": 3},
    "regime: frozen zero-shot head, batch 16, 20 steps": {"train_head": False, "head_init": "zero-shot",
                                                           "batch_size": 16, "local_steps": 20,
                                                           "lora_dropout": 0.05},
}
PRECISIONS = ("float32", "bfloat16")


class Setting:
    """A model, a client's data and what trains, for one row of the table."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.model = build_model(cfg)
        self.dataset = data.client_dataset(cfg, 0, cfg.clients)
        self.start = adapter_state(self.model)
        self.names = trainable_names(self.start, cfg.strategy, cfg.train_head)

    def round_seconds(self, precision: str, seed: int, planner: NoisePlanner) -> float:
        load_adapter_state(self.model, self.start)
        begin = time.perf_counter()
        train_client(self.model, self.dataset, self.cfg.replace(train_precision=precision), self.names, None, seed,
                     planner=planner)
        return time.perf_counter() - begin

    def per_sample_norms(self, precision: str) -> torch.Tensor:
        """(batch,) norms of the per-sample gradients of one fixed batch, in float64."""
        from opacus import GradSampleModule

        load_adapter_state(self.model, self.start)
        params = set_trainable(self.model, self.names)
        batch = [t[:self.cfg.batch_size] for t in self.dataset.tensors]
        # No dropout (BERT's attention dropout follows its module's mode), so that both
        # precisions see the same network; Opacus' hooks capture only in training mode.
        self.model.eval()
        for module in self.model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                module.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' notes on frozen modules and full backward hooks
            wrapped = GradSampleModule(self.model)
        try:
            with float32_adapters(self.model):
                forward_backward(wrapped, batch, torch.device("cpu"), precision)
            squares = [p.grad_sample.reshape(len(batch[0]), -1).double().pow(2).sum(dim=1) for p in params]
        finally:
            wrapped._close()
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            self.model.eval()
        return torch.stack(squares).sum(dim=0).sqrt()


def time_side_by_side(setting: Setting, repeats: int, planner: NoisePlanner) -> dict[str, list[float]]:
    """Seconds per round for each precision; one untimed round each first (warm-up, the plan)."""
    for precision in PRECISIONS:
        setting.round_seconds(precision, seed=0, planner=planner)
    times: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    for rep in range(repeats):
        order = PRECISIONS if rep % 2 == 0 else PRECISIONS[::-1]  # neither always runs first
        for precision in order:
            times[precision].append(setting.round_seconds(precision, seed=rep + 1, planner=planner))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per setting and precision")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: a simulation worker's, at --client-cpus 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus' notes on secure RNG, transformers' deprecations
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; median of "
          f"{args.repeats} interleaved train_client rounds (set-up included)\n")
    print("| client round | float32 s/round | bfloat16 s/round | float32 s/step | bfloat16 s/step "
          "| speed-up (fp32 / bf16) | fastest rounds' speed-up | norm rel. error median | max |")
    print("|---|---|---|---|---|---|---|---|---|")
    planner = NoisePlanner()
    for label, changes in SETTINGS.items():
        setting = Setting(RunConfig(**changes))
        times = time_side_by_side(setting, args.repeats, planner)
        full, mixed = (statistics.median(times[p]) for p in PRECISIONS)
        steps = setting.cfg.local_steps
        reference, low = setting.per_sample_norms("float32"), setting.per_sample_norms("bfloat16")
        error = ((low - reference).abs() / reference).numpy()
        fastest = min(times["float32"]) / min(times["bfloat16"])
        print(f"| {label} | {full:.2f} | {mixed:.2f} | {full / steps:.3f} | {mixed / steps:.3f} | {full / mixed:.2f}x "
              f"| {fastest:.2f}x | "
              f"{statistics.median(error):.1e} | {error.max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
