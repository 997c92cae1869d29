"""One client's local training (DP-SGD or plain) and evaluation of a classifier."""

from __future__ import annotations

import functools
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedortho import privacy
from fedortho.config import RunConfig
from fedortho.diagnostics import GradientDiagnostics
from fedortho.lora import adapter_modules, adapter_state, set_trainable
from fedortho.optim import build_optimizer
from fedortho.optim.state import export_state, import_state

# Only adapter tensors require gradients, so module inputs never do: Opacus' hooks fire on
# outputs, as intended.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@dataclass
class ClientResult:
    """What a client round produces: the trained tensors and what to report."""

    update: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    epsilon: float  # cumulative over the client's participation; inf without DP
    noise_multiplier: float
    privacy: privacy.PrivacyState | None = None  # after this round (None without DP)
    sample_rate: float = 1.0
    optimizer_state: tuple[dict, dict] = ({}, {})  # export_state's (tensors, scalars)
    steps: int = 0  # DP steps this round (empty Poisson batches included): the accountant's count
    diagnostics: dict[str, float] = field(default_factory=dict)  # GradientDiagnostics.summary(), private runs


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """Independent, reproducible seed for one client in one round."""
    return int(np.random.SeedSequence([seed, server_round, partition_id]).generate_state(1)[0])


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns that no example of the batch uses (inputs are right-padded)."""
    width = max(1, int(attention_mask.sum(dim=1).max()))
    return input_ids[:, :width], attention_mask[:, :width]


def _logits(model, input_ids, attention_mask) -> torch.Tensor:
    input_ids, attention_mask = _trim(input_ids, attention_mask)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def _forward_loss(model, batch, device: torch.device | str = "cpu") -> torch.Tensor:
    input_ids, attention_mask, labels = (t.to(device) for t in batch)
    logits = _logits(model, input_ids, attention_mask)
    return F.cross_entropy(logits.float(), labels)  # in float32 whatever precision the head ran in


# Mixed-precision training (train-precision bfloat16) and what Opacus 1.6 does with it.
# Opacus computes a module's per-sample gradient from what its hooks capture: the module's
# input (activations) and the gradient of its output (backprops). Its nn.Linear sampler
# (grad_sample/linear.py) casts the activations to the backprops' dtype and takes their
# einsum, so ``grad_sample`` has the dtype of the module's output gradient. Under
# ``torch.autocast`` an nn.Linear with float32 weights computes in bfloat16 (PEFT casts the
# LoRA path's input to A's float32; autocast casts it back for the matmul), so that gradient,
# and grad_sample, are bfloat16. DPOptimizer.clip_and_accumulate takes the per-sample norms
# and clip factors of grad_sample as it is, in bfloat16 (8 significant bits), and casts to
# the parameter's dtype only afterwards: on random bfloat16 gradients its clipped gradients
# exceeded the clip by up to 0.6%, which the accountant does not know about. The functorch
# sampler (layers without a hand-written one) re-runs the layer under autocast in the
# activations' dtype whenever that differs from the parameters'. Opacus' mixed precision is
# thus low-precision per-sample gradients, upcast for the step.
# Here the modules that own adapter tensors (LoRA A and B, Fed-SB's R, the head) run with
# autocast disabled on inputs cast to their weights' float32. For those that train, their
# outputs, hence the backprops Opacus captures, and grad_sample are float32 (the activations
# it captured may be bfloat16; it casts them to float32, exactly the values the forward
# used). Norms, clip factors, noise (drawn in the float32 summed gradient's dtype) and the
# optimizer step are float32 too, so every clipped per-sample gradient is within the clip as
# in float32 training and the guarantee is unchanged; only the frozen base model computes in
# bfloat16, which changes the gradients' values, not their bound. Frozen adapter tensors run
# in float32 as well, for accuracy at no cost: in bfloat16 a zero-shot head's logits (scale
# 10) are off by ~2**-9 of their size; on MiniLM running it in float32 halved the per-sample
# norms' error.
# Backward and the optimizer step run outside autocast: Opacus computes grad_sample in
# backward hooks and clips in the step, and under autocast those einsums (and the orthogonal
# optimizers' matmuls) would run in bfloat16.


@contextmanager
def float32_adapters(model: torch.nn.Module) -> Iterator[list[torch.nn.Module]]:
    """While open, the modules of ``model`` that own adapter tensors or trainable ones run
    outside autocast, on inputs cast to their own weights' dtype; yields those modules.
    Nothing stays on the model afterwards (a worker reuses it for other clients)."""
    adapters = {id(m) for m in adapter_modules(model)}
    modules = [m for m in model.modules()
               if id(m) in adapters or any(p.requires_grad for p in m.parameters(recurse=False))]
    for module in modules:
        # A partial, not a closure: a deep copy of the module (Opacus' functorch sampler
        # makes one) then calls the copy, not the original.
        module.forward = functools.partial(_forward_outside_autocast, module)
    try:
        yield modules
    finally:
        for module in modules:
            del module.forward  # the class's forward again


def _forward_outside_autocast(module: torch.nn.Module, *args, **kwargs):
    weight = next(module.parameters(recurse=False))
    args = tuple(a.to(weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    with torch.autocast(weight.device.type, enabled=False):
        return type(module).forward(module, *args, **kwargs)


def forward_backward(model, batch, device: torch.device, precision: str = "float32") -> torch.Tensor:
    """One training forward pass and its backward pass; returns the loss. ``precision``
    "bfloat16" runs the forward pass under bfloat16 autocast: call it inside
    ``float32_adapters(model)``, so that what trains opts out."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        loss = _forward_loss(model, batch, device)
    loss.backward()  # outside autocast (see above)
    return loss


