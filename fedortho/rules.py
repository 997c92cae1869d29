"""Aggregation rules: one entry per rule, the one place a rule is defined.

A rule says which adapter tensors clients train and send (the rest are *held*: the server
sends them only when they change), how the server combines the clients' replies into the
new global state, and whether that combination re-expresses the tensors a client keeps
optimizer state for (FedSVD's new A: the client rotates its kept momentum along).

``aggregate`` runs every server step in two stages: ``validated`` checks the replies
(names, shapes, finite values, positive weights) and the rule's ``combine`` then computes
the new state from them. Anything applied to the replies as a whole belongs between the two:
user-level DP's clipping and noise (``fedortho.userdp``) does.

Rules outside this package register through the ``fedortho.rules`` entry-point group: a
distribution that declares ``name = module:RULE`` (``RULE`` a ``Rule``) makes ``name`` a
``strategy`` of every run config, command line, ClientApp and ServerApp on that Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from fedortho.fedsvd import AggregationError, Tensors, check_update, lora_pairs, refactorize_all, weighted_mean

ENTRY_POINTS = "fedortho.rules"
# Adapter tensors beyond PEFT's A and B, named like them (``<layer>.<kind>.weight``):
FOLDED = "lora_folded"  # an update folded into the frozen weight (fedex, flora; fedortho.lora)
MIDDLE = "lora_R"  # Fed-SB's trained r x r matrix between the frozen B and A


@dataclass(frozen=True)
class Replies:
    """What a rule combines: the global state the clients started from and their validated
    updates (the tensors they train), with the aggregation weights (their example counts)."""

    global_state: Mapping[str, torch.Tensor]
    updates: Sequence[Mapping[str, torch.Tensor]]
    weights: Sequence[float]
    server_round: int  # from 1
    svd_period: int = 1
    seed: int = 0  # the run's seed: what a rule draws (FLoRA's fresh A) derives from it and the round

    def mean(self, name: str) -> torch.Tensor:
        """The weighted mean of one trained tensor over the replies (accumulated in float64)."""
        return weighted_mean([u[name] for u in self.updates], self.weights)


def every_round(factors: str) -> Callable[[int], str]:
    """The LoRA factors clients train, the same in every round: "B", "A", "AB", or "R" (the
    r x r matrix of the ``middle`` layout)."""

    def trained(server_round: int) -> str:  # noqa: ARG001
        return factors

    return trained


def alternating(server_round: int) -> str:
    """B in odd rounds, A in even ones: B first, since with B = 0 the gradient of A is 0."""
    return "B" if server_round % 2 else "A"


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str  # one line: the rule's table row and --help
    combine: Callable[[Replies], Tensors]  # the new global state (every adapter tensor)
    factors: Callable[[int], str] = every_round("B")  # the LoRA factors clients train in a round
    rotates_kept_state: bool = False  # combine re-expresses A: kept optimizer state follows
    keeps_optimizer_state: bool = True  # optimizer-state = keep is meaningful under this rule
    folds: bool = False  # the state has a folded update per LoRA layer (FOLDED)
    middle: bool = False  # the update is B R A, R trained between frozen B and A (MIDDLE)

    def trainable(self, names: Iterable[str], train_head: bool, server_round: int = 1) -> list[str]:
        """The adapter tensors clients train and send in ``server_round``: the factors the
        rule trains then, and the head if it trains."""
        factors = self.factors(server_round)
        chosen = []
        for name in names:
            if ("lora_B" in name and "B" in factors) or ("lora_A" in name and "A" in factors) \
                    or (MIDDLE in name and "R" in factors) or ("lora_" not in name and train_head):
                chosen.append(name)
        return sorted(chosen)

    def held(self, names: Iterable[str], train_head: bool, server_round: int = 1) -> list[str]:
        """The adapter tensors clients hold but do not change in ``server_round``: sent only to
        a client without their current version."""
        names = list(names)
        trained = set(self.trainable(names, train_head, server_round))
        return sorted(n for n in names if n not in trained)


def mean_of_trained(replies: Replies) -> Tensors:
    """Every trained tensor replaced by its weighted mean; held tensors keep their value."""
    new = dict(replies.global_state)
    for name in replies.updates[0]:
        new[name] = replies.mean(name)
    return new


def _fedsvd(replies: Replies) -> Tensors:
    new = mean_of_trained(replies)
    return refactorize_all(new) if replies.server_round % replies.svd_period == 0 else new


def _products(replies: Replies, b_name: str, a_name: str) -> torch.Tensor:
    """The weighted mean of the clients' products B_i A_i (float64): each client's A or B is
    the global one where it did not train it."""
    g = replies.global_state
    parts = [u.get(b_name, g[b_name]).double() @ u.get(a_name, g[a_name]).double() for u in replies.updates]
    return weighted_mean(parts, replies.weights)


def _folded_name(b_name: str) -> str:
    return b_name.split(".lora_B", 1)[0] + f".{FOLDED}.weight"


def _fedex(replies: Replies) -> Tensors:
    """FedEx-LoRA (Singhal et al., 2024): average A and B as FedAvg-LoRA does, and fold what
    that misses, mean(B_i A_i) - mean(B) mean(A), into the frozen weight: the model's update
    is then exactly the mean of the clients' updates. Clients go on from the averaged A and B."""
    new = mean_of_trained(replies)
    for b_name, a_name in lora_pairs(list(replies.global_state)):
        folded = _folded_name(b_name)
        residual = _products(replies, b_name, a_name) - new[b_name].double() @ new[a_name].double()
        new[folded] = (replies.global_state[folded].double() + residual).to(new[folded].dtype)
    return new


