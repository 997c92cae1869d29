"""Gradient diagnostics and the per-client privacy record, against hand-worked cases and
per-example gradients computed one example at a time."""

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from dp_reference import clipped_gradient_sum, training_setup
from fedortho import privacy
from fedortho.diagnostics import GradientDiagnostics, squared_norms
from fedortho.train import _forward_loss, train_client
from fedortho.worker import ClientWork, run_client_round


def test_diagnostics_of_a_batch_worked_out_by_hand():
    # Three samples. LoRA gradients (3, 4) | (0, 0) | (6, 8): norms 5, 0, 10.
    # Head gradients (0) | (12) | (0):                    norms 0, 12, 0.
    # Whole norms 5, 12, 10; clip 6 binds for the last two.
    grads = {
        "x.lora_A.weight": torch.tensor([[3.0, 0.0], [0.0, 0.0], [6.0, 0.0]]),
        "x.lora_B.weight": torch.tensor([[[4.0]], [[0.0]], [[8.0]]]),
        "classifier.weight": torch.tensor([[0.0], [12.0], [0.0]]),
    }
    lora, head = squared_norms(grads)
    assert lora.tolist() == [25.0, 0.0, 100.0] and head.tolist() == [0.0, 144.0, 0.0]
    diag = GradientDiagnostics(clip=6.0, has_head=True)
    diag.observe(grads)
    # A second step of one sample: LoRA norm 1 (unclipped), head 0.
    diag.observe({"x.lora_A.weight": torch.tensor([[1.0, 0.0]]), "x.lora_B.weight": torch.zeros(1, 1, 1),
                  "classifier.weight": torch.zeros(1, 1)})
    summary = diag.summary()
    assert summary["clipped-fraction"] == 2 / 4
    assert summary["lora-grad-norm"] == pytest.approx((1 + 5) / 2)   # median of 0, 1, 5, 10
    assert summary["head-grad-norm"] == pytest.approx(0.0)           # median of 0, 0, 0, 12
    assert summary["grad-samples"] == 4
    frozen_head = GradientDiagnostics(clip=6.0, has_head=False)
    assert frozen_head.summary() == {}  # nothing observed
    frozen_head.observe({k: v for k, v in grads.items() if "lora_" in k})
    assert "head-grad-norm" not in frozen_head.summary() and frozen_head.summary()["clipped-fraction"] == 1 / 3


