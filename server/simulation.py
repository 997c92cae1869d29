"""Launch the ServerApp and ClientApp in Flower's simulation engine (Ray): ``fedortho simulate``."""

from __future__ import annotations

import logging
import os

from fedortho.config import RunConfig


def simulate(cfg: RunConfig, client_cpus: float, ray_address: str | None, verbose: bool) -> None:
    """Run a Flower simulation (Ray) of ``cfg`` with ``cfg.clients`` virtual SuperNodes."""
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
        # fedortho reports rounds and client problems itself; Flower's INFO/WARNING lines
        # (including run_simulation's deprecation notice) are shown with --verbose.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    init_args: dict = {"include_dashboard": False}
    if ray_address:
        init_args["address"] = ray_address
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    run_simulation(server_app=make_server_app(cfg), client_app=client_app, num_supernodes=cfg.clients,
                   backend_config=backend_config, verbose_logging=verbose)
