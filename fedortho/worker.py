"""Heavy objects kept alive per process: the base model with adapters and the tokenized data.

A simulation worker trains many clients in turn; building the model and tokenizing the
data once per process, not once per client round, is what keeps rounds fast. Every client
round overwrites all adapter tensors, so the shared model carries nothing between clients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedortho import data
from fedortho.config import RunConfig
from fedortho import rules
from fedortho.lora import adapter_state, attach_lora, load_adapter_state
from fedortho.heads import label_texts, set_head, zero_shot_head
from fedortho.models import load_classifier, load_tokenizer
from fedortho.privacy import NoisePlan, NoisePlanner, PrivacyState
from fedortho.train import ClientResult, client_plan, round_seed, train_client

_MODELS: dict[tuple, torch.nn.Module] = {}
# The noise plans this process has made or been handed (a simulation's server hands its own
# to every worker at warm-up): each client's first round takes its plan from here and then
# carries it in its PrivacyState.
PLANNER = NoisePlanner()

# Where clients train: "cpu" (the default) or "cuda". ``fedortho simulate --client-gpus``
# sets it in its workers (Ray makes the GPU it gave a worker that worker's only visible one);
# a deployed node's operator sets it in the SuperNode's (or node worker's) environment.
DEVICE_ENV = "FEDORTHO_DEVICE"


def training_device() -> torch.device:
    """The device of ``DEVICE_ENV``; asking for a GPU that is not there is an error, not a
    silent fall-back to the CPU."""
    import os

    name = os.environ.get(DEVICE_ENV, "").strip().lower() or "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"{DEVICE_ENV}={name!r}: expected 'cpu' or 'cuda'")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}=cuda, but torch sees no CUDA device here")
    return torch.device(name)


def set_threads(cfg: RunConfig) -> None:
    """Honour ``num-threads``; 0 keeps torch's default, which inside a Ray worker follows the
    CPUs Ray gave it (OMP_NUM_THREADS), so parallel clients do not oversubscribe the cores."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)


def build_model(cfg: RunConfig, label_names: tuple[str, ...] | None = None) -> torch.nn.Module:
    """A fresh classifier with LoRA adapters, initialized from ``cfg.seed`` (B = 0).

    ``label_names`` (in label order) default to the run dataset's; a node that trains on its
    own data folder passes that folder's, and need not hold the run's dataset at all.
    """
    names = tuple(label_names) if label_names is not None else data.splits_for(cfg).label_names
    base = load_classifier(cfg.model, len(names), cfg.seed, cfg.pooling)
    if cfg.head_init == "zero-shot":
        set_head(base, zero_shot_head(base, load_tokenizer(cfg.model), label_texts(cfg, names), cfg.head_scale))
    return attach_lora(base, cfg, cfg.seed)


def shared_model(cfg: RunConfig, label_names: tuple[str, ...] | None = None) -> torch.nn.Module:
    key = (cfg.model, cfg.pooling, cfg.init_a, cfg.init_a_scale, cfg.head_init, cfg.head_scale, cfg.label_texts,
           cfg.dataset, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
           None if label_names is None else tuple(label_names), cfg.strategy)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process: a new configuration replaces the old one
        _MODELS[key] = build_model(cfg, label_names).to(training_device())
    return _MODELS[key]


def adapter_names(cfg: RunConfig, label_names: tuple[str, ...] | None = None) -> list[str]:
    """Names of all adapter tensors (A, B, head) of the model ``cfg`` describes."""
    return sorted(adapter_state(shared_model(cfg, label_names)))


def adapter_names_for(cfg: RunConfig, data_path: str = "") -> list[str]:
    """``adapter_names`` of a node that trains on its own data folder (or, without one, on
    the run's dataset)."""
    label_names = data.load_local(data_path, cfg.text_column, cfg.label_column)[2] if data_path else None
    return adapter_names(cfg, label_names)


@dataclass
class ClientWork:
    cfg: RunConfig
    partition_id: int
    num_partitions: int
    server_round: int
    global_state: dict[str, torch.Tensor]
    privacy: PrivacyState | None = None  # the client's record-level privacy so far (None: nothing spent)
    seed: int | None = None  # None: derived from the run seed, the round and the partition
    optimizer_state: tuple[dict, dict] | None = None  # kept from the client's last round
    data_path: str = ""  # a node's own data folder, trained whole instead of a partition of the run's dataset


def run_client_round(work: ClientWork) -> ClientResult:
    """Load the global adapter into the shared model and train this client's partition."""
    cfg = work.cfg
    set_threads(cfg)
    label_names = data.load_local(work.data_path, cfg.text_column, cfg.label_column)[2] if work.data_path else None
    model = shared_model(cfg, label_names)
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(work.global_state))
    if missing:
        raise ValueError(f"global adapter state lacks {len(missing)} tensors, e.g. '{missing[0]}'")
    load_adapter_state(model, work.global_state)
    dataset = (data.local_dataset(cfg, work.data_path) if work.data_path
               else data.client_dataset(cfg, work.partition_id, work.num_partitions))
    names = rules.rule(cfg.strategy).trainable(expected, cfg.train_head, work.server_round)
    seed = work.seed if work.seed is not None else round_seed(cfg.seed, work.server_round, work.partition_id)
    return train_client(model, dataset, cfg, names, work.privacy, seed, work.optimizer_state, PLANNER)


def warm_up(cfg: RunConfig, plans: list[NoisePlan] = ()) -> None:
    """Do a worker's one-time work before its first client: build the model, read the
    dataset and its partitioner, and plan the noise of the smallest client (a population of
    equal IID shards then needs no other plan). A simulation asks every worker to do this
    while its server evaluates round 0, so that round 1 costs what later rounds cost.
    ``plans``: the plans the server has made for the run's budget already, kept instead of
    searched again."""
    from fedortho import privacy

    for plan in plans:
        PLANNER.add(cfg.epsilon, cfg.delta, plan)
    set_threads(cfg)
    shared_model(cfg)
    data.client_dataset(cfg, 0, cfg.clients)  # the tokenizer, and the data path a client takes
    if cfg.private:
        try:
            plan_smallest_client(cfg, PLANNER)
        except privacy.BudgetTooSmall:
            pass  # an unplannable budget is the client's to report, in its round


def plan_smallest_client(cfg: RunConfig, planner: NoisePlanner) -> NoisePlan:
    """The noise plan of the client with the fewest examples, which samples at the highest
    rate: the hardest plan of the run. Raises ``privacy.BudgetTooSmall``."""
    smallest = data.smallest_partition(cfg, cfg.clients)
    return client_plan(cfg, smallest, PrivacyState(cfg.epsilon, cfg.delta, cfg.clip), planner)
