"""TensorBoard and MLflow logs of a run (setting ``log``), read back with the libraries' own
readers and compared with the run folder's metrics.jsonl, summary.json and config.json.

The runs are real, in process: the server and the ClientApp over ``LocalGrid`` (no Ray),
on a tiny BERT. Every run here writes to one MLflow store (``<runs>/mlruns``), whose tables
are made once.
"""

import json
import logging
import math
import socket
from pathlib import Path

import numpy as np
import pytest

from fedortho.config import ConfigError, RunConfig
from fedortho.tracking import HPARAMS_TAG, RunTracker, TensorBoardLog, mlflow_uri, run_names

ROUNDS = 2


def settings(model_dir: str, out: Path) -> RunConfig:
    return RunConfig(model=model_dir, clients=3, clients_per_round=3, rounds=ROUNDS, local_steps=2, batch_size=16,
                     max_train_examples=240, max_test_examples=64, num_threads=2, eval_precision="float32",
                     log="tensorboard,mlflow", out=str(out))


def read_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: float(v) if v in ("inf", "-inf") else v for k, v in row.items()} for row in rows]


def read_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def expected_rounds(rows: list[dict], finite_only: bool = False) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(round, value)] of every number in the rows (booleans as 0/1)."""
    out: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and (math.isfinite(value) or not finite_only):
                out.setdefault(key, []).append((row["round"], float(value)))
    return out


def expected_summary(summary: dict, step: int) -> dict[str, list[tuple[int, float]]]:
    """summary/<key> -> [(step, value)] of the summary's finite numbers (booleans as 0/1)."""
    return {f"summary/{k}": [(step, float(v))] for k, v in summary.items()
            if isinstance(v, (int, float)) and math.isfinite(v)}


def tensorboard_events(out: Path):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, TENSORS, EventAccumulator

    return EventAccumulator(str(out / "tensorboard"), size_guidance={SCALARS: 0, TENSORS: 0}).Reload()


