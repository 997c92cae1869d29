"""train-precision bfloat16: the frozen base model under autocast, everything DP does in float32."""

import math
import warnings

import pytest
import torch

from dp_reference import per_sample_gradients, replayed_noise, training_setup
from fedortho import data, privacy
from fedortho.config import ConfigError, RunConfig
from fedortho.diagnostics import GradientDiagnostics
from fedortho.lora import adapter_state, load_adapter_state, set_trainable
from fedortho.rules import trainable_names
from fedortho.train import float32_adapters, forward_backward, train_client
from fedortho.worker import build_model

CPU = torch.device("cpu")
# Per-sample gradient norms under bfloat16 against float32, relative, per tensor. bfloat16
# keeps 8 significant bits (unit roundoff 2**-9 = 2e-3); on the tiny model's batch of 16 the
# largest error over three model seeds was 5.3e-3, for one B (its gradient comes back through
# the whole bfloat16 network: a few roundoffs); the whole per-sample norm, head trained or
# frozen, was within 5e-4 over every example of the three clients. 2e-2 leaves 4x headroom
# and still fails on a real mistake (a wrong cast, a missing scale).
NORM_RTOL = 2e-2


def bfloat16_grad_samples(model, params, batch) -> list[torch.Tensor]:
    """Opacus' per-sample gradients of ``params`` for ``batch``, forward pass in bfloat16."""
    from opacus import GradSampleModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' notes on frozen modules and full backward hooks
        wrapped = GradSampleModule(model)
    try:
        with float32_adapters(model):
            forward_backward(wrapped, batch, CPU, "bfloat16")
        return [p.grad_sample.detach().clone() for p in params]
    finally:
        wrapped._close()


def test_bfloat16_per_sample_gradients_are_float32_and_near_the_float32_ones(tiny_cfg):
    model, _, names, params, batch = training_setup(tiny_cfg, batch_size=16)
    # Independent reference: float32 gradients, one example at a time, no Opacus.
    reference = torch.tensor([[float(g.norm()) for g in grads] for grads in per_sample_gradients(model, params, batch)],
                             dtype=torch.float64)
    grad_samples = bfloat16_grad_samples(model, params, batch)
    assert all(g.dtype == torch.float32 for g in grad_samples)  # Opacus clips these as they are
    norms = torch.stack([g.reshape(len(g), -1).double().norm(dim=1) for g in grad_samples], dim=1)
    relative = (norms - reference).abs() / reference
    assert relative.shape == (16, len(names))
    assert float(relative.max()) < NORM_RTOL
    # bfloat16 really ran: in float32 the two agree to ~1e-7.
    assert float(relative.max()) > 1e-4


def test_a_private_bfloat16_step_is_the_float32_clip_and_noise_of_its_per_sample_gradients(tiny_cfg, monkeypatch):
    """The step train_client takes under bfloat16 equals one computed in float64 from the
    per-sample gradients Opacus saw: clip each to norm <= clip, sum, add the replayed noise."""
    cfg = tiny_cfg.replace(epsilon=6.0, clip=0.05, local_steps=1, train_precision="bfloat16")
    model = build_model(cfg)
    dataset = data.client_dataset(cfg, 0, cfg.clients)
    names = trainable_names(adapter_state(model), "fedsvd", True)
    seen: dict = {}
    monkeypatch.setattr(GradientDiagnostics, "observe", lambda self, grads: seen.update(
        grads={name: g.detach().clone() for name, g in grads.items()}))
    make_private = privacy.make_private

    def recording_make_private(*args):
        engine, wrapped, optimizer, loader = make_private(*args)
        seen.update(optimizer=optimizer, noise_seed=args[-1].initial_seed())
        return engine, wrapped, optimizer, loader

    monkeypatch.setattr(privacy, "make_private", recording_make_private)
    before = adapter_state(model)
    result = train_client(model, dataset, cfg, names, None, seed=3)
    grads, optimizer = seen["grads"], seen["optimizer"]
    assert all(g.dtype == torch.float32 for g in grads.values())
    batch = len(next(iter(grads.values())))
    assert batch > 0

    # Opacus' clip factor, recomputed in float64 from the same per-sample gradients.
    norms = torch.stack([g.reshape(batch, -1).double().norm(dim=1) for g in grads.values()], dim=1).norm(dim=1)
    factors = (cfg.clip / (norms + 1e-6)).clamp(max=1.0)
    assert float(factors.min()) < 1.0  # clipping binds, or the test shows nothing
    assert float((norms * factors).max()) <= cfg.clip
    by_param = {id(p): name for name, p in zip(names, set_trainable(model, names))}
    order = [by_param[id(p)] for p in optimizer.params]  # Opacus draws noise in this order
    noise = dict(zip(order, replayed_noise([grads[n][0] for n in order], result.noise_multiplier * cfg.clip,
                                           seed=seen["noise_seed"])))
    lr = 0.5  # sgd's default
    for name in names:
        clipped_sum = torch.einsum("i,i...->...", factors, grads[name].double())
        expected = before[name].double() - lr * (clipped_sum + noise[name]) / optimizer.expected_batch_size
        assert torch.allclose(result.update[name].double(), expected, atol=1e-6), name
    after = adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in after if "lora_A" in k)  # A stays frozen
    assert all(not torch.equal(after[k], before[k]) for k in after if "lora_B" in k)


