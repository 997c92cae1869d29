"""Simulation workers kept alive across the runs of one process (a sweep's cell host).

Flower's Ray backend creates its actors (the simulated SuperNodes' workers) for each run and
ends them, and Ray with them, when the run ends: each run pays for Ray's start, the workers'
start, their imports and their model build. A cell host runs many cells one after another,
so its backend keeps Ray running and hands the same actors to the next run. An actor's
process keeps what ``fedortho.worker`` caches (the model with its adapters, the tokenized
data, the noise plans), none of which a client round depends on: every round loads all
adapter tensors from the message and seeds its own randomness, so a warm run gives the
same result as a cold one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import ray
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

ACTOR_CHECK_SECONDS = 30


class _Kept:
    """The actors of the last run and the resources they were made with."""

    resources: tuple = ()
    actors: list = []
    sharing: int = 1  # processes that run cells on the cluster at once, each with its share


def _alive(actors: list) -> list:
    """The actors that still answer (one may have died with its process between runs)."""
    alive = []
    for actor in actors:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=ACTOR_CHECK_SECONDS)
            alive.append(actor)
        except Exception:  # dead or unreachable: a new one takes its place
            pass
    return alive


class WarmRayBackend(raybackend.RayBackend):
    """Flower's Ray backend, whose ``terminate`` keeps the actors (and Ray) for the next run."""

    def build(self, app_fn) -> None:
        self.pool = BasicActorPool(actor_type=ClientAppActor, client_resources=self.client_resources,
                                   actor_kwargs=self.actor_kwargs)
        wanted = self.pool.actors_capacity // _Kept.sharing
        if wanted < 1:
            raise ValueError(f"{_Kept.sharing} cells at once need a worker each, and the Ray cluster has room "
                             f"for {self.pool.actors_capacity}: run fewer cells at once (--parallel)")
        resources = tuple(sorted(self.client_resources.items()))
        kept = _alive(_Kept.actors) if _Kept.resources == resources else _end(_Kept.actors)
        self.pool.pool.extend(kept[:wanted])
        self.pool.num_actors = len(self.pool.pool)
        _end(kept[wanted:])
        self.pool.add_actors_to_pool(max(0, wanted - self.pool.num_actors))
        _Kept.resources, _Kept.actors = resources, []
        self.app_fn = app_fn
        nodes = ray.get([actor.__ray_call__.remote(_node_of) for actor in self.pool.pool])
        # one write, line and newline together: the server's thread prints at the same time
        sys.stdout.write(f"fedortho: {len(nodes)} workers on Ray node{'s' if len(set(nodes)) > 1 else ''} "
                         f"{', '.join(sorted(set(nodes)))}\n")
        sys.stdout.flush()

    def terminate(self) -> None:
        if self.pool is not None:
            _Kept.actors = list(self.pool.pool)  # idle again: every reply has been fetched


def _node_of(actor) -> str:  # noqa: ARG001 (runs in the actor: Ray passes the actor's instance)
    return ray.get_runtime_context().get_node_id()


def _end(actors: list) -> list:
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor)
    return []


def share_cluster(hosts: int) -> None:
    """``hosts`` processes run cells on the Ray cluster at once: each run takes its share of
    the workers that fit (Flower's run takes them all). A host keeps its workers between
    cells, so without shares a second host's workers would wait for ever."""
    _Kept.sharing = max(1, int(hosts))


@contextlib.contextmanager
def warm_backend() -> Iterator[None]:
    """Within this block, Flower's simulation engine builds a ``WarmRayBackend`` (it looks the
    class up in its module each time it starts a run)."""
    original = raybackend.RayBackend
    raybackend.RayBackend = WarmRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original
