"""Declarative sweeps: a TOML grid of run settings expanded into cells, run resumably.

    [sweep]
    name = "privacy"              # results go to experiments/results/<name> unless out = "..."
    [base]                        # settings shared by every cell (any run-config key)
    rounds = 8
    [grid]                        # one cell per combination
    strategy = ["fedavg", "ffa", "fedsvd"]
    epsilon = [3.0, 6.0, inf]
    seed = [0, 1, 2]

A grid key whose values are tables sets several settings together (cells that are not a
product of single settings): each table needs a ``label``, which names the cell and the row
of the report; the key itself is only a name.

    rule = [{label = "ffa", strategy = "ffa"},
            {label = "ffa-orthonormal-a", strategy = "ffa", init-a = "orthonormal"}]

Each cell runs ``fedortho simulate`` (the same code path) in its own folder ``<out>/<cell>/``,
by default in a long-lived cell host (``WarmCells``) that keeps its imports, Ray and its
workers with their models from cell to cell, with the same results as a cell in a fresh
process of its own (``ColdCells``, ``fedortho sweep --cold``). With ``--ray-address`` the
cells' clients run on that Ray cluster, ``--parallel`` cells at once, the results on this
machine. A cell is finished when its ``status.json`` says ``done``: finished cells are never
rerun or overwritten, and a sweep file whose settings no longer match a finished cell is
refused rather than mixed with it. A cell interrupted in flight left no ``done``
status: the next ``fedortho sweep`` continues it from its last checkpointed round (or, without
one, runs it again from scratch). A failing cell records its error and the others go on (it
is retried on the next call). Each cell's process (or cell host) leads its own process group,
which ends with the sweep, also when the sweep is killed.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from fedortho.config import ConfigError, RunConfig
from fedortho.guardian import die_with_parent
from fedortho.runs import folder_in_use, json_safe, write_json_atomic

STATUS = "status.json"
RUN = "run"


@dataclass(frozen=True)
class Cell:
    name: str                  # folder name, from the grid values
    values: dict[str, Any]     # the grid values of this cell
    settings: dict[str, Any]   # base + values: the whole run config of the cell


@dataclass
class Sweep:
    name: str
    out: Path
    base: dict[str, Any]
    grid: dict[str, list]

    def cells(self) -> list[Cell]:
        keys = list(self.grid)
        cells = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            values, settings = {}, dict(self.base)
            for key, value in zip(keys, combo):
                if isinstance(value, dict):  # a bundle of settings, named by its label
                    values[key] = value["label"]
                    settings.update({k: v for k, v in value.items() if k != "label"})
                else:
                    values[key] = value
                    settings[key] = value
            RunConfig.from_mapping(settings)  # every cell must be a valid run: fail before running any
            cells.append(Cell(cell_name(values), values, settings))
        seen: dict[str, Cell] = {}
        for cell in cells:
            if cell.name in seen:
                raise ConfigError(f"grid values {seen[cell.name].values} and {cell.values} give the same cell "
                                  f"folder '{cell.name}'; make them differ in their first 6 digits")
            seen[cell.name] = cell
        return cells


def value_text(value: Any) -> str:
    """A grid value as cell names and reports show it: 6.0 -> "6", infinity -> "inf"."""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:g}"
    return str(value)


def cell_name(values: dict[str, Any]) -> str:
    return "_".join(f"{k}-{value_text(v)}".replace("/", "-") for k, v in values.items())


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        spec = tomllib.loads(path.read_text(), parse_float=_finite_or_inf)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc}") from None
    unknown = set(spec) - {"sweep", "base", "grid"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown tables {sorted(unknown)} (use [sweep], [base], [grid])")
    meta, base, grid = spec.get("sweep", {}), spec.get("base", {}), spec.get("grid", {})
    for table, value in (("sweep", meta), ("base", base), ("grid", grid)):
        if not isinstance(value, dict):
            raise ConfigError(f"sweep file {path}: '{table}' must be a table ([{table}]), got {value!r}")
    unknown = set(meta) - {"name", "out"}
    if unknown:
        raise ConfigError(f"sweep file {path}: unknown keys in [sweep]: {sorted(unknown)} (known: name, out)")
    if not grid:
        raise ConfigError(f"sweep file {path}: [grid] is empty")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep file {path}: grid key '{key}' needs a non-empty list")
        if key in base:
            raise ConfigError(f"sweep file {path}: '{key}' is in both [base] and [grid]")
        _check_bundles(path, key, values, base, grid)
    bundled = [(key, setting) for key, values in grid.items() for setting in
               {_setting(s) for v in values if isinstance(v, dict) for s in v if s != "label"}]
    for i, (key, setting) in enumerate(bundled):
        other = next((k for k, s in bundled[i + 1:] if s == setting), None)
        if other is not None:
            raise ConfigError(f"sweep file {path}: '{setting}' is set by both grid keys '{key}' and '{other}'")
    if "out" in base or "out" in grid:
        raise ConfigError(f"sweep file {path}: 'out' is set per cell by the sweep")
    name = str(meta.get("name", path.stem))
    out = Path(meta.get("out", Path("experiments") / "results" / name))
    return Sweep(name=name, out=out, base=dict(base), grid={k: list(v) for k, v in grid.items()})


def _check_bundles(path: Path, key: str, values: list, base: dict, grid: dict) -> None:
    """Bundled values: all tables, each with a label, none setting what [base] or another grid
    key sets (a setting has one place)."""
    tables = [v for v in values if isinstance(v, dict)]
    if not tables:
        return
    if len(tables) != len(values):
        raise ConfigError(f"sweep file {path}: grid key '{key}' mixes tables and plain values")
    if _setting(key) in {_setting(f.name) for f in fields(RunConfig)}:
        raise ConfigError(f"sweep file {path}: grid key '{key}' names a run setting; give its tables another name")
    labels = [t.get("label") for t in tables]
    if not all(isinstance(label, str) and label for label in labels) or len(set(labels)) != len(labels):
        raise ConfigError(f"sweep file {path}: every table of grid key '{key}' needs its own label = \"...\"")
    base_settings, grid_settings = {_setting(k) for k in base}, {_setting(k) for k in grid}
    for table in tables:
        for setting in table:
            if setting == "label":
                continue
            if _setting(setting) in base_settings or _setting(setting) in grid_settings:
                raise ConfigError(f"sweep file {path}: '{setting}' is set by grid key '{key}' and also by "
                                  f"{'[base]' if _setting(setting) in base_settings else 'the grid'}")
            if setting == "out":
                raise ConfigError(f"sweep file {path}: 'out' is set per cell by the sweep")


def _finite_or_inf(text: str) -> float:
    """A TOML float; only the literal ``inf`` may be infinite (``1e309`` would overflow to inf
    and, as an epsilon, silently turn DP off)."""
    value = float(text)
    if math.isnan(value) or (math.isinf(value) and text.lstrip("+-") != "inf"):
        raise ValueError(f"{text} is not a finite number (only the literal inf means infinity)")
    return value


def _setting(name: str) -> str:
    """A setting's one spelling (``init_a`` and ``init-a`` are the same setting)."""
    return name.replace("_", "-")


