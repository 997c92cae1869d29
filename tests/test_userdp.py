"""User-level DP (fedortho.userdp) against independent references: Opacus' RDP analysis, a
float64 clip-and-sum by hand, the noise's empirical spread, a full SVD and known quantiles."""

import math

import numpy as np
import pytest
import torch

from fedortho import privacy, rules, userdp
from fedortho.fedsvd import refactorize_full_svd


def opacus_epsilon(z, q, rounds, delta):
    """The accountant composed by hand from Opacus' RDP analysis, not through fedortho."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders)
    return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def mechanism(plan, clip=1.0, seed=0, **kw):
    return userdp.UserLevelDP(plan, clip, seed=seed, **kw)


def random_state(names_shapes, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * scale for k, shape in names_shapes.items()}


SHAPES = {"l0.lora_B.weight": (6, 2), "l1.lora_B.weight": (5, 2), "head.weight": (3, 4)}


@pytest.mark.parametrize("clients, per_round, rounds", [(10, 10, 8), (100, 10, 20), (1000, 30, 25)])
def test_reported_epsilon_is_the_accountants_for_the_recorded_noise_rate_and_rounds(clients, per_round, rounds):
    plan = userdp.plan(4.0, 1e-5, clients, per_round, rounds)
    assert plan.sample_rate == per_round / clients
    dp = mechanism(plan)
    g = {"x": torch.zeros(3)}
    released = []
    for rnd in range(1, rounds + 1):
        _, release = dp.privatize(g, ["x"], [], rnd)
        released.append(release.epsilon)
    expected = [opacus_epsilon(plan.noise_multiplier, plan.sample_rate, n, 1e-5) for n in range(1, rounds + 1)]
    assert released == pytest.approx(expected, rel=1e-9)
    assert released == sorted(released)  # cumulative
    assert released[-1] <= 4.0 and released[-1] > 4.0 - 0.1  # the whole budget, never more
    # the smallest noise that fits: a little less would overspend
    assert opacus_epsilon(plan.noise_multiplier * 0.97, plan.sample_rate, rounds, 1e-5) > 4.0


def test_a_round_beyond_the_plan_is_refused_before_anything_is_released():
    plan = userdp.plan(2.0, 1e-5, 10, 10, 3)
    dp = mechanism(plan)
    g = {"x": torch.zeros(2)}
    for rnd in (1, 2, 3):
        dp.privatize(g, ["x"], [{"x": torch.ones(2)}], rnd)
    with pytest.raises(privacy.BudgetExhausted, match="user-level privacy budget exhausted"):
        dp.privatize(g, ["x"], [{"x": torch.ones(2)}], 4)
    assert dp.rounds == 3 and dp.epsilon <= 2.0


def test_clipped_updates_never_exceed_the_bound_and_small_ones_are_untouched():
    g = random_state(SHAPES, seed=1)
    for scale in (1e-4, 0.05, 1.0, 30.0):
        update = {k: v + torch.randn_like(v) * scale for k, v in g.items()}
        clipped, norm = userdp.clip_update(update, g, clip=0.5)
        by_hand = math.sqrt(sum(float(((update[k].double() - g[k].double()) ** 2).sum()) for k in g))
        assert norm == pytest.approx(by_hand, rel=1e-12)
        assert userdp.update_norm(clipped, g) <= 0.5 * (1 + 1e-6)
        if norm <= 0.5:
            assert all(torch.allclose(clipped[k], update[k], atol=1e-7) for k in g)
        else:  # scaled, direction kept
            for k in g:
                assert torch.allclose(clipped[k].double() - g[k].double(),
                                      (update[k].double() - g[k].double()) * (0.5 / norm), atol=1e-6)


def test_the_noisy_mean_is_the_clipped_sum_over_the_expected_cohort():
    """Two cohorts through mechanisms with one seed: the noise cancels in the difference, which
    must be the float64 clip-and-sum by hand over the fixed denominator (not the cohort's size)."""
    plan = userdp.plan(8.0, 1e-5, 20, 5, 4)  # expected cohort 5
    g = random_state(SHAPES, seed=2)
    cohort_a = [{k: v + torch.randn_like(v) * s for k, v in g.items()} for s in (0.01, 0.3, 2.0)]
    cohort_b = [{k: v + torch.randn_like(v) * 0.7 for k, v in g.items()}]
    out_a, rel_a = mechanism(plan, clip=0.8, seed=5).privatize(g, list(g), cohort_a, 3)
    out_b, _ = mechanism(plan, clip=0.8, seed=5).privatize(g, list(g), cohort_b, 3)

    def clipped_sum(cohort):
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in g.items()}
        for u in cohort:
            delta = {k: u[k].double() - g[k].double() for k in g}
            norm = math.sqrt(sum(float((d ** 2).sum()) for d in delta.values()))
            for k in g:
                total[k] += delta[k] * min(1.0, 0.8 / norm)
        return total

    sa, sb = clipped_sum(cohort_a), clipped_sum(cohort_b)
    for k in g:
        assert torch.allclose(out_a[k].double() - out_b[k].double(), (sa[k] - sb[k]) / 5, atol=2e-6)
    assert rel_a.cohort == 3 and rel_a.clip == 0.8


