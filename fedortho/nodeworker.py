"""A deployed node's training process, alive across Flower's per-message ClientApp processes.

Flower 1.41 handles every message in a fresh ClientApp process, so without help each round
re-imports transformers, PEFT and Opacus, rebuilds the model and re-reads the data (seconds
per round, most of a deployed round on a small model). ``fedortho node-worker`` runs beside
the SuperNode (``deploy/supernode.sh`` starts and stops it) and keeps all of that in memory,
as a simulation worker does; the ClientApp, told of it by the node config
``worker-socket=<path>``, hands it each round's training and keeps everything else (Flower
state, the privacy ledger) itself.

The socket is a Unix socket created readable by the node's user only. Requests and replies
are ``torch.save`` dicts of tensors and plain values, read with ``weights_only=True``: no
pickled code crosses it. One request is served at a time, as a SuperNode runs one message at
a time.
"""

from __future__ import annotations

import dataclasses
import io
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedortho.config import RunConfig
from fedortho.privacy import BudgetExhausted, PrivacyState, spent_epsilon
from fedortho.train import ClientResult
from fedortho.worker import ClientWork, adapter_names_for, run_client_round

_LENGTH = struct.Struct(">Q")


class NodeWorkerError(RuntimeError):
    """The node worker could not be reached, or failed a request."""


# -- framing ---------------------------------------------------------------------------
def _send(conn: socket.socket, value: dict) -> None:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    conn.sendall(_LENGTH.pack(len(payload)) + payload)


def _receive(conn: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = conn.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("connection closed mid-message")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    (length,) = _LENGTH.unpack(exactly(_LENGTH.size))
    return torch.load(io.BytesIO(exactly(length)), weights_only=True)


def _peek(conn: socket.socket) -> bool:
    """False for a connection closed before sending anything (``reachable``'s probe)."""
    return bool(conn.recv(1, socket.MSG_PEEK))


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and dataclasses as dicts: what a
    weights-only load accepts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value


# -- the requests -----------------------------------------------------------------
def _work_to_wire(work: ClientWork) -> dict:
    return _plain({"op": "train", "cfg": work.cfg.to_dict(), "partition_id": work.partition_id,
                   "num_partitions": work.num_partitions, "server_round": work.server_round,
                   "global_state": work.global_state,
                   "privacy": work.privacy.state_dict() if work.privacy else None,
                   "seed": work.seed, "optimizer_state": list(work.optimizer_state) if work.optimizer_state else None,
                   "data_path": work.data_path})


def _work_from_wire(request: dict) -> ClientWork:
    state, kept = request["privacy"], request["optimizer_state"]
    return ClientWork(cfg=RunConfig.from_mapping(request["cfg"]), partition_id=request["partition_id"],
                      num_partitions=request["num_partitions"], server_round=request["server_round"],
                      global_state=request["global_state"],
                      privacy=PrivacyState.from_state_dict(state) if state else None,
                      seed=request["seed"], optimizer_state=tuple(kept) if kept else None,
                      data_path=request["data_path"])


def _handle(request: dict) -> dict:
    if request.get("op") == "spent-epsilon":
        return {"ok": True, "epsilon": spent_epsilon([tuple(h) for h in request["history"]], request["delta"])}
    if request.get("op") == "adapter-names":
        cfg = RunConfig.from_mapping(request["cfg"])
        return {"ok": True, "names": adapter_names_for(cfg, request["data_path"])}
    if request.get("op") == "train":
        try:
            result = run_client_round(_work_from_wire(request))
        except BudgetExhausted as exc:
            return {"ok": False, "kind": "budget-exhausted", "error": str(exc)}
        reply = dataclasses.asdict(result)
        reply["privacy"] = result.privacy.state_dict() if result.privacy else None
        return {"ok": True, "result": _plain(reply)}
    raise ValueError(f"unknown request {request.get('op')!r}")


def serve(path: str | Path) -> None:
    """Serve requests on a Unix socket at ``path`` until stopped (SIGTERM, Ctrl-C)."""
    path = Path(path)
    if path.exists():
        if reachable(path):
            raise NodeWorkerError(f"a node worker already serves {path}")
        path.unlink()  # left by a worker that was killed
    old = os.umask(0o177)  # the socket: read and write for this user only
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(4)
    print(f"fedortho node-worker: serving {path}", flush=True)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    if not _peek(conn):
                        continue
                    request = _receive(conn)
                    started = time.time()
                    try:
                        reply = _handle(request)
                    except Exception as exc:  # the client reports it; the worker serves on
                        reply = {"ok": False, "kind": "error", "error": f"{type(exc).__name__}: {exc}"}
                    print(f"fedortho node-worker: {request.get('op')} in {time.time() - started:.2f}s"
                          f"{'' if reply['ok'] else ' failed: ' + reply['error']}", flush=True)
                    _send(conn, reply)
                except (ConnectionError, OSError, EOFError) as exc:
                    print(f"fedortho node-worker: a request was cut off ({exc})", file=sys.stderr, flush=True)
    finally:
        server.close()
        path.unlink(missing_ok=True)


def reachable(path: str | Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))
        return True
    except OSError:
        return False


# -- the ClientApp's side --------------------------------------------------------------
class NodeWorkerClient:
    def __init__(self, path: str) -> None:
        self.path = path

    def _call(self, request: dict) -> dict:
        try:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.connect(self.path)
        except OSError as exc:
            raise NodeWorkerError(f"the node worker at {self.path} is not running ({exc.strerror or exc}); "
                                  "start it with `fedortho node-worker --socket PATH` or drop worker-socket "
                                  "from the node config") from None
        with conn:
            try:
                _send(conn, request)
                reply = _receive(conn)
            except (ConnectionError, OSError) as exc:
                raise NodeWorkerError(f"the node worker at {self.path} stopped during the request ({exc})") from None
        if not reply["ok"]:
            if reply.get("kind") == "budget-exhausted":
                raise BudgetExhausted(reply["error"])
            raise NodeWorkerError(f"node worker: {reply['error']}")
        return reply

    def spent_epsilon(self, history, delta: float) -> float:
        return float(self._call(_plain({"op": "spent-epsilon", "history": [list(h) for h in history],
                                        "delta": float(delta)}))["epsilon"])

    def adapter_names(self, cfg: RunConfig, data_path: str) -> list[str]:
        return list(self._call({"op": "adapter-names", "cfg": cfg.to_dict(), "data_path": data_path})["names"])

    def train(self, work: ClientWork) -> ClientResult:
        result = self._call(_work_to_wire(work))["result"]
        result["privacy"] = PrivacyState.from_state_dict(result["privacy"]) if result["privacy"] else None
        result["optimizer_state"] = tuple(result["optimizer_state"])
        return ClientResult(**result)


class InProcess:
    """The same calls, run in the calling process (simulation, or no worker configured)."""

    def spent_epsilon(self, history, delta: float) -> float:
        return spent_epsilon(history, delta)

    def adapter_names(self, cfg: RunConfig, data_path: str) -> list[str]:
        return adapter_names_for(cfg, data_path)

    def train(self, work: ClientWork) -> ClientResult:
        return run_client_round(work)
