"""ClientApp: restore the client's state from ``context.state``, train, reply.

The base model and the tokenized data stay alive in the worker process across clients and
rounds (``fedortho.worker``); per-client state is small: the A matrices the client holds
and the privacy accountant's history.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedortho.config import RunConfig
from fedortho.privacy import BudgetExhausted, remember_plan, spent_epsilon
from fedortho.worker import ClientWork, run_client_round

app = ClientApp()

STATE_A = "lora-a"
STATE_PRIVACY = "privacy"
A_VERSION_KEY = "a-version"


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise RuntimeError("node config needs 'partition-id' and 'num-partitions' "
                           "(e.g. --node-config \"partition-id=0 num-partitions=10\")") from exc


def _config(msg: Message) -> RunConfig:
    values = {k: v for k, v in msg.content["config"].items() if k not in ("server-round", A_VERSION_KEY)}
    return RunConfig.from_mapping(values)


@app.query()
def describe(msg: Message, context: Context) -> Message:
    partition_id, num_partitions = _partition(context)
    return Message(RecordDict({"info": MetricRecord({"partition-id": partition_id,
                                                     "num-partitions": num_partitions})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(msg)
    partition_id, num_partitions = _partition(context)
    server_round = int(msg.content["config"]["server-round"])
    a_version = int(msg.content["config"][A_VERSION_KEY])
    received = msg.content["arrays"].to_torch_state_dict()

    # A arrives only when it changed since this client last held it.
    if any("lora_A" in k for k in received):
        held_a = {k: v for k, v in received.items() if "lora_A" in k}
    elif STATE_A in context.state and int(context.state["a-meta"]["version"]) == a_version:
        held_a = context.state[STATE_A].to_torch_state_dict()
    else:
        raise RuntimeError("the server sent no A and this client holds no current A")
    history = []
    if STATE_PRIVACY in context.state:
        p = context.state[STATE_PRIVACY]
        history = list(zip(p["noise-multipliers"], p["sample-rates"], p["steps"]))
        # The plan travels with the client: whichever worker trains it next does not redo it.
        remember_plan(cfg.epsilon, cfg.delta, p["plan-sample-rate"], p["plan-steps"], p["plan-noise-multiplier"])

    work = ClientWork(cfg=cfg, partition_id=partition_id, num_partitions=num_partitions,
                      server_round=server_round, global_state={**received, **held_a}, history=history)
    context.state[STATE_A] = ArrayRecord(held_a)
    context.state["a-meta"] = ConfigRecord({"version": a_version})
    try:
        result = run_client_round(work)
    except BudgetExhausted:
        # Not an error: the client has spent what it may and sits the remaining rounds out.
        metrics = MetricRecord({"num-examples": 0, "budget-exhausted": 1,
                                "epsilon": spent_epsilon(history, cfg.delta), A_VERSION_KEY: a_version})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    if result.history:
        sigmas, rates, steps = zip(*result.history)
        context.state[STATE_PRIVACY] = ConfigRecord({
            "noise-multipliers": [float(s) for s in sigmas], "sample-rates": [float(q) for q in rates],
            "steps": [int(n) for n in steps], "plan-sample-rate": result.sample_rate,
            "plan-steps": result.planned_steps, "plan-noise-multiplier": result.noise_multiplier,
        })
    metrics = MetricRecord({
        "num-examples": result.num_examples, "train-loss": result.train_loss, "epsilon": result.epsilon,
        "noise-multiplier": result.noise_multiplier, "steps": result.steps, A_VERSION_KEY: a_version,
    })
    return Message(RecordDict({"arrays": ArrayRecord(result.update), "metrics": metrics}), reply_to=msg)
