"""A run's folder: config.json, metrics.jsonl, summary.json, the adapter and a plot."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fedortho.config import RunConfig

PACKAGES = ("fedortho", "flwr", "flwr-datasets", "opacus", "torch", "peft", "transformers", "ray", "numpy")


def get_logger() -> logging.Logger:
    """The ``fedortho`` logger: one line per event on stderr, independent of Flower's logger."""
    logger = logging.getLogger("fedortho")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedortho: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def default_out(cfg: RunConfig) -> Path:
    eps = "inf" if not cfg.private else f"{cfg.epsilon:g}"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.strategy}-eps{eps}-seed{cfg.seed}"


def git_commit() -> str | None:
    """The commit of the checkout this package runs from; None when it does not run from one
    (an app bundle installed by Flower: then the app's hash identifies the code)."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=package,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    # A bundle unpacked somewhere inside another repository must not take that repository's commit.
    if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() / package.name != package:
        return None
    return lines[1]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def json_safe(value: Any) -> Any:
    """``value`` with infinities and NaNs as strings: strict JSON has no non-finite numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf"/"nan": strict JSON has no infinities
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all, synced to disk: a kill or a power loss
    mid-write leaves the old file, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)


def write_json_atomic(path: Path, value: Any) -> None:
    """``write_bytes_atomic`` of ``value`` as strict JSON."""
    write_bytes_atomic(path, (json.dumps(json_safe(value), indent=2) + "\n").encode())