def fresh_a(shape: tuple[int, int], seed: int, server_round: int, index: int) -> torch.Tensor:
    """A new A as PEFT draws one (Kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(in)),
    from the run seed, the round and the layer's index."""
    import numpy as np

    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, server_round, index])
                                                 .generate_state(1)[0]))
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _flora(replies: Replies) -> Tensors:
    """FLoRA (Wang et al., 2024), stacking: the clients' adapters stacked side by side,
    [w_1 B_1 ... w_k B_k] [A_1; ...; A_k] = sum_i w_i B_i A_i, are folded into the frozen weight
    (exactly the mean of the clients' updates), and every client starts the next round from a
    fresh adapter: B = 0 and a new A (PEFT's initialization, drawn from the seed and round)."""
    new = mean_of_trained(replies)  # the head, if it trains
    for index, (b_name, a_name) in enumerate(lora_pairs(list(replies.global_state))):
        folded = _folded_name(b_name)
        stacked = _products(replies, b_name, a_name)
        new[folded] = (replies.global_state[folded].double() + stacked).to(new[folded].dtype)
        new[b_name] = torch.zeros_like(new[b_name])
        a = new[a_name]
        new[a_name] = fresh_a(tuple(a.shape), replies.seed, replies.server_round, index).to(a.dtype)
    return new


def _fedsb(replies: Replies) -> Tensors:
    """Fed-SB (Singhal et al., 2025), on LoRA-SB's layout: each update is B R A with B and A
    frozen and only R (r x r) trained, so the mean of the clients' updates is B mean(R_i) A
    exactly, and DP-SGD noises r^2 coordinates per layer instead of r (out + in) (64 against
    6,144 for MiniLM's 384 x 384 layers at r = 8). LoRA-SB takes B and A from the truncated SVD
    of the first step's full gradient, which is computed on training data: under DP that would
    read private data without accounting for it. Here B and A are the top-r singular vectors of
    the pretrained weight (B = U_r, A = V_r^T), chosen without any data, and R starts at 0, so
    the model starts as the pretrained one and no budget is spent on the subspace."""
    return mean_of_trained(replies)


_RULES: dict[str, Rule] = {}
_plugins_loaded = False


def register(rule: Rule) -> Rule:
    """Make ``rule`` a strategy of this process (an entry point does it for every process)."""
    if not rule.name or rule.name != rule.name.strip().lower() or " " in rule.name:
        raise ValueError(f"rule name must be a lower-case word, got '{rule.name}'")
    known = _RULES.get(rule.name)
    if known is not None and known != rule:
        raise ValueError(f"a different rule named '{rule.name}' is registered already")
    _RULES[rule.name] = rule
    return rule


register(Rule("fedsvd", "average B, then refactorize B A by SVD into an orthonormal A and a new B "
                        "(every svd-period rounds); A is held", _fedsvd, rotates_kept_state=True))
