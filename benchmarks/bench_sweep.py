"""The fixed cost of a sweep cell, warm (cell hosts) against cold (a process per cell).

A cell's fixed cost is its wall time as the sweep sees it (from sending the cell to its
return) less the seconds of its training rounds (rounds 1..R of ``metrics.jsonl``): what
remains is imports, Ray's start, the workers' start and model build, noise planning, the
round-0 and zero-shot evaluations, the evaluation of the cell's one round, and writing the
run's outputs. Two sweeps of 6 cells
each (seeds 0-5), both the cold way (a process per cell, no evaluation cache: how every
cell ran before) and the warm way (one cell host, the sweep's evaluation cache), side by
side in one run:

- tiny: a 2-layer BERT of 64 units, 2 clients, 1 round of 2 DP steps, 64 test examples;
- default model: all-minilm-l6-v2 in the regime's setting (zero-shot head frozen, 2 IID
  clients, batch 16, lora-dropout 0.05), 1 round of 2 DP steps, 1,000 test examples.

Prints a Markdown table: the first cell's fixed cost and the median of the later five, per
mode, and the ratio; then whether the warm and cold cells computed the same runs.

    python benchmarks/bench_sweep.py [--out /tmp/bench-sweep] [--cells 6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from fedortho.models import save_tiny_bert
from fedortho.sweep import ColdCells, WarmCells, load_sweep, run_sweep

COMMON = """clients = 2
clients-per-round = 2
partitioning = "iid"
rounds = 1
local-steps = 2
batch-size = 16
"""
WORKLOADS = {
    "tiny": 'model = "{tiny}"\nmax-train-examples = 240\nmax-test-examples = 64\n',
    "default model": ('head-init = "zero-shot"\ntrain-head = false\nlora-dropout = 0.05\n'
                      'max-test-examples = 1000\n'),
}


class TimedCells:
    """A sweep's cell runner that records each cell's wall time as the sweep sees it."""

    def __init__(self, runner) -> None:
        self.runner, self.seconds = runner, {}

    def __call__(self, cell, folder) -> None:
        started = time.perf_counter()
        self.runner(cell, folder)
        self.seconds[cell.name] = time.perf_counter() - started

    def close(self) -> None:
        self.runner.close()


def round_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r.get("round-seconds", 0.0) for r in rows if r["round"] > 0)


def outcome(run: Path) -> tuple:
    rows = [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
            for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.dumps(rows, sort_keys=True), (run / "adapter" / "adapter_model.safetensors").read_bytes()


def run(workload: str, warm: bool, out: Path, tiny: Path, cells: int) -> tuple[list[float], dict]:
    folder = out / f"{workload.replace(' ', '-')}-{'warm' if warm else 'cold'}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "sweep.toml"
    path.write_text(f'[sweep]\nname = "bench"\nout = "{folder / "cells"}"\n[base]\n{COMMON}'
                    f'{WORKLOADS[workload].format(tiny=tiny)}[grid]\nseed = {list(range(cells))}\n')
    sweep = load_sweep(path)
    # cold: as every cell ran before cell hosts, without the shared evaluation cache
    timed = TimedCells(WarmCells(sweep.out) if warm else ColdCells())
    counts = run_sweep(sweep, run_cell=timed, echo=lambda line: None)
    if counts["failed"]:
        raise SystemExit(f"{counts['failed']} cells failed; see {sweep.out}")
    fixed, outcomes = [], {}
    for cell in sweep.cells():
        cell_run = sweep.out / cell.name / "run"
        fixed.append(timed.seconds[cell.name] - round_seconds(cell_run))
        outcomes[cell.name] = outcome(cell_run)
    return fixed, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench-sweep")
    parser.add_argument("--cells", type=int, default=6)
    args = parser.parse_args()
    out = Path(args.out)
    tiny = save_tiny_bert(out / "tiny-bert")
    print("| cells | mode | first cell fixed s | later cells fixed s (median) | later: cold / warm | same runs |")
    print("|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        cold, cold_runs = run(workload, False, out, tiny, args.cells)
        warm, warm_runs = run(workload, True, out, tiny, args.cells)
        same = "yes" if cold_runs == warm_runs else "NO"
        ratio = statistics.median(cold[1:]) / statistics.median(warm[1:])
        for mode, fixed in (("cold", cold), ("warm", warm)):
            print(f"| {args.cells} x {workload} | {mode} | {fixed[0]:.1f} | {statistics.median(fixed[1:]):.1f} "
                  f"| {ratio:.1f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