@pytest.mark.parametrize("strategy", ["fedavg", "fedsb"])  # A trains; R runs in a hook on A
def test_every_trained_tensor_gets_float32_per_sample_gradients(tiny_cfg, strategy, monkeypatch):
    from fedortho import rules

    cfg = tiny_cfg.replace(strategy=strategy, epsilon=6.0, local_steps=1, train_precision="bfloat16")
    model = build_model(cfg)
    names = rules.rule(strategy).trainable(adapter_state(model), cfg.train_head, 1)
    dtypes = {}
    monkeypatch.setattr(GradientDiagnostics, "observe",
                        lambda self, grads: dtypes.update({name: g.dtype for name, g in grads.items()}))
    train_client(model, data.client_dataset(cfg, 0, cfg.clients), cfg, names, None, seed=2)
    assert set(dtypes) == set(names) and set(dtypes.values()) == {torch.float32}
    assert not any("forward" in vars(m) for m in model.modules())  # the shared model carries nothing on


def test_epsilon_and_noise_do_not_depend_on_the_training_precision(tiny_cfg):
    cfg = tiny_cfg.replace(epsilon=6.0, local_steps=2)
    model = build_model(cfg)
    dataset = data.client_dataset(cfg, 0, cfg.clients)
    names = trainable_names(adapter_state(model), cfg.strategy, cfg.train_head)
    start = adapter_state(model)
    results = {}
    for precision in ("float32", "bfloat16"):
        load_adapter_state(model, start)
        results[precision] = train_client(model, dataset, cfg.replace(train_precision=precision), names, None, seed=4)
    full, mixed = results["float32"], results["bfloat16"]
    assert math.isfinite(full.epsilon) and 0 < full.epsilon <= cfg.epsilon
    assert (mixed.epsilon, mixed.noise_multiplier, mixed.sample_rate, mixed.steps) == \
        (full.epsilon, full.noise_multiplier, full.sample_rate, full.steps)
    assert mixed.privacy.history == full.privacy.history
    # Same batches and noise: the updates differ only by bfloat16's error in the gradients.
    key = next(k for k in names if "lora_B" in k)
    change = (mixed.update[key] - start[key]).norm()
    assert 0 < (mixed.update[key] - full.update[key]).norm() < NORM_RTOL * change


def test_non_private_bfloat16_is_plain_sgd_on_the_bfloat16_gradient(tiny_cfg):
    """epsilon = inf: one full-batch step is SGD on the gradient of the autocast forward pass,
    close to the float32 one, and nothing of the autocast set-up stays on the model."""
    cfg = tiny_cfg.replace(epsilon=math.inf, local_steps=1, lr=0.5, train_precision="bfloat16")
    model, dataset, names, params, _ = training_setup(cfg)
    cfg = cfg.replace(batch_size=len(dataset))

    def gradient(precision):
        model.zero_grad()
        with float32_adapters(model):
            forward_backward(model, dataset.tensors, CPU, precision)
        return torch.cat([p.grad.flatten() for p in params]).double()

    mixed, full = gradient("bfloat16"), gradient("float32")
    assert 0 < (mixed - full).norm() < NORM_RTOL * full.norm()
    before = torch.cat([p.detach().flatten() for p in params]).double()
    model.zero_grad()
    result = train_client(model, dataset, cfg, names, None, seed=1)
    after = torch.cat([result.update[k].flatten() for k in names]).double()
    assert torch.allclose(after, before - cfg.lr * mixed, atol=1e-6)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("value", ["float16", "bf16", ""])
def test_an_unknown_train_precision_is_a_config_error_naming_it(value):
    with pytest.raises(ConfigError, match=f"train-precision must be float32 or bfloat16, got '{value}'"):
        RunConfig.from_mapping({"train-precision": value})
    assert RunConfig.from_mapping({"train-precision": "bfloat16"}).train_precision == "bfloat16"
