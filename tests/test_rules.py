"""The aggregation-rule registry: one entry makes a rule usable everywhere."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedortho import rules
from fedortho.config import ConfigError, RunConfig
from fedortho.fedsvd import AggregationError

TOY_RULE = textwrap.dedent('''
    """A rule from outside fedortho: FedAvg of A and B, logging what it combines."""
    import json
    import os

    from fedortho.rules import Rule, every_round, mean_of_trained


    def combine(replies):
        with open(os.environ["TOY_RULE_LOG"], "a") as log:
            log.write(json.dumps({"round": replies.server_round, "replies": len(replies.updates),
                                  "keys": sorted(replies.updates[0])}) + "\\n")
        return mean_of_trained(replies)


    RULE = Rule("toy", "FedAvg of A and B, logged", combine, factors=every_round("AB"))
''')


def install_toy_rule(folder):
    """A distribution on ``folder`` (put it on PYTHONPATH) that declares the toy rule."""
    (folder / "toyrule.py").write_text(TOY_RULE)
    info = folder / "toyrule-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyrule\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{rules.ENTRY_POINTS}]\ntoy = toyrule:RULE\n")


def test_a_rule_registered_by_a_plug_in_runs_end_to_end_through_the_cli(tmp_path, tiny_model_dir):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    install_toy_rule(plugin)
    log = tmp_path / "combined.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")])),
           "TOY_RULE_LOG": str(log)}
    shown = subprocess.run([sys.executable, "-m", "fedortho.cli", "simulate", "--help"], capture_output=True,
                           text=True, env=env, timeout=120)
    assert "fedsvd | ffa | fedavg" in shown.stdout and "toy" in shown.stdout
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedortho.cli", "simulate", "--strategy", "toy", "--model", tiny_model_dir,
           "--clients", "3", "--clients-per-round", "3", "--rounds", "2", "--local-steps", "2", "--batch-size", "16",
           "--max-train-examples", "240", "--max-test-examples", "64", "--eval-precision", "float32",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["completed"]
    combined = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c["round"], c["replies"]) for c in combined] == [(1, 3), (2, 3)]
    # the clients read the same entry: they trained and sent A, which the rule says they train
    assert any("lora_A" in k for k in combined[0]["keys"]) and any("lora_B" in k for k in combined[0]["keys"])
    # without the plug-in the name is unknown, and says what is known
    bare = subprocess.run(cmd[:-1] + [str(tmp_path / "other")], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in env.items() if k != "PYTHONPATH"})
    assert bare.returncode == 2 and "strategy must be one of fedsvd, ffa, fedavg" in bare.stderr


def test_the_registry_is_the_config_s_choices():
    assert rules.names()[:3] == ("fedsvd", "ffa", "fedavg")
    for name in rules.names():
        assert RunConfig(strategy=name).strategy == name
    with pytest.raises(ConfigError, match="strategy must be one of fedsvd, ffa, fedavg"):
        RunConfig.from_mapping({"strategy": "fedmedian"})
    with pytest.raises(KeyError, match="unknown aggregation rule 'fedmedian'"):
        rules.rule("fedmedian")


def test_a_rule_says_what_clients_train_and_what_they_hold():
    names = ["m.l0.q.lora_A.weight", "m.l0.q.lora_B.weight", "m.classifier.weight", "m.classifier.bias"]
    assert rules.rule("fedsvd").trainable(names, train_head=True) == sorted(names[1:])
    assert rules.rule("fedsvd").held(names, train_head=True) == [names[0]]
    assert rules.rule("ffa").held(names, train_head=False) == sorted([names[0], names[2], names[3]])
    assert rules.rule("fedavg").trainable(names, train_head=False) == sorted(names[:2])
    assert rules.rule("fedavg").held(names, train_head=True) == []
    assert rules.rule("fedsvd").rotates_kept_state and not rules.rule("ffa").rotates_kept_state


def test_registering_checks_names_and_refuses_a_second_rule_of_one_name():
    with pytest.raises(ValueError, match="lower-case word"):
        rules.register(rules.Rule("Fed Median", "x", rules.mean_of_trained))
    with pytest.raises(ValueError, match="a different rule named 'ffa'"):
        rules.register(rules.Rule("ffa", "another", rules.mean_of_trained))
    assert rules.register(rules.rule("ffa")) is rules.rule("ffa")  # the same entry again is harmless


def test_replies_are_validated_before_any_rule_combines_them():
    seen = []
    probe = rules.Rule("probe", "records its calls", lambda replies: seen.append(replies) or dict(replies.global_state))
    rules.register(probe)
    try:
        g = {"l.lora_A.weight": torch.randn(2, 5), "l.lora_B.weight": torch.zeros(4, 2)}
        good = {"l.lora_B.weight": torch.ones(4, 2)}
        bad = [({"l.lora_B.weight": torch.full((4, 2), float("nan"))}, "NaN"),
               ({"l.lora_B.weight": torch.ones(2, 4)}, "shape"),
               ({**good, "l.lora_A.weight": torch.ones(2, 5)}, "must not send held tensors"),
               ({"x.weight": torch.ones(1)}, "unknown to the global model")]
        for update, message in bad:
            with pytest.raises(AggregationError, match=message):
                rules.aggregate("probe", g, [good, update], [1, 1], 1)
        with pytest.raises(AggregationError, match="weights"):
            rules.aggregate("probe", g, [good], [0.0], 1)
        assert not seen
        rules.aggregate("probe", g, [good, good], [1.0, 2.0], 3)
        assert len(seen) == 1 and seen[0].server_round == 3 and seen[0].weights == [1.0, 2.0]
        assert torch.equal(seen[0].mean("l.lora_B.weight"), torch.ones(4, 2))
    finally:
        rules._RULES.pop("probe")


def random_adapters(seed, folds=False, middle=False, layers=(("l0.q", 12, 20), ("l1.v", 9, 20)), r=4):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, out, n_in in layers:
        state[f"{name}.lora_A.weight"] = torch.randn(r, n_in, generator=g)
        state[f"{name}.lora_B.weight"] = torch.randn(out, r, generator=g)
        if folds:
            state[f"{name}.lora_folded.weight"] = torch.randn(out, n_in, generator=g)
        if middle:
            state[f"{name}.lora_R.weight"] = torch.randn(r, r, generator=g)
    state["classifier.weight"] = torch.randn(2, 20, generator=g)
    return state


def client_updates(rule_name, global_state, server_round, seeds=(1, 2, 3)):
    """Each client's trained tensors: random, where the rule trains them."""
    trained = rules.rule(rule_name).trainable(global_state, True, server_round)
    rule = rules.rule(rule_name)
    return [{k: random_adapters(s, rule.folds, rule.middle)[k] for k in trained} for s in seeds]