@pytest.mark.parametrize("noise_cohort", [0, 400])
def test_noise_on_a_zero_update_has_std_sigma_clip_over_the_denominator(noise_cohort):
    plan = userdp.plan(3.0, 1e-5, 40, 8, 5, noise_cohort_size=noise_cohort)
    g = {"w": torch.zeros(400, 500)}
    out, _ = mechanism(plan, clip=1.5, seed=3).privatize(g, ["w"], [{"w": torch.zeros(400, 500)}] * 4, 1)
    # the mean carries the noise of a cohort of M (= 8 without a noise cohort)
    cohort = noise_cohort or 8
    expected = plan.noise_multiplier * 1.5 / cohort
    assert float(out["w"].double().std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(out["w"].double().mean())) < 5 * expected / math.sqrt(out["w"].numel())
    if noise_cohort:
        assert plan.simulated_population and plan.population == 400 / (8 / 40)
        assert "simulated population of 2000 users" in plan.describe()


def test_noise_follows_the_seed_and_round_and_os_randomness_without_a_seed():
    plan = userdp.plan(3.0, 1e-5, 10, 10, 5)
    g = {"w": torch.zeros(50)}
    first = mechanism(plan, seed=1).privatize(g, ["w"], [], 2)[0]["w"]
    again = mechanism(plan, seed=1).privatize(g, ["w"], [], 2)[0]["w"]
    other_round = mechanism(plan, seed=1).privatize(g, ["w"], [], 3)[0]["w"]
    unseeded = [mechanism(plan, seed=None).privatize(g, ["w"], [], 2)[0]["w"] for _ in range(2)]
    assert torch.equal(first, again) and not torch.equal(first, other_round)
    assert not torch.equal(unseeded[0], unseeded[1])