def cell_status(folder: Path) -> str | None:
    """``done``, ``failed`` or None (never run, in flight, killed). A finished run whose status
    file was damaged still counts as done: its summary says the run completed."""
    try:
        status = json.loads((folder / STATUS).read_text())["status"]
        if status in ("done", "failed"):
            return status
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        if json.loads((folder / RUN / "summary.json").read_text())["completed"] is True:
            return "done"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def changed_settings(sweep: Sweep, cells: list[Cell]) -> dict[str, str]:
    """Finished cells that the sweep file now describes differently: cell name -> what changed."""
    changed = {}
    for cell in cells:
        folder = sweep.out / cell.name
        if cell_status(folder) != "done":
            continue
        try:
            stored = json.loads((folder / "cell.json").read_text())["settings"]
            before = RunConfig.from_mapping(stored).to_dict(hyphenated=True)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # no readable record of its settings: keep the finished result
        now = RunConfig.from_mapping(cell.settings).to_dict(hyphenated=True)
        diff = [k for k in now if now[k] != before[k]]
        if diff:
            k = diff[0]
            changed[cell.name] = f"ran with {k}={before[k]}, the sweep file now gives {k}={now[k]}"
    return changed


def _cli_value(value: Any) -> str:
    """A setting as a ``fedortho simulate`` option value (RunConfig parses it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # floats print as Python reads them, infinities as "inf"


_CHILDREN: set[subprocess.Popen] = set()  # the cells' running processes, each the leader of its own group
_CHILDREN_LOCK = threading.Lock()
STOP_GRACE_SECONDS = 30


# A launcher runs one ``fedortho simulate`` command line for a cell, its output appended to
# the cell's log.txt, and returns its exit status.
Launcher = Callable[[list[str], Path], int]


def simulate_cell(cell: Cell, folder: Path, launch: Launcher) -> None:
    """Run one cell through ``fedortho simulate`` with ``launch``; raise on failure.

    A cell whose run was interrupted after a checkpoint is continued (``--resume``); if its
    checkpoint cannot be resumed, the cell starts over.
    """
    run = folder / RUN
    if _has_checkpoint(run):
        code = launch(["simulate", "--resume", str(run)], folder)
        if code != 2:  # 2: refused before anything ran (a damaged or foreign checkpoint)
            return _raise_on_failure(code, folder)
        _clear(folder, cell)
    args = ["simulate", "--out", str(run)]
    for key, value in cell.settings.items():
        args += [f"--{key.replace('_', '-')}", _cli_value(value)]
    (folder / "log.txt").write_text("")  # a fresh run: its own log
    _raise_on_failure(launch(args, folder), folder)


def _has_checkpoint(run: Path) -> bool:
    return (run / "checkpoint" / "checkpoint.json").is_file()


EVAL_CACHE = ".eval-cache"


def _cell_environment(sweep_out: Path) -> dict[str, str]:
    """The cells' environment: evaluations of an untrained model (round 0, the zero-shot head)
    are kept in the sweep's ``EVAL_CACHE`` and shared by its cells (fedortho.evalcache)."""
    from fedortho.evalcache import CACHE_ENV

    return {**os.environ, CACHE_ENV: str(sweep_out.resolve() / EVAL_CACHE)}