def mean64(tensors, weights):
    total = sum(weights)
    return sum(t.double() * (w / total) for t, w in zip(tensors, weights))


@pytest.mark.parametrize("name, server_round", [("fedsvd", 1), ("ffa", 1), ("fedavg", 1), ("rolora", 1),
                                                ("rolora", 2), ("fedex", 1), ("flora", 3), ("fedsb", 1)])
def test_each_rule_against_a_float64_reference(name, server_round):
    folds, middle = rules.rule(name).folds, rules.rule(name).middle
    g = random_adapters(0, folds, middle)
    updates = client_updates(name, g, server_round)
    weights = [1.0, 2.0, 5.0]
    new = rules.aggregate(name, g, updates, weights, server_round, seed=7)
    assert sorted(new) == sorted(g)
    assert torch.allclose(new["classifier.weight"].double(), mean64([u["classifier.weight"] for u in updates], weights),
                          atol=1e-6)
    for b_key in (k for k in g if "lora_B" in k):
        a_key, f_key = b_key.replace("lora_B", "lora_A"), b_key.replace("lora_B", "lora_folded")
        r_key = b_key.replace("lora_B", "lora_R")

        def update_of(state):  # a layer's whole update, in units of B A: folded, plus B (R) A
            r = state[r_key].double() if middle else torch.eye(state[a_key].shape[0], dtype=torch.float64)
            return state[b_key].double() @ r @ state[a_key].double() + (state[f_key].double() if folds else 0)

        # each client's model: what it trained, and the global value of what it did not
        exact = mean64([update_of({**g, **u}) for u in updates], weights)
        got = update_of(new)
        if name == "fedavg":  # averages the factors, not their products: not the mean of the products
            expected = mean64([u[b_key] for u in updates], weights) @ mean64([u[a_key] for u in updates], weights)
            assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, exact, atol=1e-2)
        else:  # one factor is the same for every client: the mean of the products, exactly
            assert torch.allclose(got, exact, atol=1e-5), (name, b_key)
        if name in ("ffa", "rolora"):
            untouched = a_key if server_round % 2 else b_key
            assert torch.equal(new[untouched], g[untouched])
        if name == "fedsb":  # B and A never change; R is averaged
            assert torch.equal(new[a_key], g[a_key]) and torch.equal(new[b_key], g[b_key])
        if name == "fedsvd":
            a = new[a_key].double()
            assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5)
        if name == "fedex":  # A and B averaged, the rest folded
            assert torch.allclose(new[b_key].double(), mean64([u[b_key] for u in updates], weights), atol=1e-6)
            assert torch.allclose(new[a_key].double(), mean64([u[a_key] for u in updates], weights), atol=1e-6)
        if name == "flora":  # all folded, and a fresh adapter: B = 0, a new A drawn as PEFT draws one
            assert not new[b_key].any()
            bound = 1 / g[a_key].shape[1] ** 0.5
            assert new[a_key].abs().max() <= bound and new[a_key].std() > bound / 3
            assert all(not torch.allclose(new[a_key], t[a_key]) for t in [g, *updates])
    if name == "flora":  # the fresh A is the seed's and the round's: the same run draws it again
        again = rules.aggregate(name, g, updates, weights, server_round, seed=7)
        other = rules.aggregate(name, g, updates, weights, server_round, seed=8)
        assert all(torch.equal(again[k], new[k]) for k in new)
        assert not torch.equal(other["l0.q.lora_A.weight"], new["l0.q.lora_A.weight"])


