"""LoRA adapters through PEFT: attach, read and write A/B/head, freeze rules, save.

Adapter tensors are named as in ``peft.get_peft_model_state_dict`` (for example
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` and
``base_model.model.classifier.weight``), which is also the on-disk PEFT format.

Rules that fold updates into the frozen weights (FedEx-LoRA, FLoRA) give every LoRA layer
one more tensor, ``<layer>.lora_folded.weight`` (out, in): what has been folded, in the
units of B·A, so that the layer's frozen weight is ``W0 + (alpha / r) * folded``. It is part
of the adapter state like A and B (sent, aggregated, checkpointed, saved beside the PEFT
adapter), and ``load_adapter_state`` applies it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import torch

from fedortho.config import ConfigError, RunConfig
from fedortho import rules
from fedortho.rules import FOLDED, MIDDLE

Tensors = dict[str, torch.Tensor]

FOLDED_FILE = "folded.safetensors"  # beside a saved PEFT adapter whose run folded updates


def attach_lora(base: torch.nn.Module, cfg: RunConfig, seed: int) -> torch.nn.Module:
    """Wrap ``base`` with LoRA adapters (B = 0, A drawn from ``seed``) and a trainable head copy,
    laid out as the run's aggregation rule needs: with a folded update per LoRA layer (zero)
    for the rules that fold, with B, R and A from the pretrained weight for ``fedsb``."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.targets,
    )
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a transformers deprecation PEFT triggers
            model = get_peft_model(base, config)
    except ValueError as exc:
        raise ConfigError(f"lora-targets '{cfg.lora_targets}': {exc}") from exc
    state = adapter_state(model)
    for name, a in state.items():  # FedSVD needs r orthonormal rows: r <= min(in, out)
        if "lora_A" in name and cfg.lora_r > min(a.shape[1], state[name.replace("lora_A", "lora_B")].shape[0]):
            raise ConfigError(f"lora-r {cfg.lora_r} exceeds the dimensions of '{name.rsplit('.lora_A', 1)[0]}'")
    if cfg.init_a == "orthonormal" or cfg.init_a_scale != 1.0:
        # orthonormal: same row space, orthonormal rows (FedSVD's A after a round)
        load_adapter_state(model, {k: cfg.init_a_scale * _initial_a(v, cfg.init_a)
                                   for k, v in state.items() if "lora_A" in k})
    rule = rules.rule(cfg.strategy)
    if rule.middle:
        for layer in _lora_layers(model).values():
            _add_middle(layer)
    if rule.folds:
        for layer in _lora_layers(model).values():
            _enable_folding(layer)
    model.eval()  # training switches to train mode (the base model's dropout) and back
    return model


def _initial_a(a: torch.Tensor, init: str) -> torch.Tensor:
    if init == "orthonormal":
        return torch.linalg.qr(a.double().T)[0].T.to(a.dtype).contiguous()
    return a


