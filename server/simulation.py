"""Launch the ServerApp and ClientApp in Flower's simulation engine (Ray): ``fedortho simulate``."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from fedortho.config import RunConfig


def worker_allocator() -> dict[str, str]:
    """Run the workers on jemalloc (the build Ray ships for its own services), unless the
    caller chose an allocator with LD_PRELOAD (set, even empty). Training's activations come
    in many sizes between 100 kB and a few MB; glibc's heap keeps what they fragment, and on
    the default workload a worker peaks about 0.5 GB higher with it, at the same speed."""
    import ray

    library = os.path.join(os.path.dirname(ray.__file__), "core", "libjemalloc.so")
    if "LD_PRELOAD" in os.environ or not sys.platform.startswith("linux") or not os.path.isfile(library):
        return {}
    return {"LD_PRELOAD": library}


def simulate(cfg: RunConfig, client_cpus: float, ray_address: str | None, verbose: bool, resume: bool = False,
             on_ray_started: Callable[[], None] | None = None, nodes: int = 0, client_gpus: float = 0.0,
             plans: Sequence = (), warm: bool = False) -> None:
    """Run a Flower simulation (Ray) of ``cfg`` (``resume``: continue the run in ``cfg.out``
    after its checkpoint).

    Clients are data, simulated SuperNodes are workers: ``nodes`` of them (default: one per
    client of a round, so a round's messages go out in one look of Flower's engine) train
    whichever clients the server samples, their states travelling with the messages. The
    population can be far larger than the nodes, and the result does not depend on their
    number. Each worker takes ``client_cpus`` CPUs and ``client_gpus`` GPUs (a fraction shares
    one GPU between workers; with any, clients train on the GPU). ``on_ray_started`` is called
    once Ray runs, before any round: Ray replaces the process's SIGTERM handler when it
    starts, so handlers of the caller's own are installed (again) there. ``plans``: noise plans
    made before the run (``fedortho.cli.preflight``), handed to the workers at warm-up.
    ``warm``: keep Ray and the workers running when the run ends, and reuse those an earlier
    run of this process left (``server.warm``; a sweep's cell host runs its cells so)."""
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # a simulation sends nothing anywhere
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import warnings

    import ray
    from flwr.simulation import run_simulation

    from client.app import DIAGNOSTICS_ENV, SIMULATION_ENV, app as client_app
    from fedortho.worker import DEVICE_ENV
    from server.app import make_server_app
    from server.warm import warm_backend

    # The workers' environment: simulated clients take their state from the message, report
    # gradient diagnostics and train on the device they were given. Set in Ray's job
    # environment, so that workers on every machine of a cluster have it, not only those
    # started from this process.
    worker_env = {SIMULATION_ENV: "1", DIAGNOSTICS_ENV: "1",
                  **{key: os.environ[key] for key in ("TOKENIZERS_PARALLELISM", "FLWR_TELEMETRY_ENABLED")}}
    os.environ.update(worker_env)
    worker_env[DEVICE_ENV] = "cuda" if client_gpus > 0 else "cpu"  # the workers' only, as is the allocator
    worker_env.update(worker_allocator())
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
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus}, "init_args": init_args}
    # Ray starts here, as Flower's Ray backend starts it (the simulation's own backend then finds
    # it running), so that ``on_ray_started`` runs after Ray has replaced the signal handlers;
    # the backend's job environment (the driver's import path) gains the workers' variables.
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    os.environ["PYTHONPATH"] = pythonpath
    if not (warm and ray.is_initialized()):
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath, **worker_env}}, **init_args)
    if on_ray_started is not None:
        on_ray_started()
    try:
        check_resources(client_cpus, client_gpus)
    except Exception:
        ray.shutdown()
        raise
    nodes = nodes or min(cfg.clients, cfg.clients_per_round)
    with warm_backend() if warm else contextlib.nullcontext():
        run_simulation(server_app=make_server_app(cfg, resume, plans), client_app=client_app,
                       num_supernodes=nodes, backend_config=backend_config, verbose_logging=verbose)


def check_resources(client_cpus: float, client_gpus: float) -> None:
    """One worker must fit on some machine of the Ray cluster: Flower would otherwise stop
    with a traceback (or, on a cluster still growing, wait)."""
    import ray

    from fedortho.config import ConfigError

    machines = [node["Resources"] for node in ray.nodes() if node.get("Alive") and node.get("Resources")]
    if any(r.get("CPU", 0) >= client_cpus and r.get("GPU", 0) >= client_gpus for r in machines):
        return
    cpus = max((r.get("CPU", 0) for r in machines), default=0)
    gpus = max((r.get("GPU", 0) for r in machines), default=0)
    raise ConfigError(f"no machine of the Ray cluster has --client-cpus {client_cpus:g} and --client-gpus "
                      f"{client_gpus:g} for one client (the largest has {cpus:g} CPUs and {gpus:g} GPUs)")