def writable_folder(path: Path) -> None:
    """Make ``path`` (with its parents) and write a file in it; raises OSError if it cannot."""
    import tempfile

    Path(path).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def diagnostics_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Over the trained rounds: the largest noise multiplier, the mean clipped fraction and the
    median of the per-round median gradient norms (only what the rounds recorded)."""
    out: dict[str, float] = {}

    def values(key: str) -> list[float]:
        return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))]

    if values("noise-multiplier"):
        out["noise-multiplier"] = max(values("noise-multiplier"))
    if values("clipped-fraction"):
        out["clipped-fraction"] = sum(values("clipped-fraction")) / len(values("clipped-fraction"))
    for key in ("lora-grad-norm", "head-grad-norm"):
        if values(key):
            out[key] = float(statistics.median(values(key)))
    return out


def _text(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class RunStopped(RuntimeError):
    """The run stopped before its last round; the message says why, in one line."""


_ACTIVE: list["RunRecorder"] = []
LOCK = ".lock"  # held (flock) by the run writing the folder, for as long as it writes


def folder_in_use(out: Path) -> bool:
    """Whether a live run, in this process or another, holds ``out``'s lock."""
    if not (Path(out) / LOCK).exists():
        return False
    with open(Path(out) / LOCK, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def holds_files(out: Path) -> bool:
    """Whether ``out`` holds anything but a lock file (a folder a new run may not write into)."""
    return Path(out).exists() and (not Path(out).is_dir() or any(p.name != LOCK for p in Path(out).iterdir()))


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (none if it is absent), non-finite numbers restored; a torn
    last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows.append({k: float(v) if v in ("inf", "-inf", "nan") else v for k, v in row.items()})
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    write_bytes_atomic(path, "".join(json.dumps(json_safe(row)) + "\n" for row in rows).encode())


def finish_interrupted_runs() -> list[Path]:
    """Write the summary of every run still in progress (used when the process is stopped);
    returns their folders."""
    folders = []
    for recorder in list(_ACTIVE):
        recorder.finish({"completed": False})
        folders.append(recorder.out)
    return folders


class RunRecorder:
    """Writes a run's outputs as they happen, so an interrupted run keeps its finished rounds."""

    def __init__(self, cfg: RunConfig, out: Path, echo: bool = True, provenance: dict[str, Any] | None = None,
                 resume: tuple[int, float] | None = None) -> None:
        """``resume=(round, seconds)``: continue the run in ``out`` after its checkpointed round
        (which took ``seconds``); rows of later rounds, from an attempt that was killed before
        it checkpointed them, are dropped."""
        self.cfg, self.out, self.echo = cfg, Path(out), echo
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out / LOCK, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise FileExistsError(f"run folder {self.out} is being written by another run; choose another --out") \
                from None
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()
        self.resumed_after: list[int] = []  # the rounds after which this run was continued
        if resume is not None:
            self._continue(*resume)
            _ACTIVE.append(self)
            return
        if (self.out / "metrics.jsonl").exists() or holds_files(self.out):
            self._release()
            raise FileExistsError(f"run folder {self.out} already holds files; a run writes only into a new or "
                                  "empty folder")
        # provenance: what identifies the code and the run under Flower's runtime (run id, app hash)
        meta = {"config": cfg.to_dict(hyphenated=True), "seed": cfg.seed, "git-commit": git_commit(),
                **(provenance or {}), "packages": package_versions(), "python": sys.version.split()[0],
                "platform": platform.platform()}
        (self.out / "config.json").write_text(json.dumps(json_safe(meta), indent=2) + "\n")
        _ACTIVE.append(self)

    def _continue(self, last_round: int, seconds: float) -> None:
        self.started -= seconds
        self.rows = [r for r in _read_rows(self.out / "metrics.jsonl") if r["round"] <= last_round]
        clients = [r for r in _read_rows(self.out / "privacy.jsonl") if r["round"] <= last_round]
        _write_rows(self.out / "metrics.jsonl", self.rows)
        _write_rows(self.out / "privacy.jsonl", clients)
        (self.out / "summary.json").unlink(missing_ok=True)  # the run is under way again

    def record(self, row: dict[str, Any]) -> None:
        """Append one round to ``metrics.jsonl`` (test accuracy and loss only on evaluated rounds)."""
        self.rows.append(row)
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(json_safe(row)) + "\n")
        if self.echo:
            eps = row.get("epsilon")
            eps_text = "-" if eps is None else ("inf" if not math.isfinite(eps) else f"{eps:.2f}")
            accuracy, loss = row.get("test-accuracy"), row.get("test-loss")
            user = ""
            if "user-epsilon" in row:
                simulated = self.cfg.noise_cohort_size > 0
                user = f"  user epsilon {row['user-epsilon']:.2f}" + (
                    f" (simulated population of {row['user-population']:g})" if simulated else "")
            print(f"round {row['round']:>3}/{self.cfg.rounds}  accuracy {_text(accuracy, 4)}  "
                  f"loss {_text(loss, 4)}  epsilon {eps_text}{user}  clients {row.get('clients-replied', '-')}  "
                  f"{row.get('round-seconds', 0.0):.1f}s", flush=True)

    def record_clients(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """Append each client's privacy record of a round to ``privacy.jsonl``."""
        with open(self.out / "privacy.jsonl", "a") as fh:
            for row in rows:
                fh.write(json.dumps(json_safe({"round": server_round, **row})) + "\n")

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        evaluated = [r for r in self.rows if "test-accuracy" in r]
        last = evaluated[-1] if evaluated else {}
        trained = [r for r in self.rows if r["round"] > 0]
        # (under user-level DP a round without updates still released its noise: not empty)
        empty = sum(1 for r in trained if r.get("clients-replied") == 0 and "user-epsilon" not in r)
        summary = {
            "strategy": self.cfg.strategy, "epsilon-target": self.cfg.epsilon, "rounds": self.cfg.rounds,
            "final-accuracy": last.get("test-accuracy"), "final-loss": last.get("test-loss"),
            "final-round": last.get("round"),
            "best-accuracy": max((r["test-accuracy"] for r in evaluated), default=None),
            "epsilon-spent": max((r["epsilon"] for r in trained if r.get("epsilon") is not None),
                                 default=0.0 if self.cfg.private else math.inf),
            "wall-seconds": round(time.time() - self.started, 2), **diagnostics_summary(trained),
            "empty-rounds": empty,
            **({"user-epsilon-target": self.cfg.user_epsilon,
                "user-epsilon-spent": max((r["user-epsilon"] for r in trained if "user-epsilon" in r), default=0.0)}
               if self.cfg.user_private else {}),
            # rounds in which some sampled client failed or sent an update that was rejected
            "degraded-rounds": sum(1 for r in trained if r.get("clients-failed", 0) > 0),
            "failed-client-calls": sum(int(r.get("clients-failed", 0)) for r in trained),
            **({"resumed-after-rounds": self.resumed_after} if self.resumed_after else {}), **(extra or {}),
        }
        if empty:  # a round without a usable update trained nothing: the run did not do what was asked
            summary["completed"] = False
        (self.out / "summary.json").write_text(json.dumps(json_safe(summary), indent=2) + "\n")
        self.plot()
        self._release()
        return summary

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        evaluated = [r for r in self.rows if "test-accuracy" in r]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r["round"] for r in evaluated], [r["test-accuracy"] for r in evaluated], marker="o",
                color="tab:blue")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy", color="tab:blue")
        eps = [(r["round"], r["epsilon"]) for r in self.rows if r.get("epsilon") is not None and math.isfinite(r["epsilon"])]
        if eps:
            ax2 = ax.twinx()
            ax2.plot(*zip(*eps), marker="s", color="tab:red")
            ax2.set_ylabel("epsilon spent (max over clients)", color="tab:red")
        title = "inf" if not self.cfg.private else f"{self.cfg.epsilon:g}"
        ax.set_title(f"{self.cfg.strategy}, target epsilon {title}")
        fig.tight_layout()
        path = self.out / "accuracy_epsilon.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
