"""User-level DP through the strategy and the ClientApp (in process): every rule with each
clip placement, both kinds of DP in one run, Poisson cohorts, and a client that oversteps."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedortho import userdp
from fedortho.checkpoint import ClientStates
from fedortho.config import ConfigError
from fedortho.runs import RunStopped
from fedortho.lora import adapter_state
from fedortho.worker import build_model
from server.strategy import LoRAStrategy
from test_strategy import LocalGrid
from test_userdp import opacus_epsilon


def run(cfg, grid, seeded=True, client_states=None):
    """The strategy over ``grid``; returns it, every round's record and every round's state.
    ``seeded``: cohorts and noise from the run's seed, as in a simulation (the LocalGrid is a
    deployment, which draws both from the OS). ``client_states``: run as a simulation, whose
    clients' states travel with the messages (needed for a noise cohort)."""
    strategy = LoRAStrategy(cfg, client_states=client_states)
    if seeded and strategy.user_dp:
        strategy.rng, strategy.user_dp.seed = np.random.default_rng(cfg.seed), cfg.seed
    records, states = [], []

    def after(rnd, arrays):
        states.append(arrays.to_torch_state_dict())
        if rnd:
            records.append(dict(strategy.last_round))

    strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(build_model(cfg))), num_rounds=cfg.rounds,
                   evaluate_fn=lambda rnd, arrays: after(rnd, arrays) or None)
    return strategy, records, states


class RecordingGrid(LocalGrid):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.pairs = {}
        self.clip_sent = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        for msg, reply in zip(messages, replies):
            if msg.metadata.message_type == "train" and not reply.has_error():
                config = msg.content["config"]
                if "user-clip" in config:
                    self.clip_sent.append(float(config["user-clip"]))
                self.pairs.setdefault(msg.metadata.dst_node_id, []).append(
                    (msg.content["arrays"].to_torch_state_dict(), reply.content["arrays"].to_torch_state_dict(),
                     dict(reply.content["metrics"])))
        return replies


@pytest.mark.parametrize("placement", ["server", "client"])
@pytest.mark.parametrize("rule_name", ["fedsvd", "ffa", "fedavg", "rolora", "fedex", "flora", "fedsb"])
def test_every_rule_runs_privately_with_each_placement(tiny_cfg, rule_name, placement):
    cfg = tiny_cfg.replace(strategy=rule_name, rounds=2, epsilon=math.inf, user_epsilon=4.0, update_clip=0.05,
                           clip_placement=placement)
    grid = RecordingGrid(3)
    strategy, records, states = run(cfg, grid)
    plan = strategy.user_dp.plan
    assert [r["user-epsilon"] for r in records] == pytest.approx(
        [opacus_epsilon(plan.noise_multiplier, 1.0, n, cfg.user_delta) for n in (1, 2)], rel=1e-9)
    assert records[-1]["user-epsilon"] <= 4.0
    assert all(r["clients-replied"] == 3 and r["clients-failed"] == 0 for r in records)
    assert all("train-loss" not in r for r in records)  # computed from private data without noise
    for before, after in zip(states, states[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in after)  # noise moved the model
    norms = [userdp.update_norm(update, sent) for pairs in grid.pairs.values() for sent, update, _ in pairs]
    if placement == "client":  # what left the nodes was already within the clip
        assert max(norms) <= 0.05 * (1 + 1e-5)
    else:
        assert max(norms) > 0.05  # raw updates; the server clipped them


def test_the_servers_release_is_the_mechanism_on_what_the_clients_sent(tiny_cfg):
    """End to end under server placement: the new global B is, to float32, the seeded
    mechanism applied by hand to the updates that came back (clipped, noised, over the
    expected cohort), and the server did clip: the raw updates were above the clip."""
    cfg = tiny_cfg.replace(strategy="ffa", rounds=1, epsilon=math.inf, user_epsilon=4.0, update_clip=0.02,
                           clients=6, clients_per_round=3, max_train_examples=360)
    grid = RecordingGrid(6)
    strategy = LoRAStrategy(cfg)
    strategy.user_dp.seed = 13  # the LocalGrid is a deployment, whose noise is not seeded otherwise
    states = []
    strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(build_model(cfg))), num_rounds=1,
                   evaluate_fn=lambda rnd, arrays: states.append(arrays.to_torch_state_dict()) or None)
    pairs = sorted(((msg_node, pair) for msg_node, ps in grid.pairs.items() for pair in ps), key=lambda x: x[0])
    updates = [update for _, (_, update, _) in pairs]
    assert updates and max(userdp.update_norm(u, states[0]) for u in updates) > 0.02
    by_hand = userdp.UserLevelDP(strategy.user_dp.plan, 0.02, seed=13)
    names = sorted(updates[0])
    expected, _ = by_hand.privatize(states[0], names, updates, 1)
    for k in names:
        assert torch.allclose(states[1][k], expected[k], atol=1e-6)
    assert strategy.user_dp.plan.expected_cohort == 3


