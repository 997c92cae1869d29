"""Launch the ServerApp and ClientApp in Flower's simulation engine (Ray): ``fedortho simulate``."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from fedortho.config import RunConfig


def simulate(cfg: RunConfig, client_cpus: float, ray_address: str | None, verbose: bool, resume: bool = False,
             on_ray_started: Callable[[], None] | None = None, nodes: int = 0) -> None:
    """Run a Flower simulation (Ray) of ``cfg`` (``resume``: continue the run in ``cfg.out``
    after its checkpoint).

    Clients are data, simulated SuperNodes are workers: ``nodes`` of them (default: one per
    client of a round, so a round's messages go out in one look of Flower's engine) train
    whichever clients the server samples, their states travelling with the messages. The
    population can be far larger than the nodes, and the result does not depend on their
    number. ``on_ray_started`` is
    called once Ray runs, before any round: Ray replaces the process's SIGTERM handler when
    it starts, so handlers of the caller's own are installed (again) there."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import warnings

    from flwr.simulation import run_simulation

    from client.app import DIAGNOSTICS_ENV, app as client_app
    from server.app import make_server_app

    # Simulated clients report gradient diagnostics; Ray's workers inherit the variable.
    os.environ[DIAGNOSTICS_ENV] = "1"
    warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
    if not verbose:
        # fedortho reports rounds and client problems itself; Flower's log lines (including
        # run_simulation's deprecation notice) and the workers' output are shown with --verbose.
        # Errors too: a failing client's traceback would be printed whole; the strategy reports
        # each failure in one line, and the command line the reason a run stopped.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
    init_args: dict = {"include_dashboard": False}
    if ray_address:
        init_args["address"] = ray_address
    _start_ray(init_args, verbose)
    if on_ray_started is not None:
        on_ray_started()
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    nodes = nodes or min(cfg.clients, cfg.clients_per_round)
    run_simulation(server_app=make_server_app(cfg, resume), client_app=client_app, num_supernodes=nodes,
                   backend_config=backend_config, verbose_logging=verbose)


def _start_ray(init_args: dict, verbose: bool) -> None:
    """Start (or join) Ray as Flower's Ray backend would, so that the caller runs on a Ray it
    has seen start; the backend then uses it as it is."""
    import ray

    pythonpath = os.pathsep.join(sys.path)  # workers import the apps as this process does
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
             logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=verbose, **init_args)
