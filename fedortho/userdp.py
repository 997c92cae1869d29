"""User-level (central) differential privacy: a client's whole contribution is the unit.

Each round, every sampled client's update (the tensors it trains minus the global ones, all
of them together as one vector) is clipped to ``update-clip`` in L2, the server adds Gaussian
noise to the sum and divides by a fixed denominator, the expected cohort size (DP-FedAvg,
McMahan et al., 2018). Adding or removing one client changes the sum by at most the clip,
whatever the cohort, so the noisy mean is a subsampled Gaussian mechanism with noise
multiplier z: Opacus' RDP accountant composes it over the rounds, at the sampling rate
q = clients-per-round / clients with which the server samples each cohort (Poisson sampling,
as the accountant assumes). The rule then post-processes the noisy mean (FedSVD refactorizes
it), which costs no privacy.

Placements, as Flower offers them: the server clips the raw updates (a trusted server), or
each client clips its own update before it leaves the node and the server only checks the
bound and adds the noise.

Adaptive clipping (Andrew et al., 2021): every client also contributes one bit, whether its
update was within the clip; the server noises the count of those bits (standard deviation
``clip-count-stddev``) and moves the clip geometrically towards the ``clip-quantile`` of the
update norms. The two Gaussian releases compose into one of multiplier z when the update's
own noise multiplier is (z^-2 - (2 sigma_b)^-2)^-1/2: the server noises the sum of the
centred bits b - 1/2, which one client more or less moves by at most 1/2, so the accountant
still sees z.

Simulated population (pfl-research's noise cohort): with ``noise-cohort-size`` M, the noise
is what a cohort of M clients would need, while the simulation samples m = q N of its N
clients; the sum of the m updates gets noise z C m / M, so the mean carries the noise a real
cohort of M would. The reported epsilon is then that of a population of M / q users sampled
at rate q, not of the N simulated clients.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from fedortho import privacy

Tensors = dict[str, torch.Tensor]
PLACEMENTS = ("server", "client")
NOISE_STREAM = 0x55534552  # keeps the server's noise stream apart from every client's


class UserPlanError(ValueError):
    """User-level DP settings that no noise multiplier can satisfy."""


@dataclass(frozen=True)
class UserPlan:
    """The noise of a run's user-level mechanism, fixed before round 1 from its target."""

    epsilon: float
    delta: float
    sample_rate: float  # q: each client's chance to be in a round's cohort
    rounds: int
    noise_multiplier: float  # z: what the accountant composes
    update_noise_multiplier: float  # the updates' share of z (= z without adaptive clipping)
    count_stddev: float  # sigma_b of the clipped-bit count, for a cohort of noise_cohort (0: fixed clip)
    expected_cohort: float  # m = q N: the fixed denominator of the simulated sum
    noise_cohort: float  # M: the cohort the noise is sized for (= m unless noise-cohort-size)

    @property
    def noise_scale(self) -> float:
        """m / M: the simulated sum's noise relative to a real cohort of M."""
        return self.expected_cohort / self.noise_cohort

    @property
    def population(self) -> float:
        """The users the reported epsilon is for: N, or M / q with a noise cohort."""
        return self.noise_cohort / self.sample_rate

    @property
    def simulated_population(self) -> bool:
        return self.noise_cohort != self.expected_cohort

    def noise_plan(self) -> privacy.NoisePlan:
        """The accountant's view: one step of multiplier z at rate q per round."""
        return privacy.NoisePlan(self.noise_multiplier, self.sample_rate, self.rounds)

    def describe(self) -> str:
        text = (f"user-level DP: epsilon {self.epsilon:g}, delta {self.delta:g}, noise multiplier "
                f"{self.noise_multiplier:.4g} over {self.rounds} rounds at sampling rate {self.sample_rate:.4g}")
        if self.simulated_population:
            text += (f"; noise sized for cohorts of {self.noise_cohort:g}: the epsilon is for a simulated population "
                     f"of {self.population:g} users, not for the {self.expected_cohort / self.sample_rate:g} "
                     "simulated clients")
        return text


