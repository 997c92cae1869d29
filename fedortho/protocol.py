"""What travels between the server and its clients: record keys and the held-tensor rule.

Every round the server sends the tensors a client trains (B, the head if trainable, A under
``fedavg``). The other adapter tensors, which a client holds but never changes (A under
``fedsvd``/``ffa``, a frozen head), are "held": they travel only to a client that does not
hold their current version.
"""

from __future__ import annotations

from typing import Iterable

from fedortho.lora import trainable_names

CONFIG = "config"
ARRAYS = "arrays"
METRICS = "metrics"
INFO = "info"

SERVER_ROUND = "server-round"
HELD_VERSION = "held-version"      # version of the held tensors, bumped whenever one changes
EPSILON_SEEN = "epsilon-seen"      # the largest cumulative epsilon the server saw this client report
PER_ROUND_KEYS = (SERVER_ROUND, HELD_VERSION, EPSILON_SEEN)  # not run settings

# Settings a deployed client may pin in its node config; it refuses a server that asks otherwise.
PRIVACY_KEYS = ("epsilon", "delta", "clip")


def held_names(names: Iterable[str], strategy: str, train_head: bool) -> list[str]:
    names = list(names)
    trained = set(trainable_names(names, strategy, train_head))
    return sorted(n for n in names if n not in trained)
