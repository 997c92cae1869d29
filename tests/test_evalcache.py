"""The evaluation cache a sweep's cells share (fedortho.evalcache), against plain evaluation."""

import torch
from torch.utils.data import TensorDataset


def tiny_lora_model(tiny_model_dir):
    from fedortho.config import RunConfig
    from fedortho.worker import build_model

    return build_model(RunConfig(model=tiny_model_dir, max_train_examples=240, max_test_examples=32))


def test_the_evaluation_cache_returns_what_the_evaluation_computes_and_keys_what_it_depends_on(
        tiny_model_dir, tmp_path, monkeypatch):
    from fedortho.evalcache import CACHE_ENV, cached_evaluate, evaluation_key
    from fedortho.lora import adapter_state, load_adapter_state
    from fedortho.train import evaluate

    torch.manual_seed(0)
    model = tiny_lora_model(tiny_model_dir)
    test = TensorDataset(torch.randint(1, 500, (40, 12)), torch.ones(40, 12, dtype=torch.long),
                         torch.randint(0, 2, (40,)))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    fresh = evaluate(model, test, precision="float32")
    assert cached_evaluate(model, test, "float32") == fresh  # stored
    assert cached_evaluate(model, test, "float32") == fresh  # read back
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    key = evaluation_key(model, test, "float32")

    state = adapter_state(model)
    a_names = [k for k in state if "lora_A" in k]
    b_names = [k for k in state if "lora_B" in k]
    assert a_names and b_names and all(not torch.any(state[k]) for k in b_names)  # B = 0 at the start
    other_a = {k: torch.randn_like(state[k]) for k in a_names}
    load_adapter_state(model, {**state, **other_a})
    assert evaluation_key(model, test, "float32") == key  # B = 0: A adds nothing, the key ignores it
    assert evaluate(model, test, precision="float32") == fresh  # and so does the evaluation, exactly
    load_adapter_state(model, {**state, **other_a, b_names[0]: torch.full_like(state[b_names[0]], 0.01)})
    assert evaluation_key(model, test, "float32") != key  # a non-zero product changes the model
    load_adapter_state(model, state)
    head = next(k for k in state if "lora_" not in k)
    load_adapter_state(model, {**state, head: state[head] + 1})
    assert evaluation_key(model, test, "float32") != key
    load_adapter_state(model, state)
    assert evaluation_key(model, test, "bfloat16") != key
    shorter = TensorDataset(*(t[:39] for t in test.tensors))
    assert evaluation_key(model, shorter, "float32") != key