class CellRunner:
    """Runs a cell through ``simulate_cell`` with its ``launch``; ``close`` ends what it keeps
    between cells."""

    def __call__(self, cell: Cell, folder: Path) -> None:
        simulate_cell(cell, folder, self.launch)

    def launch(self, args: list[str], folder: Path) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ColdCells(CellRunner):
    """Each cell in a fresh ``fedortho simulate`` process, which leads its own process group
    (Ray's processes join it) and gets SIGTERM if the sweep dies, even by SIGKILL."""

    def __init__(self, sweep_out: Path | None = None, ray_address: str | None = None) -> None:
        self.env = _cell_environment(sweep_out) if sweep_out is not None else None
        self.extra = ["--ray-address", ray_address] if ray_address else []

    def launch(self, args: list[str], folder: Path) -> int:
        with open(folder / "log.txt", "a") as log:
            proc = _start([sys.executable, "-m", "fedortho.cli", *args, *self.extra], stdout=log,
                          stderr=subprocess.STDOUT, env=self.env)
        try:
            return proc.wait()
        finally:
            _forget(proc)


class WarmCells(CellRunner):
    """Cells run by long-lived cell hosts (``fedortho cell-host``, ``server.cellhost``): one per
    cell running at once, each keeping its imports, its Ray session and its workers (with
    their models and data) from cell to cell. A host whose cell failed is replaced, so a
    failure leaves nothing behind for the next cell."""

    def __init__(self, sweep_out: Path, hosts: int = 1, ray_address: str | None = None) -> None:
        self.env = _cell_environment(sweep_out)
        self.command = [sys.executable, "-m", "fedortho.cli", "cell-host", "--hosts", str(max(1, hosts)),
                        *(["--ray-address", ray_address] if ray_address else [])]
        self.host_log = sweep_out / "cell-hosts.log"  # what a host says outside its cells
        self.idle: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def launch(self, args: list[str], folder: Path) -> int:
        with self.lock:
            host = self.idle.pop() if self.idle else None
        if host is None:
            with open(self.host_log, "a") as log:
                host = _start(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                              env=self.env, text=True)
        code = None
        try:
            host.stdin.write(json.dumps({"argv": args, "log": str((folder / "log.txt").resolve())}) + "\n")
            host.stdin.flush()
            reply = host.stdout.readline()
            code = json.loads(reply)["code"] if reply else host.wait()  # no reply: the host died
        except (OSError, ValueError):  # a broken reply: never a success
            code = host.poll() or 1
        finally:
            if code == 0:
                with self.lock:
                    self.idle.append(host)
            else:
                _end_host(host)
        if code != 0 and not (folder / "log.txt").read_text().strip():
            with open(folder / "log.txt", "a") as log:
                log.write(f"fedortho: error: the cell host ended with status {code}; see {self.host_log}\n")
        return code

    def close(self) -> None:
        with self.lock:
            hosts, self.idle = self.idle, []
        for host in hosts:
            _end_host(host)


def _start(command: list[str], **popen) -> subprocess.Popen:
    """A child process in its own process group, which gets SIGTERM if the sweep dies."""
    proc = subprocess.Popen(command, start_new_session=True,
                            preexec_fn=functools.partial(die_with_parent, os.getpid()), **popen)
    with _CHILDREN_LOCK:
        _CHILDREN.add(proc)
    return proc


def _forget(proc: subprocess.Popen) -> None:
    with _CHILDREN_LOCK:
        _CHILDREN.discard(proc)
    _kill_group(proc.pid)  # whatever the process left behind in its group


def _end_host(host: subprocess.Popen) -> None:
    """End of input ends a host; its guardian then ends its Ray processes."""
    try:
        host.stdin.close()
        host.wait(timeout=STOP_GRACE_SECONDS)
    except (OSError, subprocess.TimeoutExpired):
        pass
    _forget(host)


