"""Record-level DP-SGD with Opacus: budget planning, the accountant's history, the guard.

A client's budget (epsilon, delta) covers its whole participation. The noise multiplier is
chosen once for the planned number of local steps over all rounds (a ``NoisePlan``); the
accountant's history ``[(noise_multiplier, sample_rate, steps), ...]`` and the plan make up
the client's ``PrivacyState``, which travels with the client's state so that the reported
epsilon is cumulative, and a round that would push the spent epsilon past the target is
refused before any step is taken.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from torch.utils.data import DataLoader

from fedortho.runs import write_json_atomic

ACCOUNTANT = "rdp"
# With little noise the best RDP order is the largest default one; the bound stays valid
# (only looser), so Opacus' suggestion to widen the orders is not news for every round.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
History = list[tuple[float, float, int]]


class BudgetExhausted(RuntimeError):
    """The next round would spend more epsilon than the client's target."""


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate as Opacus derives it from a DataLoader: 1 / len(loader)."""
    if num_examples <= 0:
        raise ValueError("a client with no examples cannot train")
    return 1.0 / math.ceil(num_examples / batch_size)


def planned_participations(rounds: int, clients: int, clients_per_round: int) -> int:
    """Rounds a client is expected to take part in (uniform sampling without replacement)."""
    return max(1, math.ceil(rounds * clients_per_round / clients))


MAX_NOISE_MULTIPLIER = 1e6  # Opacus' own bound when it searches for a noise multiplier
EPSILON_TOLERANCE = 0.01


class BudgetTooSmall(ValueError):
    """No noise multiplier Opacus will consider keeps the planned steps within the target."""


def search_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int,
                            prior: Sequence[Sequence[float]] = ()) -> float:
    """Smallest noise multiplier (to within 0.01 in epsilon) with epsilon(prior + steps) <= target,
    or BudgetTooSmall with the setting that made it impossible.

    ``prior`` is spending that came before this run (a node's ledger): the plan then covers
    what is left of the budget.
    """
    prior = _history_tuple(prior)
    stored = stored_noise_multiplier(epsilon, delta, sample_rate, steps, prior)
    if stored is not None:
        return stored
    try:
        if prior:
            found = _search_after_prior(float(epsilon), float(delta), float(sample_rate), int(steps), prior)
        else:
            found = _search_noise_multiplier(float(epsilon), float(delta), float(sample_rate), int(steps))
    except ValueError:  # Opacus: "The privacy budget is too low."
        left = "what is left of " if prior else ""
        raise BudgetTooSmall(
            f"epsilon {epsilon:g} is too small: no noise multiplier keeps {steps} steps at sample rate "
            f"{sample_rate:.3g} within {left}it at delta {delta:g} (raise epsilon, or lower rounds or local-steps)"
        ) from None
    store_noise_multiplier(epsilon, delta, sample_rate, steps, prior, found)
    return found


# Searched noise multipliers, kept across processes: a search runs the accountant dozens of
# times (seconds), and every run, cell and test of one budget asks for the same ones. An entry
# is keyed by everything the search depends on (its inputs, Opacus' version and this module's
# code) and used only after one accountant call confirms that it keeps the steps within the
# target, so a damaged or edited cache can cost a search, never privacy.
CACHE_ENV = "FEDORTHO_CACHE"  # the folder (default: ~/.cache/fedortho, or $XDG_CACHE_HOME/fedortho)


def _plan_file(epsilon, delta, sample_rate, steps, prior) -> Path:
    import hashlib
    import os

    import opacus

    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedortho"
    key = json.dumps([opacus.__version__, _code_hash(), ACCOUNTANT, EPSILON_TOLERANCE, float(epsilon), float(delta),
                      float(sample_rate), int(steps), [list(entry) for entry in prior]])
    return Path(root) / "noise-plans" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """This module's code, read once: a change to the planning invalidates every entry."""
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def stored_noise_multiplier(epsilon, delta, sample_rate, steps, prior) -> float | None:
    """The cached search result, if there is one and it keeps the steps within the target."""
    try:
        sigma = float(json.loads(_plan_file(epsilon, delta, sample_rate, steps, prior).read_text())["noise-multiplier"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    if not (math.isfinite(sigma) and 0 < sigma <= MAX_NOISE_MULTIPLIER):
        return None
    if spent_epsilon([*prior, (sigma, float(sample_rate), int(steps))], delta) > epsilon:
        return None
    return sigma


def store_noise_multiplier(epsilon, delta, sample_rate, steps, prior, sigma: float) -> None:
    try:
        path = _plan_file(epsilon, delta, sample_rate, steps, prior)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"noise-multiplier": sigma})
    except (OSError, RuntimeError):
        pass  # a cache that cannot be written costs time, not results


@dataclass(frozen=True)
class NoisePlan:
    """A noise multiplier chosen once for a client's whole participation in a run: the planned
    steps at its sample rate, after the ``prior`` spending it was planned to leave room for."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    prior: tuple[tuple[float, float, int], ...] = ()

    def state_dict(self) -> dict:
        return {"noise-multiplier": self.noise_multiplier, "sample-rate": self.sample_rate, "steps": self.steps,
                "prior": [list(entry) for entry in self.prior]}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "NoisePlan":
        return cls(float(state["noise-multiplier"]), float(state["sample-rate"]), int(state["steps"]),
                   _history_tuple(state.get("prior", ())))


def make_plan(epsilon: float, delta: float, sample_rate: float, steps: int,
              prior: Sequence[Sequence[float]] = ()) -> NoisePlan:
    return NoisePlan(search_noise_multiplier(epsilon, delta, sample_rate, steps, prior), float(sample_rate),
                     int(steps), _history_tuple(prior))


class NoisePlanner:
    """Makes noise plans and knows the ones made or handed to it, by budget: a search runs
    Opacus' accountant dozens of times, and a simulation worker sets up thousands of clients
    that share a few plans. Whoever plans holds one (a worker process, the command line's
    checks) and passes its plans on explicitly: the command line's to the server, the
    server's to its simulation workers, a client's own in its ``PrivacyState``."""

    def __init__(self) -> None:
        self._plans: dict[tuple, NoisePlan] = {}

    def plan(self, epsilon: float, delta: float, sample_rate: float, steps: int,
             prior: Sequence[Sequence[float]] = ()) -> NoisePlan:
        key = (float(epsilon), float(delta), float(sample_rate), int(steps), _history_tuple(prior))
        if key not in self._plans:
            self._plans[key] = make_plan(epsilon, delta, sample_rate, steps, prior)
        return self._plans[key]

    def add(self, epsilon: float, delta: float, plan: NoisePlan) -> None:
        self._plans[(float(epsilon), float(delta), plan.sample_rate, plan.steps, plan.prior)] = plan

    def known(self, epsilon: float, delta: float) -> list[NoisePlan]:
        """The plans for a budget with nothing spent before the run."""
        return [plan for key, plan in self._plans.items() if key[:2] == (float(epsilon), float(delta)) and not key[4]]


def _history_tuple(history: Sequence[Sequence[float]]) -> tuple[tuple[float, float, int], ...]:
    return tuple((float(s), float(q), int(n)) for s, q, n in history)


@dataclass
class PrivacyState:
    """One home for a mechanism's privacy: its budget, the accountant's history and the noise
    plan, saved and restored as one state dict (as Opacus' accountants are). A client keeps
    one for record-level DP-SGD (``clip`` is its per-sample clip), the server one for
    user-level DP (``fedortho.userdp``); a node's ledger stores the history of one.

    ``history`` holds everything the protected data has spent: this run's rounds and, with a
    ledger, earlier runs' (the plan's ``prior``)."""

    epsilon: float
    delta: float
    clip: float = 0.0
    history: History = field(default_factory=list)
    plan: NoisePlan | None = None

    def spent(self) -> float:
        """Cumulative epsilon of the history (Opacus' RDP accountant)."""
        return spent_epsilon(self.history, self.delta)

    def after(self, steps: int, plan: NoisePlan | None = None) -> History:
        """The history after ``steps`` more steps under ``plan`` (default: this state's)."""
        plan = plan or self.plan
        return extend_history(self.history, plan.noise_multiplier, plan.sample_rate, steps)

    def check_next(self, steps: int, plan: NoisePlan | None = None) -> float:
        """Epsilon after ``steps`` more steps; BudgetExhausted, before any is taken, if that
        would pass the target."""
        plan = plan or self.plan
        return check_budget(self.history, plan.noise_multiplier, plan.sample_rate, steps, self.epsilon, self.delta)

    def state_dict(self) -> dict:
        return {"epsilon": self.epsilon, "delta": self.delta, "clip": self.clip,
                "history": [list(entry) for entry in self.history],
                "plan": self.plan.state_dict() if self.plan else None}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> "PrivacyState":
        history = list(_history_tuple(state["history"]))
        if any(not (s > 0 and 0 < q <= 1 and n >= 1) for s, q, n in history):
            raise ValueError("a privacy history holds impossible entries")
        plan = NoisePlan.from_state_dict(state["plan"]) if state.get("plan") else None
        return cls(float(state["epsilon"]), float(state["delta"]), float(state.get("clip", 0.0)), history, plan)


def _search_after_prior(epsilon: float, delta: float, sample_rate: float, steps: int, prior: tuple) -> float:
    """Opacus' search (double, then bisect) with the prior spending composed in."""
    def spent_with(sigma: float) -> float:
        return spent_epsilon([*prior, (sigma, sample_rate, steps)], delta)

    if epsilon - spent_epsilon(prior, delta) < EPSILON_TOLERANCE:  # below the search's own precision
        raise ValueError("The privacy budget is too low.")

    low, high = 0.0, 10.0
    while spent_with(high) > epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError("The privacy budget is too low.")
    while epsilon - spent_with(high) > EPSILON_TOLERANCE:
        middle = (low + high) / 2
        if spent_with(middle) < epsilon:
            high = middle
        else:
            low = middle
    return high


def _search_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=ACCOUNTANT, epsilon_tolerance=EPSILON_TOLERANCE))


