"""Seconds per round: a simulation against the same run deployed on 127.0.0.1.

Three runs with the same settings, one after the other on this machine: `fedortho simulate`,
`deploy/loopback.sh --no-worker` (every round trained inside Flower's per-message ClientApp
process) and `deploy/loopback.sh` (a node worker beside each SuperNode). Per round it reads
the training seconds the server recorded (`round-seconds`: from sending the round's messages
to the last reply; the evaluation is not in it), skips round 1 (start-up, noise planning) and
prints the mean of the rest, its ratio to the simulation, and how far the runs' epsilons and
accuracies are apart.

    python benchmarks/bench_deployment.py [--model tiny|all-minilm-l6-v2|PATH] [--nodes 2] \
        [--rounds 4] [--local-steps 2] [--max-train-examples 240] [--max-test-examples 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny", help="tiny (a small random BERT), the embedded model, or a folder")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-train-examples", type=int, default=240)
    parser.add_argument("--max-test-examples", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedortho-bench-deploy-"))
    model = args.model
    if model == "tiny":
        from fedortho.models import save_tiny_bert

        model = str(save_tiny_bert(work / "tiny-bert"))
    settings = {"model": model, "clients": args.nodes, "clients-per-round": args.nodes, "rounds": args.rounds,
                "local-steps": args.local_steps, "batch-size": args.batch_size,
                "max-train-examples": args.max_train_examples, "max-test-examples": args.max_test_examples}
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    runs = {
        "simulation": ([str(BIN / "fedortho"), "simulate", "--out", str(work / "sim" / "run"),
                        *[f"--{k}={v}" for k, v in settings.items()]], work / "sim" / "run"),
        "deployment, --no-worker": ([str(REPO / "deploy" / "loopback.sh"), str(work / "plain"), "--no-worker",
                                     "--nodes", str(args.nodes), "--rounds", str(args.rounds),
                                     *[f'{k}="{v}"' if k == "model" else f"{k}={v}" for k, v in settings.items()
                                       if k not in ("clients", "clients-per-round", "rounds")]],
                                    work / "plain" / "run"),
        "deployment, node worker": ([str(REPO / "deploy" / "loopback.sh"), str(work / "worker"),
                                     "--nodes", str(args.nodes), "--rounds", str(args.rounds),
                                     *[f'{k}="{v}"' if k == "model" else f"{k}={v}" for k, v in settings.items()
                                       if k not in ("clients", "clients-per-round", "rounds")]],
                                    work / "worker" / "run"),
    }
    print(f"{args.nodes} clients, {args.rounds} rounds, {args.local_steps} local steps, model {args.model}, "
          f"{os.cpu_count()} cores; runs in {work}", flush=True)
    results = {}
    for name, (command, folder) in runs.items():
        print(f"  running {name} ...", flush=True)
        proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not (folder / "summary.json").exists():
            sys.exit(f"{name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        results[name] = rows(folder)
    base = None
    print(f"\n| run | seconds per round (rounds 2-{args.rounds}) | vs simulation |")
    print("|---|---|---|")
    for name, run in results.items():
        per_round = statistics.mean(r["round-seconds"] for r in run if r["round"] >= 2)
        base = base or per_round
        print(f"| {name} | {per_round:.2f} | {per_round / base:.1f}x |")
    # Epsilon depends only on the settings; accuracy may move by an example or two, since
    # simulated clients run one torch thread each (Ray) and deployed ones their share of cores.
    reference = results["simulation"]
    epsilons = all([r.get("epsilon") for r in run] == [r.get("epsilon") for r in reference]
                   for run in results.values())
    gap = max(abs(a["test-accuracy"] - b["test-accuracy"]) for run in results.values()
              for a, b in zip(run, reference) if "test-accuracy" in a and "test-accuracy" in b)
    print(f"\nsame epsilons in every round: {'yes' if epsilons else 'NO'}; largest accuracy difference "
          f"from the simulation in any round: {gap:.4f}")


if __name__ == "__main__":
    main()
