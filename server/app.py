"""ServerApp: build the strategy, evaluate the global model every round, write the run folder."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedortho import data
from fedortho.config import RunConfig
from fedortho.lora import adapter_state, load_adapter_state, save_adapter
from fedortho.runs import RunRecorder, default_out
from fedortho.train import evaluate
from fedortho.worker import build_model, set_threads
from server.strategy import LoRAStrategy


def run_federation(grid: Grid, cfg: RunConfig) -> dict:
    """Run ``cfg.rounds`` rounds and write the run folder; returns the summary."""
    set_threads(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    recorder = RunRecorder(cfg, out)
    print(f"fedortho: {cfg.strategy}, {cfg.clients_per_round}/{cfg.clients} clients per round, "
          f"{cfg.rounds} rounds, epsilon {cfg.epsilon:g} -> {out}", flush=True)
    model = build_model(cfg)  # the server's copy, for evaluation and for saving the adapter
    test = data.test_tensors(cfg)
    strategy = LoRAStrategy(cfg)
    final = {}

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        state = arrays.to_torch_state_dict()
        load_adapter_state(model, state)
        accuracy, loss = evaluate(model, test, precision=cfg.eval_precision)
        row = {"round": server_round, "test-accuracy": accuracy, "test-loss": loss}
        if server_round > 0:
            row.update(strategy.last_round)
            row["epsilon"] = row.pop("epsilon-max")
            row["round-seconds"] = round(time.time() - strategy.round_started, 2)
        recorder.record(row)
        final["state"] = state
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(model)), num_rounds=cfg.rounds,
                   evaluate_fn=evaluate_global)
    load_adapter_state(model, final["state"])
    save_adapter(model, out / "adapter")
    summary = recorder.finish({"majority-rate": data.majority_rate(data.splits_for(cfg).test_labels)})
    print(f"fedortho: final accuracy {summary['final-accuracy']:.4f}, epsilon spent "
          f"{summary['epsilon-spent']}, {summary['wall-seconds']:.0f}s; outputs in {out}", flush=True)
    return summary


def make_server_app(cfg: RunConfig) -> ServerApp:
    """A ServerApp bound to ``cfg`` (used by ``fedortho simulate``)."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg)

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: settings come from the run config (pyproject + overrides)."""
    run_federation(grid, RunConfig.from_mapping(context.run_config))