def test_both_kinds_of_dp_in_one_run_report_each_budget(tiny_cfg):
    cfg = tiny_cfg.replace(rounds=2, epsilon=6.0, user_epsilon=3.0, update_clip=0.1)
    strategy, records, _ = run(cfg, RecordingGrid(3))
    for n, r in enumerate(records, start=1):
        assert 0 < r["epsilon-max"] <= 6.0  # record level: the clients' Opacus accountants
        assert r["user-epsilon"] == pytest.approx(
            opacus_epsilon(strategy.user_dp.plan.noise_multiplier, 1.0, n, cfg.user_delta), rel=1e-9)
    assert records[-1]["user-epsilon"] <= 3.0 and records[0]["epsilon-max"] < records[1]["epsilon-max"]


def test_cohorts_are_poisson_samples_at_the_accountants_rate(tiny_cfg):
    cfg = tiny_cfg.replace(clients=6, clients_per_round=2, rounds=5, epsilon=math.inf, user_epsilon=8.0,
                           max_train_examples=360)
    grid = RecordingGrid(6)
    strategy, records, states = run(cfg, grid)
    rng = np.random.default_rng(cfg.seed)
    expected = [userdp.poisson_cohort(rng, list(range(6)), 2 / 6) for _ in range(5)]
    assert [r["cohort"] for r in records] == [len(c) for c in expected]
    assert strategy.user_dp.plan.sample_rate == pytest.approx(1 / 3)
    assert len({len(c) for c in expected}) > 1  # cohort sizes vary
    # an empty cohort (round 5 with this seed) still releases noise, and is accounted
    empty = [i for i, c in enumerate(expected) if not c]
    assert empty and all(records[i]["clients-replied"] == 0 for i in empty)
    for i in empty:
        assert any(not torch.equal(states[i][k], states[i + 1][k]) for k in states[i])
        assert records[i]["user-epsilon"] > records[i - 1]["user-epsilon"]
    assert records[-1]["user-epsilon"] <= 8.0


def test_deployed_cohorts_and_noise_are_not_predictable_from_the_seed(tiny_cfg):
    """A deployment (clients keep their own state) draws cohorts and noise from the OS: two
    servers of one config sample differently, and neither as the seed would."""
    cfg = tiny_cfg.replace(clients=600, clients_per_round=200, rounds=2, epsilon=math.inf, user_epsilon=8.0)
    draws = [userdp.poisson_cohort(LoRAStrategy(cfg).rng, range(600), 1 / 3) for _ in range(2)]
    seeded = userdp.poisson_cohort(np.random.default_rng(cfg.seed), range(600), 1 / 3)
    assert draws[0] != draws[1] and seeded not in draws
    assert LoRAStrategy(cfg).user_dp.seed is None
    simulated = LoRAStrategy(cfg, client_states={})  # a simulation reproduces from its seed
    assert userdp.poisson_cohort(simulated.rng, range(600), 1 / 3) == seeded and simulated.user_dp.seed == cfg.seed


def inflate(node, reply):
    if node == 100:
        arrays = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord({k: v * 50 for k, v in arrays.items()})
    return reply


