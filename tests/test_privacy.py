import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from dp_reference import clipped_gradient_sum, replayed_noise, training_setup
from fedortho import data, privacy
from fedortho.lora import adapter_state
from fedortho.rules import trainable_names
from fedortho.train import train_client
from fedortho.worker import build_model


def opacus_epsilon(sigma, q, steps, delta):
    """Independent reference: Opacus' own accountant, stepped one step at a time."""
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("epsilon,q,steps", [(6.0, 0.03, 30), (3.0, 0.1, 20), (1.0, 0.05, 50)])
def test_planned_noise_spends_at_most_the_target(epsilon, q, steps):
    sigma = privacy.search_noise_multiplier(epsilon, 1e-5, q, steps)
    spent = opacus_epsilon(sigma, q, steps, 1e-5)
    assert spent <= epsilon
    assert spent > epsilon - 0.1  # and not wastefully more noise than needed


def test_a_plan_after_prior_spending_covers_what_is_left():
    acc = RDPAccountant()
    for _ in range(20):
        acc.step(noise_multiplier=0.7, sample_rate=0.05)
    prior = list(acc.history)
    before = acc.get_epsilon(delta=1e-5)
    sigma = privacy.search_noise_multiplier(6.0, 1e-5, 0.05, 20, prior=prior)
    for _ in range(20):  # Opacus' accountant, stepped one step at a time, is the reference
        acc.step(noise_multiplier=sigma, sample_rate=0.05)
    total = acc.get_epsilon(delta=1e-5)
    assert 5.9 < total <= 6.0
    # The plan that ignores the prior would overspend.
    fresh = privacy.search_noise_multiplier(6.0, 1e-5, 0.05, 20)
    assert fresh < sigma and privacy.spent_epsilon([*prior, (fresh, 0.05, 20)], 1e-5) > 6.0
    # Less left than the search can resolve: no plan.
    with pytest.raises(privacy.BudgetTooSmall, match="within what is left of it"):
        privacy.search_noise_multiplier(before + 0.005, 1e-5, 0.05, 20, prior=prior)


def test_a_budget_too_small_to_plan_is_named_before_training():
    with pytest.raises(privacy.BudgetTooSmall, match="epsilon 0.001 is too small") as info:
        privacy.search_noise_multiplier(1e-3, 1e-5, 0.05, 24)
    assert "\n" not in str(info.value)
    # A plannable budget gives the plan itself.
    plan = privacy.make_plan(3.0, 1e-5, 0.1, 20)
    assert (plan.noise_multiplier, plan.sample_rate, plan.steps, plan.prior) == \
        (privacy.search_noise_multiplier(3.0, 1e-5, 0.1, 20), 0.1, 20, ())


def test_a_planner_searches_once_per_distinct_setting_and_keeps_plans_handed_to_it(monkeypatch, tmp_path):
    monkeypatch.setenv(privacy.CACHE_ENV, str(tmp_path))  # an empty cache of searches
    calls = []
    search = privacy._search_noise_multiplier
    monkeypatch.setattr(privacy, "_search_noise_multiplier", lambda *key: calls.append(key) or search(*key))
    planner = privacy.NoisePlanner()
    first = [planner.plan(6.0, 1e-5, 0.05, 12) for _ in range(5)]
    planner.plan(6.0, 1e-5, 0.04, 12)
    assert len(calls) == 2 and len(set(first)) == 1
    # A plan handed over (a server's, at a simulation worker's warm-up) is used, not searched again.
    planner.add(3.0, 1e-5, privacy.NoisePlan(1.234, 0.1, 20))
    assert planner.plan(3.0, 1e-5, 0.1, 20).noise_multiplier == 1.234 and len(calls) == 2
    assert {p.noise_multiplier for p in planner.known(3.0, 1e-5)} == {1.234}
    # Another planner (another process) shares nothing in memory; it finds the search on disk.
    assert privacy.NoisePlanner().plan(6.0, 1e-5, 0.05, 12) == first[0] and len(calls) == 2
    monkeypatch.setenv(privacy.CACHE_ENV, str(tmp_path / "other"))
    assert privacy.NoisePlanner().plan(6.0, 1e-5, 0.05, 12) == first[0] and len(calls) == 3


def test_a_privacy_state_round_trips_and_refuses_impossible_histories():
    plan = privacy.make_plan(4.0, 1e-5, 0.05, 20, prior=[(1.5, 0.05, 10)])
    state = privacy.PrivacyState(4.0, 1e-5, 2.0, [(1.5, 0.05, 10), (plan.noise_multiplier, 0.05, 5)], plan)
    again = privacy.PrivacyState.from_state_dict(json.loads(json.dumps(state.state_dict())))
    assert again == state and again.spent() == pytest.approx(opacus_epsilon_history(state.history, 1e-5))
    assert state.after(5) == [(1.5, 0.05, 10), (plan.noise_multiplier, 0.05, 10)]
    bad = {**state.state_dict(), "history": [[1.5, 1.5, 3]]}
    with pytest.raises(ValueError, match="impossible"):
        privacy.PrivacyState.from_state_dict(bad)