register(Rule("ffa", "FFA-LoRA: A frozen at its initialization, average B", mean_of_trained))
register(Rule("fedavg", "FedAvg-LoRA: average A and B separately (inexact: mean(B) mean(A) is not "
                        "mean(B A))", mean_of_trained, factors=every_round("AB")))
register(Rule("rolora", "RoLoRA: train and average B in odd rounds, A in even ones (exact: the other "
                        "factor is the same for every client)", mean_of_trained, factors=alternating,
              keeps_optimizer_state=False))
register(Rule("fedsb", "Fed-SB: train only R in B R A (B, A frozen: the pretrained weight's top singular "
                       "vectors); average R (exact)", _fedsb, factors=every_round("R"), middle=True))
register(Rule("fedex", "FedEx-LoRA: average A and B, and fold mean(B A) - mean(B) mean(A) into the "
                       "frozen weights (exact)", _fedex, factors=every_round("AB"), folds=True))
register(Rule("flora", "FLoRA: fold the stacked clients' products into the frozen weights (exact); "
                       "a fresh adapter every round", _flora, factors=every_round("AB"), folds=True,
              keeps_optimizer_state=False))


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINTS):
        try:
            rule = entry.load()
        except Exception as exc:
            raise ImportError(f"aggregation rule plug-in '{entry.name} = {entry.value}' failed to load: {exc}") from exc
        if not isinstance(rule, Rule) or rule.name != entry.name:
            raise TypeError(f"entry point '{entry.name} = {entry.value}' ({ENTRY_POINTS}) must name a Rule "
                            f"called '{entry.name}'")
        register(rule)


def names() -> tuple[str, ...]:
    """Every registered rule, built-ins first."""
    _load_plugins()
    return tuple(_RULES)


def rule(name: str) -> Rule:
    _load_plugins()
    if name not in _RULES:
        raise KeyError(f"unknown aggregation rule '{name}' (choose from {', '.join(_RULES)})")
    return _RULES[name]


def trainable_names(names: Iterable[str], strategy: str, train_head: bool, server_round: int = 1) -> list[str]:
    """``rule(strategy).trainable(names, train_head, server_round)``."""
    return rule(strategy).trainable(names, train_head, server_round)


def validated(rule_: Rule, global_state: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]],
              weights: Sequence[float], server_round: int) -> None:
    """Replies the rule can combine: the same trained tensors in each, all known to the global
    state and trainable under the rule, with its shapes, finite, and weights that sum above 0."""
    if not updates:
        raise AggregationError("no client updates to aggregate")
    if len(weights) != len(updates) or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise AggregationError(f"aggregation weights must be >= 0 and sum above 0, got {list(weights)[:5]}")
    allowed = set(rule_.trainable(global_state, True, server_round))
    for i, update in enumerate(updates):
        unknown = sorted(k for k in update if k not in global_state)
        if unknown:
            raise AggregationError(f"update {i}: keys unknown to the global model: {unknown[:3]}")
        held = sorted(set(update) - allowed)
        if held:
            raise AggregationError(f"update {i}: {rule_.name}: clients must not send held tensors (got '{held[0]}')")
    keys = sorted(updates[0])
    expected = {k: global_state[k] for k in keys}
    for i, update in enumerate(updates):
        check_update(update, expected, f"update {i}")


Privatize = Callable[[Sequence[Mapping[str, torch.Tensor]]], Mapping[str, torch.Tensor]]


def aggregate(name: str, global_state: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]],
              weights: Sequence[float], server_round: int, svd_period: int = 1, seed: int = 0,
              privatize: Privatize | None = None) -> Tensors:
    """One server step of rule ``name``: the new global adapter state.

    ``privatize`` (user-level DP, ``fedortho.userdp``) turns the validated updates into one
    noisy mean, which the rule then combines as the only reply: what the rule does after it
    (FedSVD's refactorization) is post-processing. The server then sees no single client's
    update, so a rule that combines the clients' products sees only the product of the means:
    FedEx's residual is zero and FLoRA folds the noisy means' product. Under user-level DP
    every client counts alike (a fixed denominator), not by its number of examples, and a
    round whose cohort is empty still releases its noise.
    """
    chosen = rule(name)
    if updates or privatize is None:
        validated(chosen, global_state, updates, weights, server_round)
    if privatize is not None:
        updates, weights = [privatize(updates)], [1.0]
    return chosen.combine(Replies(global_state, updates, weights, server_round, svd_period, seed))
