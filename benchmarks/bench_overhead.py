"""What the simulation costs over the same client rounds called in a plain loop.

For each workload, two processes run one after the other on the same machine:

* ``plain loop``: one process that samples clients as the server does (the same seeded
  generator), calls ``fedortho.worker.run_client_round`` for each sampled client with its
  privacy state, aggregates with ``fedortho.rules.aggregate`` and evaluates the
  global adapter on the test split as the server does (zero-shot head, round 0, every round);
* ``fedortho simulate``: the same run through Flower's simulation engine and Ray.

Both make the same calls with the same seeds; the table says whether they end with the same
final accuracy (a simulation worker runs one torch thread, the plain loop as many as there
are cores). Per round: mean time of a round's training and aggregation (``round-seconds`` of
``metrics.jsonl``; evaluation excluded); start-up: from the process's start to its first
round; peak memory: the largest sum over the process and all its descendants (Ray's
processes included) of their proportional set sizes (shared pages counted once), sampled
every 0.25 s. Workloads: the default run (MiniLM, 10 clients, 8 private rounds) and a tiny
BERT with 10 clients per round over 20 rounds at populations of 100 to 100,000 clients, on a
synthetic dataset of 300,000 examples (``fedortho.synthetic``; IID shards).

    python benchmarks/bench_overhead.py               # the whole table (about 16 minutes on 2 cores)
    python benchmarks/bench_overhead.py --quick       # tiny model only, 100 and 100,000 clients
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TINY_SETTINGS = {"clients-per-round": 10, "rounds": 20, "local-steps": 2, "batch-size": 2, "partitioning": "iid",
                 "max-test-examples": 500, "eval-precision": "float32"}
POPULATIONS = (100, 1_000, 10_000, 100_000)


# -- the plain loop (runs in its own process: ``--plain SETTINGS.json OUT.json``) ----------
def plain_loop(settings: dict, out: Path) -> None:
    import numpy as np

    from fedortho import data
    from fedortho.config import RunConfig
    from fedortho.rules import aggregate
    from fedortho.lora import adapter_state, load_adapter_state
    from fedortho.privacy import BudgetExhausted
    from fedortho.train import evaluate
    from fedortho.worker import ClientWork, build_model, run_client_round, set_threads

    cfg = RunConfig.from_mapping(settings)
    set_threads(cfg)
    started = psutil.Process().create_time()
    model = build_model(cfg)
    test = data.test_tensors(cfg)
    zero_shot = evaluate(build_model(cfg.replace(head_init="zero-shot", train_head=False)), test,
                         precision=cfg.eval_precision)[0] if cfg.head_init != "zero-shot" else None
    state = adapter_state(model)
    load_adapter_state(model, state)
    evaluate(model, test, precision=cfg.eval_precision)
    first_round = time.time()
    rng = np.random.default_rng(cfg.seed)  # the server's sampling
    histories: dict[int, object] = {}  # each client's PrivacyState
    round_seconds, accuracy = [], None
    for server_round in range(1, cfg.rounds + 1):
        begun = time.time()
        chosen = sorted(int(p) for p in rng.choice(cfg.clients, size=cfg.clients_per_round, replace=False))
        results = []
        for partition in chosen:
            try:
                result = run_client_round(ClientWork(cfg, partition, cfg.clients, server_round, state,
                                                     privacy=histories.get(partition)))
            except BudgetExhausted:  # the client sits the round out, as in the simulation
                continue
            histories[partition] = result.privacy
            results.append(result)
        if not results:
            raise SystemExit(f"round {server_round}: every sampled client has exhausted its budget")
        state = aggregate(cfg.strategy, state, [r.update for r in results], [r.num_examples for r in results],
                          server_round, cfg.svd_period)
        round_seconds.append(time.time() - begun)
        load_adapter_state(model, state)
        accuracy = evaluate(model, test, precision=cfg.eval_precision)[0]
    out.write_text(json.dumps({"startup": first_round - started, "round-seconds": round_seconds,
                               "final-accuracy": accuracy, "zero-shot-accuracy": zero_shot}))


# -- measuring a process and its descendants ----------------------------------------------
def kind(proc: psutil.Process, root: psutil.Process) -> str:
    """What a process of the tree is: the command itself, a Ray worker, or Ray's own services."""
    if proc.pid == root.pid:
        return "main"
    title = " ".join(proc.cmdline())
    return "workers" if ("default_worker.py" in title or title.startswith("ray::")) else "ray"