def opacus_epsilon_history(history, delta):
    acc = RDPAccountant()
    for sigma, q, n in history:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def test_history_epsilon_and_budget_guard():
    history = privacy.extend_history([], 1.1, 0.05, 10)
    history = privacy.extend_history(history, 1.1, 0.05, 10)
    assert history == [(1.1, 0.05, 20)]
    assert privacy.spent_epsilon(history, 1e-5) == pytest.approx(opacus_epsilon(1.1, 0.05, 20, 1e-5), rel=1e-12)
    assert privacy.spent_epsilon([], 1e-5) == 0.0
    after = opacus_epsilon(1.1, 0.05, 30, 1e-5)
    assert privacy.check_budget(history, 1.1, 0.05, 10, epsilon=after + 1e-9, delta=1e-5) == pytest.approx(after)
    with pytest.raises(privacy.BudgetExhausted, match="exhausted"):
        privacy.check_budget(history, 1.1, 0.05, 10, epsilon=after - 1e-6, delta=1e-5)


def test_sample_rate_matches_opacus_loader():
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    ds = TensorDataset(torch.zeros(293, 1))
    loader = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=32))
    assert privacy.sample_rate(293, 32) == pytest.approx(loader.sample_rate)


@pytest.fixture()
def client_setup(tiny_cfg):
    cfg = tiny_cfg.replace(rounds=3, clients_per_round=3, epsilon=6.0, local_steps=2)
    model = build_model(cfg)
    dataset = data.client_dataset(cfg, 0, cfg.clients)
    names = trainable_names(adapter_state(model), cfg.strategy, cfg.train_head)
    return cfg, model, dataset, names


def test_cumulative_epsilon_matches_opacus_and_stops_at_the_target(client_setup):
    cfg, model, dataset, names = client_setup
    state, reported = None, []
    for rnd in range(cfg.rounds):
        result = train_client(model, dataset, cfg, names, state, seed=rnd)
        state = result.privacy
        reported.append(result.epsilon)
    q = privacy.sample_rate(len(dataset), cfg.batch_size)
    sigma = result.noise_multiplier
    for rnd, eps in enumerate(reported, start=1):
        assert eps == pytest.approx(opacus_epsilon(sigma, q, rnd * cfg.local_steps, cfg.delta), rel=1e-9)
    assert reported == sorted(reported) and reported[-1] <= cfg.epsilon
    with pytest.raises(privacy.BudgetExhausted):  # a fourth round would overspend: refused before training
        before = adapter_state(model)
        train_client(model, dataset, cfg, names, state, seed=99)
    assert all(torch.equal(before[k], v) for k, v in adapter_state(model).items())


def test_private_round_changes_b_only(client_setup):
    cfg, model, dataset, names = client_setup
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" not in k and "classifier" not in k}
    adapters_before = adapter_state(model)
    result = train_client(model, dataset, cfg, names, None, seed=1)
    after = adapter_state(model)
    for k, v in base_before.items():
        assert torch.equal(dict(model.named_parameters())[k], v), k
    for k in after:
        if "lora_A" in k:
            assert torch.equal(after[k], adapters_before[k]), k
        if "lora_B" in k:
            assert not torch.equal(after[k], adapters_before[k]), k
    assert set(result.update) == set(names) and all("lora_A" not in k for k in result.update)
    assert math.isfinite(result.epsilon) and 0 < result.epsilon <= cfg.epsilon


def test_noise_depends_on_seed_and_dp_differs_from_non_private(client_setup):
    cfg, model, dataset, names = client_setup
    start = adapter_state(model)

    def run(c, seed):
        from fedortho.lora import load_adapter_state

        load_adapter_state(model, start)
        return train_client(model, dataset, c, names, None, seed=seed).update

    a, a_again, b = run(cfg, 1), run(cfg, 1), run(cfg, 2)
    plain = run(cfg.replace(epsilon=math.inf), 1)
    key = next(k for k in names if "lora_B" in k)
    assert torch.equal(a[key], a_again[key])  # same seed, same result
    assert not torch.allclose(a[key], b[key])
    assert not torch.allclose(a[key], plain[key])


