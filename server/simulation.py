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
    number. ``on_ray_started`` is called once Ray runs, before any round: Ray replaces the
    process's SIGTERM handler when it starts, so handlers of the caller's own are installed
    (again) there."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a simulation sends nothing anywhere
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import warnings

    import ray
    from flwr.simulation import run_simulation

    from client.app import DIAGNOSTICS_ENV, SIMULATION_ENV, app as client_app
    from server.app import make_server_app

    # The workers' environment: simulated clients take their state from the message and report
    # gradient diagnostics. Set in Ray's job environment, so that workers on every machine of a
    # cluster have it, not only those started from this process.
    worker_env = {SIMULATION_ENV: "1", DIAGNOSTICS_ENV: "1",
                  **{key: os.environ[key] for key in ("TOKENIZERS_PARALLELISM", "FLWR_TELEMETRY_ENABLED")}}
    os.environ.update(worker_env)
    warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
    if not verbose:
        # fedortho reports rounds and client problems itself; Flower's log lines (including
        # run_simulation's deprecation notice) and the workers' output are shown with --verbose.
        # Errors too: a failing client's traceback would be printed whole; the strategy reports
        # each failure in one line, and the command line the reason a run stopped.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
    init_args: dict = {"include_dashboard": False, "log_to_driver": verbose,
                       "logging_level": logging.INFO if verbose else logging.WARNING}
    if ray_address:
        init_args["address"] = ray_address
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    # Ray starts here, as Flower's Ray backend starts it (the simulation's own backend then finds
    # it running), so that ``on_ray_started`` runs after Ray has replaced the signal handlers;
    # the backend's job environment (the driver's import path) gains the workers' variables.
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **worker_env}}, **init_args)
    if on_ray_started is not None:
        on_ray_started()
    nodes = nodes or min(cfg.clients, cfg.clients_per_round)
    run_simulation(server_app=make_server_app(cfg, resume), client_app=client_app, num_supernodes=nodes,
                   backend_config=backend_config, verbose_logging=verbose)

