"""A zero-shot classification head from the model's own embeddings of label descriptions.

A head drawn at random (std 0.02 on a mean-pooled MiniLM embedding) passes the LoRA
matrices almost no gradient, and a head trained on private data costs privacy. A head
whose row for each label is the normalized mean-pooled embedding of a short description
of that label ("a negative review", "a positive review") costs no privacy (it uses no
client data) and already classifies: it is the zero-shot baseline every run is read
against, and a sensible frozen head for training the LoRA matrices alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fedortho.config import ConfigError, RunConfig

# Descriptions of the embedded dataset's labels, in label order (0 = rotten, 1 = fresh).
EMBEDDED_LABEL_TEXTS = ("a negative review", "a positive review")


def label_texts(cfg: RunConfig, label_names: Sequence[str]) -> list[str]:
    """The descriptions of the labels, in label order: ``label-texts`` if given, else the
    embedded dataset's own, else the dataset's label names."""
    if cfg.label_texts:
        texts = [t.strip() for t in cfg.label_texts.split(",")]
    elif tuple(label_names) == ("rotten", "fresh"):
        texts = list(EMBEDDED_LABEL_TEXTS)
    elif any(str(name).strip().lstrip("-").isdigit() for name in label_names):
        raise ConfigError("the dataset's labels are numbers, not descriptions: give label-texts "
                          "(e.g. --label-texts \"a negative review,a positive review\")")
    else:
        texts = [str(name) for name in label_names]
    if len(texts) != len(label_names) or not all(texts):
        raise ConfigError(f"label-texts needs one non-empty description per label ({len(label_names)}: "
                          f"{', '.join(map(str, label_names))}), got {len(texts)}")
    return texts


@torch.no_grad()
def mean_pooled_embeddings(model: torch.nn.Module, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """(len(texts), hidden): the masked mean of the encoder's last hidden states, unit norm.

    ``model`` is a mean-pooled BERT classifier (``fedortho.models.mean_pooled_bert_class``),
    with or without PEFT's wrapper; its LoRA adapters (B = 0 at the start) are used as they are.
    """
    encoder = _encoder(model)
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    was_training = model.training
    model.eval()
    try:
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    finally:
        model.train(was_training)
    weights = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def zero_shot_head(model: torch.nn.Module, tokenizer, texts: Sequence[str], scale: float) -> dict[str, torch.Tensor]:
    """Weight (num_labels, hidden) = ``scale`` x the unit embeddings of ``texts``; bias 0.

    The logit of label k is ``scale`` times the projection of the pooled input on the
    description of k: the argmax is the label whose description is most similar (cosine).
    """
    weight = scale * mean_pooled_embeddings(model, tokenizer, texts)
    return {"weight": weight, "bias": torch.zeros(weight.shape[0])}


def set_head(model: torch.nn.Module, head: dict[str, torch.Tensor]) -> None:
    """Write ``head`` into the classifier's weight and bias (every copy PEFT keeps of it)."""
    layers = [m for name, m in model.named_modules()
              if name.endswith("classifier") or name.endswith("classifier.original_module")
              or name.endswith("classifier.modules_to_save.default")]
    layers = [m for m in layers if isinstance(m, torch.nn.Linear)]
    if not layers:
        raise ConfigError("head-init zero-shot needs a model with a linear 'classifier' head (pooling=mean)")
    for layer in layers:
        if layer.weight.shape != head["weight"].shape:
            raise ConfigError(f"zero-shot head has shape {tuple(head['weight'].shape)}, the classifier "
                              f"{tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight.copy_(head["weight"])
            layer.bias.copy_(head["bias"])


def _encoder(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if hasattr(module, "bert") and hasattr(module, "classifier"):
            return module.bert
    raise ConfigError("head-init zero-shot needs a BERT model with pooling=mean")