def test_opacus_per_sample_norms_match_one_example_at_a_time(tiny_cfg):
    """The norms the diagnostics read from Opacus' per-sample gradients are those of each
    example's own gradient, and the clipped fraction is the share the reference clips."""
    from torch.utils.data import DataLoader

    model, dataset, names, params, batch = training_setup(tiny_cfg)
    reference = []
    for i in range(len(batch[0])):
        model.zero_grad()
        _forward_loss(model, [t[i:i + 1] for t in batch]).backward()
        lora = sum(float(p.grad.double().pow(2).sum()) for n, p in zip(names, params) if "lora_" in n)
        head = sum(float(p.grad.double().pow(2).sum()) for n, p in zip(names, params) if "lora_" not in n)
        reference.append((math.sqrt(lora), math.sqrt(head)))
    whole = sorted(math.hypot(*r) for r in reference)
    middle = len(whole) // 2
    clip = (whole[middle - 1] + whole[middle]) / 2  # between two norms: half are clipped, none on the edge
    sums, factors = clipped_gradient_sum(model, params, batch, clip)  # clipped one example at a time
    optimizer = torch.optim.SGD(params, lr=0.1)
    _, wrapped, dp_opt, _ = privacy.make_private(model, optimizer, DataLoader(dataset, batch_size=8), 1.0, clip,
                                                 [], torch.Generator().manual_seed(0))
    dp_opt.zero_grad()
    _forward_loss(wrapped, batch).backward()
    grad_samples = {n: p.grad_sample.clone() for n, p in zip(names, params)}
    dp_opt.clip_and_accumulate()  # what Opacus itself clips
    for p, expected in zip(params, sums):
        assert torch.allclose(p.summed_grad.double(), expected, rtol=1e-4, atol=1e-7)
    wrapped._close()
    diag = GradientDiagnostics(clip, has_head=True)
    diag.observe(grad_samples)
    lora, head = squared_norms(grad_samples)
    assert torch.allclose(lora.sqrt(), torch.tensor([r[0] for r in reference], dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(head.sqrt(), torch.tensor([r[1] for r in reference], dtype=torch.float64), rtol=1e-4)
    expected_clipped = sum(f < 1 for f in factors) / len(factors)  # the reference's scale factors
    assert 0 < expected_clipped < 1
    assert diag.summary()["clipped-fraction"] == pytest.approx(expected_clipped)


def test_a_private_round_reports_its_diagnostics(tiny_cfg):
    cfg = tiny_cfg.replace(epsilon=6.0, local_steps=3)
    low = run_client_round(ClientWork(cfg.replace(clip=1e-6), 0, cfg.clients, 1, _initial(cfg)))
    high = run_client_round(ClientWork(cfg.replace(clip=1e6), 0, cfg.clients, 1, _initial(cfg)))
    assert low.diagnostics["clipped-fraction"] == 1.0 and high.diagnostics["clipped-fraction"] == 0.0
    # Same seed: the same Poisson batches, and the same gradients before any step is taken.
    assert low.diagnostics["grad-samples"] == high.diagnostics["grad-samples"] > 0
    assert low.diagnostics["lora-grad-norm"] > 0 and "head-grad-norm" in low.diagnostics
    assert low.steps == 3
    frozen = run_client_round(ClientWork(cfg.replace(train_head=False), 0, cfg.clients, 1, _initial(cfg)))
    assert "head-grad-norm" not in frozen.diagnostics
    plain = run_client_round(ClientWork(cfg.replace(epsilon=math.inf), 0, cfg.clients, 1, _initial(cfg)))
    assert plain.diagnostics == {} and plain.steps == 0  # no per-sample gradients, no DP steps


def _initial(cfg):
    from fedortho.lora import adapter_state
    from fedortho.worker import build_model

    return adapter_state(build_model(cfg))


def test_run_folder_records_each_clients_privacy_and_evaluates_every_n_rounds(tiny_cfg, tmp_path, monkeypatch):
    from test_strategy import LocalGrid

    from server.app import run_federation

    monkeypatch.setenv("FEDORTHO_REPORT_DIAGNOSTICS", "1")
    cfg = tiny_cfg.replace(rounds=5, clients=3, clients_per_round=2, epsilon=6.0, eval_every=2,
                           out=str(tmp_path / "run"))
    summary = run_federation(LocalGrid(3), cfg)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [("test-accuracy" in r) for r in rows] == [True, False, True, False, True, True]
    assert summary["final-round"] == 5 and summary["final-accuracy"] == rows[-1]["test-accuracy"]
    assert 0 <= summary["zero-shot-accuracy"] <= 1  # the embedded labels have descriptions
    records = [json.loads(line) for line in (out / "privacy.jsonl").read_text().splitlines()]
    assert len(records) == 5 * 2
    # A client sampled more often than its noise was planned for sits out, and says so.
    clients = [c for c in records if not c.get("budget-exhausted")]
    assert all(c["epsilon"] <= cfg.epsilon for c in records)
    for partition in range(3):
        mine = [c for c in clients if c["partition"] == partition]
        assert mine  # every client trained at least once: the checks below are not vacuous
        assert [c["participations"] for c in mine] == list(range(1, len(mine) + 1))
        accountant = RDPAccountant()  # rebuilt from what the records say, round by round
        for c in mine:
            assert c["steps"] == cfg.local_steps and 0 < c["sample-rate"] <= 1 and c["noise-multiplier"] > 0
            for _ in range(c["steps"]):
                accountant.step(noise_multiplier=c["noise-multiplier"], sample_rate=c["sample-rate"])
            assert c["epsilon"] == pytest.approx(accountant.get_epsilon(cfg.delta), rel=1e-9)
            assert 0 <= c["clipped-fraction"] <= 1 and c["lora-grad-norm"] > 0 and c["head-grad-norm"] > 0
    for r in rows[1:]:
        here = [c for c in clients if c["round"] == r["round"]]
        assert r["noise-multiplier"] == max(c["noise-multiplier"] for c in here)
        weights = [c["grad-samples"] for c in here]
        expected = sum(c["clipped-fraction"] * w for c, w in zip(here, weights)) / sum(weights)
        assert r["clipped-fraction"] == pytest.approx(expected)
    assert 0 <= summary["clipped-fraction"] <= 1 and summary["noise-multiplier"] > 0


def test_diagnostics_leave_a_node_only_when_it_opts_in(tiny_cfg, monkeypatch):
    from test_strategy import LocalGrid, start

    monkeypatch.delenv("FEDORTHO_REPORT_DIAGNOSTICS", raising=False)
    cfg = tiny_cfg.replace(rounds=1, epsilon=6.0)
    _, _, rounds = start(cfg, LocalGrid(3))
    assert "clipped-fraction" not in rounds[0] and rounds[0]["noise-multiplier"] > 0
    strategy, _, rounds = start(cfg, LocalGrid(3, node_config=lambda i: {"report-diagnostics": i == 1}))
    assert 0 <= rounds[0]["clipped-fraction"] <= 1
    reported = [c["partition"] for c in strategy.last_clients if "clipped-fraction" in c]
    assert reported == [1]


def test_a_rejected_update_leaves_no_privacy_record(tiny_cfg, monkeypatch):
    from test_strategy import LocalGrid, start

    monkeypatch.setenv("FEDORTHO_REPORT_DIAGNOSTICS", "1")
    strategy, _, rounds = start(tiny_cfg.replace(rounds=1, epsilon=6.0), LocalGrid(3, corrupt_node=101))
    assert rounds[0]["clients-failed"] == 1
    assert [c["partition"] for c in strategy.last_clients] == [0, 2]  # partition 1 sent NaNs


def test_two_runs_cannot_write_one_folder(tiny_cfg, tmp_path):
    from fedortho.runs import RunRecorder, folder_in_use

    out = tmp_path / "run"
    first = RunRecorder(tiny_cfg, out, echo=False)
    assert folder_in_use(out)
    with pytest.raises(FileExistsError, match="is being written by another run"):
        RunRecorder(tiny_cfg, out, echo=False)
    first.record({"round": 0, "test-accuracy": 0.5})
    first.finish({"completed": True})
    assert not folder_in_use(out)
    with pytest.raises(FileExistsError, match="already holds files"):
        RunRecorder(tiny_cfg, out, echo=False)  # finished: still not a folder to write into
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]
