"""Populations far larger than the simulated nodes: 100,000 clients, and workers that train
many clients while building their model once."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from client.app import app as client_app
from fedortho import worker
from fedortho.config import RunConfig
from server.app import run_federation

pytestmark = pytest.mark.slow


def test_100000_clients_10_per_round_complete_two_rounds(tmp_path, tiny_model_dir):
    """A cohort costs its own clients, not the population: no node per client, no partition
    materialized but the sampled ones, client state kept only for clients that trained."""
    from fedortho.synthetic import write_synthetic_dataset

    dataset = write_synthetic_dataset(tmp_path / "synthetic", train_rows=300_000, test_rows=200)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedortho.cli", "simulate", "--model", tiny_model_dir, "--dataset", str(dataset),
           "--clients", "100000", "--clients-per-round", "10", "--rounds", "2", "--partitioning", "iid",
           "--local-steps", "2", "--batch-size", "2", "--eval-precision", "float32", "--seed", "5",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["rounds"] == 2 and 0 < summary["epsilon-spent"] <= 6.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("clients-replied") for r in rows[1:]] == [10, 10]
    # the clients trained are the server's seeded sample of the whole population
    rng = np.random.default_rng(5)
    expected = [sorted(int(p) for p in rng.choice(100_000, size=10, replace=False)) for _ in range(2)]
    trained = [json.loads(line) for line in (out / "privacy.jsonl").read_text().splitlines()]
    assert [sorted(r["partition"] for r in trained if r["round"] == k) for k in (1, 2)] == expected
    assert all(r["participations"] == 1 and r["steps"] == 2 for r in trained)
    # state on disk: one file per client that trained, none for the other 99,980
    index = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    assert sorted(int(p) for p in index["clients"]) == sorted(set(expected[0]) | set(expected[1]))
    assert len(list((out / "checkpoint" / "clients").iterdir())) == len(index["clients"])


class OneWorkerGrid:
    """A simulation with one node, which is one worker process (this one): every sampled
    client is trained by the same ClientApp, as a Ray worker trains them in turn."""

    def __init__(self) -> None:
        self.node = 7
        self.context = Context(run_id=1, node_id=self.node, node_config={"partition-id": 0, "num-partitions": 1},
                               state=RecordDict(), run_config={})
        self.replies: dict[str, Message] = {}
        self.partitions: list[int] = []

    def get_node_ids(self):
        return [self.node]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's Grids do when sending
            if msg.metadata.message_type == "train":
                self.partitions.append(int(msg.content["config"]["partition"]))
            try:
                self.replies[msg.object_id] = client_app(msg, self.context)
            except Exception as exc:  # as Flower's runtime does: an error reply, not a crash
                self.replies[msg.object_id] = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"),
                                                      reply_to=msg)
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def test_one_worker_trains_many_clients_and_builds_the_model_once(tmp_path, tiny_model_dir, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    monkeypatch.setenv("FEDORTHO_SIMULATION", "1")  # what `fedortho simulate` sets in its workers
    builds = []
    real_build = worker.build_model
    monkeypatch.setattr(worker, "build_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    worker._MODELS.clear()  # as in a fresh worker process
    cfg = RunConfig(model=tiny_model_dir, clients=8, clients_per_round=3, rounds=3, local_steps=2, batch_size=16,
                    max_train_examples=240, max_test_examples=32, num_threads=2, eval_precision="float32", partitioning="iid",
                    out=str(tmp_path / "run"))
    grid = OneWorkerGrid()
    summary = run_federation(grid, cfg, state_travels=True)
    assert summary["completed"]
    assert len(grid.partitions) == 9 and len(set(grid.partitions)) >= 5  # many clients, one worker
    assert len(builds) == 1  # built once, at warm-up, and reused by every client
    assert len(worker._MODELS) == 1
    # each client's state came with its message and went back: the worker holds none of it
    assert len(grid.context.state.keys()) == 0
    trained = torch.load(next((tmp_path / "run" / "checkpoint" / "clients").iterdir()), weights_only=True)
    assert "privacy" in trained


def test_a_deployed_node_refuses_a_state_sent_by_the_server(tmp_path, tiny_model_dir, monkeypatch):
    """Outside a simulation a client never takes its state (its privacy history) from the
    message: a server could otherwise hand it a fresh budget."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    monkeypatch.delenv("FEDORTHO_SIMULATION", raising=False)
    cfg = RunConfig(model=tiny_model_dir, clients=8, clients_per_round=3, rounds=3, local_steps=2, batch_size=16,
                    max_train_examples=240, max_test_examples=32, num_threads=2, eval_precision="float32", partitioning="iid",
                    out=str(tmp_path / "run"), min_clients=1)
    with pytest.raises(Exception, match="stopped after round 0"):
        run_federation(OneWorkerGrid(), cfg, state_travels=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "deployed node keeps its own state" in summary["stopped"]


@pytest.mark.parametrize("simulated", [True, False])
def test_noise_plans_from_the_server_are_taken_only_in_a_simulation(tiny_model_dir, monkeypatch, simulated):
    """A warm-up message may carry the server's noise plans; a deployed client (no simulation
    environment) ignores them and plans its noise itself: a server could send a tiny one."""
    from flwr.app import ConfigRecord, MessageType

    from fedortho import privacy, protocol
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    if simulated:
        monkeypatch.setenv("FEDORTHO_SIMULATION", "1")
    else:
        monkeypatch.delenv("FEDORTHO_SIMULATION", raising=False)
    monkeypatch.setattr(worker, "PLANNER", privacy.NoisePlanner())
    cfg = RunConfig(model=tiny_model_dir, clients=3, clients_per_round=3, max_train_examples=240, partitioning="iid")
    bogus = (0.123, 77, 0.01)  # a noise multiplier no honest plan would give
    config = ConfigRecord({**cfg.to_dict(hyphenated=True), protocol.PLAN_RATES: [bogus[0]],
                           protocol.PLAN_STEPS: [bogus[1]], protocol.PLAN_SIGMAS: [bogus[2]]})
    msg = Message(content=RecordDict({protocol.CONFIG: config}),
                  message_type=f"{MessageType.QUERY}.{protocol.WARM_UP}", dst_node_id=7)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    client_app(msg, Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3},
                            state=RecordDict(), run_config={}))
    known = worker.PLANNER.known(cfg.epsilon, cfg.delta)
    taken = privacy.NoisePlan(bogus[2], bogus[0], bogus[1]) in known
    assert taken == simulated
    assert known  # the worker planned its own smallest client either way
