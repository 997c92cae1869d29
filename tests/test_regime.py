"""Settings of the paper's regime: the zero-shot head, A's scale at round 0, LoRA dropout,
and the scaling identity that ties A's scale to the learning rate and the clip under DP."""

import math

import pytest
import torch

from fedortho.config import ConfigError, RunConfig
from fedortho.rules import aggregate
from fedortho.lora import adapter_state
from fedortho.worker import ClientWork, build_model, run_client_round


def test_zero_shot_head_is_the_scaled_sentence_embedding_of_each_label():
    """Each row of the head is head-scale x the normalized mean-pooled embedding of the label's
    description, as sentence-transformers (an independent implementation) computes it."""
    from sentence_transformers import SentenceTransformer

    from fedortho.heads import EMBEDDED_LABEL_TEXTS
    from fedortho.models import resolve_model_path

    cfg = RunConfig(head_init="zero-shot", head_scale=7.0, train_head=False, max_train_examples=200,
                    max_test_examples=50)
    state = adapter_state(build_model(cfg))
    weight = next(v for k, v in state.items() if k.endswith("classifier.weight"))
    bias = next(v for k, v in state.items() if k.endswith("classifier.bias"))
    reference = SentenceTransformer(resolve_model_path(cfg.model), device="cpu").encode(
        list(EMBEDDED_LABEL_TEXTS), convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(weight, 7.0 * reference.float(), atol=1e-4)
    assert torch.equal(bias, torch.zeros(2))
    # The descriptions are what makes it a classifier: swapped, the logits swap.
    swapped = adapter_state(build_model(cfg.replace(label_texts="a positive review,a negative review")))
    assert torch.allclose(next(v for k, v in swapped.items() if k.endswith("classifier.weight")),
                          weight.flip(0), atol=1e-6)


@pytest.mark.parametrize("values,message", [
    ({"head-init": "pretrained"}, "head-init must be one of"),
    ({"head-init": "zero-shot", "pooling": "model"}, "head-init zero-shot needs pooling=mean"),
    ({"head-scale": 0}, "head-scale must be > 0"),
    ({"init-a-scale": -1}, "init-a-scale must be > 0"),
    ({"lora-dropout": 1.0}, "lora-dropout must be in [0, 1)"),
    ({"eval-every": 0}, "eval-every must be >= 1"),
])
def test_bad_regime_settings_fail_with_one_clear_line(values, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_mapping(values)


def test_label_texts_must_name_every_label(tiny_cfg):
    with pytest.raises(ConfigError, match="one non-empty description per label"):
        build_model(tiny_cfg.replace(head_init="zero-shot", label_texts="only one"))
    from fedortho.heads import label_texts

    with pytest.raises(ConfigError, match="labels are numbers"):  # "0", "1" describe nothing
        label_texts(tiny_cfg, ("0", "1"))
    assert label_texts(tiny_cfg, ("negative", "positive")) == ["negative", "positive"]


def test_init_a_scale_and_lora_dropout(tiny_cfg):
    kaiming = adapter_state(build_model(tiny_cfg))
    scaled = adapter_state(build_model(tiny_cfg.replace(init_a_scale=0.25)))
    ortho = adapter_state(build_model(tiny_cfg.replace(init_a="orthonormal", init_a_scale=0.5)))
    for k in kaiming:
        if "lora_A" in k:
            assert torch.allclose(scaled[k], 0.25 * kaiming[k])
            gram = ortho[k].double() @ ortho[k].double().T
            assert torch.allclose(gram, 0.25 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-6)
        elif "lora_B" in k:
            assert not scaled[k].any()
    model = build_model(tiny_cfg.replace(lora_dropout=0.3))
    dropouts = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in dropouts)


# -- the scaling identity ---------------------------------------------------------------------

C_SCALE = math.sqrt(3.0)  # PEFT's Kaiming-uniform A is about Q / sqrt(3)


def _private_rounds(cfg, state, rounds):
    """``rounds`` rounds of every client, each keeping its accountant history; the final state
    and the diagnostics of every client round."""
    histories = {pid: None for pid in range(cfg.clients)}
    diagnostics = []
    for rnd in range(1, rounds + 1):
        results = []
        for pid in range(cfg.clients):
            result = run_client_round(ClientWork(cfg, pid, cfg.clients, rnd, state, privacy=histories[pid]))
            histories[pid] = result.privacy
            results.append(result)
            diagnostics.append(result.diagnostics)
        state = aggregate(cfg.strategy, state, [r.update for r in results], [r.num_examples for r in results],
                          rnd, cfg.svd_period)
    return state, diagnostics


def _products(state):
    return {k: state[k].double() @ state[k.replace("lora_B", "lora_A")].double() for k in state if "lora_B" in k}


def _relative_gap(p, q):
    return max(float((p[k] - q[k]).norm() / q[k].norm()) for k in p)


@pytest.fixture()
def identity_cfg(tiny_cfg):
    """Private FFA, LoRA matrices only (a trained head would share the clipping norm), with a
    clip at the median per-sample gradient norm so that clipping binds for about half."""
    cfg = tiny_cfg.replace(strategy="ffa", train_head=False, init_a="orthonormal", epsilon=6.0, rounds=3,
                           local_steps=2, lr=2.0, seed=4)
    # One step from B = 0: the per-sample norms before any (noisy) update.
    probe = run_client_round(ClientWork(cfg.replace(clip=1e6, local_steps=1), 0, cfg.clients, 1,
                                        adapter_state(build_model(cfg))))
    return cfg.replace(clip=probe.diagnostics["lora-grad-norm"])


def test_scaled_a_with_rescaled_lr_and_clip_gives_the_same_product(identity_cfg):
    """FFA with A = Q/c at (c^2 lr, C/c) makes the same B·A updates as FFA with A = Q at (lr, C):
    clipping commutes with scale, and the noise multiplier (so epsilon) is the same."""
    cfg, c = identity_cfg, C_SCALE
    start_q = adapter_state(build_model(cfg))
    scaled_cfg = cfg.replace(init_a_scale=1 / c, lr=c * c * cfg.lr, clip=cfg.clip / c)
    start_scaled = adapter_state(build_model(scaled_cfg))
    for k in start_q:
        if "lora_A" in k:
            assert torch.allclose(start_scaled[k], start_q[k] / c, atol=1e-7)
    q_state, q_diag = _private_rounds(cfg, start_q, cfg.rounds)
    s_state, s_diag = _private_rounds(scaled_cfg, start_scaled, cfg.rounds)
    # Clipping really binds, equally in both runs, and B moved away from 0.
    fractions = [d["clipped-fraction"] for d in q_diag]
    assert 0 < sum(fractions) / len(fractions) < 1
    assert fractions == pytest.approx([d["clipped-fraction"] for d in s_diag], abs=1e-9)
    p_q, p_s = _products(q_state), _products(s_state)
    assert all(p_q[k].norm() > 0 for k in p_q)
    assert _relative_gap(p_s, p_q) < 1e-4

    # Without rescaling the clip the noise (sigma x clip) is c times too large: not the same.
    wrong_cfg = scaled_cfg.replace(clip=cfg.clip)
    wrong_state, _ = _private_rounds(wrong_cfg, start_scaled, cfg.rounds)
    assert _relative_gap(_products(wrong_state), p_q) > 0.05


def test_fedsvd_from_orthonormal_a0_follows_ffa_under_clipping(identity_cfg, monkeypatch):
    """FedSVD rotates B (and A) by an orthogonal W: per-sample gradient norms, so clipping, are
    unchanged, and FedSVD from an orthonormal A0 gives FFA's B·A. With noise the two agree in
    distribution (the noise on B is isotropic, so rotated noise is noise of the same law), not
    draw by draw: the draw-by-draw check runs with the noise multiplier set to 0, clipping on."""
    from fedortho import privacy

    cfg = identity_cfg
    start_q = adapter_state(build_model(cfg))
    # Round 1 is trained from the same A by both rules: equal with real noise too.
    ffa_1, _ = _private_rounds(cfg, start_q, 1)
    svd_1, _ = _private_rounds(cfg.replace(strategy="fedsvd"), start_q, 1)
    assert _relative_gap(_products(svd_1), _products(ffa_1)) < 1e-5

    from fedortho import train

    # clipping without noise: a plan of noise multiplier 0, never short of budget
    monkeypatch.setattr(train, "client_plan", lambda cfg, n, state, planner=None:
                        privacy.NoisePlan(0.0, privacy.sample_rate(n, min(cfg.batch_size, n)), cfg.local_steps))
    monkeypatch.setattr(privacy.PrivacyState, "check_next", lambda self, steps, plan=None: 0.0)
    ffa, diag = _private_rounds(cfg, start_q, cfg.rounds)
    svd, _ = _private_rounds(cfg.replace(strategy="fedsvd"), start_q, cfg.rounds)
    assert 0 < sum(d["clipped-fraction"] for d in diag) / len(diag) < 1
    a_key = next(k for k in svd if "lora_A" in k)
    assert not torch.allclose(svd[a_key], ffa[a_key], atol=1e-3)  # FedSVD did rotate A
    assert _relative_gap(_products(svd), _products(ffa)) < 1e-4