def make_accountant(history: Sequence[Sequence[float]] = ()):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def spent_epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """Cumulative epsilon of a history under Opacus' accountant (0 for an empty history)."""
    if not history:
        return 0.0
    return float(make_accountant(history).get_epsilon(delta=delta))


def extend_history(history: Sequence[Sequence[float]], noise_multiplier: float, rate: float, steps: int) -> History:
    """History after ``steps`` more steps, merged as Opacus' accountant merges them."""
    accountant = make_accountant(history)
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=rate)
    return list(accountant.history)


def check_budget(history: Sequence[Sequence[float]], noise_multiplier: float, rate: float, steps: int,
                 epsilon: float, delta: float) -> float:
    """Epsilon after the next round; raise BudgetExhausted if it would exceed ``epsilon``."""
    after = spent_epsilon(extend_history(history, noise_multiplier, rate, steps), delta)
    if after > epsilon:
        raise BudgetExhausted(
            f"privacy budget exhausted: spent {spent_epsilon(history, delta):.3f}, "
            f"another round would reach {after:.3f} > target {epsilon:g}")
    return after


def make_private(model, optimizer, loader: DataLoader, noise_multiplier: float, clip: float,
                 history: Sequence[Sequence[float]], noise_generator):
    """Wrap (model, optimizer, loader) with Opacus; the accountant starts from ``history``.

    Returns (engine, model, optimizer, loader). Move the model to its device before calling.
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=ACCOUNTANT)
    engine.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=clip, poisson_sampling=True, noise_generator=noise_generator,
    )
    return engine, model, optimizer, loader


class LedgerError(RuntimeError):
    """A privacy ledger that cannot be trusted: the client refuses to train."""


class PrivacyLedger:
    """A node's spending across runs: the accountant's history in a JSON file on the node.

    Flower keeps a client's state for one run only; a ledger makes one (epsilon, delta)
    budget cover every run that trains on the node's data. The ledger is bound to that
    budget and to its owner (the partition) when first written: a run asking for another
    budget, or another partition's client, is refused. Every private round reads it under
    an exclusive lock, trains with the whole history as its past, and writes the extended
    history back (atomically, synced to disk) before the update leaves the node. A damaged
    ledger stops training instead of starting a fresh budget.
    """

    def __init__(self, path: str | Path, epsilon: float, delta: float, owner: str) -> None:
        self.path = Path(path)
        self.binding = {"owner": owner, "epsilon-budget": float(epsilon), "delta": float(delta)}

    @contextmanager
    def locked(self) -> Iterator["PrivacyLedger"]:
        """Hold the node's ledger for a whole round: concurrent runs take turns."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> History:
        if not self.path.exists():
            return []
        try:
            record = json.loads(self.path.read_text())
            history = [(float(s), float(q), int(n)) for s, q, n in record["history"]]
            bound = {key: record[key] for key in self.binding}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"privacy ledger {self.path} is unreadable ({type(exc).__name__}); refusing to "
                              "train rather than start a fresh budget") from None
        if any(not (s > 0 and 0 < q <= 1 and n >= 1) for s, q, n in history):
            raise LedgerError(f"privacy ledger {self.path} holds impossible entries; refusing to train")
        for key, value in self.binding.items():
            if bound[key] != value:
                raise LedgerError(f"privacy ledger {self.path} is kept for {key} {bound[key]}, this run has "
                                  f"{key} {value}; refusing to train")
        return history

    def write(self, state: PrivacyState, epsilon: float | None = None) -> None:
        """Write the state's history; ``epsilon`` is its spent epsilon if the caller computed it
        already."""
        entries = [[float(s), float(q), int(n)] for s, q, n in state.history]
        spent = spent_epsilon(entries, self.binding["delta"]) if epsilon is None else float(epsilon)
        record = {**self.binding, "epsilon-spent": spent, "history": entries}
        write_json_atomic(self.path, record)
