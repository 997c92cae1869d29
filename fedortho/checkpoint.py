"""A run's checkpoint: everything needed to continue it after its last complete round.

Inside the run folder::

    checkpoint/checkpoint.json          the commit point: round, settings, server state, and
                                        every file below with its SHA-256
    checkpoint/server-r<k>.pt           the global adapter after round k
    checkpoint/clients/p<p>-r<k>.pt     the state of partition p's client as of round k (its
                                        accountant history and noise plan, optimizer state,
                                        participations), from its last round in the run
                                        (simulation; a deployed node keeps its own, see
                                        ``save_node_state``)

New files get new names and are synced before ``checkpoint.json`` is replaced atomically;
only then are the files it no longer names removed. A kill at any moment leaves one complete
checkpoint: the old one or the new one. A client's state is written only in the rounds it
trains and read back only when it is sampled, so a round costs the cohort's files, not the
population's.

A client state is a plain mapping ``record name -> {"arrays": {name: tensor}}`` or
``{"config": {key: value}}`` (the shape of a Flower ``RecordDict`` without Flower).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedortho.config import RunConfig
from fedortho.runs import json_safe, write_bytes_atomic, write_json_atomic

FORMAT = 1
FOLDER = "checkpoint"
INDEX = "checkpoint.json"
ClientState = dict[str, dict[str, dict[str, Any]]]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or belongs to other settings."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dump(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _verified_bytes(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({exc.strerror or exc})") from None
    if _sha256(data) != sha256:
        raise CheckpointError(f"checkpoint file {path} is damaged (its SHA-256 does not match {INDEX})")
    return data


def _read_verified(path: Path, sha256: str) -> Any:
    return torch.load(io.BytesIO(_verified_bytes(path, sha256)), weights_only=True)


class ClientStates:
    """Every client's state in a run, on disk, with the states changed since the last commit
    in memory. ``get`` reads (and verifies) a client's file when it is sampled."""

    def __init__(self, folder: Path, files: dict[int, tuple[str, str]] | None = None) -> None:
        self.folder = Path(folder)
        self.files = dict(files or {})  # partition -> (file name, sha256) of its committed state
        self.pending: dict[int, ClientState] = {}

    def get(self, partition: int) -> ClientState | None:
        if partition in self.pending:
            return self.pending[partition]
        if partition not in self.files:
            return None  # never trained in this run
        name, sha256 = self.files[partition]
        return _read_verified(self.folder / name, sha256)

    def put(self, partition: int, state: ClientState) -> None:
        self.pending[partition] = state

    def write_pending(self, server_round: int) -> tuple[dict[int, tuple[str, str]], list[Path]]:
        """Write the changed states under new names; returns the index to commit and the files
        it supersedes (to remove once it is committed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        files, superseded = dict(self.files), []
        for partition, state in sorted(self.pending.items()):
            name = f"p{partition}-r{server_round}.pt"
            data = _dump(state)
            write_bytes_atomic(self.folder / name, data)
            if partition in files and files[partition][0] != name:
                superseded.append(self.folder / files[partition][0])
            files[partition] = (name, _sha256(data))
        return files, superseded

    def committed(self, files: dict[int, tuple[str, str]]) -> None:
        self.files, self.pending = files, {}


@dataclass
class Checkpoint:
    """A run's state after round ``round``."""

    round: int
    config: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    server: dict[str, Any]  # the strategy's state (sampling RNG, versions, epsilons seen), JSON
    clients: ClientStates
    run: dict[str, Any] = field(default_factory=dict)  # the recorder's: elapsed seconds, zero-shot accuracy


