"""A sweep's cell host: one process that runs the cells it is sent, one after another.

A cold cell is a fresh ``fedortho simulate`` process: it imports torch, transformers, Flower
and Ray, starts Ray and its workers, builds the model and plans the noise before its first
round. A cell host pays for that once: its imports, its Ray session (or its connection to a
cluster), its workers with their models and data (``server.warm``) and its noise plans
serve every cell it runs. Each cell is the same ``fedortho simulate`` command line, run by
the same code in this process, with its output in the cell's log.

Protocol (``fedortho.sweep.CellHost`` is the other side): one JSON line a cell on stdin,
``{"argv": [...], "log": "<file>"}``; one JSON line back, ``{"code": <exit status>}``, on the
stdout the host started with. End of input ends the host. A host is guarded like a run: its
Ray processes end with it, and a SIGTERM (its sweep ended) writes the running cell's summary
and exits with 130, as an interrupted ``fedortho simulate`` does.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from collections.abc import Iterator
from typing import NoReturn


def serve_cells(hosts: int = 1, ray_address: str | None = None) -> NoReturn:
    """Run cells until the input ends, then end the process (``hosts``: cell hosts of the sweep
    sharing the cluster)."""
    from fedortho import cli
    from fedortho.guardian import guard_this_process
    from server.app import STARTED_AT_ENV
    from server.warm import share_cluster

    share_cluster(hosts)
    guard_this_process()  # Ray's processes end with this host, even if it is killed with SIGKILL
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    for line in sys.stdin:
        request = json.loads(line)
        argv = list(request["argv"])
        if ray_address:  # where Ray runs is not a run setting: a resumed cell takes it too
            argv += ["--ray-address", ray_address]
        os.environ[STARTED_AT_ENV] = repr(time.time())  # the cell's start-up is counted from here
        with output_to(request["log"]):
            code = cli.main(argv, warm=True)
        replies.write(json.dumps({"code": code}) + "\n")
    # Done: the guardian ends this host's Ray processes (an attached cluster ends the host's
    # workers when its connection goes); Ray's own shutdown would take seconds.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def output_to(path: str) -> Iterator[None]:
    """This process's stdout and stderr (the file descriptors, so that what Ray, Flower and
    loggers write goes there too) appended to ``path`` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
