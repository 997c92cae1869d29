"""A deployed client's own settings (a SuperNode's ``--node-config``) and their checks.

The server decides how to train; the node decides which data it holds and which privacy
settings it accepts. ``NodeSettings.check`` runs when the server first asks a node to
describe itself, so that a misconfigured node is dropped at discovery with its reason, not
when it is first asked to train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedortho.config import ConfigError, RunConfig, _coerce
from fedortho.data import DataError, load_local
from fedortho.privacy import PrivacyLedger

PRIVACY_KEYS = ("epsilon", "delta", "clip")  # settings a node may pin; it refuses a server asking otherwise
KNOWN_KEYS = ("partition-id", "num-partitions", *PRIVACY_KEYS, "secure-noise", "privacy-ledger", "data-path",
              "report-diagnostics", "worker-socket", "state-path")


class NodeConfigError(ValueError):
    """A node's own configuration is unusable, or does not fit the run the server asks for."""


@dataclass(frozen=True)
class NodeSettings:
    partition_id: int
    num_partitions: int
    pins: dict[str, float] = field(default_factory=dict)
    secure_noise: bool = False
    ledger: str = ""
    data_path: str = ""
    report_diagnostics: bool = False
    worker_socket: str = ""  # a fedortho node-worker that keeps the model and data across messages
    state_path: str = ""  # a folder where the node keeps its client state per run, across restarts

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> "NodeSettings":
        unknown = sorted(k for k in values if k not in KNOWN_KEYS)
        if unknown:
            raise NodeConfigError(f"unknown node-config key '{unknown[0]}' (known: {', '.join(KNOWN_KEYS)})")
        try:
            partition, parts = int(values["partition-id"]), int(values["num-partitions"])
        except KeyError:
            raise NodeConfigError("node config needs 'partition-id' and 'num-partitions' "
                                  "(e.g. --node-config \"partition-id=0 num-partitions=10\")") from None
        except (TypeError, ValueError):
            raise NodeConfigError("partition-id and num-partitions must be whole numbers, got "
                                  f"{values['partition-id']!r} and {values['num-partitions']!r}") from None
        if parts < 1 or not 0 <= partition < parts:
            raise NodeConfigError(f"partition-id {partition} is out of range for num-partitions {parts}")
        pins = {}
        for key in PRIVACY_KEYS:
            if key in values:
                try:
                    pins[key] = float(values[key])
                except (TypeError, ValueError):
                    raise NodeConfigError(f"node-config {key} must be a number, got {values[key]!r}") from None
                if not (pins[key] > 0 and (key == "epsilon" or math.isfinite(pins[key]))):
                    raise NodeConfigError(f"node-config {key} must be > 0, got {values[key]!r}")
        if "delta" in pins and pins["delta"] >= 1:
            raise NodeConfigError(f"node-config delta must be < 1, got {pins['delta']}")
        try:
            flags = {key: _coerce(key, values.get(key, False), bool) for key in ("secure-noise", "report-diagnostics")}
        except ConfigError as exc:
            raise NodeConfigError(f"node-config {exc}") from None
        return cls(partition, parts, pins, flags["secure-noise"], str(values.get("privacy-ledger", "")),
                   str(values.get("data-path", "")), flags["report-diagnostics"], str(values.get("worker-socket", "")),
                   str(values.get("state-path", "")))

    @property
    def owner(self) -> str:
        return f"partition {self.partition_id} of {self.num_partitions}"

    def label_names(self, cfg: RunConfig) -> tuple[str, ...] | None:
        """The label names of this node's data folder; None if it has none."""
        if not self.data_path:
            return None
        try:
            return load_local(self.data_path, cfg.text_column, cfg.label_column)[2]
        except DataError as exc:
            raise NodeConfigError(str(exc)) from None

    def check_privacy(self, cfg: RunConfig) -> None:
        for key, pinned in self.pins.items():
            if pinned != float(getattr(cfg, key)):
                raise NodeConfigError(f"the server asks for {key}={getattr(cfg, key)} but this node is pinned to "
                                      f"{key}={pinned:g}; refusing to train")
        if self.ledger and not cfg.private:
            raise NodeConfigError(f"this node keeps a privacy ledger ({self.ledger}) and does not train without DP")

    def privacy_ledger(self, cfg: RunConfig) -> PrivacyLedger | None:
        return PrivacyLedger(self.ledger, cfg.epsilon, cfg.delta, owner=self.owner) if self.ledger else None

    def check(self, cfg: RunConfig, run_label_names: tuple[str, ...] | None) -> None:
        """Everything that can be known before training: the partition fits the run, the
        privacy pins match, the ledger is readable and this node's, the data folder loads
        and labels its examples as the run does."""
        if self.num_partitions != cfg.clients:
            raise NodeConfigError(f"num-partitions {self.num_partitions} does not match the run's "
                                  f"clients={cfg.clients}")
        self.check_privacy(cfg)
        if self.worker_socket:
            from fedortho.nodeworker import reachable

            if not reachable(self.worker_socket):
                raise NodeConfigError(f"worker-socket {self.worker_socket}: no node worker is serving it "
                                      "(start `fedortho node-worker --socket PATH`)")
        if self.state_path:
            _check_writable_folder(self.state_path)
        ledger = self.privacy_ledger(cfg)
        if ledger is not None:
            with ledger.locked():
                ledger.read()  # raises LedgerError on a damaged or foreign ledger
        names = self.label_names(cfg)
        if names is not None and run_label_names is not None and tuple(names) != tuple(run_label_names):
            raise NodeConfigError(f"data-path {self.data_path} labels its examples {list(names)}, the run "
                                  f"labels them {list(run_label_names)}")


def _check_writable_folder(path: str) -> None:
    from fedortho.runs import writable_folder

    try:
        writable_folder(path)
    except OSError as exc:
        raise NodeConfigError(f"state-path {path} is not a writable folder ({exc.strerror or exc})") from None
