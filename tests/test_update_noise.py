"""The noise analysis of optimizer updates (``fedortho.update_noise``): its clipped per-sample
gradients against one example at a time, its rounds against SGD's closed form, and its
expected-update estimates against known means."""

import math

import pytest
import torch

from dp_reference import clipped_gradient_sum, training_setup
from fedortho.update_noise import (NoiseSetting, _expected_cosine, _mean_norm, clipped_per_sample_gradients,
                                   compare_optimizers, round_update, sampled_rounds, top_direction_share)


def test_clipped_per_sample_gradients_sum_to_the_one_at_a_time_reference(tiny_cfg):
    model, dataset, names, params, batch = training_setup(tiny_cfg, batch_size=12)
    model.eval()  # the caller's state, restored afterwards
    norms = []
    for i in range(len(batch[0])):
        sums, _ = clipped_gradient_sum(model, params, [t[i:i + 1] for t in batch], clip=1e9)  # unclipped
        norms.append(float(torch.cat([s.flatten() for s in sums]).norm()))
    clip = sorted(norms)[len(norms) // 2]  # about half of the examples are clipped
    expected, factors = clipped_gradient_sum(model, params, batch, clip)
    assert 0 < sum(f < 1 for f in factors) < len(factors)
    subset = torch.utils.data.TensorDataset(*batch)
    pool = clipped_per_sample_gradients(model, subset, names, clip, batch_size=5)  # batches of 5, 5, 2
    for name, want in zip(names, expected):
        assert pool[name].shape == (12, *want.shape)
        assert torch.allclose(pool[name].double().sum(dim=0), want, rtol=1e-4, atol=1e-7)
    whole = torch.sqrt(sum(g.reshape(12, -1).double().pow(2).sum(dim=1) for g in pool.values()))  # by hand
    assert float(whole.max()) <= clip * (1 + 1e-5) and pool[names[0]].dtype == torch.float32
    assert all(p.requires_grad for p in params) and not model.training  # left as it was found
    assert all(p.grad is None for p in params)


def test_an_sgd_round_is_minus_the_rate_times_the_summed_gradients():
    gen = torch.Generator().manual_seed(0)
    steps = [{"x.lora_B.weight": torch.randn(6, 3, generator=gen, dtype=torch.float64)} for _ in range(5)]
    update = round_update("sgd", 0.3, steps)["x.lora_B.weight"]
    expected = -0.3 * sum(s["x.lora_B.weight"] for s in steps)
    assert torch.allclose(update.double(), expected, atol=1e-6)
    muon = round_update("muon", 0.02, steps)["x.lora_B.weight"]
    assert not torch.allclose(muon.double() / muon.norm(), expected / expected.norm(), atol=1e-2)


def test_expected_update_estimates_remove_the_noise_bias():
    """Samples around two known means at a cosine of 0.6, with noise 20 times each mean's norm
    per sample: a plain cosine of the sample means is shrunk towards 0, the estimate is not."""
    gen = torch.Generator().manual_seed(1)
    dim, draws = 20000, 256
    a = torch.zeros(dim, dtype=torch.float64)
    b = torch.zeros(dim, dtype=torch.float64)
    a[0], b[0], b[1] = 1.0, 0.6, 0.8
    noise = 20.0 / math.sqrt(dim)  # per coordinate: noise norm 20
    xs = a + noise * torch.randn(draws, dim, generator=gen, dtype=torch.float64)
    ys = b + noise * torch.randn(draws, dim, generator=gen, dtype=torch.float64)
    assert _mean_norm(xs) == pytest.approx(1.0, rel=0.1)
    assert _expected_cosine(xs, ys) == pytest.approx(0.6, abs=0.1)
    plain = float(torch.nn.functional.cosine_similarity(xs.mean(0), ys.mean(0), dim=0))
    assert plain < 0.4
    # Correlated stacks, as a noisy and a clean round on the same batches: sharing a draw's
    # noise must not lift the estimate. A stack against itself has cosine 1.
    assert _expected_cosine(xs, xs) == pytest.approx(1.0, abs=0.1)
    shared = xs + 0.5 * noise * torch.randn(draws, dim, generator=gen, dtype=torch.float64)
    assert _expected_cosine(xs, shared) == pytest.approx(1.0, abs=0.1)


def test_sgd_round_snr_matches_its_closed_form():
    """Every example has the same clipped gradient G, so a round's clean update is
    -lr * steps * G and its noise -lr * (sum of steps noises): SNR = sqrt(steps) ||G|| / (std sqrt(P))."""
    gen = torch.Generator().manual_seed(2)
    def spread_spectrum(rows):  # singular values 1 and 0.1: orthogonalizing it changes its direction
        u, _ = torch.linalg.qr(torch.randn(rows, 2, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(8, 2, generator=gen))
        return u @ torch.diag(torch.tensor([1.0, 0.1])) @ v.T

    g = {"x.lora_B.weight": spread_spectrum(64), "y.lora_B.weight": spread_spectrum(32)}
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
    g = {k: t / norm for k, t in g.items()}  # ||G|| = 1 <= clip
    pool = {k: t.expand(40, *t.shape).clone() for k, t in g.items()}
    setting = NoiseSetting(noise_multiplier=1.0, clip=4.0, batch_size=8, steps=10, draws=64)
    std, size = 1.0 * 4.0 / 8, 64 * 8 + 32 * 8
    result = compare_optimizers(pool, {"sgd": 0.1, "muon": 0.02}, setting, seed=0)
    expected = math.sqrt(10) / (std * math.sqrt(size))
    assert result["sgd"]["round-snr"] == pytest.approx(expected, rel=0.15)
    assert 0 < abs(result["sgd"]["round-snr"] - expected) < 3 * result["sgd"]["round-snr-se"]  # an honest error bar
    assert result["sgd"]["clean-vs-gradient"] == pytest.approx(1.0, abs=1e-9)
    assert result["sgd"]["mean-vs-gradient"] == pytest.approx(1.0, abs=0.1)
    # Muon's noise-free round orthogonalizes G: not the gradient's direction
    assert result["muon"]["clean-vs-gradient"] < 0.95
    quiet = compare_optimizers(pool, {"muon": 0.02}, NoiseSetting(0.0, 4.0, 8, 10, 4), seed=0)
    assert quiet["muon"]["mean-vs-clean"] == pytest.approx(1.0, abs=1e-6)  # no noise: the same rounds
    with pytest.raises(ValueError, match="draws must be even"):
        compare_optimizers(pool, {"sgd": 0.1}, NoiseSetting(1.0, 4.0, 8, 10, 5))


def test_top_direction_share_of_rank_one_and_flat_gradients():
    u, v = torch.randn(10, 1), torch.randn(1, 4)
    rank_one = {"x.lora_B.weight": (u @ v).expand(3, 10, 4).clone()}
    assert top_direction_share(rank_one) == pytest.approx(1.0)
    flat = {"x.lora_B.weight": torch.eye(10)[:, :4].expand(3, 10, 4).clone()}
    assert top_direction_share(flat) == pytest.approx(0.25)


def test_rounds_divide_as_opacus_divides():
    """Opacus' Poisson loader divides the clipped sum, and scales the noise, by its expected
    batch size int(n / len(loader)): 15 for 5,123 examples in batches of 16."""
    setting = NoiseSetting.as_opacus(0.5, 2.0, 16, steps=1, draws=2, num_examples=5123)
    assert (setting.batch_size, setting.divisor) == (16, 15)
    assert NoiseSetting.as_opacus(0.5, 2.0, 16, 1, 2, num_examples=160).divisor == 16
    pool = {"x.lora_B.weight": torch.ones(40, 3, 2)}
    (clean, noisy), _ = list(sampled_rounds(pool, setting, seed=0))
    assert torch.allclose(clean[0]["x.lora_B.weight"], torch.full((3, 2), 16 / 15, dtype=torch.float64))
    noise = noisy[0]["x.lora_B.weight"] - clean[0]["x.lora_B.weight"]
    big = NoiseSetting(0.5, 2.0, 16, steps=400, draws=2, divisor=15)
    draws = torch.stack([n["x.lora_B.weight"] - c["x.lora_B.weight"]
                         for c, n in zip(*next(iter(sampled_rounds(pool, big, seed=1))))])
    assert float(draws.std()) == pytest.approx(0.5 * 2.0 / 15, rel=0.05)  # 2,400 numbers
    assert noise.abs().max() > 0