def tensorboard_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    events = tensorboard_events(out)
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_float32(expected: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard keeps of each value: its scalars are float32."""
    return {tag: [(step, float(np.float32(value))) for step, value in points] for tag, points in expected.items()}


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    record = json.loads((out / "mlflow.json").read_text())
    client = MlflowClient(tracking_uri=record["tracking-uri"])
    return client, client.get_run(record["run-id"])


def mlflow_metrics(client, run) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}


class Connections:
    """Records (and refuses) every attempt of this process to open a network connection."""

    def __init__(self, monkeypatch):
        self.attempts = []
        original = socket.socket.connect

        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.attempts.append(address)
                raise OSError("no network in this test")
            return original(sock, address)

        monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("tracking") / "runs"
    runs.mkdir()
    return runs


@pytest.fixture(scope="module")
def tracked(runs, tiny_model_dir):
    """One short private run with both logs (clients report their gradient diagnostics), its
    MLflow store the default one; returns its folder and the connections it tried."""
    from client.app import DIAGNOSTICS_ENV
    from server.app import run_federation
    from test_strategy import LocalGrid

    out = runs / "tracked"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(DIAGNOSTICS_ENV, "1")
        connections = Connections(monkeypatch)
        run_federation(LocalGrid(3), settings(tiny_model_dir, out))
    return out, connections.attempts


@pytest.fixture(scope="module")
def resumed(runs, tiny_model_dir):
    """A run stopped before round 2 (the server interrupted, as by Ctrl-C), then resumed to
    the end; returns its folder and its MLflow run id after the interruption."""
    from server.app import run_federation
    from test_strategy import LocalGrid

    def stop_before_round_2(grid, server_round):
        if server_round == 2:
            raise KeyboardInterrupt

    def nodes(i):  # the clients' states outlive the server (deployment: on the nodes' disks)
        return {"state-path": str(runs / "resumed-nodes" / f"node-{i}")}

    out = runs / "resumed"
    cfg = settings(tiny_model_dir, out)
    with pytest.raises(KeyboardInterrupt):
        run_federation(LocalGrid(3, before_round=stop_before_round_2, node_config=nodes), cfg)
    interrupted = json.loads((out / "mlflow.json").read_text())["run-id"]
    summary = run_federation(LocalGrid(3, node_config=nodes), cfg, resume=True)
    assert summary["completed"] is True and summary["resumed-after-rounds"] == [1]
    return out, interrupted


def test_tensorboard_holds_every_round_of_metrics_jsonl_and_the_summary(tracked):
    out, _ = tracked
    rows = read_rows(out)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    assert {"clipped-fraction", "lora-grad-norm", "noise-multiplier", "epsilon", "round-seconds"} <= set(rows[1])
    # each value as metrics.jsonl has it (rounded to float32), each round once
    expected = {**expected_rounds(rows), **expected_summary(read_summary(out), ROUNDS)}
    assert tensorboard_scalars(out) == as_float32(expected)


def test_tensorboard_hparams_are_the_run_settings(tracked):
    from tensorboard.plugins.hparams.metadata import parse_session_start_info_plugin_data

    out, _ = tracked
    content = tensorboard_events(out).SummaryMetadata(HPARAMS_TAG).plugin_data.content
    hparams = parse_session_start_info_plugin_data(content).hparams
    logged = {name: getattr(value, value.WhichOneof("kind")) for name, value in hparams.items()}
    config = json.loads((out / "config.json").read_text())["config"]
    assert logged == {k: float(v) if type(v) in (int, float) else v for k, v in config.items()}  # (numbers as float64)
    assert logged["log"] == "tensorboard,mlflow" and logged["user-epsilon"] == "inf" and logged["train-head"] is True


def test_mlflow_run_holds_the_settings_every_round_the_summary_and_the_adapter(tracked, runs, tmp_path):
    out, _ = tracked
    client, run = mlflow_run(out)
    assert json.loads((out / "mlflow.json").read_text())["tracking-uri"] == \
        f"sqlite:///{(runs / 'mlruns' / 'mlflow.db').resolve()}"  # the default store: beside the run folder
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "fedortho"
    assert run.data.tags["fedortho.run-folder"] == str(out.resolve())
    config = json.loads((out / "config.json").read_text())["config"]
    assert run.data.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    summary = read_summary(out)
    assert mlflow_metrics(client, run) == {**expected_rounds(read_rows(out), finite_only=True),
                                           **expected_summary(summary, ROUNDS)}
    assert run.data.tags["summary/strategy"] == summary["strategy"] == "fedsvd"
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert listed == {f"adapter/{f.name}" for f in (out / "adapter").iterdir()}
    assert "adapter/adapter_model.safetensors" in listed
    copy = Path(client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(tmp_path)))
    assert copy.read_bytes() == (out / "adapter" / "adapter_model.safetensors").read_bytes()


def test_logging_opens_no_network_connection(tracked):
    assert tracked[1] == []


def test_a_resumed_run_goes_on_in_the_same_logs_without_logging_a_round_twice(resumed):
    out, interrupted = resumed
    client, run = mlflow_run(out)
    assert run.info.run_id == interrupted and run.info.status == "FINISHED"
    named = client.search_runs([run.info.experiment_id], filter_string="attributes.run_name = 'resumed'")
    assert [r.info.run_id for r in named] == [interrupted]
    rows, summary = read_rows(out), read_summary(out)
    logged, written = mlflow_metrics(client, run), tensorboard_scalars(out)
    # each round once; the interrupted run's summary stays at the round it stopped after
    summary_keys = {k for k in logged if k.startswith("summary/")}
    assert {k: v for k, v in logged.items() if k not in summary_keys} == expected_rounds(rows, finite_only=True)
    assert {k: v for k, v in written.items() if not k.startswith("summary/")} == as_float32(expected_rounds(rows))
    final = expected_summary(summary, ROUNDS)
    for key, float32 in as_float32(final).items():
        assert [step for step, _ in logged[key]] == [1, ROUNDS] and logged[key][-1] == final[key][0], key
        assert [step for step, _ in written[key]] == [1, ROUNDS] and written[key][-1] == float32[0], key
    assert run.data.metrics["summary/final-accuracy"] == summary["final-accuracy"]  # MLflow shows the last
    assert run.data.metrics["summary/completed"] == 1.0


def test_a_resume_writes_the_checkpointed_rounds_its_logs_lack_and_nothing_twice(runs):
    """Killed after round 2's checkpoint and before round 2 was logged: the resumed run (its
    rows up to round 2 kept) logs round 2 and none of the earlier rounds again."""
    out = runs / "gap"
    out.mkdir(parents=True)
    cfg = RunConfig(log="tensorboard,mlflow", out=str(out))
    rows = [{"round": 0, "test-accuracy": 0.5}, {"round": 1, "test-accuracy": 0.625, "epsilon": 1.5},
            {"round": 2, "test-accuracy": 0.75, "epsilon": 2.25}, {"round": 3, "test-accuracy": 0.875, "epsilon": 3.0}]
    killed = RunTracker.start(cfg, out)
    for row in rows[:2]:
        killed.log_round(row)
    for log in killed.logs:
        if isinstance(log, TensorBoardLog):
            log.writer.close()  # as the kill left it: flushed, without a summary
    again = RunTracker.start(cfg, out, rows[:3])
    again.log_round(rows[3])
    again.finish({"final-accuracy": 0.875, "completed": True}, out / "adapter")  # (no adapter: none logged)
    expected = {**expected_rounds(rows), **expected_summary({"final-accuracy": 0.875, "completed": True}, 3)}
    assert tensorboard_scalars(out) == as_float32(expected)
    client, run = mlflow_run(out)
    assert mlflow_metrics(client, run) == expected
    assert client.list_artifacts(run.info.run_id) == []


def test_a_failing_log_is_one_line_and_the_run_goes_on(runs, monkeypatch):
    """MLflow cannot open its store (its folder would be under a file); TensorBoard fails on
    its second round (a full disk): each says so once, the tracker never raises, and what
    TensorBoard wrote before stays."""
    blocker = runs / "a-file"
    blocker.write_text("")
    out = runs / "failing"
    out.mkdir()
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("fedortho").addHandler(handler)
    try:
        tracker = RunTracker.start(RunConfig(log="tensorboard,mlflow", mlflow_uri=f"sqlite:///{blocker}/mlflow.db",
                                             out=str(out)), out)
        calls = []
        original = TensorBoardLog.log

        def full_disk(self, values, step):
            calls.append(step)
            if step == 1:
                raise OSError(28, "No space left on device")
            original(self, values, step)

        monkeypatch.setattr(TensorBoardLog, "log", full_disk)
        for step in range(3):
            tracker.log_round({"round": step, "test-accuracy": 0.5})
        tracker.finish({"completed": True}, out / "adapter")
    finally:
        logging.getLogger("fedortho").removeHandler(handler)
    assert len(lines) == 2, lines
    assert lines[0].startswith("mlflow logging stopped (") and "the run goes on" in lines[0]
    assert lines[1] == ("tensorboard logging stopped (OSError: [Errno 28] No space left on device); the run goes on "
                        "and its folder keeps every round")
    assert calls == [0, 1]  # dropped after its failure
    assert tensorboard_scalars(out) == {"test-accuracy": [(0, 0.5)]}
    assert not (out / "mlflow.json").exists()


def test_log_setting_is_checked_in_one_line(tmp_path, capsys):
    from fedortho.cli import main
    from fedortho.sweep import load_sweep

    assert RunConfig(log=" tensorboard , mlflow ").loggers == ["tensorboard", "mlflow"]
    assert RunConfig().loggers == []
    with pytest.raises(ConfigError, match=r"^log takes tensorboard, mlflow or both, comma-separated, got 'wandb'$"):
        RunConfig.from_mapping({"log": "tensorboard,wandb"})
    assert main(["simulate", "--log", "wandb", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == \
        "fedortho: error: log takes tensorboard, mlflow or both, comma-separated, got 'wandb'\n"
    assert not (tmp_path / "x").exists()
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text('[base]\nlog = "tensorboard,mlflow"\nmlflow-uri = "sqlite:///x.db"\n[grid]\nseed = [0, 1]\n')
    cells = load_sweep(sweep_file).cells()
    assert {RunConfig.from_mapping(c.settings).mlflow_uri for c in cells} == {"sqlite:///x.db"}


def test_a_sweeps_cells_log_to_the_sweeps_experiment_and_store(tmp_path):
    sweep = tmp_path / "results" / "privacy-sweep"
    (sweep / "strategy-ffa_seed-0").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"name": "privacy"}))
    (sweep / "strategy-ffa_seed-0" / "cell.json").write_text("{}")
    run = sweep / "strategy-ffa_seed-0" / "run"
    assert run_names(run) == (sweep.resolve(), "privacy", "strategy-ffa_seed-0")
    assert mlflow_uri(RunConfig(), run) == f"sqlite:///{sweep.resolve()}/mlruns/mlflow.db"
    alone = tmp_path / "runs" / "20260101-fedsvd"
    assert run_names(alone) == ((tmp_path / "runs").resolve(), "fedortho", "20260101-fedsvd")
    assert mlflow_uri(RunConfig(mlflow_uri="http://127.0.0.1:5000"), alone) == "http://127.0.0.1:5000"
