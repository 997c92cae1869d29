"""A client's state as Flower records and as plain tensors and values.

The plain form (``fedortho.checkpoint.ClientState``: record name -> ``{"arrays": {...}}`` or
``{"config": {...}}``) is what the server's checkpoint and a node's state file hold; the
records are what ``Context.state`` and messages hold.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord


def to_records(state: dict | None) -> dict:
    """Record name -> ArrayRecord or ConfigRecord."""
    return {name: ArrayRecord(record["arrays"]) if "arrays" in record else ConfigRecord(record["config"])
            for name, record in (state or {}).items()}


def from_records(records) -> dict:
    """The plain form of ``(name, record)`` pairs (records of other kinds are left out)."""
    state = {}
    for name, record in records:
        if isinstance(record, ArrayRecord):
            state[name] = {"arrays": record.to_torch_state_dict()}
        elif isinstance(record, ConfigRecord):
            state[name] = {"config": dict(record)}
    return state