def _batches(loader: DataLoader):
    while True:  # a round is counted in steps, not epochs
        yield from loader


def client_plan(cfg: RunConfig, num_examples: int, state: privacy.PrivacyState,
                planner: privacy.NoisePlanner | None = None) -> privacy.NoisePlan:
    """The client's noise plan: the one in its state, or (first round) one for its whole
    participation at its sample rate, after everything its state has spent before (a node's
    ledger: the plan covers what is left). Raises ``privacy.BudgetTooSmall``, or
    ``privacy.BudgetExhausted`` when earlier runs left too little."""
    if state.plan is not None:
        return state.plan
    rate = privacy.sample_rate(num_examples, min(cfg.batch_size, num_examples))
    steps = cfg.local_steps * privacy.planned_participations(cfg.rounds, cfg.clients, cfg.clients_per_round)
    planner = planner or privacy.NoisePlanner()
    try:
        return planner.plan(cfg.epsilon, cfg.delta, rate, steps, state.history)
    except privacy.BudgetTooSmall as exc:
        if not state.history:
            raise
        raise privacy.BudgetExhausted(f"earlier runs left too little budget: {exc}") from None


def train_client(model: torch.nn.Module, dataset: TensorDataset, cfg: RunConfig, trainable: list[str],
                 state: privacy.PrivacyState | None, seed: int, optimizer_state: tuple[dict, dict] | None = None,
                 planner: privacy.NoisePlanner | None = None) -> ClientResult:
    """Train ``trainable`` adapter tensors of ``model`` for ``cfg.local_steps`` steps.

    With a finite ``cfg.epsilon``: Poisson sampling, per-sample clipping to ``cfg.clip`` and
    Gaussian noise with the multiplier of the client's plan (``client_plan``; ``planner``
    makes it in the first round); raises ``privacy.BudgetExhausted`` (before training) if
    the round would exceed the target. ``state`` is the client's privacy so far (None: a
    fresh budget); the result carries it after this round, with its plan.
    ``optimizer_state`` (from ``fedortho.optim.state.export_state``) resumes the optimizer;
    the result carries its final state. ``cfg.train_precision`` "bfloat16" runs the frozen
    base model under bfloat16 autocast; what trains, and everything DP does to it, stays
    float32.
    """
    n = len(dataset)
    device = next(model.parameters()).device  # batches and noise follow the model
    model.train()
    params = set_trainable(model, trainable)
    named = list(zip(trainable, params))
    optimizer = base_optimizer = build_optimizer(cfg.optimizer, named, cfg.lr, cfg.head_lr, cfg.orthogonalize)
    if optimizer_state is not None:
        import_state(base_optimizer, named, *optimizer_state)
    # Independent streams for dropout, batch sampling and noise.
    streams = np.random.SeedSequence(seed).spawn(3)
    dropout_seed, sampling_seed, noise_seed = (int(child.generate_state(1)[0]) for child in streams)
    torch.manual_seed(dropout_seed)
    data_gen = torch.Generator().manual_seed(sampling_seed)
    loader = DataLoader(dataset, batch_size=min(cfg.batch_size, n), shuffle=not cfg.private, generator=data_gen)
    sigma, rate, wrapped, engine, plan = 0.0, 1.0, model, None, None
    if cfg.private:
        state = state or privacy.PrivacyState(cfg.epsilon, cfg.delta, cfg.clip)
        plan = client_plan(cfg, n, state, planner)
        sigma, rate = plan.noise_multiplier, plan.sample_rate
        state.check_next(cfg.local_steps, plan)
        noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' notes on secure RNG and on frozen modules
            engine, wrapped, optimizer, loader = privacy.make_private(
                model, optimizer, loader, sigma, cfg.clip, state.history, noise_gen)
    losses: list[float] = []
    diagnostics = GradientDiagnostics(cfg.clip, has_head=any("lora_" not in name for name in trainable))
    mixed = cfg.train_precision == "bfloat16"
    try:
        with float32_adapters(model) if mixed else nullcontext():
            batches = _batches(loader)
            for _ in range(cfg.local_steps):
                batch = next(batches)
                if len(batch[0]) == 0:
                    # An empty Poisson batch still releases a noisy step: account for it.
                    engine.accountant.step(noise_multiplier=sigma, sample_rate=rate)
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = forward_backward(wrapped, batch, device, cfg.train_precision)
                if engine is not None:  # per-sample gradients, before the optimizer clips them
                    diagnostics.observe({name: p.grad_sample for name, p in named})
                optimizer.step()
                losses.append(float(loss.detach()))
    finally:
        if engine is not None:
            wrapped._close()  # remove Opacus hooks: the model object is reused by later rounds
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        model.eval()
    after = None
    if engine is not None:
        after = privacy.PrivacyState(cfg.epsilon, cfg.delta, cfg.clip, list(engine.accountant.history), plan)
        epsilon = after.spent()
    else:
        epsilon = math.inf
    state = adapter_state(model)
    return ClientResult(
        optimizer_state=export_state(base_optimizer, named),
        update={k: state[k] for k in trainable}, num_examples=n,
        train_loss=float(np.mean(losses)) if losses else float("nan"), epsilon=epsilon,
        noise_multiplier=sigma, privacy=after, sample_rate=rate,
        steps=cfg.local_steps if engine is not None else 0, diagnostics=diagnostics.summary(),
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 256,
             precision: str = "float32") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``dataset``.

    ``precision="bfloat16"`` runs the forward pass under bfloat16 autocast (about twice as
    fast on CPUs with bf16 instructions); logits are compared and scored in float32.
    """
    model.eval()
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        return _evaluate(model, dataset, batch_size)


def _evaluate(model: torch.nn.Module, dataset: TensorDataset, batch_size: int) -> tuple[float, float]:
    correct, loss_sum = 0, 0.0
    # Batches of similar length waste little compute on padding.
    order = torch.argsort(dataset.tensors[1].sum(dim=1), stable=True)
    by_length = TensorDataset(*(t[order] for t in dataset.tensors))
    for input_ids, attention_mask, labels in DataLoader(by_length, batch_size=batch_size):
        logits = _logits(model, input_ids, attention_mask).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    n = len(dataset)
    return correct / n, loss_sum / n
