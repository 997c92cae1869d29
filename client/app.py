"""ClientApp: restore the client's state from ``context.state``, train, reply.

The base model and the tokenized data stay alive in the worker process across clients and
rounds (``fedortho.worker``); per-client state is small: the held tensors (A, a frozen head),
the privacy accountant's history, the noise plan and, with ``optimizer-state = keep``, the
optimizer's state (its momentum rotated along when FedSVD rotates B and A).

Node config (``--node-config`` of a SuperNode; set automatically in simulation), read and
checked by ``fedortho.node.NodeSettings``: ``partition-id`` and ``num-partitions`` (required);
optionally ``data-path`` (this node's own training data), ``epsilon``, ``delta``, ``clip`` to
pin this client's privacy settings (it refuses a server asking for others),
``secure-noise=true`` to seed sampling and noise from OS randomness instead of the run seed
(so that no one who knows the seed can replay the noise; runs are then not reproducible),
``privacy-ledger=<file>`` to make the budget cover every run on this node's data, not one
run (``fedortho.privacy.PrivacyLedger``), ``state-path=<folder>`` to keep this client's state
(accountant history, noise plan, optimizer state) on the node's disk after every round, so a
restarted SuperNode or a resumed run goes on with it, and ``report-diagnostics=true``. The node checks
them against the run when first asked to describe itself.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import nullcontext

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.state import from_records, to_records
from fedortho import protocol, rules, userdp
from fedortho.checkpoint import CheckpointError, load_node_state, save_node_state
from fedortho.config import ConfigError, RunConfig
from fedortho.faults import maybe_fail
from fedortho.node import NodeConfigError, NodeSettings
from fedortho.optim.rotation import rotate_saved_state
from fedortho.nodeworker import InProcess, NodeWorkerClient
from fedortho.privacy import BudgetExhausted, LedgerError, NoisePlan, PrivacyLedger, PrivacyState
from fedortho.worker import ClientWork

app = ClientApp()

STATE_HELD = "held-tensors"
STATE_HELD_META = "held-meta"
STATE_PRIVACY = "privacy"  # the client's PrivacyState, as its state dict in JSON (one record)
STATE_OPTIMIZER = "optimizer-tensors"
STATE_OPTIMIZER_SCALARS = "optimizer-scalars"
STATE_OPTIMIZER_BASIS = "optimizer-basis"  # the A the kept optimizer state is expressed in
STATE_PARTICIPATION = "participation"  # rounds this client trained in this run

# Gradient diagnostics are computed from private data without noise: a client releases them
# only in simulation (``fedortho simulate`` sets this variable for its workers) or when its
# node config says ``report-diagnostics=true``.
DIAGNOSTICS_ENV = "FEDORTHO_REPORT_DIAGNOSTICS"
# Set (by ``fedortho simulate``) only in a simulation's workers: there a client's state travels
# with its messages. A deployed node keeps its own and never takes a privacy history from the
# server, which could otherwise hand it a fresh budget.
SIMULATION_ENV = "FEDORTHO_SIMULATION"


def _node(context: Context) -> NodeSettings:
    return NodeSettings.from_node_config(context.node_config)


def _run_config(msg: Message) -> RunConfig:
    """The run's settings from a message (without the per-round keys that travel beside them)."""
    values = {k: v for k, v in msg.content[protocol.CONFIG].items() if k not in protocol.PER_ROUND_KEYS}
    return RunConfig.from_mapping(values)


def _config(msg: Message, node: NodeSettings, kept: PrivacyState | None) -> RunConfig:
    """The run's settings, checked against the node's pinned privacy settings and against the
    budget of the client's kept privacy state (``_kept_privacy``)."""
    cfg = _run_config(msg)
    node.check_privacy(cfg)
    if kept is not None:  # the budget may not change once spending has begun
        for key in protocol.PRIVACY_KEYS:
            if float(getattr(kept, key)) != float(getattr(cfg, key)):
                raise RuntimeError(f"{key} changed from {getattr(kept, key)} to {getattr(cfg, key)} during the run; "
                                   "refusing to train")
    return cfg


