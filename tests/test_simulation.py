"""End to end: the CLI's Flower simulation on a tiny BERT and a dataset saved to a folder."""

import json
import math
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dataset_dir(tmp_path_factory):
    """A slice of the embedded data saved as a Hugging Face dataset: the hub loading path."""
    import datasets

    from fedortho import data
    from fedortho.config import RunConfig

    s = data.splits_for(RunConfig(max_train_examples=240, max_test_examples=80))
    folder = tmp_path_factory.mktemp("hf-data") / "reviews"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": list(s.train_texts), "label": s.train_labels.tolist()}),
        "test": datasets.Dataset.from_dict({"text": list(s.test_texts), "label": s.test_labels.tolist()}),
    }).save_to_disk(str(folder))
    return str(folder)


def simulate(out, model, dataset, *extra):
    cmd = [sys.executable, "-m", "fedortho.cli", "simulate", "--model", model, "--dataset", dataset,
           "--clients", "3", "--clients-per-round", "3", "--rounds", "2", "--local-steps", "2",
           "--batch-size", "16", "--epsilon", "6", "--eval-precision", "float32", "--seed", "3",
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_model_dir, hf_dataset_dir):
    out = tmp_path_factory.mktemp("runs") / "a"
    proc = simulate(out, tiny_model_dir, hf_dataset_dir)
    return out, proc


# The first run's settings as cells of one sweep, with two more runs of this module's tests:
# a warm cell host runs all four, one after another (server.cellhost).
CELLS = """[sweep]
name = "cells"
out = "{out}"
[base]
model = "{model}"
dataset = "{dataset}"
clients = 3
clients-per-round = 3
rounds = 2
local-steps = 2
batch-size = 16
epsilon = 6.0
eval-precision = "float32"
[grid]
run = [
    {{label = "seed-1", seed = 1}},
    {{label = "first-run", seed = 3}},
    {{label = "auon-kept", seed = 3, optimizer = "auon", optimizer-state = "keep"}},
    {{label = "user-dp", seed = 3, user-epsilon = 3.0, update-clip = 0.1, adaptive-clip = true, noise-cohort-size = 300, clip-placement = "client"}},
]
"""


def sweep(path, *options):
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "sweep", str(path), *options],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def warm_cells(tmp_path_factory, tiny_model_dir, hf_dataset_dir):
    """(sweep file, the cells' run folders by label): the four cells, run by the default
    sweep on this machine, one warm cell host."""
    from fedortho.sweep import load_sweep

    folder = tmp_path_factory.mktemp("warm")
    path = folder / "cells.toml"
    path.write_text(CELLS.format(out=folder / "results", model=tiny_model_dir, dataset=hf_dataset_dir))
    proc = sweep(path)
    assert "4 ran, 0 failed" in proc.stdout
    spec = load_sweep(path)
    return path, {cell.values["run"]: spec.out / cell.name / "run" for cell in spec.cells()}


def outcome(run):
    """Everything a run computed, without its timings."""
    def untimed(name):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in (run / name).read_text().splitlines()]

    summary = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if "seconds" not in k}
    return {"metrics": untimed("metrics.jsonl"), "privacy": untimed("privacy.jsonl"), "summary": summary,
            "adapter": (run / "adapter" / "adapter_model.safetensors").read_bytes()}


def cell_log(run):
    return (run.parent / "log.txt").read_text()


