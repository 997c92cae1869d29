"""TensorBoard and MLflow views of a run (setting ``log``): its settings, every metrics.jsonl
row and its summary.

The run folder stays the record; these logs show it in other tools. ``RunTracker`` is the one
object the server calls: when the run starts, after each round's checkpoint, and at the end.
A resumed run goes on in the same TensorBoard folder and MLflow run, and no metric is
written twice for one step: a round is logged only once it is checkpointed (a resume never
runs it again), and a resume first reads back what the logs hold, then writes what they lack.

- TensorBoard: event files in ``<run folder>/tensorboard/``; each row's numbers as scalars
  (float32) at step = round, the settings as HParams (a sweep's cells side by side when
  TensorBoard's logdir is the sweep folder), the summary's numbers as ``summary/<key>``
  scalars at the last round.
- MLflow: a SQLite store, ``mlruns/mlflow.db`` beside the run folder (for a sweep's cell,
  in the sweep folder) with artifacts in ``mlruns/artifacts/``, unless ``mlflow-uri`` names
  another. The settings as params, each row's finite numbers as metrics at step = round,
  the summary as ``summary/<key>`` metrics (text and infinities as tags), the adapter folder
  as the artifact ``adapter/``. The run's id is kept in ``<run folder>/mlflow.json``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from fedortho.config import ConfigError, RunConfig
from fedortho.runs import get_logger, json_safe, write_json_atomic

TENSORBOARD_FOLDER = "tensorboard"
MLFLOW_FOLDER = "mlruns"  # the default store: mlflow.db and artifacts/
MLFLOW_RUN_FILE = "mlflow.json"  # the MLflow run's id: a resumed run continues it
EXPERIMENT = "fedortho"  # the MLflow experiment of runs outside a sweep
SUMMARY = "summary/"  # summary keys would clash with rows' (noise-multiplier: the largest of a round, or of the run)
HPARAMS_TAG = "_hparams_/session_start_info"  # where TensorBoard's HParams plugin keeps a run's settings
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}  # module, package


def check_installed(cfg: RunConfig) -> None:
    """Each logger of ``cfg.log`` must be importable (found, not imported: they are slow to import)."""
    for name in cfg.loggers:
        module, package = PACKAGES[name]
        if find_spec(module) is None:
            raise ConfigError(f"log {name} needs the {package} package; install the pinned requirements "
                              "(pip install -r requirements.txt)")


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numeric values as floats (booleans as 0 or 1); text, lists and None are left out."""
    return {key: float(value) for key, value in values.items() if isinstance(value, (int, float))}


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def text(value: Any) -> str:
    """A value as MLflow keeps params and tags (text): as config.json and summary.json write
    it, without JSON's quotes around strings ("inf", "true", "6.0", "query,value")."""
    value = json_safe(value)
    return value if isinstance(value, str) else json.dumps(value)


# -- where a run logs --------------------------------------------------------------------

def run_names(out: Path) -> tuple[Path, str, str]:
    """(the folder the default MLflow store goes in, the experiment's name, the run's name).

    A sweep's cell, ``<sweep>/<cell>/run`` (``fedortho.sweep``), is the run named after its
    cell in the experiment named after the sweep, with the store in the sweep folder, so that
    the cells compare side by side; any other run is named after its folder, in experiment
    "fedortho", with the store beside it."""
    out = Path(out).resolve()
    cell, sweep = out.parent, out.parent.parent
    if out.name == "run" and (cell / "cell.json").is_file():
        try:
            return sweep, str(json.loads((sweep / "sweep.json").read_text())["name"]), cell.name
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not a sweep's cell after all
    return out.parent, EXPERIMENT, out.name


