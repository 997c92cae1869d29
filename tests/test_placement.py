"""Where a simulated client runs: the device it trains on, the machine that can host it, the
memory its worker takes."""

import os
import sys

import pytest
import torch

from fedortho import worker
from fedortho.config import ConfigError
from server.simulation import check_resources, worker_allocator


def test_clients_train_on_the_device_their_environment_names(monkeypatch):
    monkeypatch.delenv(worker.DEVICE_ENV, raising=False)
    assert worker.training_device() == torch.device("cpu")
    monkeypatch.setenv(worker.DEVICE_ENV, "CPU")
    assert worker.training_device() == torch.device("cpu")
    monkeypatch.setenv(worker.DEVICE_ENV, "cuda")
    if torch.cuda.is_available():
        assert worker.training_device() == torch.device("cuda")
    else:  # a GPU asked for and missing is an error, never a quiet run on the CPU
        with pytest.raises(RuntimeError, match=f"{worker.DEVICE_ENV}=cuda"):
            worker.training_device()
    monkeypatch.setenv(worker.DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match="expected 'cpu' or 'cuda'"):
        worker.training_device()


def test_a_client_no_machine_can_host_is_one_clear_error(monkeypatch):
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]  # a machine that left the cluster
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    check_resources(2, 0)
    check_resources(4, 0.25)  # fits on the GPU machine only
    with pytest.raises(ConfigError, match=r"--client-gpus 2 for one client \(the largest has 8 CPUs and 1 GPUs\)"):
        check_resources(1, 2)
    with pytest.raises(ConfigError, match="--client-cpus 16 "):
        check_resources(16, 0)
    # resources that exist, but not on one machine, do not host a client
    nodes[1]["Resources"] = {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ConfigError):
        check_resources(2, 0.5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and Ray's jemalloc build are Linux's")
def test_workers_run_on_jemalloc_unless_the_caller_chose_an_allocator(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    library = worker_allocator()["LD_PRELOAD"]
    assert os.path.isfile(library) and "jemalloc" in os.path.basename(library)
    monkeypatch.setenv("LD_PRELOAD", "")  # set, even empty: the caller's choice stands
    assert worker_allocator() == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory map in /proc")
def test_the_frozen_base_weights_are_pages_of_the_model_file_shared_by_all_workers(tiny_cfg, monkeypatch):
    """The base model is memory-mapped from its safetensors file, not copied: every worker on
    a machine reads the same pages, and only adapters, head and activations are its own."""
    monkeypatch.delenv(worker.DEVICE_ENV, raising=False)
    worker._MODELS.clear()
    model = worker.shared_model(tiny_cfg)
    weights = os.path.realpath(os.path.join(tiny_cfg.model, "model.safetensors"))
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and os.path.realpath(parts[5]) == weights:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                mapped.append((start, end))
    assert mapped, "the model file is not mapped"
    in_file = {name: any(a <= p.data_ptr() < b for a, b in mapped) for name, p in model.named_parameters()}
    base = [name for name in in_file if ".bert." in name and "lora_" not in name]  # the pretrained encoder
    assert len(base) > 10 and all(in_file[name] for name in base), [n for n in base if not in_file[n]][:3]
    # what a client trains lives in the worker's own memory, writable
    assert not any(in_file[name] for name in in_file if "lora_" in name or "modules_to_save" in name)
    worker._MODELS.clear()