def test_cli_simulation_writes_a_complete_run_folder(first_run):
    out, proc = first_run
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy_epsilon.png",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).is_file(), name
    metrics = rows(out)
    assert [r["round"] for r in metrics] == [0, 1, 2]
    for r in metrics[1:]:
        assert r["clients-replied"] == 3 and 0 < r["epsilon"] <= 6.0 and r["round-seconds"] > 0
        assert "train-loss" not in r  # a private run does not release its training loss
    assert metrics[2]["epsilon"] > metrics[1]["epsilon"]  # cumulative
    assert proc.stdout.count("round ") >= 3  # one progress line per round
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["strategy"] == "fedsvd" and config["seed"] == 3
    assert "opacus" in config["packages"] and config["git-commit"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final-accuracy"] == metrics[-1]["test-accuracy"]


def test_saved_adapter_reproduces_the_evaluated_accuracy(first_run, tiny_model_dir, hf_dataset_dir):
    from peft import PeftModel

    from fedortho import data
    from fedortho.config import RunConfig
    from fedortho.models import load_classifier
    from fedortho.train import evaluate

    out, _ = first_run
    cfg = RunConfig(model=tiny_model_dir, dataset=hf_dataset_dir)
    base = load_classifier(tiny_model_dir, 2, seed=12345, pooling="mean")  # another head init: overwritten
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    accuracy, loss = evaluate(model, data.test_tensors(cfg))
    final = rows(out)[-1]
    assert accuracy == final["test-accuracy"]
    assert loss == pytest.approx(final["test-loss"], rel=1e-5)


def same_run(a, b):
    keys = ("test-accuracy", "test-loss", "train-loss", "epsilon")
    assert [[r.get(k) for k in keys] for r in rows(a)] == [[r.get(k) for k in keys] for r in rows(b)]
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (b / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (a / "privacy.jsonl").read_text() == (b / "privacy.jsonl").read_text()


def test_same_seed_same_result_with_one_worker_or_two_and_any_number_of_nodes(first_run, tmp_path, tiny_model_dir,
                                                                             hf_dataset_dir):
    """Clients are data, nodes are workers: one simulated node on one Ray worker (a client
    takes both CPUs) training all 3 clients in turn gives the default run's result (3 nodes,
    one CPU per client: 2 workers), bit for bit."""
    import os

    assert (os.cpu_count() or 1) >= 2  # the first run had two workers
    out, _ = first_run
    again = tmp_path / "b"
    simulate(again, tiny_model_dir, hf_dataset_dir, "--nodes", "1", "--client-cpus", str(os.cpu_count()))
    same_run(again, out)


def test_attached_to_a_two_node_ray_cluster_the_run_and_a_sweep_are_the_same(first_run, warm_cells, tmp_path,
                                                                             tiny_model_dir, hf_dataset_dir):
    """``--ray-address`` attaches to a running cluster: two Ray nodes on this machine, one CPU
    each, and half a CPU per client: 4 workers, 2 on each node, train the clients. The result
    is the first run's (2 workers on one node). Then a sweep of four cells on the same cluster
    spreads its cells over both nodes and computes the cells run on this machine. The cluster
    is the test's and it stops it."""
    import ray
    from ray.cluster_utils import Cluster

    # (Ray's nodes listen on the machine's own address, which Ray also substitutes for 127.0.0.1)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        assert len(cluster.list_all_nodes()) == 2
        out, _ = first_run
        attached = tmp_path / "c"
        proc = simulate(attached, tiny_model_dir, hf_dataset_dir, "--ray-address", cluster.address,
                        "--client-cpus", "0.5", "--nodes", "4")
        assert proc.returncode == 0
        same_run(attached, out)
        alive = [n for n in cluster.list_all_nodes() if n.remaining_processes_alive()]
        assert len(alive) == 2  # the run used the cluster and left it running, as attached runs must
        swept = sweep_on(cluster, warm_cells, tmp_path)
    finally:
        cluster.shutdown()
        ray.shutdown()
    assert not any(n.any_processes_alive() for n in cluster.list_all_nodes())
    # The sweep: two cell hosts at once (--parallel 2), each with one worker; the cluster's two
    # nodes have one CPU each, so the hosts' workers ran on different nodes.
    nodes, local = swept
    used = set()
    for label, run in local.items():
        cluster_run = tmp_path / "results" / run.parent.name / "run"
        found = re.findall(r"1 workers on Ray node ([0-9a-f]+)", cell_log(cluster_run))
        assert len(found) == 1, cell_log(cluster_run)
        used.update(found)
        assert outcome(cluster_run) == outcome(run), label  # as the cells run on this machine
    assert used == nodes


def sweep_on(cluster, warm_cells, tmp_path):
    """Run the warm cells' sweep on ``cluster``, two cells at once, into ``tmp_path/results``;
    returns (the cluster's node ids, the local cells)."""
    path, local = warm_cells
    on_cluster = tmp_path / "cells.toml"
    on_cluster.write_text(path.read_text().replace(str(path.parent / "results"), str(tmp_path / "results")))
    proc = sweep(on_cluster, "--ray-address", cluster.address, "--parallel", "2")
    assert "4 ran, 0 failed" in proc.stdout
    return {node.node_id for node in cluster.list_all_nodes()}, local


def test_a_warm_cell_is_bit_identical_to_a_cold_one(warm_cells, first_run):
    """The first run's settings as the second cell of a cell host, which had run a cell before
    it (its Ray, workers, models, noise plans and the zero-shot evaluation reused): the same
    run, to the bit, as the cold first run (a process of its own, no evaluation cache)."""
    from fedortho.sweep import EVAL_CACHE

    _, cells = warm_cells
    assert all("workers on Ray node" in cell_log(run) for run in cells.values())  # each ran in a cell host
    out, _ = first_run
    warm, cold = outcome(cells["first-run"]), outcome(out)
    assert warm == cold
    assert [r["round"] for r in warm["metrics"]] == [0, 1, 2] and warm["summary"]["completed"] is True
    assert outcome(cells["seed-1"])["adapter"] != warm["adapter"]  # the cells did not share their training
    # Round 0's model is the same in every cell (B = 0 adds nothing whatever A the seed drew, and
    # the saved tiny model brings its own head; its labels have no descriptions, so no zero-shot
    # head): one evaluation, made once and read by the other three cells.
    sweep_folder = cells["seed-1"].parent.parent
    assert len(list((sweep_folder / EVAL_CACHE).glob("*.json"))) == 1
    assert len({json.dumps(outcome(run)["metrics"][0]) for run in cells.values()}) == 1


def test_bad_option_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "simulate", "--strategy", "fedprox",
                           "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    from fedortho import rules

    assert proc.stderr.strip() == f"fedortho: error: strategy must be one of {', '.join(rules.names())}, got 'fedprox'"
    assert not (tmp_path / "x").exists()


def test_missing_dataset_and_used_run_folder_fail_before_ray_starts(tmp_path, first_run):
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "simulate", "--dataset", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("fedortho: error: cannot load dataset")
    assert len(proc.stderr.strip().splitlines()) == 1
    out, _ = first_run
    before = (out / "metrics.jsonl").read_text()
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "simulate", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing already computed is lost


@pytest.mark.parametrize("case, message", [
    ("non-empty out", r"--out \S+ is not an empty folder"),
    ("unwritable out", "cannot write to --out"),
    ("rank too large", r"lora-r 10000 exceeds bert\.encoder\.layer\.0\.attention\.self\.query \(\d+x\d+\)"),
    ("no such target", "lora-targets nothing names no linear layer"),
    ("epsilon overflow", r"setting 'epsilon' is infinite \('1e309'\)"),
    ("user-level count noise too small", r"adaptive clipping needs clip-count-stddev above"),
])
def test_bad_inputs_fail_in_one_line_before_ray_starts(tmp_path, tiny_model_dir, hf_dataset_dir, case, message):
    out = tmp_path / "out"
    extra = []
    if case == "non-empty out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "unwritable out":
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        out = blocker / "run"  # a folder under a file cannot be made
    elif case == "rank too large":
        extra = ["--lora-r", "10000"]
    elif case == "no such target":
        extra = ["--lora-targets", "nothing"]
    elif case.startswith("user-level"):
        extra = ["--user-epsilon", "2", "--adaptive-clip", "true"]  # 3 clients: count noise 0.15
    else:
        extra = ["--epsilon", "1e309"]
    proc = subprocess.run([sys.executable, "-m", "fedortho.cli", "simulate", "--model", tiny_model_dir,
                           "--dataset", hf_dataset_dir, "--partitioning", "iid", "--clients", "3",
                           "--clients-per-round", "3", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr[-2000:]
    assert "Ray" not in proc.stdout + proc.stderr
    if case == "non-empty out":
        assert [f.name for f in out.iterdir()] == ["notes.txt"]  # left as it was
    elif case != "unwritable out":
        assert not out.exists()


def test_orthogonal_optimizer_with_kept_state_under_dp(warm_cells):
    out = warm_cells[1]["auon-kept"]
    metrics = rows(out)
    assert [r["clients-replied"] for r in metrics[1:]] == [3, 3]
    assert 0 < metrics[1]["epsilon"] < metrics[2]["epsilon"] <= 6.0
    assert json.loads((out / "config.json").read_text())["config"]["optimizer"] == "auon"


def test_an_unplannable_epsilon_fails_before_the_simulation_starts(tmp_path, tiny_model_dir, hf_dataset_dir):
    cmd = [sys.executable, "-m", "fedortho.cli", "simulate", "--model", tiny_model_dir, "--dataset", hf_dataset_dir,
           "--clients", "3", "--clients-per-round", "3", "--epsilon", "0.001", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("fedortho: error: epsilon 0.001 is too small")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # nothing started



def test_user_level_and_record_level_dp_together_in_a_simulation(warm_cells):
    """Both budgets reported, each for its unit; the user-level one for the simulated population
    of a 300-client noise cohort, said so in the summary and the last line."""
    from fedortho import userdp
    from test_userdp import opacus_epsilon

    out = warm_cells[1]["user-dp"]
    output = cell_log(out)
    plan = userdp.plan(3.0, 1e-5, 3, 3, 2, adaptive=True, noise_cohort_size=300)
    metrics = rows(out)[1:]
    # the accountant recomputed from what the run folder records
    assert [r["user-epsilon"] for r in metrics] == pytest.approx(
        [opacus_epsilon(r["user-noise-multiplier"], r["user-sample-rate"], n, 1e-5)
         for n, r in enumerate(metrics, start=1)], rel=1e-9)
    assert all(r["user-noise-multiplier"] == plan.noise_multiplier for r in metrics)
    assert all(0 < r["epsilon"] <= 6.0 for r in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["user-epsilon-spent"] == metrics[-1]["user-epsilon"] <= 3.0
    assert "simulated population of 300 users" in summary["user-dp"]
    assert "user-level epsilon spent" in output and "(for the simulated population)" in output