def checkpoint_folder(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def save_checkpoint(run_dir: Path, server_round: int, config: dict[str, Any], adapter: dict[str, torch.Tensor],
                    server: dict[str, Any], clients: ClientStates, run: dict[str, Any]) -> None:
    """Commit the state after ``server_round``: whole or not at all."""
    folder = checkpoint_folder(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_index(folder) if (folder / INDEX).exists() else None
    server_name = f"server-r{server_round}.pt"
    data = _dump({k: v.contiguous() for k, v in adapter.items()})
    write_bytes_atomic(folder / server_name, data)
    files, superseded = clients.write_pending(server_round)
    index = {
        "format": FORMAT, "round": server_round, "config": config, "server": server, "run": run,
        "adapter": [server_name, _sha256(data)],
        "clients": {str(p): list(entry) for p, entry in sorted(files.items())},
    }
    write_json_atomic(folder / INDEX, index)  # the commit point
    clients.committed(files)
    if previous is not None and previous["adapter"][0] != server_name:
        superseded.append(folder / previous["adapter"][0])
    for path in superseded:
        path.unlink(missing_ok=True)


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent.parent} has no checkpoint ({FOLDER}/{INDEX} is missing)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fedortho checkpoint of format {FORMAT}")
    try:
        int(index["round"]), dict(index["config"]), dict(index["server"]), list(index["adapter"])
        {int(p): tuple(entry) for p, entry in index["clients"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged (bad or missing entry: {exc})") from None
    return index


def load_checkpoint(run_dir: Path, verify_clients: bool = True) -> Checkpoint:
    """The checkpoint of ``run_dir``, verified file by file (``verify_clients``: every client's
    state too, before anything starts); raises CheckpointError naming what is wrong."""
    folder = checkpoint_folder(run_dir)
    index = _read_index(folder)
    adapter = _read_verified(folder / index["adapter"][0], index["adapter"][1])
    clients = ClientStates(folder / "clients", {int(p): tuple(e) for p, e in index["clients"].items()})
    if verify_clients:  # checksums only: each state is unpickled when its client is sampled
        for name, sha256 in sorted(clients.files.values()):
            _verified_bytes(clients.folder / name, sha256)
    return Checkpoint(round=int(index["round"]), config=dict(index["config"]), adapter=adapter,
                      server=dict(index["server"]), clients=clients, run=dict(index.get("run", {})))


def check_resumable(checkpoint: Checkpoint, cfg: RunConfig) -> None:
    """The checkpoint must be of this run's settings and leave rounds to run."""
    settings = cfg.to_dict(hyphenated=True)
    # A setting added after the checkpoint was written ran as its default (what the code did
    # before the setting existed).
    written = {**RunConfig().to_dict(hyphenated=True), **checkpoint.config}
    changed = [k for k in settings if k != "out" and json_safe(settings[k]) != json_safe(written.get(k))]
    if changed:
        k = changed[0]
        raise CheckpointError(f"the checkpoint was written with {k}={written.get(k)!r}, the run's settings "
                              f"say {k}={settings[k]!r}; it belongs to another run")
    if checkpoint.round >= cfg.rounds:
        raise CheckpointError(f"the run has already finished all {cfg.rounds} rounds")


def node_state_file(folder: str | Path, run_key: str) -> Path:
    """Where a deployed node keeps its client state for one run (``state-path`` node config)."""
    return Path(folder) / f"run-{run_key}.pt"


def save_node_state(folder: str | Path, run_key: str, server_round: int, state: ClientState) -> None:
    """Replace the node's state for the run, synced: a crash leaves the old state or the new."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(node_state_file(folder, run_key), _dump({"run-key": run_key, "round": server_round,
                                                          "state": state}))


def load_node_state(folder: str | Path, run_key: str) -> ClientState | None:
    """The node's state for the run; None if it has none; CheckpointError if it is damaged."""
    path = node_state_file(folder, run_key)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if saved["run-key"] != run_key:
            raise ValueError("it belongs to another run")
        return saved["state"]
    except Exception as exc:  # any damage: torch's unpickler raises many kinds
        raise CheckpointError(f"node state file {path} is damaged ({str(exc).splitlines()[0][:120]})") from None
