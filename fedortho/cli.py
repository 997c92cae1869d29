"""``fedortho`` command line. The only module of the library that launches Flower."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from fedortho.checkpoint import CheckpointError
from fedortho.config import ConfigError, RunConfig
from fedortho.data import DataError
from fedortho.guardian import TOKEN_ENV
from fedortho.models import ModelLoadError
from fedortho.nodeworker import NodeWorkerError
from fedortho.runs import RunStopped


DATA_SETTINGS = ("dataset", "text_column", "label_column", "test_fraction", "partitioning", "dirichlet_alpha",
                 "max_train_examples", "max_test_examples", "seed")


def _add_config_options(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    for f in fields(RunConfig):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not MISSING else None
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        # Values stay strings here; RunConfig.from_mapping converts them and names bad ones.
        parser.add_argument(flag, dest=f.name, default=None, metavar=f.type.upper() if isinstance(f.type, str) else "",
                            help=help_text)


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if getattr(args, f.name, None) is not None}
    return RunConfig.from_mapping(given)


def preflight(cfg: RunConfig, resuming: bool = False) -> list:
    """Fail fast, before Ray starts, on a run folder in use or a model, dataset or budget
    that won't do. Returns the noise plans it made (``privacy.NoisePlan``, for the run's
    record-level budget), which the simulation's server hands to its workers."""
    from fedortho import data
    from fedortho.models import check_model, load_tokenizer

    if cfg.out and not resuming:
        check_out_folder(Path(cfg.out), create=False)
    check_model(cfg.model, cfg.pooling)
    load_tokenizer(cfg.model)
    splits = data.splits_for(cfg)  # cached: the server reuses it
    check_lora_rank(cfg)
    if cfg.head_init == "zero-shot" or cfg.label_texts:
        from fedortho.heads import label_texts

        label_texts(cfg, splits.label_names)
    plans = []
    if cfg.private:
        from fedortho.privacy import BudgetTooSmall
        from fedortho.worker import PLANNER, plan_smallest_client

        try:  # the process's planner: a cell host plans each budget once for all its cells
            plans.append(plan_smallest_client(cfg, PLANNER))
        except BudgetTooSmall as exc:
            raise ConfigError(str(exc)) from None
    if cfg.user_private:
        from fedortho.userdp import UserPlanError, plan_for

        try:
            plan_for(cfg)
        except UserPlanError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.loggers:
        from fedortho.tracking import check_installed

        check_installed(cfg)
    if cfg.out and not resuming:  # last: a run that fails its other checks leaves no folder behind
        check_out_folder(Path(cfg.out), create=True)
    return plans


def resume_config(run_dir: str, args: argparse.Namespace) -> RunConfig:
    """The settings of the run in ``run_dir``, checked against its checkpoint (which is read,
    never changed, here): a run resumes only as it was configured."""
    import json

    from fedortho.checkpoint import check_resumable, load_checkpoint
    from fedortho.runs import folder_in_use

    given = [f.name.replace("_", "-") for f in fields(RunConfig) if getattr(args, f.name, None) is not None]
    if given:
        raise ConfigError(f"--resume continues a run with the settings in its config.json; drop --{given[0]}")
    folder = Path(run_dir)
    if not folder.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run folder")
    if folder_in_use(folder):
        raise ConfigError(f"run folder {folder} is being written by another run")
    try:
        settings = json.loads((folder / "config.json").read_text())["config"]
        cfg = RunConfig.from_mapping({**settings, "out": str(folder)})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--resume {run_dir}: its config.json cannot be read ({exc})") from None
    try:
        check_resumable(load_checkpoint(folder), cfg)
    except CheckpointError as exc:  # the folder is left as it is
        raise CheckpointError(f"--resume {run_dir}: {exc}") from None
    return cfg


def check_out_folder(out, create: bool) -> None:
    """``--out`` must be absent or empty (a run never writes into another's files) and, with
    ``create``, writable: it is made, and a file is written in it and removed."""
    from fedortho.runs import folder_in_use, holds_files, writable_folder

    if folder_in_use(out):
        raise ConfigError(f"run folder {out} is being written by another run; choose another --out")
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"run folder {out} already holds a run; choose another --out")
    if holds_files(out):
        raise ConfigError(f"--out {out} is not an empty folder; give a new or empty one")
    if not create:
        return
    try:
        writable_folder(out)
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {out}: {exc.strerror or exc}") from None


def check_lora_rank(cfg: RunConfig) -> None:
    """Every LoRA target must be a linear layer with both sides at least ``lora-r``."""
    from fedortho.models import model_skeleton

    model = model_skeleton(cfg.model)
    found = False
    for name, module in model.named_modules():
        if name.split(".")[-1] in cfg.targets and isinstance(module, torch.nn.Linear):
            found = True
            if cfg.lora_r > min(module.in_features, module.out_features):
                raise ConfigError(f"lora-r {cfg.lora_r} exceeds {name} ({module.out_features}x{module.in_features}); "
                                  f"the rank can be at most {min(module.in_features, module.out_features)}")
    if not found:
        raise ConfigError(f"lora-targets {cfg.lora_targets} names no linear layer of {cfg.model}")