def _raise_on_failure(code: int, folder: Path) -> None:
    if code != 0:
        lines = (folder / "log.txt").read_text().strip().splitlines()
        errors = [line for line in lines if "error" in line.lower()]
        raise RuntimeError((errors or lines or [f"exit code {code}"])[-1])


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a cell's process group (its leader has exited or had its grace)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_cells() -> None:
    """End every running cell: its run writes its summary, Ray stops, then its group is killed."""
    with _CHILDREN_LOCK:
        running = list(_CHILDREN)
    for proc in running:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in running:
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc.pid)


def _clear(folder: Path, cell: Cell) -> None:
    """Start a cell afresh: an unfinished or failed attempt holds nothing finished."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_json_atomic(folder / "cell.json", {"values": cell.values, "settings": cell.settings})


def _same_settings(folder: Path, cell: Cell) -> bool:
    try:
        return json.loads((folder / "cell.json").read_text())["settings"] == json_safe(cell.settings)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_sweep(sweep: Sweep, parallel: int = 1, run_cell: Callable[[Cell, Path], None] | None = None,
              echo: Callable[[str], None] = print, warm: bool = True,
              ray_address: str | None = None) -> dict[str, int]:
    """Run every unfinished cell, ``parallel`` at once; returns counts of cells done before,
    run now, failed. ``run_cell`` runs one cell (default: ``WarmCells``, or ``ColdCells``
    without ``warm``); ``ray_address``: the cells' clients run on that Ray cluster."""
    cells = sweep.cells()
    changed = changed_settings(sweep, cells)
    if changed:
        name, what = next(iter(changed.items()))
        raise ConfigError(f"{len(changed)} finished cells in {sweep.out} ran with other settings ({name}: {what}); "
                          "move that folder away or give the sweep another [sweep] out")
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(sweep.out / "sweep.json", {"name": sweep.name, "base": sweep.base, "grid": sweep.grid})
    todo = [c for c in cells if cell_status(sweep.out / c.name) != "done"]
    counts = {"cells": len(cells), "done-before": len(cells) - len(todo), "ran": 0, "failed": 0}
    echo(f"sweep {sweep.name}: {len(cells)} cells, {counts['done-before']} already done, {len(todo)} to run")
    started = time.time()
    runner = run_cell or (WarmCells(sweep.out, parallel, ray_address) if warm else ColdCells(sweep.out, ray_address))

    def attempt(cell: Cell) -> None:
        folder = sweep.out / cell.name
        if folder_in_use(folder / RUN):  # e.g. the child of a killed sweep, still running
            raise RuntimeError(f"cell {cell.name}: its run folder is still being written by another process; "
                               "stop that process, then run the sweep again")
        if not (_has_checkpoint(folder / RUN) and _same_settings(folder, cell)):
            _clear(folder, cell)  # else the run continues from its checkpoint
        (folder / STATUS).unlink(missing_ok=True)
        try:
            runner(cell, folder)
        except Exception as exc:  # recorded; the other cells go on
            write_json_atomic(folder / STATUS, {"status": "failed", "error": str(exc)})
            raise
        write_json_atomic(folder / STATUS, {"status": "done"})

    _run_cells(todo, parallel, attempt, counts, started, echo, close=getattr(runner, "close", None))
    return counts


def _run_cells(todo: list[Cell], parallel: int, attempt: Callable[[Cell], None], counts: dict[str, int],
               started: float, echo: Callable[[str], None], close: Callable[[], None] | None = None) -> None:
    """Run ``attempt`` on every cell, ``parallel`` at once; then ``close`` (what the runner
    keeps between cells), while the threads that started its processes live: a process that
    dies with its parent gets its signal when the thread that started it ends."""
    finished = 0
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        pending: dict[Future, Cell] = {}
        queue = list(todo)
        try:
            while queue or pending:
                while queue and len(pending) < max(1, parallel):
                    cell = queue.pop(0)
                    pending[pool.submit(attempt, cell)] = cell
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    cell = pending.pop(future)
                    finished += 1
                    error = future.exception()
                    if error is not None:
                        if isinstance(error, KeyboardInterrupt):
                            raise error
                        counts["failed"] += 1
                        echo(f"  cell {cell.name} failed: {error}")
                    else:
                        counts["ran"] += 1
                    elapsed = time.time() - started
                    eta = elapsed / finished * (len(todo) - finished)
                    echo(f"  [{_bar(finished, len(todo))}] {finished}/{len(todo)} cells  "
                         f"elapsed {elapsed / 60:.1f} min  ETA {eta / 60:.1f} min  ({cell.name})")
        except BaseException:  # Ctrl-C, SIGTERM: the running cells end with the sweep
            queue.clear()
            for future in pending:
                future.cancel()
            stop_cells()  # before the pool waits for the threads that wait for them
            raise
        finally:
            if close is not None:
                close()


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = int(width * done / max(1, total))
    return "#" * filled + "." * (width - filled)
