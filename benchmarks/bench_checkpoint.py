"""What the per-round checkpoint costs: write time per round, size on disk, and the time a
resume spends verifying it, for the default model and a tiny one with large populations.

A client's state has the shapes a real one has (``--optimizer auon --optimizer-state keep``:
momentum for every trained tensor, the A it is expressed in, the accountant history); the
checkpoint is written as ``run_federation`` writes it: the cohort's states, the adapter and
the index. Prints a table.

    python benchmarks/bench_checkpoint.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from fedortho import protocol
from fedortho.checkpoint import ClientStates, checkpoint_folder, load_checkpoint, save_checkpoint
from fedortho.config import RunConfig
from fedortho.lora import adapter_state
from fedortho.rules import trainable_names
from fedortho.models import save_tiny_bert
from fedortho.privacy import NoisePlan, PrivacyState
from fedortho.worker import build_model

COHORT = 10
ROUNDS = 5


def client_state(adapter: dict[str, torch.Tensor], cfg: RunConfig, keep: bool) -> dict:
    trained = trainable_names(adapter, cfg.strategy, cfg.train_head)
    held = protocol.held_names(adapter, cfg.strategy, cfg.train_head)
    state = {
        "privacy": {"config": {"state": json.dumps(PrivacyState(6.0, 1e-5, 2.0, [(1.2, 0.02, 6)],
                                                                 NoisePlan(1.2, 0.02, 24)).state_dict())}},
        "participation": {"config": {"rounds": 3}},
    }
    if keep:
        state["optimizer-tensors"] = {"arrays": {f"{k}.momentum": torch.randn_like(adapter[k]) for k in trained}}
        state["optimizer-scalars"] = {"config": {"step": 6}}
        state["optimizer-basis"] = {"arrays": {k: adapter[k].clone() for k in held}}
    return state


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(name: str, cfg: RunConfig, clients: int, keep: bool) -> tuple:
    adapter = adapter_state(build_model(cfg))
    state = client_state(adapter, cfg, keep)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        states = ClientStates(checkpoint_folder(run) / "clients")
        for p in range(clients):  # every client has trained once: the largest checkpoint
            states.put(p, state)
        save_checkpoint(run, 0, cfg.to_dict(hyphenated=True), adapter, {"rng": 0}, states, {})
        times = []
        for r in range(1, ROUNDS + 1):
            for p in range(COHORT):
                states.put((r * COHORT + p) % clients, state)
            start = time.perf_counter()
            save_checkpoint(run, r, cfg.to_dict(hyphenated=True), adapter, {"rng": r}, states, {})
            times.append(time.perf_counter() - start)
        size = folder_bytes(checkpoint_folder(run))
        start = time.perf_counter()
        load_checkpoint(run)  # what --resume verifies before Ray starts
        verify = time.perf_counter() - start
    per_client = sum(v.numel() * v.element_size() for rec in state.values() for v in rec.get("arrays", {}).values())
    return name, clients, "keep" if keep else "reset", per_client, 1000 * sorted(times)[len(times) // 2], size, verify


def main() -> None:
    torch.manual_seed(0)
    tiny = save_tiny_bert(Path(tempfile.mkdtemp()) / "tiny")
    default = RunConfig()
    small = RunConfig(model=str(tiny), max_train_examples=240)
    rows = [measure("MiniLM (default)", default, 10, False), measure("MiniLM (default)", default, 10, True),
            measure("tiny BERT", small, 1_000, True), measure("tiny BERT", small, 10_000, True)]
    print(f"{os.cpu_count()} cores; a round writes {COHORT} clients' states, the adapter and the index "
          f"(median of {ROUNDS} rounds); every client has a state on disk")
    print(f"{'model':<18} {'clients':>8} {'optimizer state':>15} {'tensors/client':>15} {'write/round':>12} "
          f"{'checkpoint size':>16} {'resume verify':>14}")
    for name, clients, keep, per_client, write_ms, size, verify in rows:
        print(f"{name:<18} {clients:>8,} {keep:>15} {per_client / 1024:>12.1f} KB {write_ms:>9.1f} ms "
              f"{size / 2**20:>13.1f} MB {verify:>12.2f} s")


if __name__ == "__main__":
    main()