def _stop_cleanly_on_signals() -> None:
    """Ctrl-C or SIGTERM: stop Ray's processes and exit. Finished rounds are already on disk."""

    def stop(signum, frame):  # noqa: ARG001
        from fedortho.runs import finish_interrupted_runs

        try:
            folders = finish_interrupted_runs()
            hint = "".join(f"; continue with `fedortho simulate --resume {f}`" for f in folders)
            print(f"fedortho: interrupted; finished rounds are saved{hint}", file=sys.stderr, flush=True)
        except Exception as exc:  # still stop Ray below
            print(f"fedortho: interrupted; could not write the run summary: {exc}", file=sys.stderr, flush=True)
        # That line is the last: what Ray and Flower print while their workers go is not for the user.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        try:
            # A guarded run exits at once and its guardian ends Ray's processes: a ray.shutdown()
            # here races Ray's own threads, which end the process with status 1 when they see
            # the raylet go first.
            if TOKEN_ENV not in os.environ:
                import ray

                ray.shutdown()
        finally:
            os._exit(130)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None, warm: bool = False) -> int:
    """The command line; returns the exit status. ``warm``: a sweep's cell host runs a cell
    (``simulate``) and goes on to the next, where a command-line run ends its process."""
    parser = argparse.ArgumentParser(prog="fedortho", description="Private federated fine-tuning with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a Flower simulation (default: private FedSVD on the embedded model)")
    _add_config_options(sim)
    sim.add_argument("--client-cpus", type=float, default=1.0,
                     help="CPUs per simulated client (Ray resources): clients run in parallel on the free cores "
                          "(default: 1)")
    sim.add_argument("--client-gpus", type=float, default=0.0,
                     help="GPUs per simulated client (Ray resources; a fraction shares a GPU, e.g. 0.25: four "
                          "clients train on one GPU at once); 0 trains on the CPU (default: 0)")
    sim.add_argument("--ray-address", default=None,
                     help="attach to an existing Ray cluster (e.g. 'auto' or HEAD_IP:6379; see README, 'A Ray cluster') "
                          "instead of starting one on this machine")
    sim.add_argument("--verbose", action="store_true", help="show Flower's own log lines")
    sim.add_argument("--nodes", type=int, default=0,
                     help="simulated SuperNodes: workers that train whichever clients are sampled (default: "
                          "clients-per-round); results do not depend on it")
    sim.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue the run in RUN_DIR after its last complete round, with its own settings; it "
                          "ends as the uninterrupted run would")
    sub.add_parser("config", help="print the default run config as TOML ([tool.flwr.app.config])")
    sw = sub.add_parser("sweep", help="run a grid of simulations from a TOML file, resumably")
    sw.add_argument("file", help="sweep file, e.g. experiments/privacy.toml")
    sw.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
    sw.add_argument("--parallel", type=int, default=1, help="cells run at once (default: 1)")
    sw.add_argument("--out", default=None, help="results folder (default: the file's [sweep] out)")
    sw.add_argument("--ray-address", default=None,
                    help="run the cells' clients on this Ray cluster (e.g. HEAD_IP:6379; see README, 'A Ray "
                         "cluster'); results are written on this machine")
    sw.add_argument("--cold", action="store_true",
                    help="run every cell in a fresh process (default: cell hosts that keep their imports, Ray "
                         "and workers from cell to cell; the results are the same)")
    ex = sub.add_parser("export-partition", help="write one client's training examples to a folder a SuperNode "
                                                 "reads with data-path=<folder>")
    ex.add_argument("--partition-id", type=int, required=True, help="the client's partition")
    ex.add_argument("--num-partitions", type=int, required=True, help="number of clients of the run")
    ex.add_argument("--to", required=True, help="folder to write (must not exist or be empty)")
    _add_config_options(ex, only=DATA_SETTINGS)
    nw = sub.add_parser("node-worker", help="keep a deployed node's model and data in memory across Flower's "
                                             "per-message ClientApp processes (see deploy/README.md)")
    nw.add_argument("--socket", required=True, help="Unix socket to serve; the node config names it as "
                                                    "worker-socket=<path>")
    host = sub.add_parser("cell-host", help="(used by `fedortho sweep`) run the cells it is sent, one after "
                                            "another, in one process with Ray and the workers kept running")
    host.add_argument("--hosts", type=int, default=1, help="cell hosts sharing the Ray cluster")
    host.add_argument("--ray-address", default=None)
    rp = sub.add_parser("report", help="results table (Markdown, CSV) and plots of a sweep folder")
    rp.add_argument("folder", help="a sweep's results folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            from fedortho.report import report

            report(args.folder)
            return 0
        if args.command == "node-worker":
            from fedortho.nodeworker import serve

            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # unlink the socket on the way out
            try:
                serve(args.socket)
            except KeyboardInterrupt:
                pass
            return 0
        if args.command == "export-partition":
            from fedortho import data

            cfg = _config_from_args(args).replace(clients=max(1, args.num_partitions), clients_per_round=1)
            written = data.export_partition(cfg, args.partition_id, args.num_partitions, args.to)
            print(f"fedortho: partition {args.partition_id} of {args.num_partitions}: {written} examples -> {args.to}")
            return 0
        if args.command == "config":
            for key, value in RunConfig().to_dict(hyphenated=True).items():
                print(f"{key} = {_toml(value)}")
            return 0
        if args.command == "cell-host":
            from server.cellhost import serve_cells

            return serve_cells(args.hosts, args.ray_address)
        _simulate(args, warm)
        if warm:
            return 0
        _exit_now(0)
    except (ConfigError, DataError, ModelLoadError, FileNotFoundError, NodeWorkerError, CheckpointError) as exc:
        print(f"fedortho: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`fedortho sweep F --dry-run | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush is quiet
        return 1
    except Exception as exc:  # what the ServerApp raised (run_simulation may wrap it in a RuntimeError)
        cause = exc.__cause__ or exc
        what = "the simulation stopped: " if args.command == "simulate" else ""
        kind = "" if isinstance(cause, RunStopped) else f"{type(cause).__name__}: "
        print(f"fedortho: error: {what}{kind}{cause}", file=sys.stderr)
        if args.command == "simulate" and not warm:
            _exit_now(1)
        return 1


def _simulate(args: argparse.Namespace, warm: bool) -> None:
    """``fedortho simulate``: check the settings, then run the simulation. ``warm``: in a
    sweep's cell host, whose Ray, workers and guardian outlive the run (``server.cellhost``)."""
    if args.nodes < 0:
        raise ConfigError(f"--nodes must be >= 1 (0: clients-per-round), got {args.nodes}")
    if not args.client_cpus > 0:
        raise ConfigError(f"--client-cpus must be > 0, got {args.client_cpus:g}")
    if not args.client_gpus >= 0:
        raise ConfigError(f"--client-gpus must be >= 0, got {args.client_gpus:g}")
    resuming = bool(args.resume)
    cfg = resume_config(args.resume, args) if resuming else _config_from_args(args)
    plans = preflight(cfg, resuming)
    from server.simulation import simulate  # the Flower side launches the apps

    from fedortho.guardian import guard_this_process

    if not warm:
        guard_this_process()  # Ray's processes end with this one, even if it is killed with SIGKILL
    _stop_cleanly_on_signals()
    simulate(cfg, args.client_cpus, args.ray_address, args.verbose, resume=resuming,
             on_ray_started=_stop_cleanly_on_signals, nodes=args.nodes, client_gpus=args.client_gpus,
             plans=plans, warm=warm)


def _exit_now(code: int) -> None:
    """End a simulation's process once its outputs are on disk (each written and synced as it
    was made) and Ray is shut down: the interpreter's own teardown of Ray's and torch's native
    state takes seconds and does nothing a finished run needs."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _sweep(args: argparse.Namespace) -> int:
    from fedortho.sweep import cell_status, changed_settings, load_sweep, run_sweep

    sweep = load_sweep(args.file)
    if args.out:
        sweep.out = Path(args.out)
    cells = sweep.cells()
    if args.dry_run:
        print(f"sweep {sweep.name}: {len(cells)} cells -> {sweep.out}")
        changed = changed_settings(sweep, cells)
        for cell in cells:
            status = "changed" if cell.name in changed else cell_status(sweep.out / cell.name) or "todo"
            note = f"  ({changed[cell.name]})" if cell.name in changed else ""
            print(f"  {status:<7} {cell.name}{note}")
        return 0
    def interrupt(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C: the running cells are ended first
    try:
        counts = run_sweep(sweep, parallel=args.parallel, warm=not args.cold, ray_address=args.ray_address)
    except KeyboardInterrupt:
        print(f"fedortho: sweep interrupted; finished cells are kept in {sweep.out}, interrupted ones continue "
              "from their checkpoint when the sweep runs again", file=sys.stderr, flush=True)
        return 130
    print(f"sweep {sweep.name}: {counts['ran']} ran, {counts['failed']} failed, "
          f"{counts['done-before']} were already done; `fedortho report {sweep.out}` for the table")
    return 1 if counts["failed"] else 0


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


if __name__ == "__main__":
    sys.exit(main())