def test_a_client_that_oversteps_the_clip_is_rejected_under_client_placement(tiny_cfg, caplog):
    cfg = tiny_cfg.replace(rounds=1, epsilon=math.inf, user_epsilon=4.0, update_clip=0.05, clip_placement="client")
    _, records, _ = run(cfg, RecordingGrid(3, tamper=inflate))
    assert records[0]["clients-replied"] == 2 and records[0]["clients-failed"] == 1
    assert "exceeds update-clip" in caplog.text


def test_adaptive_clipping_with_clients_clipping_their_own_updates(tiny_cfg, tmp_path, monkeypatch):
    """Clients report whether they were within the clip; the server moves the clip with the
    noisy count. A noise cohort of 1,000 sizes the count's noise so that the plan is possible."""
    cfg = tiny_cfg.replace(rounds=3, epsilon=math.inf, user_epsilon=4.0, update_clip=1e-4, clip_placement="client",
                           adaptive_clip=True, noise_cohort_size=1000)
    monkeypatch.setenv("FEDORTHO_SIMULATION", "1")  # a noise cohort is for simulations, as `fedortho simulate` sets
    grid = RecordingGrid(3)
    strategy, records, _ = run(cfg, grid, client_states=ClientStates(tmp_path / "states"))
    bits = [metrics["update-within-clip"] for pairs in grid.pairs.values() for _, _, metrics in pairs]
    assert bits and all(b == 0 for b in bits)  # a tiny clip: every update was above it
    clips = [r["update-clip"] for r in records]
    assert clips[0] == 1e-4 and clips == sorted(clips) and clips[-1] > clips[0]  # the clip grows
    assert grid.clip_sent[:3] == [1e-4] * 3
    assert strategy.user_dp.plan.simulated_population
    assert strategy.user_dp.rounds == 3 and strategy.state_dict()["user-dp"]["privacy"]["history"]


def test_a_deployment_refuses_a_noise_cohort(tiny_cfg):
    """Noise sized for cohorts of 1,000 on a deployment's real cohorts of 3 would report, for
    real users, an epsilon the noise does not give: only a simulation may size it so."""
    cfg = tiny_cfg.replace(epsilon=math.inf, user_epsilon=4.0, adaptive_clip=True, noise_cohort_size=1000)
    with pytest.raises(ConfigError, match="noise-cohort-size .* is for simulations only"):
        LoRAStrategy(cfg)


def test_a_rejected_update_under_user_dp_is_a_zero_contribution_not_a_stop(tiny_cfg):
    """Whether later rounds exist must not depend on one user's update: with min-clients equal
    to the cohort, a rejected reply stops a run without user-level DP and not one with it."""
    cfg = tiny_cfg.replace(rounds=2, epsilon=math.inf, user_epsilon=4.0, update_clip=0.05,
                           clip_placement="client", clients=3, clients_per_round=3, min_clients=3)
    _, records, _ = run(cfg, RecordingGrid(3, tamper=inflate))
    assert [r["clients-failed"] for r in records] == [1, 1] and len(records) == 2
    with pytest.raises(RunStopped, match="fewer than min-clients=3"):
        run(cfg.replace(user_epsilon=math.inf, clip_placement="server"), RecordingGrid(3, tamper=nan_update))


def nan_update(node, reply):
    if node == 100:
        arrays = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord({k: v * math.nan for k, v in arrays.items()})
    return reply


def test_the_mechanisms_state_resumes(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg.replace(rounds=2, epsilon=math.inf, user_epsilon=4.0, adaptive_clip=True, noise_cohort_size=500)
    monkeypatch.setenv("FEDORTHO_SIMULATION", "1")
    strategy, _, _ = run(cfg, RecordingGrid(3), client_states=ClientStates(tmp_path / "states"))
    resumed = LoRAStrategy(cfg, client_states=ClientStates(tmp_path / "resumed"))
    resumed.load_state_dict(strategy.state_dict())
    assert resumed.user_dp.clip == strategy.user_dp.clip != cfg.update_clip
    assert resumed.user_dp.epsilon == strategy.user_dp.epsilon > 0