def mlflow_uri(cfg: RunConfig, out: Path) -> str:
    """``cfg.mlflow_uri``, or the SQLite store ``mlruns/mlflow.db`` in ``run_names``' folder
    (MLflow 3 refuses a file store unless told to allow it, and SQLite is its default)."""
    if cfg.mlflow_uri:
        return cfg.mlflow_uri
    return f"sqlite:///{run_names(out)[0] / MLFLOW_FOLDER / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's database (MLflow's
    own default is ./mlruns under whatever folder the run started in); other stores decide."""
    database = _sqlite_file(uri)
    return str(database.parent / "artifacts") if database is not None else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """One process at a time creates a SQLite store's tables and the experiment: a sweep's
    cells may start together."""
    database = _sqlite_file(uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- the two logs ------------------------------------------------------------------------

class TensorBoardLog:
    """Event files in ``<run folder>/tensorboard/``."""

    name = "tensorboard"

    def __init__(self, out: Path, settings: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(out) / TENSORBOARD_FOLDER
        self.written = tensorboard_steps(folder)  # (tag, step) already there: a resumed run's
        self.writer = SummaryWriter(str(folder))
        if not any(tag == HPARAMS_TAG for tag, _ in self.written):
            from tensorboard.plugins.hparams.summary_v2 import hparams_pb

            # infinities as "inf", as config.json has them: TensorBoard leaves an infinite hparam blank
            self.writer.file_writer.add_summary(hparams_pb(json_safe(settings)))
        self.writer.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if (tag, step) not in self.written:
                # float32, as TensorBoard's scalars are: its default (fast) loader skips float64 ones
                self.writer.add_scalar(tag, value, step)
                self.written.add((tag, step))
        self.writer.flush()  # a killed run's logged rounds are on disk

    def finish(self, summary: dict[str, Any], adapter: Path, step: int) -> None:
        self.log({SUMMARY + key: value for key, value in numbers(summary).items()}, step)
        self.close()

    def close(self) -> None:
        self.writer.close()


def tensorboard_steps(folder: Path) -> set[tuple[str, int]]:
    """Every (tag, step) the event files in ``folder`` hold, read with TensorBoard's reader."""
    if not folder.is_dir():
        return set()
    from tensorboard.backend.event_processing import event_accumulator

    everything = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    events = event_accumulator.EventAccumulator(str(folder), size_guidance=everything).Reload()
    tags = events.Tags()
    return ({(tag, event.step) for tag in tags["scalars"] for event in events.Scalars(tag)}
            | {(tag, event.step) for tag in tags["tensors"] for event in events.Tensors(tag)})  # (the HParams)


class MlflowLog:
    """One MLflow run, its id in ``<run folder>/mlflow.json``."""

    name = "mlflow"

    def __init__(self, cfg: RunConfig, out: Path, settings: dict[str, Any]) -> None:
        # Offline: MLflow 3 reports its usage over the network unless told not to.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        # Creating a store's tables, and MLflow's use of deprecated SQLAlchemy, are not news for the run's log.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")
        self.uri = mlflow_uri(cfg, out)
        _, experiment, run_name = run_names(out)
        with store_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment_id = self._experiment(experiment)
        record = Path(out) / MLFLOW_RUN_FILE
        self.run_id = self._stored_run(record)
        if self.run_id is None:
            self.run_id = self._new_run(record, experiment_id, run_name, Path(out))
            self.logged: set[tuple[str, int]] = set()  # (key, step) the run holds
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = self._logged_steps()
        self._log_params(settings)

    def _new_run(self, record: Path, experiment_id: str, run_name: str, out: Path) -> str:
        run = self.client.create_run(experiment_id, run_name=run_name, tags={"fedortho.run-folder": str(out.resolve())})
        write_json_atomic(record, {"tracking-uri": self.uri, "experiment-id": experiment_id,
                                   "run-id": run.info.run_id})
        return run.info.run_id

    def _log_params(self, settings: dict[str, Any]) -> None:
        """The settings as params; again when resumed (MLflow accepts a param logged again with
        its value), so that a run whose first attempt failed before its params has them."""
        from mlflow.entities import Param

        params = [Param(key, text(value)) for key, value in settings.items()]
        for first in range(0, len(params), 100):  # MLflow takes at most 100 params a call
            self.client.log_batch(self.run_id, params=params[first:first + 100])

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=artifact_root(self.uri))

    def _stored_run(self, record: Path) -> str | None:
        """The id of the run ``record`` names, if this store holds it (a resumed run)."""
        from mlflow.exceptions import MlflowException

        try:
            run_id = json.loads(record.read_text())["run-id"]
            run = self.client.get_run(run_id)
        except (OSError, ValueError, KeyError, TypeError, MlflowException):
            return None
        return run_id if run.info.lifecycle_stage == "active" else None

    def _logged_steps(self) -> set[tuple[str, int]]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {(key, metric.step) for key in keys for metric in self.client.get_metric_history(self.run_id, key)}

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # An infinity would be stored as the largest float (SQLite): left out (the param says epsilon=inf).
        metrics = [Metric(key, value, now, step) for key, value in values.items()
                   if math.isfinite(value) and (key, step) not in self.logged]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
            self.logged.update((metric.key, step) for metric in metrics)

    def finish(self, summary: dict[str, Any], adapter: Path, step: int) -> None:
        from mlflow.entities import RunTag

        self.log({SUMMARY + key: value for key, value in numbers(summary).items()}, step)
        tags = [RunTag(SUMMARY + key, text(value)) for key, value in summary.items()
                if value is not None and not finite_number(value)]
        if tags:
            self.client.log_batch(self.run_id, tags=tags)
        if Path(adapter).is_dir():
            self.client.log_artifacts(self.run_id, str(adapter), artifact_path="adapter")
        self.client.set_terminated(self.run_id, status="FINISHED" if summary.get("completed") is True else "FAILED")

    def close(self) -> None:
        pass  # each call to the store stands alone


