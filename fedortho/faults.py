"""Fault injection: client training calls that fail on purpose, to see how a run copes.

Whether a call fails depends only on the run seed, the round and the partition, so a run
with ``fail-rate`` is reproducible and two runs with one seed fail the same calls.
"""

from __future__ import annotations

import numpy as np

_STREAM = 0xFA17  # keeps these draws independent of the seeds used for training


class InjectedFault(RuntimeError):
    """A client call failed on purpose (``fail-rate``)."""


def fails(seed: int, server_round: int, partition_id: int, rate: float) -> bool:
    if rate <= 0:
        return False
    draw = np.random.default_rng(np.random.SeedSequence([seed, server_round, partition_id, _STREAM])).random()
    return bool(draw < rate)


def maybe_fail(seed: int, server_round: int, partition_id: int, rate: float) -> None:
    """Raise InjectedFault for the calls ``rate`` selects (before any training: nothing is spent)."""
    if fails(seed, server_round, partition_id, rate):
        raise InjectedFault(f"injected fault (fail-rate {rate:g}) in round {server_round}")
