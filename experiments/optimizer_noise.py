"""Why the optimizers rank differently with and without DP (`fedortho.update_noise`).

The setting of `optimizers-regime.toml` (FedSVD in the regime, LoRA B matrices only, frozen
zero-shot head, clip 2, batch 16, 20 steps a round, each optimizer at its rate from the
grid): at the model's starting point, or at a trained adapter (--adapter), per-sample
gradients of client 0's examples are clipped, and each optimizer runs over the same sampled
rounds with and without epsilon 6's noise (multiplier 0.483). Writes a table to
results/optimizer-noise/<point>.md and prints it.

    .venv/bin/python experiments/optimizer_noise.py [--adapter DIR] [--draws 256]
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).parent
RATES = {"sgd": 0.5, "adamw": 0.01, "auon": 0.05, "muon": 0.02, "normuon": 0.02, "root": 0.02}
NOISE_MULTIPLIER = 0.4833984375  # epsilon 6 at this setting (every private cell's plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", help="a run's adapter folder (default: the starting point)")
    parser.add_argument("--draws", type=int, default=256, help="rounds sampled per optimizer (even)")
    parser.add_argument("--examples", type=int, default=1024, help="client 0's examples in the gradient pool")
    parser.add_argument("--name", help="the point's name in the title and file name (default: start or trained)")
    parser.add_argument("--out", default=str(HERE / "results" / "optimizer-noise"))
    args = parser.parse_args()

    import torch

    from fedortho import data, rules, worker
    from fedortho.config import RunConfig
    from fedortho.lora import adapter_state, load_adapter_state
    from fedortho.update_noise import (NoiseSetting, clipped_per_sample_gradients, compare_optimizers,
                                       per_sample_norms, top_direction_share)

    sweep = tomllib.loads((HERE / "optimizers-regime.toml").read_text())
    cfg = RunConfig.from_mapping({**sweep["base"], "seed": 0, "epsilon": 6.0})
    model = worker.build_model(cfg)
    if args.adapter:
        from safetensors.torch import load_file

        load_adapter_state(model, load_file(str(Path(args.adapter) / "adapter_model.safetensors")))
    names = rules.trainable_names(adapter_state(model), cfg.strategy, cfg.train_head)
    dataset = data.client_dataset(cfg, 0, cfg.clients)
    subset = torch.utils.data.TensorDataset(*(t[:args.examples] for t in dataset.tensors))
    started = time.time()
    torch.manual_seed(0)  # the LoRA dropout of the per-sample gradients
    pool = clipped_per_sample_gradients(model, subset, names, cfg.clip)
    norms = per_sample_norms(pool)
    mean_norm = float(torch.sqrt(sum(g.double().mean(dim=0).pow(2).sum() for g in pool.values())))
    size = sum(g[0].numel() for g in pool.values())
    def setting(multiplier: float) -> NoiseSetting:  # batches and noise as Opacus makes them for client 0
        return NoiseSetting.as_opacus(multiplier, cfg.clip, cfg.batch_size, cfg.local_steps, args.draws, len(dataset))

    divisor = setting(NOISE_MULTIPLIER).divisor
    std = NOISE_MULTIPLIER * cfg.clip / divisor
    point = args.name or ("trained" if args.adapter else "start")
    lines = [f"# Optimizer updates under DP noise, point: {point}", "",
             f"{len(subset)} examples of client 0, {len(names)} LoRA B matrices ({size} numbers); "
             f"clipped per-sample norm: median {float(norms.median()):.2f} (clip {cfg.clip:g}); "
             f"norm of the mean clipped gradient {mean_norm:.3f}; noise per step at epsilon 6: "
             f"norm {std * size ** 0.5:.2f} (std {std:.4f} x sqrt({size}); Opacus divides by {divisor}, its "
             f"expected batch for {len(dataset)} examples); top singular direction's "
             f"share of the mean gradient's energy, mean over matrices: {top_direction_share(pool):.2f}.", ""]
    header = ("| optimizer | noise | round SNR | rounds for SGD's signal | mean vs clean | mean vs gradient "
              "| clean vs gradient |")
    lines += [header, "|---|---|---|---|---|---|---|"]
    for multiplier in (0.0, NOISE_MULTIPLIER):
        results = compare_optimizers(pool, RATES, setting(multiplier), seed=0)
        for name, r in results.items():
            # averaging k updates multiplies the SNR by sqrt(k): k rounds match one of SGD's
            rounds = (results["sgd"]["round-snr"] / r["round-snr"]) ** 2 if r["round-snr"] > 0 else float("inf")
            lines.append(f"| {name} | {'eps 6' if multiplier else 'none'} | {r['round-snr']:.3f} ± {r['round-snr-se']:.3f} | {rounds:.1f} | "
                         f"{r['mean-vs-clean']:.2f} | {r['mean-vs-gradient']:.2f} | {r['clean-vs-gradient']:.2f} |")
    lines += ["", f"({args.draws} sampled rounds of {cfg.local_steps} steps at batch {cfg.batch_size}; "
              f"{time.time() - started:.0f} s.)"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{point}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
