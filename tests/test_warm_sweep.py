"""Warm sweep cells (cell hosts that keep Ray, the workers and their models from cell to cell),
the shared evaluation cache, and sweeps on a Ray cluster: each against cells run the cold way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedortho.sweep import EVAL_CACHE, ColdCells, load_sweep

SEEDS = (0, 1, 2, 3)


def sweep_file(folder: Path, model_dir: str, out: Path) -> Path:
    path = folder / "cells.toml"
    path.write_text(f"""[sweep]
name = "cells"
out = "{out}"
[base]
model = "{model_dir}"
clients = 2
clients-per-round = 2
rounds = 2
local-steps = 1
batch-size = 16
max-train-examples = 240
max-test-examples = 32
num-threads = 1
[grid]
seed = {list(SEEDS)}
""")
    return path


def sweep(path: Path, *options: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "sweep", str(path), *options],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def outcome(run: Path) -> dict:
    """Everything a run computed, without its timings."""
    def rows(name):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in (run / name).read_text().splitlines()]

    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if "seconds" not in k}
    return {"metrics": rows("metrics.jsonl"), "privacy": rows("privacy.jsonl"), "summary": summary,
            "adapter": (run / "adapter" / "adapter_model.safetensors").read_bytes()}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, tiny_model_dir):
    """The four cells, run by this machine's default sweep: one warm cell host."""
    folder = tmp_path_factory.mktemp("warm")
    path = sweep_file(folder, tiny_model_dir, folder / "results")
    sweep(path)
    return path, load_sweep(path)


def test_a_warm_cell_is_bit_identical_to_a_cold_one(local_sweep, tmp_path):
    """The third cell ran in a host that had run two cells before it (its workers, models,
    noise plans and round-0 evaluation reused); a fresh process, with no evaluation cache,
    computes the same run to the bit."""
    _, spec = local_sweep
    cells = spec.cells()
    logs = [(spec.out / cell.name / "log.txt").read_text() for cell in cells]
    assert all("workers on Ray node" in log for log in logs)  # every cell ran in a cell host
    cell = cells[2]
    folder = tmp_path / cell.name
    folder.mkdir()
    ColdCells()(cell, folder)  # no sweep folder: no evaluation cache either
    warm, cold = outcome(spec.out / cell.name / "run"), outcome(folder / "run")
    assert warm["metrics"] == cold["metrics"] and warm["privacy"] == cold["privacy"]
    assert warm["summary"] == cold["summary"] and warm["adapter"] == cold["adapter"]
    assert [r["round"] for r in warm["metrics"]] == [0, 1, 2] and warm["summary"]["completed"] is True
    # the seeds drew different models: the cells did not share their training, only the untrained evaluations
    assert len({outcome(spec.out / c.name / "run")["adapter"] for c in cells}) == len(SEEDS)
    assert len(list((spec.out / EVAL_CACHE).glob("*.json"))) == 2  # round 0 and the zero-shot head, for all seeds


def test_a_sweep_on_a_two_node_ray_cluster_spreads_its_cells_and_matches_the_local_run(local_sweep, tmp_path):
    """``--ray-address`` with ``--parallel 2``: two cell hosts share a cluster of two Ray nodes
    with one CPU each, so each host's worker runs on its own node; the four cells are those of
    the local run. The cluster is the test's and it stops it."""
    from ray.cluster_utils import Cluster

    path, spec = local_sweep
    text = path.read_text().replace(str(spec.out), str(tmp_path / "results"))
    on_cluster = tmp_path / "cells.toml"
    on_cluster.write_text(text)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        assert len(nodes) == 2
        proc = sweep(on_cluster, "--ray-address", cluster.address, "--parallel", "2")
        assert "4 ran, 0 failed" in proc.stdout
        alive = [n for n in cluster.list_all_nodes() if n.remaining_processes_alive()]
        assert len(alive) == 2  # the sweep used the cluster and left it running
    finally:
        cluster.shutdown()
    used = set()
    for cell in spec.cells():
        log = (tmp_path / "results" / cell.name / "log.txt").read_text()
        found = re.findall(r"1 workers on Ray node (\w+)", log)
        assert len(found) == 1, log
        used.update(found)
        assert outcome(tmp_path / "results" / cell.name / "run") == outcome(spec.out / cell.name / "run")
    assert used == nodes  # the cells' clients ran on both machines of the cluster


def tiny_lora_model(tiny_model_dir):
    from fedortho.config import RunConfig
    from fedortho.worker import build_model

    return build_model(RunConfig(model=tiny_model_dir, max_train_examples=240, max_test_examples=32))


def test_the_evaluation_cache_returns_what_the_evaluation_computes_and_keys_what_it_depends_on(
        tiny_model_dir, tmp_path, monkeypatch):
    from fedortho.evalcache import CACHE_ENV, cached_evaluate, evaluation_key
    from fedortho.lora import adapter_state, load_adapter_state
    from fedortho.train import evaluate

    torch.manual_seed(0)
    model = tiny_lora_model(tiny_model_dir)
    test = TensorDataset(torch.randint(1, 500, (40, 12)), torch.ones(40, 12, dtype=torch.long),
                         torch.randint(0, 2, (40,)))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    fresh = evaluate(model, test, precision="float32")
    assert cached_evaluate(model, test, "float32") == fresh  # stored
    assert cached_evaluate(model, test, "float32") == fresh  # read back
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    key = evaluation_key(model, test, "float32")

    state = adapter_state(model)
    a_names = [k for k in state if "lora_A" in k]
    b_names = [k for k in state if "lora_B" in k]
    assert a_names and b_names and all(not torch.any(state[k]) for k in b_names)  # B = 0 at the start
    other_a = {k: torch.randn_like(state[k]) for k in a_names}
    load_adapter_state(model, {**state, **other_a})
    assert evaluation_key(model, test, "float32") == key  # B = 0: A adds nothing, the key ignores it
    assert evaluate(model, test, precision="float32") == fresh  # and so does the evaluation, exactly
    load_adapter_state(model, {**state, **other_a, b_names[0]: torch.full_like(state[b_names[0]], 0.01)})
    assert evaluation_key(model, test, "float32") != key  # a non-zero product changes the model
    load_adapter_state(model, state)
    head = next(k for k in state if "lora_" not in k)
    load_adapter_state(model, {**state, head: state[head] + 1})
    assert evaluation_key(model, test, "float32") != key
    load_adapter_state(model, state)
    assert evaluation_key(model, test, "bfloat16") != key
    shorter = TensorDataset(*(t[:39] for t in test.tensors))
    assert evaluation_key(model, shorter, "float32") != key
