"""ServerApp: build the strategy, evaluate the global model every round, write the run folder."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import HttpGrid

from fedortho import data
from fedortho.checkpoint import CheckpointError, ClientStates, check_resumable, checkpoint_folder, \
    load_checkpoint, save_checkpoint
from fedortho.config import ConfigError, RunConfig
from fedortho.data import DataError
from fedortho.evalcache import cached_evaluate
from fedortho.lora import adapter_state, load_adapter_state, save_adapter
from fedortho.models import ModelLoadError
from fedortho.privacy import NoisePlan
from fedortho.runs import RunRecorder, RunStopped, default_out, get_logger
from fedortho.tracking import RunTracker
from fedortho.train import evaluate
from fedortho.worker import build_model, set_threads
from server.grid import PromptGrid
from server.strategy import LoRAStrategy


def run_federation(grid: Grid, cfg: RunConfig, resume: bool = False, state_travels: bool = False,
                   plans: Sequence[NoisePlan] = ()) -> dict:
    """Run ``cfg.rounds`` rounds and write the run folder; returns the summary.

    After every round the folder holds the metrics, the adapter of the last evaluated round
    and a checkpoint (``fedortho.checkpoint``); the summary is written even if the run stops
    early. ``resume``: continue the run in ``cfg.out`` after its checkpointed round.
    ``state_travels``: clients' states come back with their replies and are checkpointed here
    (simulation); otherwise each node keeps its own. ``plans``: noise plans already made for
    the run's budget, which a simulation hands to its workers.
    """
    set_threads(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    # the clients' files were verified before the run started (fedortho simulate --resume) and are
    # verified again as each client is sampled
    checkpoint = load_checkpoint(out, verify_clients=False) if resume else None
    if checkpoint is not None:
        check_resumable(checkpoint, cfg)
    clients = checkpoint.clients if checkpoint is not None else ClientStates(checkpoint_folder(out) / "clients")
    # Before the run folder is written: an impossible user-level plan or a checkpoint whose
    # strategy state does not fit stops the run here.
    strategy = LoRAStrategy(cfg, data.splits_for(cfg).label_names, clients if state_travels else None, plans)
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint.server)
        recorder = RunRecorder(cfg, out, resume=(checkpoint.round, float(checkpoint.run.get("seconds", 0.0))))
        recorder.resumed_after = [*checkpoint.run.get("resumed-after-rounds", []), checkpoint.round]
    else:
        strategy.run_key = uuid.uuid4().hex
        recorder = RunRecorder(cfg, out, provenance=provenance(grid))
    first = 1 if checkpoint is None else checkpoint.round + 1
    print(f"fedortho: {cfg.strategy}, {cfg.clients_per_round}/{cfg.clients} clients per round, "
          f"{cfg.rounds} rounds, epsilon {cfg.epsilon:g} -> {out}"
          + (f" (resumed after round {checkpoint.round})" if checkpoint else ""), flush=True)
    if strategy.user_dp:
        print(f"fedortho: {strategy.user_dp.plan.describe()}", flush=True)
    model = build_model(cfg)  # the server's copy, for evaluation and for saving the adapter
    test = data.test_tensors(cfg)
    if isinstance(grid, HttpGrid):  # deployment: Flower's own Grid would wait 3 s between looks
        grid = PromptGrid(grid)

    zero_shot = checkpoint.run.get("zero-shot-accuracy") if checkpoint else None

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        """Record the round, evaluate the global model when due, and checkpoint."""
        row: dict = {"round": server_round}
        if server_round > 0:
            row.update(strategy.last_round)
            row["epsilon"] = row.pop("epsilon-max")
            row["round-seconds"] = round(time.time() - strategy.round_started, 2)
            recorder.record_clients(server_round, strategy.last_clients)
        tensors = arrays.to_torch_state_dict()
        if evaluated(cfg, server_round):
            load_adapter_state(model, tensors)
            # round 0's model is untrained: a sweep's cells share its evaluation
            accuracy, loss = (cached_evaluate(model, test, cfg.eval_precision) if server_round == 0
                              else evaluate(model, test, precision=cfg.eval_precision))
            row.update({"test-accuracy": accuracy, "test-loss": loss})
            save_adapter(model, out / "adapter")  # the adapter of the last evaluated round
        recorder.record(row)
        if server_round == 0 and cfg.head_init == "zero-shot":
            nonlocal zero_shot
            zero_shot = row["test-accuracy"]  # round 0 measures the zero-shot head itself
        save_checkpoint(out, server_round, cfg.to_dict(hyphenated=True), tensors, strategy.state_dict(), clients,
                        {"seconds": round(time.time() - recorder.started, 2), "zero-shot-accuracy": zero_shot,
                         "resumed-after-rounds": recorder.resumed_after})
        # after the checkpoint: a logged round is one a resume does not run again
        tracker.log_round(row)

    # Simulation: the workers build their models while this process evaluates round 0.
    warming = strategy.warm_up(grid) if state_travels else []
    # TensorBoard, MLflow (setting log); a resumed run's logs get the kept rounds they lack
    tracker = RunTracker.start(cfg, out, recorder.rows)
    finished, stopped, startup = False, None, None
    try:
        if checkpoint is None:
            if cfg.head_init != "zero-shot":
                zero_shot = zero_shot_accuracy(cfg, test)
            initial = ArrayRecord(adapter_state(model))
            after_round(0, initial)
        else:
            initial = ArrayRecord(checkpoint.adapter)
        strategy.warmed_up(grid, warming)
        startup = round(time.time() - run_started(), 2)
        run_rounds(strategy, grid, initial, first, cfg.rounds, after_round)
        finished = True
    except RunStopped as exc:
        stopped = str(exc)
    finally:
        summary = recorder.finish({"majority-rate": data.majority_rate(data.splits_for(cfg).test_labels),
                                   "zero-shot-accuracy": zero_shot, "completed": finished,
                                   # from the run's start (its process's or cell's) to its first round
                                   "startup-seconds": startup,
                                   **({"user-dp": strategy.user_dp.plan.describe()} if strategy.user_dp else {}),
                                   **({"stopped": stopped} if stopped else {})})
        tracker.finish(summary, out / "adapter")
    if stopped:
        saved = max((r["round"] for r in recorder.rows), default=0)
        how = (f"`fedortho simulate --resume {out}`" if state_travels
               else f"`flwr run` and `--run-config 'resume=\"{out}\"'`")
        raise RunStopped(f"{stopped}; the run stopped after round {saved}, which is saved in {out}: continue it "
                         f"with {how}")
    if summary["empty-rounds"]:
        get_logger().warning("%d of %d rounds had no usable client update; the run is not complete",
                             summary["empty-rounds"], cfg.rounds)
    final = summary["final-accuracy"]
    print(f"fedortho: final accuracy {'-' if final is None else f'{final:.4f}'} (zero-shot head "
          f"{'-' if zero_shot is None else f'{zero_shot:.4f}'}), epsilon spent {summary['epsilon-spent']:.3f}, "
          + (f"user-level epsilon spent {summary['user-epsilon-spent']:.3f}"
             f"{' (for the simulated population)' if strategy.user_dp.plan.simulated_population else ''}, "
             if strategy.user_dp else "") +
          f"{summary['wall-seconds']:.0f}s; outputs in {out}", flush=True)
    return summary


ROUND_TIMEOUT = 3600  # seconds a round waits for its replies (Flower's default)


def run_rounds(strategy: LoRAStrategy, grid: Grid, arrays: ArrayRecord, first: int, last: int,
               after_round: Callable[[int, ArrayRecord], None]) -> ArrayRecord:
    """Rounds ``first``..``last``: train the sampled clients, aggregate, then ``after_round``.

    Flower's ``Strategy.start`` always begins at round 1 with an evaluation of round 0; a
    resumed run begins after its checkpoint.
    """
    for server_round in range(first, last + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        # (an empty Poisson cohort sends nothing; its round still releases user-level noise)
        replies = grid.send_and_receive(messages, timeout=ROUND_TIMEOUT) if messages else []
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        after_round(server_round, arrays)
    return arrays


# When the run started, if not with its process: a sweep's cell host sets it for each cell.
STARTED_AT_ENV = "FEDORTHO_RUN_STARTED_AT"


def run_started() -> float:
    """The run's start (seconds since the epoch): its process's, unless ``STARTED_AT_ENV`` says."""
    given = os.environ.get(STARTED_AT_ENV, "")
    return float(given) if given else psutil.Process().create_time()


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
    return cached_evaluate(reference, test, cfg.eval_precision)[0]


def make_server_app(cfg: RunConfig, resume: bool = False, plans: Sequence[NoisePlan] = ()) -> ServerApp:
    """A ServerApp bound to ``cfg`` (used by ``fedortho simulate``): the clients' states travel
    with the messages and are checkpointed with the run."""
    bound = ServerApp()

    @bound.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, resume=resume, state_travels=True, plans=plans)

    return bound


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: settings come from the run config (pyproject + overrides)."""
    try:
        settings = dict(context.run_config)
        # `--run-config 'resume="<run folder>"'`: continue that run (with the same settings)
        resume = str(settings.pop("resume", ""))
        cfg = RunConfig.from_mapping({**settings, **({"out": resume} if resume else {})})
        run_federation(grid, cfg, resume=bool(resume))
    except (ConfigError, DataError, ModelLoadError, FileExistsError, RunStopped, CheckpointError) as exc:
        get_logger().error("%s", exc)  # the reason in one line, before Flower's report
        # An Exception (not SystemExit, which Flower does not catch) makes Flower mark the
        # run failed with this reason (`flwr ls`) instead of waiting for a heartbeat.
        raise RunFailed(str(exc)) from None


class RunFailed(RuntimeError):
    """The run could not start or go on; its message is the reason, in one line."""