def test_rolora_alternates_what_clients_train_and_hold():
    names = ["m.l0.q.lora_A.weight", "m.l0.q.lora_B.weight", "m.classifier.weight"]
    rolora = rules.rule("rolora")
    assert rolora.trainable(names, True, 1) == [names[2], names[1]] and rolora.held(names, True, 1) == [names[0]]
    assert rolora.trainable(names, True, 2) == sorted([names[0], names[2]]) and rolora.held(names, True, 2) == [names[1]]
    assert rolora.trainable(names, False, 3) == [names[1]]
    with pytest.raises(AggregationError, match="must not send held tensors"):  # B in an A round
        rules.aggregate("rolora", random_adapters(0), client_updates("rolora", random_adapters(0), 1), [1, 1, 1], 2)
    with pytest.raises(ConfigError, match="optimizer-state keep is not available with strategy rolora"):
        RunConfig(strategy="rolora", optimizer_state="keep")


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    from fedortho.synthetic import write_synthetic_dataset

    return str(write_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "data", train_rows=600, test_rows=200))


@pytest.mark.parametrize("name", ["fedsvd", "ffa", "fedavg", "rolora", "fedex", "flora", "fedsb"])
def test_a_tiny_federation_learns_under_each_rule(name, tiny_cfg, synthetic_dir):
    """Three clients, four rounds, the LoRA matrices alone (under the zero-shot head, frozen)
    on a task a word decides: the test loss falls."""
    import math

    from fedortho import data
    from fedortho.lora import adapter_state, load_adapter_state
    from fedortho.train import evaluate
    from fedortho.worker import ClientWork, build_model, run_client_round

    cfg = tiny_cfg.replace(strategy=name, dataset=synthetic_dir, partitioning="iid", epsilon=math.inf,
                           head_init="zero-shot", label_texts="rotten,fresh", train_head=False, lr=1.0,
                           local_steps=6, rounds=4, max_train_examples=0, max_test_examples=0)
    model = build_model(cfg)
    test = data.test_tensors(cfg)
    start = state = adapter_state(model)
    before = evaluate(model, test, precision="float32")[1]
    for rnd in range(1, cfg.rounds + 1):
        results = [run_client_round(ClientWork(cfg, pid, cfg.clients, rnd, state)) for pid in range(cfg.clients)]
        state = rules.aggregate(name, state, [r.update for r in results], [r.num_examples for r in results], rnd,
                                seed=cfg.seed)
    load_adapter_state(model, state)
    after = evaluate(model, test, precision="float32")[1]
    assert after < before - 0.15, (before, after)
    changed = {k for k in state if not torch.equal(state[k], start[k])}
    rule = rules.rule(name)
    assert any(("lora_folded" if rule.folds else "lora_R" if rule.middle else "lora_B") in k for k in changed)
    assert any("lora_A" in k for k in changed) == (name not in ("ffa", "fedsb"))