def _kept_privacy(context: Context) -> PrivacyState | None:
    """The PrivacyState this client kept from its earlier rounds of the run (None before its first)."""
    if STATE_PRIVACY not in context.state:
        return None
    record = context.state[STATE_PRIVACY]
    try:
        if "state" not in record and "noise-multipliers" in record:
            return _earlier_layout(record)
        return PrivacyState.from_state_dict(json.loads(str(record["state"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise RuntimeError(f"this client's privacy state is unreadable ({type(exc).__name__}); refusing to train") \
            from None


def _backend(node: NodeSettings):
    """Where training runs: the node's long-lived worker if its config names one (deployment;
    ``fedortho.nodeworker``), else this process (simulation, whose worker processes live on)."""
    return NodeWorkerClient(node.worker_socket) if node.worker_socket else InProcess()


def _held_tensors(received: dict, cfg: RunConfig, names: list[str], context: Context, version: int,
                  server_round: int) -> dict:
    """The held tensors of this round: from the message when they changed (and then kept),
    else from this client's state."""
    held = protocol.held_names(names, cfg.strategy, cfg.train_head, server_round)
    if not held:  # fedavg with a trained head: everything travels every round
        return {}
    if any(k in received for k in held):
        missing = [k for k in held if k not in received]
        if missing:
            raise RuntimeError(f"the server sent only part of the held tensors (missing '{missing[0]}')")
        tensors = {k: received[k] for k in held}
        context.state[STATE_HELD] = ArrayRecord(tensors)
        context.state[STATE_HELD_META] = ConfigRecord({"version": version})
        return tensors
    if STATE_HELD in context.state and int(context.state[STATE_HELD_META]["version"]) == version:
        kept = context.state[STATE_HELD].to_torch_state_dict()
        if set(held) <= set(kept):
            return {k: kept[k] for k in held}
    raise RuntimeError("the server sent no held tensors (A) and this client holds no current copy")


def _kept_optimizer_state(cfg: RunConfig, context: Context, held: dict):
    """The optimizer state this client kept, moved into the coordinates of the current A.

    The state is rotated from the A it was trained with (saved beside it), not from the A
    held before this message: a round that failed after a new A arrived must not leave the
    momentum in stale coordinates.
    """
    if cfg.optimizer_state != "keep" or STATE_OPTIMIZER not in context.state:
        return None
    tensors = context.state[STATE_OPTIMIZER].to_torch_state_dict()
    scalars = dict(context.state[STATE_OPTIMIZER_SCALARS]) if STATE_OPTIMIZER_SCALARS in context.state else {}
    basis = context.state[STATE_OPTIMIZER_BASIS].to_torch_state_dict() if STATE_OPTIMIZER_BASIS in context.state else {}
    if rules.rule(cfg.strategy).rotates_kept_state and any(not torch.equal(basis[k], held[k])
                                                           for k in basis if k in held):
        tensors = rotate_saved_state(tensors, basis, held)  # the server rotated (B, A): rotate B's momentum too
    return tensors, scalars


def _earlier_layout(record) -> PrivacyState:
    """A privacy record kept in the earlier layout (parallel lists and plan fields, as
    checkpoints and nodes' state files of earlier versions hold it)."""
    history = list(zip(record["noise-multipliers"], record["sample-rates"], record["steps"]))
    plan = NoisePlan(float(record["plan-noise-multiplier"]), float(record["plan-sample-rate"]),
                     int(record["plan-steps"]), tuple(map(tuple, json.loads(str(record.get("plan-prior", "[]"))))))
    return PrivacyState.from_state_dict({"epsilon": record["run-epsilon"], "delta": record["run-delta"],
                                         "clip": record["run-clip"], "history": history, "plan": plan.state_dict()})


def _privacy_past(cfg: RunConfig, kept: PrivacyState | None, ledger: PrivacyLedger | None, seen: float,
                  backend) -> tuple[PrivacyState, float]:
    """(state, spent): this client's PrivacyState with everything its data has spent so far
    (with a ledger, every run's rounds on this node, this run's included), and its epsilon.
    The state's noise plan, made in the client's first round, travels with it: whichever
    process trains it next does not redo it, and a plan made after a ledger's earlier runs
    keeps covering what they left. Refuses to go on if spending the server has seen
    (``seen``) or this run's own history is missing from what it finds."""
    state = kept or PrivacyState(cfg.epsilon, cfg.delta, cfg.clip)
    # Epsilon is computed by the backend: in a node worker, Opacus is imported once, not per message.
    spent = backend.spent_epsilon(state.history, cfg.delta)
    if ledger is not None:
        state.history = ledger.read()
        in_ledger = backend.spent_epsilon(state.history, cfg.delta)
        if in_ledger < spent - 1e-9:
            raise RuntimeError(f"privacy ledger {ledger.path} shows less spending than this run's own "
                               "history (was it replaced or removed?); refusing to train")
        spent = in_ledger
    if cfg.private and seen > spent + 1e-9:
        raise RuntimeError(f"this client's privacy history is missing (the server saw it spend epsilon "
                           f"{seen:.3f}, its state shows {spent:.3f}); refusing to train")
    return state, spent


def _reports_diagnostics(node: NodeSettings) -> bool:
    return node.report_diagnostics or os.environ.get(DIAGNOSTICS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Say which partition this node trains, or why it cannot take part in this run."""
    try:
        node = _node(context)
        node.check(_run_config(msg), _run_label_names(msg))
        info = {"partition-id": node.partition_id, "num-partitions": node.num_partitions}
    except (NodeConfigError, LedgerError, ConfigError) as exc:
        info = {protocol.REFUSED: str(exc)}
    return Message(RecordDict({protocol.INFO: ConfigRecord(info)}), reply_to=msg)


@app.query(protocol.WARM_UP)
def warm_up(msg: Message, context: Context) -> Message:
    """Simulation: build the model, read the data and plan the noise in this worker process
    now, while the server evaluates round 0 (``fedortho.worker.warm_up``)."""
    from fedortho.worker import warm_up as warm_up_worker

    config = msg.content[protocol.CONFIG]
    # Noise plans made by the server are taken only in a simulation, whose server is this
    # machine's own process: a deployed client plans its noise itself.
    plans = list(zip(config.get(protocol.PLAN_RATES, []), config.get(protocol.PLAN_STEPS, []),
                     config.get(protocol.PLAN_SIGMAS, []))) if os.environ.get(SIMULATION_ENV) == "1" else []
    warm_up_worker(_run_config(msg), [NoisePlan(float(s), float(q), int(n)) for q, n, s in plans])
    return Message(RecordDict({protocol.INFO: ConfigRecord({})}), reply_to=msg)


def _run_label_names(msg: Message) -> tuple[str, ...] | None:
    names = msg.content[protocol.CONFIG].get(protocol.LABEL_NAMES)
    return None if names is None else tuple(str(n) for n in names)


def _restore_travelling_state(msg: Message, context: Context) -> None:
    """Make the state that came with the message this client's whole state (simulation)."""
    _forget(context)
    for key, record in msg.content.items():
        if key.startswith(protocol.STATE_PREFIX):
            context.state[key.removeprefix(protocol.STATE_PREFIX)] = record


def _travelling_state(context: Context) -> dict:
    """The records of this client's state that go back with its reply (the held tensors do not:
    the server sends them every round when the state travels)."""
    return {protocol.STATE_PREFIX + key: record for key, record in _kept_records(context)}


def _forget(context: Context) -> None:
    """A simulated node holds nothing between its rounds: its state lives with the server
    (the simulation engine would otherwise keep every client's last state in memory)."""
    for key in list(context.state.keys()):
        del context.state[key]


def _client_of(round_config, node: NodeSettings, cfg: RunConfig, travels: bool) -> tuple[int, int]:
    """(partition, number of partitions) this message asks to train. A simulated node is a
    worker and trains whichever client it is sent (its state came with the message); a
    deployed node trains only its own partition."""
    asked = round_config.get(protocol.PARTITION)
    if travels and asked is not None:
        return int(asked), cfg.clients
    if asked is not None and int(asked) != node.partition_id:
        raise NodeConfigError(f"this node holds partition {node.partition_id}, the server asks it to train "
                              f"partition {int(asked)}; refusing")
    return node.partition_id, node.num_partitions


def _kept_records(context: Context) -> list:
    """This client's state but the held tensors, which the server sends again to a node that
    does not hold them."""
    return [(key, record) for key, record in context.state.items() if key not in (STATE_HELD, STATE_HELD_META)]


def _restore_from_disk(node: NodeSettings, run_key: str, context: Context) -> None:
    """A node with ``state-path`` that lost its state in memory (its SuperNode restarted, or the
    server resumed the run as a new Flower run) takes it back from its own disk."""
    if not (node.state_path and run_key) or STATE_PARTICIPATION in context.state:
        return
    try:
        saved = load_node_state(node.state_path, run_key)
    except CheckpointError as exc:
        raise RuntimeError(f"{exc}; refusing to train") from None
    for key, record in to_records(saved).items():
        context.state[key] = record


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    round_config = msg.content[protocol.CONFIG]
    travels = bool(round_config.get(protocol.STATE_TRAVELS, False))
    if travels and os.environ.get(SIMULATION_ENV) != "1":
        raise NodeConfigError("the server sent this client's state with the message; a deployed node keeps its "
                              "own state and privacy history, refusing")
    run_key = str(round_config.get(protocol.RUN_KEY, ""))
    if travels:
        _restore_travelling_state(msg, context)
    else:
        _restore_from_disk(node, run_key, context)
    kept = _kept_privacy(context)
    cfg = _config(msg, node, kept)
    partition_id, num_partitions = _client_of(round_config, node, cfg, travels)
    maybe_fail(cfg.seed, int(round_config[protocol.SERVER_ROUND]), partition_id, cfg.fail_rate)
    version = int(round_config[protocol.HELD_VERSION])
    received = msg.content[protocol.ARRAYS].to_torch_state_dict()
    backend = _backend(node)
    held = _held_tensors(received, cfg, backend.adapter_names(cfg, node.data_path), context, version,
                         int(round_config[protocol.SERVER_ROUND]))

    ledger = node.privacy_ledger(cfg)
    with ledger.locked() if ledger is not None else nullcontext():
        past, spent = _privacy_past(cfg, kept, ledger, float(round_config.get(protocol.EPSILON_SEEN, 0.0)), backend)
        secure = node.secure_noise
        work = ClientWork(cfg=cfg, partition_id=partition_id, num_partitions=num_partitions,
                          server_round=int(round_config[protocol.SERVER_ROUND]), global_state={**received, **held},
                          privacy=past if cfg.private else None, seed=secrets.randbits(62) if secure else None,
                          optimizer_state=_kept_optimizer_state(cfg, context, held), data_path=node.data_path)
        try:
            result = backend.train(work)
        except BudgetExhausted:
            # Not an error: the client has spent what it may and sits the remaining rounds out.
            metrics = MetricRecord({"num-examples": 0, "budget-exhausted": 1, "epsilon": spent,
                                    protocol.HELD_VERSION: version})
            if travels:
                _forget(context)  # unchanged: the server keeps it
            return Message(RecordDict({protocol.METRICS: metrics}), reply_to=msg)
        if ledger is not None:
            # before anything trained on the data leaves the node; result.epsilon is the epsilon
            # of result.privacy (a ledger exists only under DP)
            ledger.write(result.privacy, result.epsilon)

    if cfg.optimizer_state == "keep":
        tensors, scalars = result.optimizer_state
        context.state[STATE_OPTIMIZER] = ArrayRecord(tensors)
        context.state[STATE_OPTIMIZER_SCALARS] = ConfigRecord(scalars)
        if held:
            context.state[STATE_OPTIMIZER_BASIS] = ArrayRecord(held)
    if result.privacy is not None:
        context.state[STATE_PRIVACY] = ConfigRecord({"state": json.dumps(result.privacy.state_dict())})
    participations = int(context.state[STATE_PARTICIPATION]["rounds"]) + 1 if STATE_PARTICIPATION in context.state else 1
    context.state[STATE_PARTICIPATION] = ConfigRecord({"rounds": participations})
    if node.state_path and run_key and not travels:  # on disk before anything trained leaves the node
        # with the held tensors: a restarted node that kept its node id need not be sent A again
        save_node_state(node.state_path, run_key, int(round_config[protocol.SERVER_ROUND]),
                        from_records(context.state.items()))
    # What the accountant counted: public given the run's settings, so always reported.
    metrics = {
        "num-examples": result.num_examples, "epsilon": result.epsilon,
        "noise-multiplier": result.noise_multiplier, "sample-rate": result.sample_rate, "steps": result.steps,
        "participations": participations, protocol.HELD_VERSION: version,
    }
    if _reports_diagnostics(node):
        metrics.update(result.diagnostics)
    if not (cfg.private or cfg.user_private):
        # The loss on the private batches is computed without clipping or noise: releasing
        # it would spend privacy no accountant counts, so only non-private runs report it.
        metrics["train-loss"] = result.train_loss
    update = result.update
    if cfg.user_private and cfg.clip_placement == "client":
        update, within = _clipped_by_client(update, {**received, **held}, round_config)
        if cfg.adaptive_clip:
            metrics[protocol.WITHIN_CLIP] = int(within)
    metrics = MetricRecord(metrics)
    state = _travelling_state(context) if travels else {}
    if travels:
        _forget(context)
    return Message(RecordDict({protocol.ARRAYS: ArrayRecord(update), protocol.METRICS: metrics, **state}),
                   reply_to=msg)


def _clipped_by_client(update: dict, global_state: dict, round_config) -> tuple[dict, bool]:
    """User-level DP with clip-placement client: the update clipped to the round's clip before
    it leaves the node, and whether it was within the clip already."""
    if protocol.USER_CLIP not in round_config:
        raise RuntimeError("user-level DP with clip-placement client, but the server sent no update clip; refusing")
    clip = float(round_config[protocol.USER_CLIP])
    clipped, norm = userdp.clip_update(update, global_state, clip)
    return clipped, norm <= clip
