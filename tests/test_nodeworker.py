"""The node worker: a round trained through its socket equals the same round trained in
process, bit for bit; its failures reach the ClientApp as the right exceptions."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedortho import data
from fedortho.lora import adapter_state
from fedortho.node import NodeConfigError, NodeSettings
from fedortho.nodeworker import InProcess, NodeWorkerClient, NodeWorkerError
from fedortho.privacy import BudgetExhausted, PrivacyState
from fedortho.worker import ClientWork, build_model

FEDORTHO = Path(sys.executable).parent / "fedortho"


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    socket_path = tmp_path_factory.mktemp("worker") / "node.sock"
    proc = subprocess.Popen([str(FEDORTHO), "node-worker", "--socket", str(socket_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not socket_path.exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.1)
        yield proc, socket_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def node_data(tmp_path_factory, tiny_model_dir):
    from fedortho.config import RunConfig

    folder = tmp_path_factory.mktemp("node-data") / "node-0"
    cfg = RunConfig(model=tiny_model_dir, clients=2, clients_per_round=2, max_train_examples=240)
    data.export_partition(cfg, 0, 2, str(folder))
    return str(folder)


def work_for(tiny_cfg, node_data, **changes):
    cfg = tiny_cfg.replace(clients=2, clients_per_round=2, epsilon=6.0, **changes)
    state = adapter_state(build_model(cfg))
    return ClientWork(cfg=cfg, partition_id=0, num_partitions=2, server_round=1, global_state=state,
                      data_path=node_data)


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_a_round_through_the_worker_equals_the_round_in_process(worker, node_data, tiny_cfg, optimizer):
    _, socket_path = worker
    work = work_for(tiny_cfg, node_data, optimizer=optimizer, optimizer_state="keep")
    remote = NodeWorkerClient(str(socket_path)).train(work)
    local = InProcess().train(work)
    assert remote.update.keys() == local.update.keys()
    assert all(torch.equal(remote.update[k], local.update[k]) for k in local.update)
    assert (remote.epsilon, remote.noise_multiplier, remote.privacy, remote.steps, remote.num_examples) == \
        (local.epsilon, local.noise_multiplier, local.privacy, local.steps, local.num_examples)
    assert local.privacy.plan is not None and local.privacy.history
    assert remote.num_examples == len(data.local_dataset(work.cfg, node_data))  # the node's own folder
    tensors, scalars = remote.optimizer_state
    assert all(torch.equal(tensors[k], local.optimizer_state[0][k]) for k in local.optimizer_state[0])
    assert scalars == local.optimizer_state[1]
    assert NodeWorkerClient(str(socket_path)).adapter_names(work.cfg, node_data) == \
        InProcess().adapter_names(work.cfg, node_data)


def test_a_spent_budget_and_a_bad_request_come_back_as_their_errors(worker, node_data, tiny_cfg):
    _, socket_path = worker
    client = NodeWorkerClient(str(socket_path))
    spent = work_for(tiny_cfg, node_data)
    spent.privacy = PrivacyState(6.0, 1e-5, 2.0, [(0.3, 1.0, 500)])  # far beyond epsilon 6
    with pytest.raises(BudgetExhausted):
        client.train(spent)
    missing = work_for(tiny_cfg, node_data)
    missing.global_state = {}
    with pytest.raises(NodeWorkerError, match="global adapter state lacks"):
        client.train(missing)
    assert client.train(work_for(tiny_cfg, node_data)).num_examples > 0  # and it serves on


def test_the_socket_is_private_and_removed_on_stop(tmp_path):
    socket_path = tmp_path / "w.sock"
    proc = subprocess.Popen([str(FEDORTHO), "node-worker", "--socket", str(socket_path)])
    try:
        deadline = time.time() + 60
        while not socket_path.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
        second = subprocess.run([str(FEDORTHO), "node-worker", "--socket", str(socket_path)], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode == 2 and "already serves" in second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not socket_path.exists()


def test_a_node_whose_worker_is_not_running_is_refused(tmp_path, tiny_cfg):
    settings = NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 3,
                                              "worker-socket": str(tmp_path / "none.sock")})
    with pytest.raises(NodeConfigError, match="no node worker is serving it"):
        settings.check(tiny_cfg, None)
    with pytest.raises(NodeWorkerError, match="is not running"):
        NodeWorkerClient(str(tmp_path / "none.sock")).adapter_names(tiny_cfg, "")


def test_spent_epsilon_through_the_worker_is_opacus_own(worker):
    from opacus.accountants import RDPAccountant

    _, socket_path = worker
    history = [(1.1, 0.05, 30), (0.9, 0.1, 12)]
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    assert NodeWorkerClient(str(socket_path)).spent_epsilon(history, 1e-5) == \
        pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