@pytest.mark.parametrize("name", ["fedex", "flora", "fedsb"])
def test_a_rule_s_saved_model_is_the_evaluated_one(name, tiny_cfg, tmp_path):
    """Updates folded into the frozen weights, and Fed-SB's R, travel with the adapter state,
    reach the clients' models, and are saved with the PEFT adapter: reloaded with
    ``load_adapter``, the model scores what the server evaluated."""
    import math

    from fedortho import data
    from fedortho.lora import FOLDED, adapter_state, load_adapter, load_adapter_state, save_adapter
    from fedortho.models import load_classifier
    from fedortho.train import evaluate
    from fedortho.worker import ClientWork, build_model, run_client_round

    cfg = tiny_cfg.replace(strategy=name, epsilon=math.inf, local_steps=2, lr=1.0)
    model = build_model(cfg)
    state = adapter_state(model)
    extra = FOLDED if rules.rule(name).folds else "lora_R"
    assert any(extra in k for k in state) and not any(state[k].any() for k in state if extra in k)
    for rnd in (1, 2):
        results = [run_client_round(ClientWork(cfg, pid, cfg.clients, rnd, state)) for pid in range(cfg.clients)]
        assert not any(FOLDED in k for r in results for k in r.update)  # clients never send a folded update
        state = rules.aggregate(name, state, [r.update for r in results], [r.num_examples for r in results], rnd,
                                seed=cfg.seed)
    assert all(state[k].abs().max() > 0 for k in state if extra in k)
    load_adapter_state(model, state)
    assert all(torch.equal(adapter_state(model)[k], state[k]) for k in state)  # the state round-trips
    test = data.test_tensors(cfg)
    evaluated = evaluate(model, test, precision="float32")
    save_adapter(model, tmp_path / "adapter")
    base = load_classifier(cfg.model, 2, seed=12345, pooling=cfg.pooling)  # another head init: overwritten
    reloaded = load_adapter(base, tmp_path / "adapter")
    assert evaluate(reloaded, test, precision="float32") == evaluated
    # without its folded updates the adapter alone is another model
    from peft import PeftModel

    bare = PeftModel.from_pretrained(load_classifier(cfg.model, 2, seed=1, pooling=cfg.pooling),
                                     str(tmp_path / "adapter"))
    assert evaluate(bare, test, precision="float32") != evaluated


def test_fed_sb_starts_from_the_pretrained_model_in_its_top_singular_subspace(tiny_cfg):
    """B and A come from the pretrained weight, not from data; R = 0: the model is the
    pretrained one until clients train R."""
    from fedortho.lora import adapter_state
    from fedortho.worker import build_model

    model = build_model(tiny_cfg.replace(strategy="fedsb"))
    state = adapter_state(model)
    weights = dict(model.named_parameters())
    for r_key in (k for k in state if "lora_R" in k):
        b, a = state[r_key.replace("lora_R", "lora_B")].double(), state[r_key.replace("lora_R", "lora_A")].double()
        assert not state[r_key].any()
        w0 = weights[r_key.replace("lora_R.weight", "base_layer.weight")].double()
        s = torch.linalg.svdvals(w0)[: a.shape[0]]
        assert torch.allclose(b.T @ w0 @ a.T, torch.diag(s), atol=1e-4)  # B, A: W0's top singular vectors
        assert torch.allclose(b.T @ b, torch.eye(b.shape[1], dtype=torch.float64), atol=1e-5)
