"""LoRAStrategy: FedSVD, FFA-LoRA and FedAvg-LoRA on Flower's Message API.

The arithmetic lives in ``fedortho.fedsvd.aggregate``; this class samples clients, decides
what travels, validates replies and keeps per-node bookkeeping.

What travels: the server sends B and the head every round and A only to a client that
does not hold the current A (A changes every round for ``fedavg``, after each
refactorization for ``fedsvd``, never for ``ffa``). Clients send back what they trained.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedortho.config import RunConfig
from fedortho.fedsvd import AggregationError, aggregate, check_update
from fedortho.lora import trainable_names
from fedortho.runs import get_logger

logger = get_logger()

A_VERSION_KEY = "a-version"


def is_lora_a(name: str) -> bool:
    return "lora_A" in name


class LoRAStrategy(FedAvg):
    """Weighted aggregation of LoRA adapters with an optional FedSVD refactorization."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(min_train_nodes=cfg.clients_per_round, min_available_nodes=cfg.clients)
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.a_version = 0
        self.a_version_at_node: dict[int, int] = {}
        self.partition_of_node: dict[int, int] = {}
        self.last_round: dict[str, float] = {}
        self.epsilon_of_partition: dict[int, float] = {}
        self.round_started = time.time()

    def summary(self) -> None:
        c = self.cfg
        log(INFO, "\t├──> %s: %d of %d clients per round, svd-period %d", c.strategy, c.clients_per_round,
            c.clients, c.svd_period)
        log(INFO, "\t└──> epsilon %s, delta %g, clip %g, %s lr %g, %d local steps", c.epsilon, c.delta, c.clip,
            c.optimizer, c.lr, c.local_steps)

    # -- node discovery and sampling ----------------------------------------------------
    def _discover(self, grid: Grid) -> None:
        """Learn each node's partition id once, so that sampling depends on the seed only."""
        while len(nodes := sorted(grid.get_node_ids())) < self.cfg.clients:
            logger.info("waiting for clients: %d of %d connected", len(nodes), self.cfg.clients)
            time.sleep(1)
        unknown = [n for n in nodes if n not in self.partition_of_node]
        if not unknown:
            return
        content = RecordDict({"config": ConfigRecord(self.cfg.to_dict(hyphenated=True))})
        replies = grid.send_and_receive([Message(content=content, message_type=MessageType.QUERY, dst_node_id=n)
                                         for n in unknown])
        for reply in replies:
            if reply.has_error():
                logger.warning("client %d did not describe itself: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            self.partition_of_node[reply.metadata.src_node_id] = int(reply.content["info"]["partition-id"])

    def sample(self, grid: Grid) -> list[int]:
        self._discover(grid)
        by_partition = {p: n for n, p in self.partition_of_node.items() if n in set(grid.get_node_ids())}
        partitions = sorted(by_partition)
        if len(partitions) < self.cfg.clients_per_round:
            raise RuntimeError(f"only {len(partitions)} clients available, {self.cfg.clients_per_round} needed")
        chosen = self.rng.choice(partitions, size=self.cfg.clients_per_round, replace=False)
        return [by_partition[int(p)] for p in sorted(chosen)]

    # -- one round ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.round_started = time.time()
        state = arrays.to_torch_state_dict()
        config = ConfigRecord({**self.cfg.to_dict(hyphenated=True), **config, "server-round": server_round,
                               A_VERSION_KEY: self.a_version})
        messages = []
        for node in self.sample(grid):
            needs_a = self.a_version_at_node.get(node) != self.a_version
            payload = {k: v for k, v in state.items() if needs_a or not is_lora_a(k)}
            content = RecordDict({"arrays": ArrayRecord(payload), "config": config})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self._global = state
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global model on the held-out test split itself

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        expected_names = trainable_names(self._global, self.cfg.strategy, self.cfg.train_head)
        expected = {k: self._global[k] for k in expected_names}
        accepted: list[tuple[int, dict[str, torch.Tensor], float]] = []
        losses, exhausted, failed = [], 0, 0
        for reply in replies:
            node = reply.metadata.src_node_id
            who = f"client {self.partition_of_node.get(node, node)}"
            if reply.has_error():
                failed += 1
                reason = (reply.error.reason or "").strip().splitlines()
                logger.warning("%s failed: %s", who, reason[-1] if reason else "no reason given")
                continue
            info = reply.content["metrics"]
            self.a_version_at_node[node] = int(info.get(A_VERSION_KEY, -1))
            self.epsilon_of_partition[self.partition_of_node.get(node, node)] = float(info["epsilon"])
            if int(info.get("budget-exhausted", 0)):
                exhausted += 1
                logger.warning("%s skipped the round: privacy budget exhausted (epsilon %.3f)", who, info["epsilon"])
                continue
            update = reply.content["arrays"].to_torch_state_dict() if "arrays" in reply.content else {}
            try:
                check_update(update, expected, who)
            except AggregationError as exc:
                failed += 1
                logger.warning("rejected update: %s", exc)
                continue
            accepted.append((self.partition_of_node.get(node, node), update, float(info["num-examples"])))
            losses.append((float(info["train-loss"]), float(info["num-examples"])))
        accepted.sort(key=lambda item: item[0])  # a fixed summation order keeps runs reproducible
        metrics = {
            "clients-replied": len(accepted), "clients-failed": failed, "clients-exhausted": exhausted,
            # cumulative: the largest epsilon any client has spent so far
            "epsilon-max": max(self.epsilon_of_partition.values(), default=0.0),
            "train-loss": (sum(l * w for l, w in losses) / sum(w for _, w in losses)) if losses else math.nan,
        }
        self.last_round = metrics
        if not accepted:
            logger.warning("round %d: no usable client update; the global adapter is unchanged", server_round)
            return None, MetricRecord(metrics)
        new_state, a_changed = aggregate(self.cfg.strategy, self._global, [u for _, u, _ in accepted],
                                         [w for _, _, w in accepted], server_round, self.cfg.svd_period)
        if a_changed:
            self.a_version += 1
        return ArrayRecord({k: v.contiguous() for k, v in new_state.items()}), MetricRecord(metrics)