def test_fedsvd_refactorizes_the_noisy_mean_after_the_noise():
    """The rule's post-processing acts on the released noisy mean: the new (B, A) is a full
    SVD's factorization of (B_g + noisy mean) A_g, not of the noiseless mean."""
    torch.manual_seed(0)
    g = {"l.lora_A.weight": torch.linalg.qr(torch.randn(12, 3))[0].T.contiguous(),
         "l.lora_B.weight": torch.randn(7, 3) * 0.1}
    updates = [{"l.lora_B.weight": g["l.lora_B.weight"] + torch.randn(7, 3) * 0.2} for _ in range(4)]
    plan = userdp.plan(2.0, 1e-5, 4, 4, 3)
    reference_dp = mechanism(plan, clip=0.3, seed=9)
    noisy_b = reference_dp.privatize(g, ["l.lora_B.weight"], updates, 1)[0]["l.lora_B.weight"]

    dp = mechanism(plan, clip=0.3, seed=9)
    out = rules.aggregate("fedsvd", g, updates, [1.0] * 4, 1,
                          privatize=lambda ups: dp.privatize(g, ["l.lora_B.weight"], ups, 1)[0])
    b, a = out["l.lora_B.weight"].double(), out["l.lora_A.weight"].double()
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-5)
    product = noisy_b.double() @ g["l.lora_A.weight"].double()
    b_ref, a_ref = refactorize_full_svd(noisy_b.double(), g["l.lora_A.weight"].double())
    assert torch.allclose(b @ a, product, atol=1e-5) and torch.allclose(b_ref @ a_ref, product, atol=1e-9)
    noiseless = sum(u["l.lora_B.weight"].double() for u in updates) / 4 @ g["l.lora_A.weight"].double()
    assert not torch.allclose(b @ a, noiseless, atol=1e-3)
    assert dp.rounds == 1


def test_an_empty_cohort_still_releases_noise_and_is_accounted():
    plan = userdp.plan(3.0, 1e-5, 100, 5, 4)
    g = {"l.lora_A.weight": torch.eye(2, 6), "l.lora_B.weight": torch.zeros(4, 2)}
    dp = mechanism(plan)
    out = rules.aggregate("ffa", g, [], [], 1,
                          privatize=lambda ups: dp.privatize(g, ["l.lora_B.weight"], ups, 1)[0])
    assert not torch.equal(out["l.lora_B.weight"], g["l.lora_B.weight"])
    assert torch.equal(out["l.lora_A.weight"], g["l.lora_A.weight"])
    assert dp.rounds == 1 and dp.epsilon > 0


def test_poisson_cohorts_have_the_planned_rate():
    rng = np.random.default_rng(0)
    sizes = [len(userdp.poisson_cohort(rng, range(200), 0.05)) for _ in range(2000)]
    assert np.mean(sizes) == pytest.approx(10, rel=0.03)
    assert np.var(sizes) == pytest.approx(200 * 0.05 * 0.95, rel=0.1)  # binomial, not fixed-size
    assert min(sizes) < 5 < 15 < max(sizes)
    assert userdp.poisson_cohort(rng, [3, 1, 2], 1.0) == [1, 2, 3]


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.8])
def test_adaptive_clipping_tracks_a_known_quantile(quantile):
    """Update norms uniform on [0, 10]: the clip settles near 10 * quantile."""
    clients = 200
    plan = userdp.plan(50.0, 1e-5, clients, clients, 150, adaptive=True)
    assert plan.count_stddev == clients / 20
    assert plan.update_noise_multiplier > plan.noise_multiplier  # the bits' share of the budget
    dp = mechanism(plan, clip=1.0, adaptive=True, quantile=quantile, clip_lr=0.2)
    rng = np.random.default_rng(1)
    g = {"x": torch.zeros(1)}
    clips = []
    for rnd in range(1, 151):
        norms = rng.uniform(0, 10, clients)
        dp.privatize(g, ["x"], [{"x": torch.tensor([n], dtype=torch.float32)} for n in norms], rnd)
        clips.append(dp.clip)
    assert np.mean(clips[-50:]) == pytest.approx(10 * quantile, rel=0.12)