def test_infinite_epsilon_is_plain_sgd_without_clipping_or_noise(tiny_cfg):
    """epsilon = inf: one full-batch step equals a hand-computed SGD step on the unclipped mean."""
    cfg = tiny_cfg.replace(epsilon=math.inf, clip=1e-3, local_steps=1, lr=0.5)
    model = build_model(cfg)
    dataset = data.client_dataset(cfg, 0, cfg.clients)
    cfg = cfg.replace(batch_size=len(dataset))
    names = trainable_names(adapter_state(model), "fedsvd", True)
    from fedortho.lora import set_trainable
    from fedortho.train import _forward_loss

    params = set_trainable(model, names)
    model.zero_grad()
    _forward_loss(model, dataset.tensors).backward()
    grad = torch.cat([p.grad.flatten() for p in params])
    assert grad.norm() > 50 * cfg.clip  # clipping to cfg.clip would have changed the step
    before = torch.cat([p.detach().flatten() for p in params])
    model.zero_grad()
    result = train_client(model, dataset, cfg, names, None, seed=1)
    after = torch.cat([result.update[k].flatten() for k in names])
    assert torch.allclose(after, before - cfg.lr * grad, atol=1e-6)
    assert result.privacy is None and math.isinf(result.epsilon)


def test_clipping_and_noise_against_a_hand_computed_step(tiny_cfg):
    """One DP-SGD step on a fixed batch equals: clip each per-sample gradient, sum, add noise."""
    from fedortho.train import _forward_loss

    model, dataset, names, params, batch = training_setup(tiny_cfg)
    clip, lr, sigma = 0.05, 1.0, 0.7
    sums, factors = clipped_gradient_sum(model, params, batch, clip)
    assert max(factors) < 1.0  # the test is only meaningful if clipping binds
    clipped_sum = torch.cat([g.flatten() for g in sums])
    before = torch.cat([p.detach().flatten().double() for p in params])

    from torch.utils.data import DataLoader

    optimizer = torch.optim.SGD(params, lr=lr)
    loader = DataLoader(dataset, batch_size=16)
    engine, wrapped, dp_opt, _ = privacy.make_private(model, optimizer, loader, sigma, clip, [],
                                                      torch.Generator().manual_seed(5))
    dp_opt.zero_grad()
    _forward_loss(wrapped, batch).backward()
    dp_opt.step()
    wrapped._close()
    after = torch.cat([p.detach().flatten().double() for p in params])
    expected_batch = dp_opt.expected_batch_size
    # Noise replayed from the same generator, in parameter order, as std * N(0, 1).
    noise = torch.cat([n.flatten() for n in replayed_noise(params, sigma * clip, seed=5)])
    expected = before - lr * (clipped_sum + noise) / expected_batch
    assert torch.allclose(after, expected, atol=1e-6)
    # And the noise is really there: without it the step would be far from what happened.
    assert (after - (before - lr * clipped_sum / expected_batch)).norm() > 0.5 * (lr * noise / expected_batch).norm()


def test_a_cached_noise_multiplier_is_the_searched_one_and_a_damaged_one_is_never_used(tmp_path, monkeypatch):
    """Searches are kept across processes (``FEDORTHO_CACHE``); an entry is used only if the
    accountant confirms it keeps the steps within the target."""
    import json

    from fedortho import privacy

    monkeypatch.setenv(privacy.CACHE_ENV, str(tmp_path))
    budget = (6.0, 1e-5, 0.05, 24, ((1.0, 0.05, 10),))
    searched = privacy.search_noise_multiplier(*budget)
    files = list((tmp_path / "noise-plans").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == {"noise-multiplier": searched}
    assert privacy.stored_noise_multiplier(*budget) == searched
    assert privacy.search_noise_multiplier(*budget) == searched
    assert privacy.stored_noise_multiplier(6.0, 1e-5, 0.05, 25, budget[4]) is None  # another budget, another entry
    # an entry with less noise than the budget allows (edited, or from a bug) is not used ...
    files[0].write_text(json.dumps({"noise-multiplier": searched * 0.9}))
    assert privacy.stored_noise_multiplier(*budget) is None
    assert privacy.search_noise_multiplier(*budget) == searched  # ... the search runs again and stores its result
    assert json.loads(files[0].read_text()) == {"noise-multiplier": searched}
    for damaged in ("{", '{"noise-multiplier": "x"}', '{"noise-multiplier": -1}', '{"noise-multiplier": NaN}'):
        files[0].write_text(damaged)
        assert privacy.stored_noise_multiplier(*budget) is None
    spent = privacy.spent_epsilon([*budget[4], (searched, 0.05, 24)], 1e-5)
    assert spent <= 6.0 and spent > 6.0 - 2 * privacy.EPSILON_TOLERANCE  # the search's own tolerance
