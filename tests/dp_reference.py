"""Hand-made DP-SGD pieces for tests: per-sample gradients one example at a time, clipped in
float64, and Opacus' noise replayed from the same generator."""

import torch

from fedortho.train import _forward_loss


def per_sample_gradients(model, params, batch):
    """Per example, the float64 copies of ``params``' gradients, one backward pass each."""
    per_sample = []
    for i in range(len(batch[0])):
        model.zero_grad()
        _forward_loss(model, [t[i:i + 1] for t in batch]).backward()
        per_sample.append([p.grad.detach().double().clone() for p in params])
    return per_sample


def clipped_gradient_sum(model, params, batch, clip):
    """Per parameter: sum over examples of the gradient scaled to total norm <= clip.

    Also returns the per-example scale factors (below 1 where clipping bound)."""
    per_sample = per_sample_gradients(model, params, batch)
    factors = [min(1.0, clip / float(torch.cat([g.flatten() for g in gs]).norm())) for gs in per_sample]
    sums = [sum(f * gs[j] for f, gs in zip(factors, per_sample)) for j in range(len(params))]
    return sums, factors


def replayed_noise(params, std, seed):
    """The Gaussian noise Opacus adds to each parameter, drawn in parameter order."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.normal(0.0, std, size=p.shape, generator=gen).double() for p in params]


def training_setup(cfg, batch_size=8):
    """A fresh model in train mode with its FedSVD trainables, client 0's data and a fixed batch."""
    from fedortho import data
    from fedortho.lora import adapter_state, set_trainable
    from fedortho.rules import trainable_names
    from fedortho.worker import build_model

    model = build_model(cfg)
    model.train()
    dataset = data.client_dataset(cfg, 0, cfg.clients)
    names = trainable_names(adapter_state(model), "fedsvd", True)
    params = set_trainable(model, names)
    return model, dataset, names, params, [t[:batch_size] for t in dataset.tensors]