def test_one_client_moves_the_released_count_by_at_most_one_half():
    """The bits' release has the sensitivity the budget split assumes: with the same noise, a
    cohort with one client more (within the clip or not) moves the noisy count by 1/2."""
    plan = userdp.plan(3.0, 1e-5, 1000, 100, 10, adaptive=True)
    g = {"x": torch.zeros(1)}
    small = [{"x": torch.tensor([n])} for n in (0.1, 0.5, 3.0, 9.0)]
    counts = []
    for cohort in (small, small + [{"x": torch.tensor([0.2])}], small + [{"x": torch.tensor([50.0])}]):
        dp = mechanism(plan, clip=1.0, adaptive=True, seed=4)
        counts.append(dp.privatize(g, ["x"], cohort, 1)[1].unclipped_fraction * plan.expected_cohort)
    assert abs(counts[1] - counts[0]) == pytest.approx(0.5, abs=1e-9)
    assert abs(counts[2] - counts[0]) == pytest.approx(0.5, abs=1e-9)


def test_a_resumed_mechanism_releases_what_the_uninterrupted_one_does():
    """The state goes through JSON (as in a checkpoint); the next rounds' releases, clip and
    epsilon are the same; a checkpoint of another plan is refused."""
    import json

    plan = userdp.plan(3.0, 1e-5, 1000, 100, 4, adaptive=True)
    g = {"x": torch.zeros(5)}
    cohorts = [[{"x": torch.randn(5, generator=torch.Generator().manual_seed(10 * r + i))} for i in range(6)]
               for r in range(4)]
    whole = mechanism(plan, clip=0.5, adaptive=True, seed=2)
    outputs = [whole.privatize(g, ["x"], cohorts[r], r + 1) for r in range(4)]
    first = mechanism(plan, clip=0.5, adaptive=True, seed=2)
    for r in range(2):
        first.privatize(g, ["x"], cohorts[r], r + 1)
    resumed = mechanism(plan, clip=0.5, adaptive=True, seed=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for r in (2, 3):
        out, release = resumed.privatize(g, ["x"], cohorts[r], r + 1)
        assert torch.equal(out["x"], outputs[r][0]["x"]) and release == outputs[r][1]
    assert resumed.epsilon == whole.epsilon and resumed.clip == whole.clip
    other = mechanism(userdp.plan(5.0, 1e-5, 1000, 100, 4, adaptive=True), clip=0.5, adaptive=True)
    with pytest.raises(ValueError, match="differs"):
        other.load_state_dict(first.state_dict())


def test_client_clipped_float32_updates_are_clipped_again_in_float64():
    """A client's clip rounded to float32 may end a hair above the bound; the server takes
    each contribution at most the clip, exactly (the float64 difference it sums), and does
    not mistake the hair for a client that did not clip."""
    gen = torch.Generator().manual_seed(6)
    g = {"w": torch.rand(100_000, generator=gen) + 0.5}
    update = {"w": g["w"] + torch.randn(100_000, generator=gen)}
    clipped, _ = userdp.clip_update(update, g, 1e-4)
    sent = userdp.update_norm(clipped, g)
    assert 1e-4 < sent <= 1e-4 + userdp.rounding_allowance(clipped)  # float32 rounding, and what it allows
    summed, _ = userdp.clipped_difference(clipped, g, 1e-4)
    assert math.sqrt(sum(float((d ** 2).sum()) for d in summed.values())) <= 1e-4 * (1 + 1e-12)


def test_adaptive_clipping_composes_to_the_planned_multiplier():
    plan = userdp.plan(3.0, 1e-5, 1000, 100, 10, adaptive=True, count_stddev=20.0)
    z, zu, sb = plan.noise_multiplier, plan.update_noise_multiplier, plan.count_stddev
    assert z ** -2 == pytest.approx(zu ** -2 + (2 * sb) ** -2, rel=1e-12)


@pytest.mark.parametrize("kwargs, message", [
    (dict(epsilon=1e-4, delta=1e-5, clients=10, clients_per_round=10, rounds=50), "too small"),
    (dict(epsilon=2.0, delta=1e-5, clients=10, clients_per_round=10, rounds=8, adaptive=True), "clip-count-stddev"),
])
def test_plans_that_cannot_be_met_say_why(kwargs, message):
    with pytest.raises(userdp.UserPlanError, match=message):
        userdp.plan(**kwargs)
