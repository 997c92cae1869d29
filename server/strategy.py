"""LoRAStrategy: any aggregation rule of ``fedortho.rules`` on Flower's Message API.

The arithmetic lives in the rule (``fedortho.rules.aggregate``); this class samples clients,
decides what travels (``fedortho.protocol``), reads and checks replies and keeps per-node
bookkeeping.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from client.state import from_records, to_records
from fedortho import privacy, protocol, rules, userdp
from fedortho.checkpoint import CheckpointError, ClientStates
from fedortho.config import ConfigError, RunConfig
from fedortho.fedsvd import AggregationError, check_update
from fedortho.runs import RunStopped, get_logger

logger = get_logger()
CLIENT_WAIT_SECONDS = 600


class LoRAStrategy(FedAvg):
    """Weighted aggregation of LoRA adapters with an optional FedSVD refactorization."""

    def __init__(self, cfg: RunConfig, label_names: tuple[str, ...] = (), client_states: ClientStates | None = None,
                 plans: Sequence[privacy.NoisePlan] = ()) -> None:
        """``client_states``: the clients' states travel with the messages and are kept here
        (simulation: they are checkpointed with the run); None: each node keeps its own.
        ``plans``: record-level noise plans made before the run, for the simulation's workers."""
        # Flower's own node checks are not used: sample() and _discover() decide who trains.
        super().__init__(min_train_nodes=cfg.clients_per_round)
        self.cfg = cfg
        self.rule = rules.rule(cfg.strategy)
        self.client_states = client_states
        self.plans = list(plans)
        self.run_key = ""  # names the run to nodes that keep their state on disk (the same when resumed)
        self.label_names = list(label_names)  # sent to nodes: their own data must label examples alike
        self.refused: dict[int, str] = {}  # nodes that cannot take part, with their reason
        self.deferred: set[int] = set()  # nodes to ask again: their claim waits, or they did not answer
        self._sent: list[Message] = []  # this round's training messages: replies are matched to them
        self.rng = np.random.default_rng(cfg.seed)
        self.held_version = 0
        self.held_version_at_node: dict[int, int] = {}
        self.partition_of_node: dict[int, int] = {}
        self.epsilon_of_partition: dict[int, float] = {}
        self.last_round: dict[str, float] = {}
        self.last_clients: list[dict] = []  # one row per client that replied in the last round
        self.round_started = time.time()
        self._global: dict[str, torch.Tensor] = {}
        if cfg.noise_cohort_size and client_states is None:
            # Noise sized for a cohort the deployment does not have would report, for its real
            # users, an epsilon its noise does not give them.
            raise ConfigError(f"noise-cohort-size ({cfg.noise_cohort_size}) simulates a population and is for "
                              "simulations only; a deployment's noise must be sized for its own cohorts (set it to 0)")
        # A simulation's noise follows its seed, to reproduce; a deployment's comes from the OS.
        self.user_dp = user_mechanism(cfg, seed=cfg.seed if client_states is not None else None)
        if self.user_dp and client_states is None:
            # Sampling amplifies privacy only if no one can predict the cohorts: a deployment
            # under user-level DP draws them from the OS, not from the run's (public) seed.
            self.rng = np.random.default_rng(secrets.randbits(128))

    def state_dict(self) -> dict:
        """What the next rounds depend on, as JSON: a resumed run samples, versions and checks
        the clients' privacy histories exactly as the uninterrupted run would."""
        return {"rng": self.rng.bit_generator.state, "held-version": self.held_version, "run-key": self.run_key,
                "epsilon-of-partition": {str(p): e for p, e in sorted(self.epsilon_of_partition.items())},
                **({"user-dp": self.user_dp.state_dict()} if self.user_dp else {})}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.run_key = str(state["run-key"])
        self.held_version = int(state["held-version"])
        self.epsilon_of_partition = {int(p): float(e) for p, e in state["epsilon-of-partition"].items()}
        if self.user_dp:
            try:
                self.user_dp.load_state_dict(state["user-dp"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"the checkpoint's user-level DP state does not fit this run: {exc}") from None

    def summary(self) -> None:
        c = self.cfg
        log(INFO, "\t├──> %s: %d of %d clients per round, svd-period %d", c.strategy, c.clients_per_round,
            c.clients, c.svd_period)
        log(INFO, "\t└──> epsilon %s, delta %g, clip %g, %s lr %g, %d local steps", c.epsilon, c.delta, c.clip,
            c.optimizer, c.lr, c.local_steps)
        if self.user_dp:
            log(INFO, "\t└──> %s; %s clips at %g%s", self.user_dp.plan.describe(), c.clip_placement, c.update_clip,
                " (adaptive)" if c.adaptive_clip else "")

    # -- node discovery and sampling ----------------------------------------------------
    def _discover(self, grid: Grid) -> None:
        """Learn each node's partition id once, so that sampling depends on the seed only.

        The first round waits for every client; later rounds go on with the clients still
        connected, and a node that claims the partition of a node that has gone (a restarted
        SuperNode gets a new node id) takes that partition over.
        """
        need = self.cfg.clients if not self.partition_of_node else self.cfg.clients_per_round
        deadline = time.time() + CLIENT_WAIT_SECONDS
        while len(nodes := sorted(grid.get_node_ids())) < need:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {need} clients connected within "
                                   f"{CLIENT_WAIT_SECONDS}s (start one SuperNode per client, or lower 'clients')")
            logger.info("waiting for clients: %d of %d connected", len(nodes), need)
            time.sleep(1)
        unknown = [n for n in nodes if n not in self.partition_of_node and n not in self.refused]
        self.deferred = set()
        if not unknown:
            return
        settings = {**self.cfg.to_dict(hyphenated=True), protocol.LABEL_NAMES: self.label_names}
        queries = [Message(content=RecordDict({protocol.CONFIG: ConfigRecord(settings)}),
                           message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
        replies = grid.send_and_receive(queries)
        for reply in replies:
            node = recipient(reply, queries)
            if reply.has_error():
                logger.warning("client node %d did not describe itself: %s", node, error_line(reply))
                self.deferred.add(node)
                continue
            info = reply.content[protocol.INFO]
            if protocol.REFUSED in info:
                self.refused[node] = str(info[protocol.REFUSED])
                logger.warning("client node %d cannot take part: %s", node, self.refused[node])
                continue
            partition = int(info["partition-id"])
            if int(info["num-partitions"]) != self.cfg.clients:
                self.refused[node] = (f"num-partitions {int(info['num-partitions'])} does not match the run's "
                                      f"clients={self.cfg.clients}")
                logger.warning("client node %d cannot take part: %s", node, self.refused[node])
                continue
            holder = next((n for n, p in self.partition_of_node.items() if p == partition), None)
            if holder is not None:
                if holder in nodes:
                    # A restarted SuperNode may show up before the SuperLink drops its old node id;
                    # it is asked again next round, and takes over once the old id has gone.
                    logger.warning("client node %d claims partition %d, still held by node %d; not sampled "
                                   "until that node has gone", node, partition, holder)
                    self.deferred.add(node)
                    continue
                del self.partition_of_node[holder]
                self.held_version_at_node.pop(holder, None)
                logger.info("client node %d took over partition %d from node %d, which has gone", node, partition,
                            holder)
            self.partition_of_node[node] = partition

    def sample(self, grid: Grid) -> list[tuple[int, int]]:
        """(partition, node) of each of the round's ``clients-per-round`` clients, chosen by
        partition from the seed alone.

        Simulation (the clients' states travel): clients are data, nodes are workers. No node
        is asked anything before round 1, and the chosen partitions go to the simulated nodes
        in turn, however many there are. Deployment: a node owns one partition, learned at
        discovery (``_discover``). If too few partitions are available because known ones lost
        their node (a SuperNode that died and may come back) or a node's claim waits for its
        old node to go, the round waits for them (up to CLIENT_WAIT_SECONDS); if nothing can
        change that, it fails at once, naming the nodes that refused and why.
        """
        if self.client_states is not None:
            nodes = self._workers(grid)
            chosen = self._cohort(range(self.cfg.clients))
            return [(p, nodes[i % len(nodes)]) for i, p in enumerate(chosen)]
        deadline = time.time() + CLIENT_WAIT_SECONDS
        last_note = 0.0
        while True:
            self._discover(grid)
            connected = set(grid.get_node_ids())
            by_partition = {p: n for n, p in self.partition_of_node.items() if n in connected}
            if len(by_partition) >= self.cfg.clients_per_round:
                break
            gone = set(self.partition_of_node.values()) - set(by_partition)
            if (not gone and not self.deferred) or time.time() > deadline:
                reasons = "".join(f"; node {n}: {why}" for n, why in self.refused.items() if n in connected)
                raise RuntimeError(f"only {len(by_partition)} clients available, {self.cfg.clients_per_round} "
                                   f"needed{reasons}")
            if time.time() - last_note > 10:
                logger.info("waiting for clients: %d of %d needed available (partitions %s have no node)",
                            len(by_partition), self.cfg.clients_per_round, sorted(gone) or "-")
                last_note = time.time()
            time.sleep(5)  # each look asks the undecided nodes again: one ClientApp process each
        return [(p, by_partition[p]) for p in self._cohort(sorted(by_partition))]

    def _cohort(self, partitions) -> list[int]:
        """The round's clients among ``partitions``: ``clients-per-round`` of them drawn without
        replacement, or under user-level DP each with probability clients-per-round / clients
        (Poisson sampling, as its accountant assumes; a cohort's size then varies)."""
        partitions = list(partitions)
        if self.user_dp:
            return userdp.poisson_cohort(self.rng, partitions, self.user_dp.plan.sample_rate)
        return sorted(int(p) for p in self.rng.choice(partitions, size=self.cfg.clients_per_round, replace=False))

    def warm_up(self, grid: Grid) -> list[str]:
        """Simulation: ask every simulated node to ready its worker (model, data, noise plan)
        without waiting for it; ``warmed_up`` collects the replies before round 1."""
        settings = ConfigRecord({**self.cfg.to_dict(hyphenated=True),
                                 protocol.PLAN_RATES: [p.sample_rate for p in self.plans],
                                 protocol.PLAN_STEPS: [p.steps for p in self.plans],
                                 protocol.PLAN_SIGMAS: [p.noise_multiplier for p in self.plans]})
        messages = [Message(content=RecordDict({protocol.CONFIG: settings}),
                            message_type=f"{MessageType.QUERY}.{protocol.WARM_UP}", dst_node_id=node)
                    for node in self._workers(grid)]
        return list(grid.push_messages(messages))

    def warmed_up(self, grid: Grid, message_ids: list[str]) -> None:
        """Wait for the warm-up replies. A worker that failed to get ready is only noted: its
        first client reports the real error, in its round."""
        waiting, deadline = set(message_ids), time.time() + CLIENT_WAIT_SECONDS
        while waiting and time.time() < deadline:
            for reply in grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    logger.warning("a simulated node failed to get ready: %s", error_line(reply))
            if waiting:
                time.sleep(0.05)

    def _workers(self, grid: Grid) -> list[int]:
        deadline = time.time() + CLIENT_WAIT_SECONDS
        while not (nodes := sorted(grid.get_node_ids())):
            if time.time() > deadline:
                raise RuntimeError(f"no simulated node connected within {CLIENT_WAIT_SECONDS}s")
            time.sleep(0.1)
        return nodes

    # -- one round ----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.round_started = time.time()
        state = arrays.to_torch_state_dict()
        held = set(self.rule.held(state, self.cfg.train_head, server_round))
        travels = self.client_states is not None
        settings = {**self.cfg.to_dict(hyphenated=True), **config, protocol.SERVER_ROUND: server_round,
                    protocol.HELD_VERSION: self.held_version, protocol.STATE_TRAVELS: travels,
                    protocol.RUN_KEY: self.run_key,
                    **({protocol.USER_CLIP: self.user_dp.clip} if self.user_dp else {})}
        messages = []
        for partition, node in self.sample(grid):
            up_to_date = not travels and self.held_version_at_node.get(node) == self.held_version
            payload = {k: v for k, v in state.items() if not (up_to_date and k in held)}
            seen = self.epsilon_of_partition.get(partition, 0.0)
            client_state = _state_records(self.client_states.get(partition)) if travels else {}
            content = RecordDict({protocol.ARRAYS: ArrayRecord(payload),
                                  protocol.CONFIG: ConfigRecord({**settings, protocol.EPSILON_SEEN: seen,
                                                                 protocol.PARTITION: partition}),
                                  **client_state})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        self._global = state
        self._sent = messages  # the Grid sets their message ids when it sends them
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global model on the held-out test split itself

    def _read_reply(self, reply: Message, node: int, partition: int, expected: dict[str, torch.Tensor], who: str):
        """(update, weight, train loss) of a usable reply; None if the client sat out; raises if bad."""
        info = reply.content[protocol.METRICS]
        epsilon = float(info["epsilon"])
        if math.isnan(epsilon):
            raise AggregationError("reported epsilon is NaN")
        self.epsilon_of_partition[partition] = epsilon
        self.held_version_at_node[node] = int(info[protocol.HELD_VERSION])
        if int(info.get("budget-exhausted", 0)):
            self.last_clients.append(_client_row(partition, info))
            return None
        weight = float(info["num-examples"])
        if not (math.isfinite(weight) and weight > 0):
            raise AggregationError(f"num-examples must be a positive number, got {weight}")
        update = reply.content[protocol.ARRAYS].to_torch_state_dict()
        check_update(update, expected, who)
        within = None
        if self.user_dp and self.cfg.clip_placement == "client":
            within = self._check_client_clip(update, expected, info)
        self.last_clients.append(_client_row(partition, info))  # only what was used
        return update, weight, float(info.get("train-loss", math.nan)), within  # no loss under DP

    def _check_client_clip(self, update, expected, info) -> bool | None:
        """A client that clips its own update must stay within the round's clip; its bit
        (whether the update was within it before clipping) feeds adaptive clipping."""
        norm, clip = userdp.update_norm(update, expected), self.user_dp.clip
        if norm > clip * (1 + 1e-9) + userdp.rounding_allowance(update):  # (the server's own clip removes rounding)
            raise AggregationError(f"update norm {norm:.6g} exceeds update-clip {clip:.6g} (clip-placement client)")
        if not self.cfg.adaptive_clip:
            return None
        if protocol.WITHIN_CLIP not in info:
            raise AggregationError(f"no '{protocol.WITHIN_CLIP}' bit, which adaptive clipping needs")
        return bool(int(info[protocol.WITHIN_CLIP]))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        expected_names = self.rule.trainable(self._global, self.cfg.train_head, server_round)
        expected = {k: self._global[k] for k in expected_names}
        accepted: list[tuple[int, dict[str, torch.Tensor], float, bool | None]] = []
        losses, exhausted, rejected, failures = [], 0, 0, []
        self.last_clients = []
        for reply in replies:
            sent = answered(reply, self._sent)
            node = recipient(reply, self._sent)
            partition = int(sent.content[protocol.CONFIG][protocol.PARTITION]) if sent is not None else -1
            who = f"client {partition}"
            if reply.has_error():
                lost = worker_lost(reply)
                if lost:  # Flower's simulation engine would hand every later client to the dead worker
                    raise RunStopped(f"round {server_round}: the simulation worker training {who} died ({lost})")
                failures.append(f"{who} failed: {error_line(reply)}")
                self.held_version_at_node.pop(node, None)  # it may have lost its state: resend A
                logger.warning("%s", failures[-1])
                continue
            if self.client_states is not None and (client_state := _reply_state(reply)):
                # kept even if the update is rejected below: the privacy it spent stays spent
                self.client_states.put(partition, client_state)
            try:
                read = self._read_reply(reply, node, partition, expected, who)
            except (AggregationError, KeyError, TypeError, ValueError) as exc:
                rejected += 1
                failures.append(f"rejected reply of {who}: {str(exc).removeprefix(f'{who}: ')}")
                self.held_version_at_node.pop(node, None)
                logger.warning("%s", failures[-1])
                continue
            if read is None:
                exhausted += 1
                logger.warning("%s sat the round out: privacy budget exhausted (epsilon %.3f)", who,
                               self.epsilon_of_partition[partition])
                continue
            update, weight, loss, within = read
            accepted.append((partition, update, weight, within))
            if math.isfinite(loss):  # NaN under DP, or when every Poisson batch came out empty
                losses.append((loss, weight))
        accepted.sort(key=lambda item: item[0])  # a fixed summation order keeps runs reproducible
        succeeded = len(accepted) + exhausted
        if self.user_dp:
            # A rejected update (wrong shape, NaN, above the clip) may come from one user's data:
            # stopping on it would reveal that user through whether later rounds exist, so under
            # user-level DP it counts as a zero contribution. Clients that did not answer still count.
            succeeded += rejected
        # a Poisson cohort may be smaller than min-clients, or empty, by design
        if succeeded < min(self.cfg.min_clients, len(self._sent) if self.user_dp else self.cfg.min_clients):
            raise RunStopped(f"round {server_round}: {succeeded} of {len(self._sent)} sampled clients succeeded, "
                             f"fewer than min-clients={self.cfg.min_clients}"
                             + (f" ({failures[0]})" if failures else ""))
        metrics = {
            "clients-replied": len(accepted), "clients-failed": len(failures), "clients-exhausted": exhausted,
            # cumulative: the largest epsilon any client has spent so far
            # (before any client has reported: nothing spent, or without DP no guarantee at all)
            "epsilon-max": max(self.epsilon_of_partition.values(), default=0.0 if self.cfg.private else math.inf),
        }
        if losses:  # private clients do not report their training loss
            metrics["train-loss"] = sum(l * w for l, w in losses) / sum(w for _, w in losses)
        metrics.update(round_diagnostics(self.last_clients))
        self.last_clients.sort(key=lambda row: row["partition"])
        self.last_round = metrics
        if not accepted and not self.user_dp:
            logger.warning("round %d: no usable client update; the global adapter is unchanged", server_round)
            return None, MetricRecord(metrics)
        privatize = None
        if self.user_dp:
            def privatize(updates):
                noisy, release = self.user_dp.privatize(self._global, expected_names, updates, server_round,
                                                        [w for *_, w in accepted])
                metrics.update(user_metrics(release, self.user_dp.plan))
                return noisy
        try:
            new_state = rules.aggregate(self.cfg.strategy, self._global, [u for _, u, _, _ in accepted],
                                        [w for _, _, w, _ in accepted], server_round, self.cfg.svd_period,
                                        self.cfg.seed, privatize)
        except privacy.BudgetExhausted as exc:
            raise RunStopped(f"round {server_round}: {exc}") from None
        # What clients hold next round must be current: a new version if any of it changed, or
        # if it is not what they held this round (rules that alternate the trained factor).
        held_now = self.rule.held(new_state, self.cfg.train_head, server_round)
        held_next = self.rule.held(new_state, self.cfg.train_head, server_round + 1)
        if held_next != held_now or any(not torch.equal(new_state[k], self._global[k]) for k in held_next):
            self.held_version += 1
        return ArrayRecord({k: v.contiguous() for k, v in new_state.items()}), MetricRecord(metrics)


def user_mechanism(cfg: RunConfig, seed: int | None) -> userdp.UserLevelDP | None:
    """The run's user-level DP mechanism (None without user-level DP); a plan that cannot be
    made is a ConfigError."""
    try:
        plan = userdp.plan_for(cfg)
    except userdp.UserPlanError as exc:
        raise ConfigError(str(exc)) from None
    if plan is None:
        return None
    return userdp.UserLevelDP(plan, cfg.update_clip, cfg.clip_placement, cfg.adaptive_clip, cfg.clip_quantile,
                              cfg.clip_lr, seed)


def user_metrics(release: userdp.Release, plan: userdp.UserPlan) -> dict:
    """A round's user-level record: cumulative epsilon with what the accountant composed (noise
    multiplier and sampling rate), the clip the round used, the cohort's size, and (adaptive
    clipping) the noisy share of updates within the clip."""
    out = {"user-epsilon": release.epsilon, "user-population": plan.population,
           "user-noise-multiplier": plan.noise_multiplier, "user-sample-rate": plan.sample_rate,
           "update-clip": release.clip, "cohort": release.cohort}
    if release.unclipped_fraction is not None:
        out["unclipped-fraction"] = release.unclipped_fraction  # noisy: may fall outside [0, 1]
        out["update-noise-multiplier"] = plan.update_noise_multiplier  # the updates' share of z
    return out


def _state_records(state: dict | None) -> dict:
    """A client's stored state as the records that travel with its training message."""
    return {protocol.STATE_PREFIX + name: record for name, record in to_records(state).items()}


def _reply_state(reply: Message) -> dict:
    """The client state a reply carries back, in plain form (``fedortho.checkpoint``)."""
    return from_records((key.removeprefix(protocol.STATE_PREFIX), record) for key, record in reply.content.items()
                        if key.startswith(protocol.STATE_PREFIX))


# Ray errors that mean the simulation worker itself is gone, not that the ClientApp it ran failed
# (which arrives as RayTaskError(ClientAppException)).
WORKER_LOST_ERRORS = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError",
                      "NodeDiedError", "LocalRayletDiedError", "OutOfMemoryError")


def worker_lost(reply: Message) -> str | None:
    """The Ray error's name if the reply says the simulation worker itself died or cannot be
    reached."""
    match = re.match(r"<class 'ray\.exceptions\.(\w+)'>", (reply.error.reason or "").strip())
    return match.group(1) if match and match.group(1) in WORKER_LOST_ERRORS else None


def answered(reply: Message, sent: list[Message]) -> Message | None:
    """The message a reply answers (its recipient is the node, its partition the client).

    Not ``reply.metadata.src_node_id``: when a node dies, the SuperLink answers in its place
    with an error reply that carries the SuperLink's own id there.
    """
    wanted = reply.metadata.reply_to_message_id
    return next((m for m in sent if m.metadata.message_id == wanted), None)


def recipient(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for: the recipient of the message it replies to."""
    message = answered(reply, sent)
    return message.metadata.dst_node_id if message is not None else reply.metadata.src_node_id


def error_line(reply: Message) -> str:
    """The last line of an error reply's reason, without Flower's "<class ...>:<'...'>" wrapping."""
    reason = (reply.error.reason or "").strip()
    match = re.fullmatch(r"<class '[^']+'>:<'(.*)'>", reason, flags=re.S)
    lines = (match.group(1) if match else reason).strip().splitlines()
    line = lines[-1] if lines else "no reason given"
    return re.sub(r"^Exception \w+ occurred\. Message: ", "", line)  # how Flower wraps a ClientApp's error


CLIENT_KEYS = ("epsilon", "noise-multiplier", "sample-rate", "steps", "participations", "budget-exhausted",
               "clipped-fraction", "lora-grad-norm", "head-grad-norm", "grad-samples")


def _client_row(partition: int, info) -> dict:
    """A client's privacy record of one round (``privacy.jsonl``): what it reported of
    CLIENT_KEYS, as plain numbers."""
    row = {"partition": partition}
    for key in CLIENT_KEYS:
        if key in info:
            value = info[key]
            row[key] = int(value) if key in ("steps", "participations", "budget-exhausted", "grad-samples") \
                else float(value)
    return row


def round_diagnostics(rows: list[dict]) -> dict:
    """Round-level summary of the clients' rows: the largest noise multiplier, the share of
    clipped samples over all clients' samples, and the median over clients of their median
    per-sample gradient norms (only what clients reported)."""
    out = {}
    sigmas = [r["noise-multiplier"] for r in rows if "noise-multiplier" in r]
    if sigmas:
        out["noise-multiplier"] = max(sigmas)
    counted = [r for r in rows if "clipped-fraction" in r and r.get("grad-samples", 0) > 0]
    if counted:
        samples = sum(r["grad-samples"] for r in counted)
        out["clipped-fraction"] = sum(r["clipped-fraction"] * r["grad-samples"] for r in counted) / samples
    for key in ("lora-grad-norm", "head-grad-norm"):
        values = [r[key] for r in counted if key in r]
        if values:
            out[key] = float(np.median(values))
    return out
