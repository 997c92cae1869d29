"""What travels between the server and its clients: record keys and the held-tensor rule.

Every round the server sends the tensors a client trains (B, the head if trainable, A under
``fedavg``). The other adapter tensors, which a client holds but never changes (A under
``fedsvd``/``ffa``, a frozen head), are "held": they travel only to a client that does not
hold their current version.
"""

from __future__ import annotations

from typing import Iterable

from fedortho import rules
from fedortho.node import PRIVACY_KEYS as NODE_PRIVACY_KEYS

CONFIG = "config"
ARRAYS = "arrays"
METRICS = "metrics"
INFO = "info"

SERVER_ROUND = "server-round"
HELD_VERSION = "held-version"      # version of the held tensors, bumped whenever one changes
EPSILON_SEEN = "epsilon-seen"      # the largest cumulative epsilon the server saw this client report
LABEL_NAMES = "label-names"        # the run's label names, in label order: a node's own data must agree
STATE_TRAVELS = "state-travels"    # true: the client's state comes with the message and goes back with the reply
RUN_KEY = "run-key"                # names the run across restarts: a node's state file on disk is kept per run key
PARTITION = "partition"            # the client (partition) to train: any in simulation, the node's own in deployment
PLAN_RATES, PLAN_STEPS, PLAN_SIGMAS = "plan-sample-rates", "plan-steps", "plan-noise-multipliers"  # warm-up
USER_CLIP = "user-clip"            # user-level DP, clip-placement client: the bound a client clips its update to
PER_ROUND_KEYS = (SERVER_ROUND, HELD_VERSION, EPSILON_SEEN, LABEL_NAMES, STATE_TRAVELS, RUN_KEY,
                  PARTITION, PLAN_RATES, PLAN_STEPS, PLAN_SIGMAS, USER_CLIP)  # not run settings

# In simulation a client's state (its records but the held tensors, which the server sends
# every round instead) travels as records with this prefix: it then lives in the server's
# checkpoint, whichever worker or machine trains the client next.
STATE_PREFIX = "client-state."

# What a client's training reply carries besides the tensors it trains: what the accountant
# counted (public given the run's settings); the gradient diagnostics only where the node opted
# in; the training loss only without DP (it is computed from private data without noise).
REPLY_METRICS = ("num-examples", "epsilon", "noise-multiplier", "sample-rate", "steps", "participations",
                 HELD_VERSION)
EXHAUSTED_METRICS = ("num-examples", "budget-exhausted", "epsilon", HELD_VERSION)  # a client that sat out
DIAGNOSTIC_METRICS = ("clipped-fraction", "lora-grad-norm", "head-grad-norm", "grad-samples")
NON_PRIVATE_METRICS = ("train-loss",)
# User-level DP, clip-placement client with adaptive clipping: 1 if the client's update was
# within the round's clip before it clipped it (the server noises the count of these bits).
WITHIN_CLIP = "update-within-clip"

WARM_UP = "warm_up"  # the query action (message type "query.warm_up") that readies a simulation worker

REFUSED = "refused"  # in a node's description: why it cannot take part in the run

# Settings a deployed client may pin in its node config; it refuses a server that asks otherwise.
PRIVACY_KEYS = NODE_PRIVACY_KEYS


def held_names(names: Iterable[str], strategy: str, train_head: bool, server_round: int = 1) -> list[str]:
    """The adapter tensors clients of rule ``strategy`` hold but do not change in ``server_round``."""
    return rules.rule(strategy).held(names, train_head, server_round)