def plan(epsilon: float, delta: float, clients: int, clients_per_round: int, rounds: int,
         adaptive: bool = False, count_stddev: float = 0.0, noise_cohort_size: int = 0) -> UserPlan:
    """The run's user-level noise: the smallest z (within Opacus' tolerance) whose epsilon
    after ``rounds`` rounds at q = clients-per-round / clients stays within ``epsilon``.
    ``count_stddev`` 0 with ``adaptive``: the cohort's size / 20 (Andrew et al.)."""
    rate = clients_per_round / clients
    expected = float(clients_per_round)
    cohort = float(noise_cohort_size or clients_per_round)
    try:
        z = privacy.search_noise_multiplier(epsilon, delta, rate, rounds)
    except privacy.BudgetTooSmall:
        raise UserPlanError(f"user-epsilon {epsilon:g} is too small: no noise multiplier keeps {rounds} rounds at "
                            f"sampling rate {rate:.3g} within it at user-delta {delta:g}") from None
    update_z, sigma_b = z, 0.0
    if adaptive:
        sigma_b = count_stddev or cohort / 20
        if z >= 2 * sigma_b:
            raise UserPlanError(
                f"adaptive clipping needs clip-count-stddev above {z / 2:.3g} (half the noise multiplier {z:.3g}), "
                f"got {sigma_b:g}: raise clip-count-stddev or noise-cohort-size, or use a fixed update-clip")
        update_z = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    return UserPlan(epsilon, delta, rate, rounds, z, update_z, sigma_b, expected, cohort)


def plan_for(cfg) -> UserPlan | None:
    """The plan of a ``RunConfig``'s user-level DP (None without it)."""
    if not cfg.user_private:
        return None
    return plan(cfg.user_epsilon, cfg.user_delta, cfg.clients, cfg.clients_per_round, cfg.rounds, cfg.adaptive_clip,
                cfg.clip_count_stddev, cfg.noise_cohort_size)


