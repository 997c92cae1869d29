"""Evaluations of untrained models, shared by the cells of a sweep.

Every cell evaluates its model before any round (round 0) and, unless its head is the
zero-shot head, the zero-shot head's model too. With LoRA's B = 0 these models do not depend
on the cell's seed or training settings, so the cells of a sweep evaluate the same model
again and again. Here an evaluation is stored under a key of everything it depends on: the
model's tensors, the test set, the precision and batch size, torch's version, threads and
the CPU's instruction set (bfloat16 rounding follows the CPU). A LoRA layer one of whose
factors is all zero adds exactly nothing, so its factors are left out of the key: that is
what makes seeds that draw different A share the evaluation. A cached result is the result
the same evaluation gives on this machine, bit for bit.

The cache is on only where ``FEDORTHO_EVAL_CACHE`` names a folder (``fedortho sweep`` sets it
to ``<sweep folder>/.eval-cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from fedortho.runs import write_json_atomic
from fedortho.train import evaluate

CACHE_ENV = "FEDORTHO_EVAL_CACHE"
FACTORS = ("lora_A", "lora_B", "lora_R")  # a LoRA layer adds the product of these (PEFT's names, Fed-SB's R)
EVAL_BATCH = 256


def cached_evaluate(model: torch.nn.Module, dataset: TensorDataset, precision: str) -> tuple[float, float]:
    """``train.evaluate(model, dataset, precision=precision)``, read from the cache when it
    holds this evaluation and stored there when not (no cache: plain evaluation)."""
    folder = os.environ.get(CACHE_ENV, "")
    if not folder:
        return evaluate(model, dataset, EVAL_BATCH, precision)
    path = Path(folder) / f"{evaluation_key(model, dataset, precision)}.json"
    try:
        stored = json.loads(path.read_text())
        return float(stored["accuracy"]), float(stored["loss"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: evaluate
    accuracy, loss = evaluate(model, dataset, EVAL_BATCH, precision)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"accuracy": accuracy, "loss": loss})
    except OSError:
        pass  # a cache that cannot be written costs time, not results
    return accuracy, loss


def evaluation_key(model: torch.nn.Module, dataset: TensorDataset, precision: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([torch.__version__, torch.get_num_threads(), _cpu(), precision, EVAL_BATCH,
                              type(model).__name__]).encode())
    state = model.state_dict()
    silent = _silent_factors(state)
    for name in sorted(state):
        if name in silent:
            continue
        digest.update(name.encode())
        _update(digest, state[name])
    for tensor in dataset.tensors:
        _update(digest, tensor)
    return digest.hexdigest()


def _silent_factors(state: dict[str, torch.Tensor]) -> set[str]:
    """Names of the LoRA factors of layers whose product has an all-zero factor."""
    layers: dict[str, list[str]] = {}
    for name in state:
        for factor in FACTORS:
            if f".{factor}." in name:
                layers.setdefault(name.split(f".{factor}.")[0], []).append(name)
    silent = set()
    for names in layers.values():
        if any(not torch.any(state[name]) for name in names):
            silent.update(names)
    return silent


def _update(digest, tensor: torch.Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy())


@lru_cache(maxsize=1)
def _cpu() -> str:
    """The CPU's model and the instruction sets torch's kernels choose between."""
    name, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split()
                                        if f.startswith(("avx", "amx", "fma", "sse4"))))
                break
    except OSError:
        pass
    return f"{name} {torch.backends.cpu.get_cpu_capability()} {flags}"