LOGS: dict[str, Callable[[RunConfig, Path, dict[str, Any]], Any]] = {
    "tensorboard": lambda cfg, out, settings: TensorBoardLog(out, settings),
    "mlflow": MlflowLog,
}


# -- what the server calls ---------------------------------------------------------------

class RunTracker:
    """The run's logs (none without ``log``). ``start`` when the run folder is open,
    ``log_round`` with each metrics.jsonl row once its round is checkpointed, ``finish`` with
    the summary once summary.json is written."""

    def __init__(self) -> None:
        self.logs: list = []
        self.last_round = 0

    @classmethod
    def start(cls, cfg: RunConfig, out: Path, earlier_rows: Iterable[dict[str, Any]] = ()) -> "RunTracker":
        """Open each log of ``cfg.log`` with the run's settings. A resumed run passes the rows
        it kept: what its logs lack of them (a run killed after a checkpoint, before it
        logged that round) is written now."""
        tracker = cls()
        settings = cfg.to_dict(hyphenated=True)
        for name in cfg.loggers:
            opened = tracker._attempt(name, lambda name=name: LOGS[name](cfg, Path(out), settings))
            if opened is not None:
                tracker.logs.append(opened)
        for row in earlier_rows:
            tracker.log_round(row)
        return tracker

    def log_round(self, row: dict[str, Any]) -> None:
        """Every number of a metrics.jsonl row at step = its round."""
        step = int(row["round"])
        self.last_round = max(self.last_round, step)
        values = numbers({key: value for key, value in row.items() if key != "round"})
        for log in list(self.logs):
            self._attempt(log.name, lambda log=log: log.log(values, step), log)

    def finish(self, summary: dict[str, Any], adapter: Path) -> None:
        """The summary at the last round logged, the adapter folder; then the logs close."""
        for log in list(self.logs):
            self._attempt(log.name, lambda log=log: log.finish(summary, Path(adapter), self.last_round), log)
        self.logs = []

    def _attempt(self, name: str, call: Callable[[], Any], log: Any = None) -> Any:
        """``call``'s result; if it fails, one line on the log and that log is dropped.

        The run folder holds every round whatever happens here: a full disk, a locked
        database or a tracking server gone away must not cost the training. Dropping the
        failed log reports the failure once rather than every round; a resumed run writes
        what its logs lack.
        """
        try:
            return call()
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            get_logger().warning("%s logging stopped (%s: %s); the run goes on and its folder keeps every round",
                                 name, type(exc).__name__, reason)
            if log in self.logs:
                self.logs.remove(log)
                self._close(log)
            return None

    @staticmethod
    def _close(log: Any) -> None:
        """Release what a dropped log holds (a writer's file and thread: a sweep's cell host
        runs many runs in one process)."""
        try:
            log.close()
        except Exception:
            pass  # already reported: the log failed