class PeakMemory:
    """Largest sum of PSS over a process tree, sampled in a thread, and its split by kind of
    process at that moment."""

    def __init__(self, pid: int) -> None:
        self.root, self.peak, self.split, self._stop = psutil.Process(pid), 0, {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            split: dict[str, int] = {}
            for proc in procs:
                try:
                    what = kind(proc, self.root)
                    split[what] = split.get(what, 0) + proc.memory_full_info().pss
                except psutil.Error:
                    pass
            if sum(split.values()) > self.peak:
                self.peak, self.split = sum(split.values()), split
            self._stop.wait(0.25)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_measured(cmd: list[str], env: dict) -> tuple[float, PeakMemory, list[tuple[float, str]]]:
    """(wall seconds, peak memory in bytes and its split, stdout lines with their arrival times)."""
    begun = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    memory = PeakMemory(proc.pid)
    lines = [(time.time() - begun, line.rstrip()) for line in proc.stdout]
    code = proc.wait()
    wall = time.time() - begun
    memory.stop()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n" + "\n".join(line for _, line in lines[-20:]))
    return wall, memory, lines


def measure_plain(settings: dict, env: dict, tmp: Path) -> dict:
    out = tmp / "plain.json"
    (tmp / "settings.json").write_text(json.dumps(settings))
    wall, memory, _ = run_measured([sys.executable, __file__, "--plain", str(tmp / "settings.json"), str(out)], env)
    result = json.loads(out.read_text())
    return {"wall": wall, "peak": memory.peak, "startup": result["startup"], "round-seconds": result["round-seconds"],
            "final-accuracy": result["final-accuracy"]}


def measure_simulate(settings: dict, env: dict, tmp: Path) -> dict:
    out = tmp / "run"
    args = [x for key, value in settings.items() for x in (f"--{key}", str(value))]
    cmd = [sys.executable, "-m", "fedortho.cli", "simulate", *args, "--out", str(out)]
    wall, memory, lines = run_measured(cmd, env)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    began = next(t for t, line in lines if line.startswith("fedortho: ") and "clients per round" in line)
    round0 = next(t for t, line in lines if line.lstrip().startswith("round   0/"))
    startup = summary["startup-seconds"]
    return {"wall": wall, "peak": memory.peak, "split": memory.split, "startup": startup,
            "round-seconds": [r["round-seconds"] for r in rows if r["round"] > 0],
            "final-accuracy": summary["final-accuracy"],
            # where start-up goes: imports, checks, Ray and Flower; the server's model and
            # round-0 evaluation; waiting for the workers to build theirs
            "phases": (began, round0 - began, max(0.0, startup - round0))}


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", nargs=2, metavar=("SETTINGS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny model only, at 100 and 100,000 clients")
    args = parser.parse_args()
    if args.plain:
        plain_loop(json.loads(Path(args.plain[0]).read_text()), Path(args.plain[1]))
        return
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from fedortho.models import save_tiny_bert
        from fedortho.synthetic import write_synthetic_dataset

        tiny = str(save_tiny_bert(tmp / "tiny-bert"))
        synthetic = str(write_synthetic_dataset(tmp / "synthetic", train_rows=300_000, test_rows=2_000))
        workloads = [] if args.quick else [("default (MiniLM, 10 clients, 8 private rounds)", {})]
        for clients in ((100, 100_000) if args.quick else POPULATIONS):
            workloads.append((f"tiny BERT, {clients:,} clients, 10 per round, 20 rounds",
                              {"model": tiny, "dataset": synthetic, "clients": clients, **TINY_SETTINGS}))
        header = ("| workload | per round: simulate / plain loop (s) | ratio | start-up: simulate / plain (s) "
                  "| wall: simulate / plain (s) | peak memory: simulate / plain (GB) | same final accuracy: simulate / plain "
                  "| simulate start-up (s): before the server / server's round 0 / waiting for workers "
                  "| simulate peak (GB): server process / Ray workers / Ray services |")
        rows = []
        for name, settings in workloads:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            cell = tmp / f"w{len(rows)}"
            cell.mkdir()
            plain = measure_plain(settings, env, cell)
            sim = measure_simulate(settings, env, cell)
            per_sim, per_plain = mean(sim["round-seconds"]), mean(plain["round-seconds"])
            same = abs(sim["final-accuracy"] - plain["final-accuracy"]) < 1e-9
            split = " / ".join(f"{sim['split'].get(k, 0) / 1e9:.2f}" for k in ("main", "workers", "ray"))
            rows.append(f"| {name} | {per_sim:.2f} / {per_plain:.2f} | {per_sim / per_plain:.2f}x "
                        f"| {sim['startup']:.1f} / {plain['startup']:.1f} (+{sim['startup'] - plain['startup']:.1f}) "
                        f"| {sim['wall']:.0f} / {plain['wall']:.0f} ({sim['wall'] / plain['wall']:.2f}x) "
                        f"| {sim['peak'] / 1e9:.2f} / {plain['peak'] / 1e9:.2f} ({sim['peak'] / plain['peak']:.2f}x) "
                        f"| {'yes' if same else 'no'}: {sim['final-accuracy']:.4f} / {plain['final-accuracy']:.4f} "
                        f"| {' / '.join(f'{t:.1f}' for t in sim['phases'])} "
                        f"| {split} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n{os.cpu_count()} CPUs; per round = training and aggregation, evaluation excluded\n")
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