def _difference(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> Tensors:
    return {k: update[k].double() - global_state[k].double() for k in update}


def _norm(tensors: Tensors) -> float:
    return math.sqrt(sum(float((t ** 2).sum()) for t in tensors.values()))


def update_norm(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the update's difference from the global tensors, all tensors together (float64)."""
    return _norm(_difference(update, global_state))


def clipped_difference(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                       clip: float) -> tuple[Tensors, float]:
    """(the update's difference from the global tensors scaled to L2 norm at most ``clip``, in
    float64, the difference's norm before)."""
    difference = _difference(update, global_state)
    norm = _norm(difference)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: d * scale for k, d in difference.items()}, norm


def rounding_allowance(update: Mapping[str, torch.Tensor]) -> float:
    """The most by which rounding a clipped update to its dtype can move its norm: the L2
    norm of one unit in the last place of every entry."""
    total = 0.0
    for v in update.values():
        ulp = torch.nextafter(v.abs(), torch.full_like(v, math.inf)) - v.abs()
        total += float((ulp.double() ** 2).sum())
    return math.sqrt(total)


def clip_update(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                clip: float) -> tuple[Tensors, float]:
    """(global + the difference scaled to L2 norm at most ``clip``, in the update's dtype, the
    difference's norm): what a client that clips its own update sends. Rounding to float32
    may leave it a hair above the clip; the server clips again in float64 (``privatize``)."""
    difference, norm = clipped_difference(update, global_state, clip)
    return {k: (global_state[k].double() + d).to(update[k].dtype) for k, d in difference.items()}, norm


@dataclass
class Release:
    """One round of the mechanism, for the run's records: what it released (the clip, epsilon,
    the noisy fraction) and the cohort's size, which is the server's own (README)."""

    clip: float  # the clip this round used
    next_clip: float
    epsilon: float  # cumulative after this round
    cohort: int  # updates in the sum
    unclipped_fraction: float | None = None  # noisy, adaptive clipping only


@dataclass
class UserLevelDP:
    """The server's user-level mechanism and its state across rounds (checkpointed with the
    run). ``seed`` None draws every round's noise from OS randomness (deployments); a seed
    makes the noise a function of (seed, round), as a simulation's must be to reproduce."""

    plan: UserPlan
    clip: float
    placement: str = "server"
    adaptive: bool = False
    quantile: float = 0.5
    clip_lr: float = 0.2
    seed: int | None = None
    # the accountant's state: the user-level budget, the rounds released so far, the plan
    account: privacy.PrivacyState = field(init=False)

    def __post_init__(self) -> None:
        self.account = privacy.PrivacyState(self.plan.epsilon, self.plan.delta, self.clip, [], self.plan.noise_plan())

    def state_dict(self) -> dict:
        return {"clip": self.clip, "privacy": self.account.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        account = privacy.PrivacyState.from_state_dict(state["privacy"])
        if account.plan != self.plan.noise_plan() or (account.epsilon, account.delta) != (self.plan.epsilon,
                                                                                          self.plan.delta):
            # the noise would follow this plan and the accountant the saved one
            raise ValueError(f"the saved user-level plan {account.plan} differs from this run's "
                             f"{self.plan.noise_plan()}")
        self.clip, self.account = float(state["clip"]), account

    @property
    def rounds(self) -> int:
        """Rounds released so far."""
        return sum(n for _, _, n in self.account.history)

    @property
    def epsilon(self) -> float:
        """Cumulative user-level epsilon of the rounds released so far."""
        return self.account.spent()

    def generator(self, server_round: int) -> torch.Generator:
        seed = secrets.randbits(63) if self.seed is None else \
            int(np.random.SeedSequence([self.seed, server_round, NOISE_STREAM]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)

    def privatize(self, global_state: Mapping[str, torch.Tensor], names: Sequence[str],
                  updates: Sequence[Mapping[str, torch.Tensor]], server_round: int,
                  within_clip: Sequence[bool] | None = None) -> tuple[Tensors, Release]:
        """One round: the global tensors ``names`` plus the noisy mean of the clipped
        differences, and what was released. ``within_clip``: each client's bit under client
        placement (its update before it clipped it); the server's own clipping computes them.

        Raises ``privacy.BudgetExhausted`` if the round would exceed the target (a run with
        more rounds than planned), before anything is released."""
        try:
            after = self.account.check_next(1)
        except privacy.BudgetExhausted as exc:
            raise privacy.BudgetExhausted(f"user-level {exc}") from None
        clip, bits = self.clip, []
        names = sorted(names)  # one order: the same noise for the same seed
        total = {k: torch.zeros_like(global_state[k], dtype=torch.float64) for k in names}
        for i, update in enumerate(updates):
            # In float64, straight into the sum: each contribution's norm is at most the clip.
            # Under client placement the update is already clipped (up to float32 rounding,
            # which this removes) and the bit is the client's.
            difference, norm = clipped_difference({k: update[k] for k in names}, global_state, clip)
            if self.placement == "server":
                bits.append(norm <= clip)
            elif within_clip is not None:
                bits.append(bool(within_clip[i]))
            for k in names:
                total[k] += difference[k]
        gen = self.generator(server_round)
        std = self.plan.update_noise_multiplier * clip * self.plan.noise_scale
        denominator = self.plan.expected_cohort
        noisy = {}
        for k in names:
            noise = torch.randn(total[k].shape, generator=gen, dtype=torch.float64) * std
            noisy[k] = (global_state[k].double() + (total[k] + noise) / denominator).to(global_state[k].dtype)
        fraction = None
        if self.adaptive:
            # The centred bits b - 1/2: one client more or less moves their sum by at most 1/2,
            # the sensitivity the budget split assumes. (Their plain count would move by 1, and
            # the cohort's size that would make the centring free is not public.)
            count_noise = float(torch.randn((), generator=gen, dtype=torch.float64)) * \
                self.plan.count_stddev * self.plan.noise_scale
            centred = sum(b - 0.5 for b in map(float, bits))
            fraction = (centred + count_noise) / denominator + 0.5
            self.clip = clip * math.exp(-self.clip_lr * (fraction - self.quantile))
        self.account.history = self.account.after(1)
        return noisy, Release(clip=clip, next_clip=self.clip, epsilon=after, cohort=len(updates),
                              unclipped_fraction=fraction)


def poisson_cohort(rng: np.random.Generator, candidates: Sequence[int], rate: float) -> list[int]:
    """The candidates each taken independently with probability ``rate`` (sorted): the
    sampling the accountant assumes. The cohort may be empty; its round still releases noise."""
    if rate >= 1:
        return sorted(candidates)
    taken = rng.random(len(candidates)) < rate
    return sorted(int(c) for c, t in zip(candidates, taken) if t)
