"""Runs that survive: SIGKILL and resume, damaged checkpoints, dead workers, injected faults,
killed sweeps. Each run is a real ``fedortho simulate`` process on a tiny BERT."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from fedortho.faults import fails

pytestmark = pytest.mark.slow

# DP, an orthogonal optimizer whose state every client keeps across rounds, and a cohort
# smaller than the population: the state a resume must restore is all there.
RUN = ["--clients", "3", "--clients-per-round", "2", "--rounds", "4", "--local-steps", "2", "--batch-size", "16",
       "--max-train-examples", "240", "--max-test-examples", "64", "--epsilon", "6", "--optimizer", "auon",
       "--optimizer-state", "keep", "--eval-precision", "float32", "--seed", "3"]


def cli(*args):
    return [sys.executable, "-m", "fedortho.cli", *args]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def without_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "round-seconds"} for r in metrics]


def checkpoint_round(run: Path) -> int:
    try:
        return json.loads((run / "checkpoint" / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError):
        return -1


def wait_for(condition, proc, seconds=300):
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def descendants(pid: int) -> list[psutil.Process]:
    """The processes ``pid`` started (and theirs), each with its command line as ``.line``."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            p.line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        found.append(p)
    return found


def all_gone(processes: list[psutil.Process], seconds=30) -> list[str]:
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    names = [p.line[:80] for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:  # leave nothing behind, whatever the assertion says
        try:
            p.kill()
        except psutil.Error:
            pass
    return names


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("resume") / "whole"
    proc = subprocess.run(cli("simulate", "--model", tiny_model_dir, *RUN, "--out", str(out)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_model_dir):
    """The same run, killed with SIGKILL once round 2 is checkpointed; returns its folder, the
    round it was killed after, and the processes it had started."""
    out = tmp_path_factory.mktemp("resume") / "killed"
    proc = subprocess.Popen(cli("simulate", "--model", tiny_model_dir, *RUN, "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: checkpoint_round(out) >= 2, proc)
        started = descendants(proc.pid)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, checkpoint_round(out), started


def test_sigkill_leaves_no_ray_process_behind(killed):
    _, _, started = killed
    assert any("raylet" in p.line for p in started)
    assert all_gone(started) == []  # Ray's agents ignore SIGTERM: the run's guardian kills them


def test_a_resumed_run_ends_bit_for_bit_as_the_uninterrupted_one(uninterrupted, killed, tmp_path):
    out, k, _ = killed
    assert 2 <= k < 4
    assert all_gone(killed[2]) == []
    assert (out / "checkpoint" / "checkpoint.json").is_file()
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)  # the killed folder stays for the damaged-checkpoint tests
    run_key = json.loads((out / "checkpoint" / "checkpoint.json").read_text())["server"]["run-key"]
    proc = subprocess.run(cli("simulate", "--resume", str(resumed)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"(resumed after round {k})" in proc.stdout

    a = (uninterrupted / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (resumed / "adapter" / "adapter_model.safetensors").read_bytes() == a
    whole_ckpt = json.loads((uninterrupted / "checkpoint" / "checkpoint.json").read_text())
    resumed_ckpt = json.loads((resumed / "checkpoint" / "checkpoint.json").read_text())
    assert resumed_ckpt["adapter"][1] == whole_ckpt["adapter"][1]  # SHA-256 of the global adapter tensors
    assert resumed_ckpt["clients"] == whole_ckpt["clients"]  # every client's final state, byte for byte
    assert resumed_ckpt["server"].pop("run-key") == run_key  # the run keeps its name; each run has its own
    whole_ckpt["server"].pop("run-key")
    assert resumed_ckpt["server"] == whole_ckpt["server"]  # sampling RNG, versions, epsilons
    assert without_timing(rows(resumed / "metrics.jsonl")) == without_timing(rows(uninterrupted / "metrics.jsonl"))
    assert [r["round"] for r in rows(resumed / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    assert rows(resumed / "privacy.jsonl") == rows(uninterrupted / "privacy.jsonl")
    whole, again = (json.loads((f / "summary.json").read_text()) for f in (uninterrupted, resumed))
    for key in ("final-accuracy", "final-loss", "epsilon-spent", "best-accuracy", "noise-multiplier"):
        assert again[key] == whole[key], key
    assert again["completed"] is True and again["resumed-after-rounds"] == [k]
    assert 0 < again["epsilon-spent"] <= 6.0

    # The kept optimizer state travelled and was checkpointed: every trained client has momentum.
    clients = resumed / "checkpoint" / "clients"
    for name, _ in resumed_ckpt["clients"].values():
        state = torch.load(clients / name, weights_only=True)
        assert state["optimizer-tensors"]["arrays"], name
        # the accountant counted every DP step of every round it trained (2 local steps each)
        history = json.loads(state["privacy"]["config"]["state"])["history"]
        assert sum(n for _, _, n in history) == 2 * state["participation"]["config"]["rounds"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage, message", [
    ("client file", "is damaged (its SHA-256 does not match checkpoint.json)"),
    ("adapter file", "is damaged (its SHA-256 does not match checkpoint.json)"),
    ("index", "checkpoint.json is damaged"),
    ("missing client file", "cannot be read"),
    ("settings", "the checkpoint was written with lr=0.0, the run's settings say lr=0.25; it belongs to another run"),
])
def test_a_damaged_or_foreign_checkpoint_is_refused_and_left_as_it_is(killed, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(killed[0], run)
    ckpt = run / "checkpoint"
    index = json.loads((ckpt / "checkpoint.json").read_text())
    if damage == "client file":
        path = ckpt / "clients" / next(iter(index["clients"].values()))[0]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "adapter file":
        path = ckpt / index["adapter"][0]
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "index":
        path = ckpt / "checkpoint.json"
        path.write_text(path.read_text()[:100])
    elif damage == "missing client file":
        (ckpt / "clients" / next(iter(index["clients"].values()))[0]).unlink()
    else:
        meta = json.loads((run / "config.json").read_text())
        meta["config"]["lr"] = 0.25
        (run / "config.json").write_text(json.dumps(meta))
    before = snapshot(run)
    proc = subprocess.run(cli("simulate", "--resume", str(run)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fedortho: error: --resume {run}: ") and message in lines[0], \
        proc.stderr
    assert snapshot(run) == before  # nothing was changed


def test_resume_refuses_new_settings_and_a_finished_run(uninterrupted):
    proc = subprocess.run(cli("simulate", "--resume", str(uninterrupted), "--rounds", "8"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "fedortho: error: --resume continues a run with the settings in its config.json; drop --rounds"
    proc = subprocess.run(cli("simulate", "--resume", str(uninterrupted)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        f"fedortho: error: --resume {uninterrupted}: the run has already finished all 4 rounds"


FAULTY = ["--clients", "6", "--clients-per-round", "4", "--rounds", "10", "--local-steps", "1", "--batch-size", "16",
          "--max-train-examples", "240", "--max-test-examples", "32", "--epsilon", "inf", "--fail-rate", "0.3"]


def expected_failures(seed: int, clients: int, per_round: int, rounds: int, rate: float) -> list[int]:
    """Failed calls per round, replayed independently: the strategy samples partitions with
    numpy's default_rng(seed); a call fails when its seeded draw says so."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(1, rounds + 1):
        chosen = rng.choice(list(range(clients)), size=per_round, replace=False)
        out.append(sum(fails(seed, r, int(p), rate) for p in chosen))
    return out


def test_a_run_with_30_percent_of_client_calls_failing_completes_and_counts_them(tmp_path, tiny_model_dir):
    seed = next(s for s in range(100) if max(expected_failures(s, 6, 4, 10, 0.3)) < 4
                and sum(expected_failures(s, 6, 4, 10, 0.3)) >= 8)
    failures = expected_failures(seed, 6, 4, 10, 0.3)
    out = tmp_path / "faulty"
    proc = subprocess.run(cli("simulate", "--model", tiny_model_dir, *FAULTY, "--seed", str(seed), "--out", str(out)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = rows(out / "metrics.jsonl")[1:]
    assert [r["clients-failed"] for r in metrics] == failures
    assert [r["clients-replied"] for r in metrics] == [4 - f for f in failures]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True
    assert summary["failed-client-calls"] == sum(failures)
    assert summary["degraded-rounds"] == sum(1 for f in failures if f)
    assert proc.stderr.count("injected fault (fail-rate 0.3)") == sum(failures)  # one line per failed call
    assert "Traceback" not in proc.stderr


def test_a_round_below_min_clients_stops_the_run_with_its_reason(tmp_path, tiny_model_dir):
    seed = 0
    failures = expected_failures(seed, 6, 4, 10, 0.3)
    first = next(r for r, f in enumerate(failures, start=1) if f)
    out = tmp_path / "stopped"
    proc = subprocess.run(cli("simulate", "--model", tiny_model_dir, *FAULTY, "--seed", str(seed), "--min-clients",
                              "4", "--out", str(out)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fedortho: error: the simulation stopped: round {first}: {4 - failures[first - 1]} of 4 "
                           "sampled clients succeeded, fewer than min-clients=4 (client ")
    assert f"the run stopped after round {first - 1}, which is saved in {out}" in last
    assert "Traceback" not in proc.stderr
    assert [r["round"] for r in rows(out / "metrics.jsonl")] == list(range(first))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and "fewer than min-clients=4" in summary["stopped"]


def test_a_dead_worker_stops_the_run_which_then_resumes_to_the_end(tmp_path, tiny_model_dir):
    out = tmp_path / "worker"
    args = ["--clients", "3", "--clients-per-round", "2", "--rounds", "8", "--local-steps", "1", "--batch-size", "16",
            "--max-train-examples", "240", "--max-test-examples", "32", "--epsilon", "inf", "--out", str(out)]
    proc = subprocess.Popen(cli("simulate", "--model", tiny_model_dir, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: checkpoint_round(out) >= 2, proc)
        actors = [p for p in descendants(proc.pid) if "ClientAppActor" in p.line]
        assert actors
        actors[0].kill()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert "the simulation worker training client" in last and "died (" in last
    assert f"continue it with `fedortho simulate --resume {out}`" in last
    stopped_after = checkpoint_round(out)
    assert json.loads((out / "summary.json").read_text())["completed"] is False

    done = subprocess.run(cli("simulate", "--resume", str(out)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["round"] for r in rows(out / "metrics.jsonl")] == list(range(9))
    assert all(r["clients-failed"] == 0 for r in rows(out / "metrics.jsonl")[1:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is True and summary["resumed-after-rounds"] == [stopped_after]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_with_one_line_and_no_ray_process(tmp_path, tiny_model_dir, sig):
    out = tmp_path / "interrupted"
    args = ["--clients", "3", "--clients-per-round", "2", "--rounds", "50", "--local-steps", "1", "--batch-size", "16",
            "--max-train-examples", "240", "--max-test-examples", "32", "--out", str(out)]
    proc = subprocess.Popen(cli("simulate", "--model", tiny_model_dir, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: checkpoint_round(out) >= 1, proc)
        started = descendants(proc.pid)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        f"fedortho: interrupted; finished rounds are saved; continue with `fedortho simulate --resume {out}`"]
    assert all_gone(started) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and summary["final-round"] == rows(out / "metrics.jsonl")[-1]["round"]


def test_a_sweep_killed_mid_cell_takes_its_cell_along_and_continues_it_cleanly(tmp_path, tiny_model_dir):
    """A real two-cell sweep through the command line, killed with SIGKILL in its first cell."""
    from fedortho.runs import folder_in_use
    from fedortho.sweep import load_sweep

    sweep = tmp_path / "kill.toml"
    results = tmp_path / "results"
    sweep.write_text(f"""[sweep]
name = "kill"
out = "{results}"
[base]
model = "{tiny_model_dir}"
clients = 3
clients-per-round = 3
rounds = 8
local-steps = 1
batch-size = 16
max-train-examples = 240
max-test-examples = 32
[grid]
epsilon = [inf, 6.0]
""")
    first, second = (results / cell.name for cell in load_sweep(sweep).cells())
    run = first / "run"
    proc = subprocess.Popen(cli("sweep", str(sweep)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: checkpoint_round(run) >= 2, proc)
        started = descendants(proc.pid)
        assert any("cell-host" in p.line for p in started)  # the process that runs the sweep's cells
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert all_gone(started) == []  # the cell's process, its Ray and its guardian
    assert not folder_in_use(run)
    interrupted_at = checkpoint_round(run)
    dry = subprocess.run(cli("sweep", str(sweep), "--dry-run"), capture_output=True, text=True, timeout=120)
    assert dry.stdout.count("todo") == 2

    again = subprocess.run(cli("sweep", str(sweep)), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2/2 cells" in again.stdout
    metrics = rows(run / "metrics.jsonl")
    assert [r["round"] for r in metrics] == list(range(9))  # one row per round: nothing doubled or lost
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] is True and summary["resumed-after-rounds"] == [interrupted_at]
    assert json.loads((second / "run" / "summary.json").read_text())["completed"] is True
    dry = subprocess.run(cli("sweep", str(sweep), "--dry-run"), capture_output=True, text=True, timeout=120)
    assert dry.stdout.count("done") == 2
    report = subprocess.run(cli("report", str(results)), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "left out" not in report.stdout + report.stderr
    assert report.stdout.count("\n| ") == 2  # header separator aside: one row per cell
    table = (results / "results.csv").read_text().splitlines()
    assert len(table) == 3 and any(line.startswith("inf,1,") for line in table[1:])


def test_a_checkpoint_from_before_a_setting_existed_resumes_as_that_settings_default():
    """Settings added later (train-precision, log, ...) are absent from older checkpoints:
    those runs ran as the defaults do, and any other difference is still refused."""
    from fedortho.checkpoint import Checkpoint, CheckpointError, check_resumable
    from fedortho.config import RunConfig

    cfg = RunConfig(rounds=4)
    older = {k: v for k, v in cfg.to_dict(hyphenated=True).items() if k not in ("train-precision", "log")}
    checkpoint = Checkpoint(round=2, config=older, adapter={}, server={}, clients=None)
    check_resumable(checkpoint, cfg)
    with pytest.raises(CheckpointError, match="train-precision='float32'.*train-precision='bfloat16'"):
        check_resumable(checkpoint, cfg.replace(train_precision="bfloat16"))
    with pytest.raises(CheckpointError, match="lr=0.0"):
        check_resumable(checkpoint, cfg.replace(lr=0.3))