def adapter_state(model: torch.nn.Module) -> Tensors:
    """All adapter tensors (A, B and, with a SEQ_CLS task, the head), detached copies in host
    memory (also of a model trained on a GPU: they are sent, aggregated and saved)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    for key, layer in _lora_layers(model).items():
        if hasattr(layer, "fedortho_folded"):
            state[key] = layer.fedortho_folded.to("cpu", copy=True)
    return state


def load_adapter_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Write (some of) the adapter tensors into ``model`` in place; unknown names are an error."""
    params = _adapter_params(model)
    layers = _lora_layers(model)
    for name, value in state.items():
        if name in layers and hasattr(layers[name], "fedortho_folded"):
            _fold(layers[name], value)
            continue
        if name not in params:
            raise KeyError(f"'{name}' is not an adapter tensor of this model")
        target = params[name]
        if target.shape != value.shape:
            raise ValueError(f"'{name}' has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The LoRA layers of ``model`` by the name of their folded tensor."""
    from peft.tuners.lora import LoraLayer

    return {f"{name}.{FOLDED}.weight": module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def _add_middle(layer: torch.nn.Module, from_weight: bool = True) -> None:
    """Fed-SB's layout: the update is B R A with B and A frozen and R (r x r) trained. R sits
    between PEFT's A and B (applied to A's output by a forward hook; its state key is
    ``<layer>.lora_R.weight``) and starts at 0, so the model starts as the pretrained one.
    ``from_weight``: B and A are the top-r singular vectors of the pretrained weight W0
    (B = U_r, A = V_r^T): a subspace chosen without data (see ``rules`` on Fed-SB)."""
    a_module, b_module = layer.lora_A["default"], layer.lora_B["default"]
    r = a_module.weight.shape[0]
    if from_weight:
        w0 = layer.get_base_layer().weight.detach().double()
        u, _, vh = torch.linalg.svd(w0, full_matrices=False)
        with torch.no_grad():
            b_module.weight.copy_(u[:, :r].to(b_module.weight.dtype))
            a_module.weight.copy_(vh[:r].to(a_module.weight.dtype))
    middle = torch.nn.Linear(r, r, bias=False, dtype=a_module.weight.dtype, device=a_module.weight.device)
    torch.nn.init.zeros_(middle.weight)
    layer.lora_R = torch.nn.ModuleDict({"default": middle})
    a_module.register_forward_hook(lambda module, inputs, output: middle(output))


def _enable_folding(layer: torch.nn.Module) -> None:
    """Keep the layer's pretrained weight (shared read-only) to fold updates onto; nothing is
    folded yet."""
    weight = layer.get_base_layer().weight
    layer.fedortho_w0 = weight.data
    layer.fedortho_folded = torch.zeros_like(weight.data)


def _fold(layer: torch.nn.Module, folded: torch.Tensor) -> None:
    """Make the layer's frozen weight ``W0 + scaling * folded`` (W0 itself is never written:
    it is the model file's shared pages)."""
    weight = layer.get_base_layer().weight
    w0 = layer.fedortho_w0.to(weight.device)  # a copy only if the model moved to a GPU
    if tuple(folded.shape) != tuple(w0.shape):
        raise ValueError(f"folded update has shape {tuple(folded.shape)}, the layer expects {tuple(w0.shape)}")
    layer.fedortho_folded = folded.detach().to(weight.device, weight.dtype, copy=True)
    weight.data = w0 if not folded.any() else w0 + layer.scaling["default"] * layer.fedortho_folded


def set_trainable(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter except the adapter tensors in ``names``; return those, in order."""
    params = _adapter_params(model)
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = []
    for name in names:
        params[name].requires_grad_(True)
        chosen.append(params[name])
    return chosen


def save_adapter(model: torch.nn.Module, folder: str | Path) -> Path:
    """Save in PEFT format, loadable with ``PeftModel.from_pretrained(base, folder)``; a model
    with folded updates also writes them beside it (``FOLDED_FILE``): ``load_adapter`` reads
    both."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.save_pretrained(folder)
    folded = {k: v for k, v in adapter_state(model).items() if FOLDED in k}
    if folded:
        save_file({k: v.contiguous() for k, v in folded.items()}, str(folder / FOLDED_FILE))
    return folder


def load_adapter(base: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """The model a run saved: ``base`` (the run's base model) with the PEFT adapter in
    ``folder`` and, if the run folded updates into the frozen weights, those as well."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fed-SB's R is not PEFT's: loaded below
        model = PeftModel.from_pretrained(base, str(folder))
    saved = load_file(str(folder / "adapter_model.safetensors"))
    if any(MIDDLE in k for k in saved):
        layers = _lora_layers(model)
        for layer in layers.values():
            _add_middle(layer, from_weight=False)
        load_adapter_state(model, {k: v for k, v in saved.items() if MIDDLE in k})
    if (folder / FOLDED_FILE).exists():
        layers = _lora_layers(model)
        for name, folded in load_file(str(folder / FOLDED_FILE)).items():
            if name not in layers:
                raise KeyError(f"{folder / FOLDED_FILE}: '{name}' is not a LoRA layer of this model")
            _enable_folding(layers[name])
            _fold(layers[name], folded)
    model.eval()
    return model


def adapter_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that own adapter tensors (LoRA A, B and R, the head), trained or not."""
    owned = {id(p) for p in _adapter_params(model).values()}
    return [m for m in model.modules() if any(id(p) in owned for p in m.parameters(recurse=False))]


def _adapter_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Map PEFT state-dict names to the live parameters they are read from."""
    from peft import get_peft_model_state_dict

    by_id = {id(p): p for p in model.parameters()}
    live = dict(model.named_parameters())
    names = get_peft_model_state_dict(model).keys()
    out = {}
    for name in names:
        # PEFT drops the adapter name ("default") and, for the head, the wrapper prefix.
        candidates = [
            name.replace(".weight", ".default.weight").replace(".bias", ".default.bias"),
            name.replace("classifier.", "classifier.modules_to_save.default."),
            name.replace("score.", "score.modules_to_save.default."),
            name,
        ]
        for c in candidates:
            if c in live and id(live[c]) in by_id:
                out[name] = live[c]
                break
        else:
            raise KeyError(f"cannot locate parameter for adapter tensor '{name}'")
    return out
