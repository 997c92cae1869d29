"""ServerApp: build the strategy, evaluate the global model every round, write the run folder."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid

from fedortho import data
from fedortho.config import ConfigError, RunConfig
from fedortho.data import DataError
from fedortho.lora import adapter_state, load_adapter_state, save_adapter
from fedortho.models import ModelLoadError
from fedortho.runs import RunRecorder, default_out, get_logger
from fedortho.train import evaluate
from fedortho.worker import build_model, set_threads
from server.grid import PromptGrid
from server.strategy import LoRAStrategy


def run_federation(grid: Grid, cfg: RunConfig) -> dict:
    """Run ``cfg.rounds`` rounds and write the run folder; returns the summary.

    The adapter is saved after every evaluated round and the summary is written even if the
    run stops early, so an interrupted run keeps everything it computed.
    """
    set_threads(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    recorder = RunRecorder(cfg, out, provenance=provenance(grid))
    print(f"fedortho: {cfg.strategy}, {cfg.clients_per_round}/{cfg.clients} clients per round, "
          f"{cfg.rounds} rounds, epsilon {cfg.epsilon:g} -> {out}", flush=True)
    model = build_model(cfg)  # the server's copy, for evaluation and for saving the adapter
    test = data.test_tensors(cfg)
    strategy = LoRAStrategy(cfg, data.splits_for(cfg).label_names)
    if isinstance(grid, HttpGrid):  # deployment: Flower's own Grid would wait 3 s between looks
        grid = PromptGrid(grid)

    zero_shot = None
    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        row: dict = {"round": server_round}
        if server_round > 0:
            row.update(strategy.last_round)
            row["epsilon"] = row.pop("epsilon-max")
            row["round-seconds"] = round(time.time() - strategy.round_started, 2)
            recorder.record_clients(server_round, strategy.last_clients)
        if not evaluated(cfg, server_round):
            recorder.record(row)
            return None
        load_adapter_state(model, arrays.to_torch_state_dict())
        accuracy, loss = evaluate(model, test, precision=cfg.eval_precision)
        row.update({"test-accuracy": accuracy, "test-loss": loss})
        save_adapter(model, out / "adapter")  # the adapter of the last evaluated round
        recorder.record(row)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    finished = False
    try:
        # With a zero-shot head, round 0 measures it: no evaluation of its own.
        zero_shot = None if cfg.head_init == "zero-shot" else zero_shot_accuracy(cfg, test)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(model)), num_rounds=cfg.rounds,
                       evaluate_fn=evaluate_global)
        finished = True
    finally:
        if cfg.head_init == "zero-shot" and recorder.rows:
            zero_shot = recorder.rows[0].get("test-accuracy")
        summary = recorder.finish({"majority-rate": data.majority_rate(data.splits_for(cfg).test_labels),
                                   "zero-shot-accuracy": zero_shot, "completed": finished})
    if summary["empty-rounds"]:
        get_logger().warning("%d of %d rounds had no usable client update; the run is not complete",
                             summary["empty-rounds"], cfg.rounds)
    final = summary["final-accuracy"]
    print(f"fedortho: final accuracy {'-' if final is None else f'{final:.4f}'} (zero-shot head "
          f"{'-' if zero_shot is None else f'{zero_shot:.4f}'}), epsilon spent {summary['epsilon-spent']:.3f}, "
          f"{summary['wall-seconds']:.0f}s; outputs in {out}", flush=True)
    return summary


def provenance(grid: Grid) -> dict:
    """The Flower run id and the hash of the app bundle that ran (empty in a simulation
    started by ``fedortho simulate``, where the checkout's commit identifies the code)."""
    try:
        run = grid.run
    except Exception:  # a Grid without a run set
        return {}
    out = {}
    if getattr(run, "fab_hash", ""):
        out.update({"flower-run-id": int(run.run_id), "app-hash": run.fab_hash,
                    "app": f"{run.fab_id}=={run.fab_version}".strip("=")})
    return out


def evaluated(cfg: RunConfig, server_round: int) -> bool:
    """Round 0, every ``eval-every``-th round and the last round are evaluated."""
    return server_round in (0, cfg.rounds) or server_round % cfg.eval_every == 0


def zero_shot_accuracy(cfg: RunConfig, test) -> float | None:
    """Test accuracy of the model with B = 0 and a zero-shot head: the score a run must beat
    without training on any client's data. None if the labels have no usable descriptions."""
    if cfg.pooling != "mean":
        return None
    try:
        reference = build_model(cfg.replace(head_init="zero-shot", train_head=False))
    except ConfigError:
        return None
    return evaluate(reference, test, precision=cfg.eval_precision)[0]


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
    try:
        cfg = RunConfig.from_mapping(context.run_config)
        run_federation(grid, cfg)
    except (ConfigError, DataError, ModelLoadError, FileExistsError) as exc:
        get_logger().error("%s", exc)  # the reason in one line, before Flower's report
        # An Exception (not SystemExit, which Flower does not catch) makes Flower mark the
        # run failed with this reason (`flwr ls`) instead of waiting for a heartbeat.
        raise RunFailed(str(exc)) from None


class RunFailed(RuntimeError):
    """The run could not start or go on; its message is the reason, in one line."""
