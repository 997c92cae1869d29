"""LoRAStrategy and the ClientApp together, in process, over a minimal in-memory grid."""

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from fedortho.lora import adapter_state
from fedortho.runs import RunStopped
from fedortho.worker import build_model
from server.strategy import LoRAStrategy


class LocalGrid:
    """Delivers each message to the ClientApp of its node; records what travelled."""

    def __init__(self, num_nodes, corrupt_node=None, tamper=None, before_round=None, node_config=None):
        # Messages are stamped with the identity of the running task, as in a real ServerApp.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i,
                             node_config={"partition-id": i, "num-partitions": num_nodes,
                                          **((node_config(i) if callable(node_config) else node_config) or {})},
                             state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self.corrupt_node, self.tamper, self.before_round = corrupt_node, tamper, before_round
        self.sent, self.received, self.held_by_client = [], [], []
        self.rounds = 0
        self.last_train_message = {}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            self.rounds += 1
            if self.before_round:
                self.before_round(self, self.rounds)
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's Grids do when sending
            node = msg.metadata.dst_node_id
            try:
                reply = client_app(msg, self.contexts[node])
            except Exception as exc:  # as Flower's runtime does: an error reply, not a crash
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
                continue
            if msg.metadata.message_type == "train":
                self.last_train_message[node] = msg
                self.sent.append((node, sorted(msg.content["arrays"].keys())))
                if node == self.corrupt_node:
                    arrays = reply.content["arrays"]
                    key = next(k for k in arrays.keys() if "lora_B" in k)
                    bad = arrays.to_torch_state_dict()
                    bad[key] = torch.full_like(bad[key], float("nan"))
                    reply.content["arrays"] = ArrayRecord(bad)
                if self.tamper:
                    reply = self.tamper(node, reply)
                self.received.append((node, sorted(reply.content["arrays"].keys())
                                       if reply.has_content() and "arrays" in reply.content else []))
                state = self.contexts[node].state
                if "held-tensors" in state:
                    self.held_by_client.append((self.rounds, state["held-tensors"].to_torch_state_dict()))
            replies.append(reply)
        return replies


def start(cfg, grid):
    strategy = LoRAStrategy(cfg)
    initial = ArrayRecord(adapter_state(build_model(cfg)))
    history = []
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds,
                            evaluate_fn=lambda rnd, arrays: history.append(dict(strategy.last_round)) or None)
    return strategy, result, history[1:]


def a_sent_per_round(grid, clients_per_round):
    flags = [any("lora_A" in k for k in keys) for _, keys in grid.sent]
    return [sum(flags[i:i + clients_per_round]) for i in range(0, len(flags), clients_per_round)]


@pytest.mark.parametrize("strategy,svd_period,expected", [
    ("ffa", 1, [3, 0, 0]),      # A never changes: sent once
    ("fedsvd", 1, [3, 3, 3]),   # refactorized every round
    ("fedsvd", 2, [3, 0, 3]),   # refactorized after round 2 only
    ("fedavg", 1, [3, 3, 3]),   # averaged every round
])
def test_a_travels_only_when_it_changed(tiny_cfg, strategy, svd_period, expected):
    cfg = tiny_cfg.replace(strategy=strategy, svd_period=svd_period, rounds=3, epsilon=math.inf)
    grid = LocalGrid(3)
    start(cfg, grid)
    assert a_sent_per_round(grid, 3) == expected
    sends_a = [any("lora_A" in k for k in keys) for _, keys in grid.received]
    assert all(sends_a) if strategy == "fedavg" else not any(sends_a)


def test_bad_update_is_rejected_and_the_round_goes_on(tiny_cfg, caplog):
    cfg = tiny_cfg.replace(rounds=2, epsilon=6.0)
    grid = LocalGrid(3, corrupt_node=101)
    strategy, result, rounds = start(cfg, grid)
    assert [r["clients-replied"] for r in rounds] == [2, 2]
    assert [r["clients-failed"] for r in rounds] == [1, 1]
    final = result.arrays.to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in final.values())
    # Accountant state persisted in each client's context: epsilon grows across rounds.
    eps = [r["epsilon-max"] for r in rounds]
    assert 0 < eps[0] < eps[1] <= cfg.epsilon


def test_exhausted_clients_sit_out(tiny_cfg):
    # Clients plan their noise for the rounds in the config they receive (1 round); the server
    # then runs 3 rounds, so from round 2 on every client must refuse instead of overspending.
    cfg = tiny_cfg.replace(rounds=1, clients_per_round=3, epsilon=6.0)
    grid = LocalGrid(3)
    strategy = LoRAStrategy(cfg)
    initial = ArrayRecord(adapter_state(build_model(cfg)))
    rounds = []
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=3,
                   evaluate_fn=lambda rnd, arrays: rounds.append(dict(strategy.last_round)) or None)
    rounds = rounds[1:]
    assert [r["clients-replied"] for r in rounds] == [3, 0, 0]
    assert [r["clients-exhausted"] for r in rounds] == [0, 3, 3]
    assert 0 < max(r["epsilon-max"] for r in rounds) <= cfg.epsilon


def test_clients_hold_exactly_the_servers_a(tiny_cfg):
    cfg = tiny_cfg.replace(strategy="fedsvd", rounds=3, epsilon=math.inf)
    grid = LocalGrid(3)
    strategy = LoRAStrategy(cfg)
    initial = ArrayRecord(adapter_state(build_model(cfg)))
    globals_before_round = []
    grid.before_round = lambda g, rnd: globals_before_round.append(None)
    states = []
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.rounds,
                   evaluate_fn=lambda rnd, arrays: states.append(arrays.to_torch_state_dict()) or None)
    assert len(grid.held_by_client) == 9
    for rnd, held in grid.held_by_client:
        global_before = states[rnd - 1]  # the global state the round started from
        assert held and all(torch.equal(held[k], global_before[k]) for k in held)


@pytest.mark.parametrize("rule_name", ["rolora", "fedex", "flora", "fedsb"])
def test_rules_that_change_what_clients_train_or_hold_run_through_the_client_app(tiny_cfg, rule_name):
    """A deployment's path (each node keeps what it holds): every round each client sends
    what the rule trains then and holds the server's current copy of the rest."""
    from fedortho import rules

    cfg = tiny_cfg.replace(strategy=rule_name, rounds=3, epsilon=math.inf)
    rule = rules.rule(rule_name)
    grid = LocalGrid(3)
    strategy = LoRAStrategy(cfg)
    states = []
    strategy.start(grid=grid, initial_arrays=ArrayRecord(adapter_state(build_model(cfg))), num_rounds=cfg.rounds,
                   evaluate_fn=lambda rnd, arrays: states.append(arrays.to_torch_state_dict()) or None)
    names = sorted(states[0])
    assert [keys for _, keys in grid.received] == [rule.trainable(names, True, rnd) for rnd in (1, 2, 3) for _ in range(3)]
    assert len(grid.held_by_client) == 9
    for rnd, held in grid.held_by_client:
        assert sorted(held) == rule.held(names, True, rnd)
        assert all(torch.equal(held[k], states[rnd - 1][k]) for k in held)
    assert [strategy.last_round["clients-replied"]] == [3]
    moved = [k for k in names if not torch.equal(states[-1][k], states[0][k])]
    expected_moving = {"rolora": "lora_A", "fedex": "lora_folded", "flora": "lora_folded", "fedsb": "lora_R"}
    assert any(expected_moving[rule_name] in k for k in moved)


def drop_metrics(node, reply):
    if node == 100:
        del reply.content["metrics"]
    if node == 101:
        reply.content["metrics"]["num-examples"] = float("nan")
    return reply


def test_malformed_replies_are_rejected_one_line_each(tiny_cfg, caplog):
    cfg = tiny_cfg.replace(rounds=1, epsilon=math.inf)
    grid = LocalGrid(3, tamper=drop_metrics)
    _, result, rounds = start(cfg, grid)
    assert rounds[0]["clients-replied"] == 1 and rounds[0]["clients-failed"] == 2
    assert all(torch.isfinite(v).all() for v in result.arrays.to_torch_state_dict().values())


def test_a_client_that_lost_its_state_gets_a_again(tiny_cfg):
    def wipe(grid, rnd):
        if rnd == 2:
            grid.contexts[100].state = RecordDict()

    cfg = tiny_cfg.replace(strategy="ffa", rounds=3, epsilon=math.inf)
    grid = LocalGrid(3, before_round=wipe)
    _, _, rounds = start(cfg, grid)
    assert [r["clients-replied"] for r in rounds] == [3, 2, 3]  # fails once, then A is resent


def test_a_private_client_that_lost_its_history_refuses(tiny_cfg):
    def wipe(grid, rnd):
        if rnd == 2:
            grid.contexts[100].state = RecordDict()

    cfg = tiny_cfg.replace(rounds=2, epsilon=6.0)
    grid = LocalGrid(3, before_round=wipe)
    _, _, rounds = start(cfg, grid)
    assert [r["clients-replied"] for r in rounds] == [3, 2]
    assert rounds[1]["clients-failed"] == 1


def test_pinned_privacy_settings_are_enforced_by_the_client(tiny_cfg):
    cfg = tiny_cfg.replace(rounds=1, epsilon=math.inf)
    # The server asks for no DP: every node refuses when asked to describe itself ...
    with pytest.raises(RuntimeError, match=r"only 0 clients available.*pinned to epsilon=6"):
        start(cfg, LocalGrid(3, node_config={"epsilon": 6.0}))

    # ... and when asked to train, should a server skip discovery or a node change its pin.
    def pin(grid, server_round):
        for context in grid.contexts.values():
            context.node_config["epsilon"] = 6.0
    with pytest.raises(RunStopped, match=r"round 1: 0 of 3 sampled clients succeeded, fewer than min-clients=1 "
                                         r"\(client \d failed: NodeConfigError: .*pinned to epsilon=6"):
        start(cfg, LocalGrid(3, before_round=pin))
    _, _, rounds = start(tiny_cfg.replace(rounds=1, epsilon=6.0), LocalGrid(3, node_config={"epsilon": 6.0}))
    assert rounds[0]["clients-replied"] == 3


@pytest.mark.parametrize("bad, reason", [
    ({"partition-id": 5}, "partition-id 5 is out of range for num-partitions 3"),
    ({"num-partitions": 4, "partition-id": 2}, "num-partitions 4 does not match the run's clients=3"),
    ({"epsilon": -1}, "node-config epsilon must be > 0"),
    ({"clip": "two"}, "node-config clip must be a number"),
    ({"delta": 1e-6}, "pinned to delta=1e-06"),
    ({"privacy-ledger": "LEDGER-GARBAGE"}, "is unreadable"),
    ({"privacy-ledger": "LEDGER-FOREIGN"}, "is kept for owner partition 0 of 3"),
    ({"data-path": "/nonexistent/folder"}, "data-path /nonexistent/folder is not a folder"),
    ({"secure-noise": "maybe"}, "secure-noise"),
    ({"partiton-id": 1}, "unknown node-config key 'partiton-id'"),
])
def test_a_bad_node_config_is_dropped_at_discovery_with_its_reason(tiny_cfg, tmp_path, bad, reason):
    """The misconfigured node (partition 2) is named with its own reason before round 1 and
    never asked to train; the other nodes train."""
    from fedortho.privacy import PrivacyLedger, PrivacyState

    bad = dict(bad)
    if bad.get("privacy-ledger") == "LEDGER-GARBAGE":
        bad["privacy-ledger"] = str(tmp_path / "garbage.json")
        (tmp_path / "garbage.json").write_text("{not json")
    elif bad.get("privacy-ledger") == "LEDGER-FOREIGN":
        bad["privacy-ledger"] = str(tmp_path / "foreign.json")
        PrivacyLedger(tmp_path / "foreign.json", 6.0, 1e-5, owner="partition 0 of 3").write(PrivacyState(6.0, 1e-5, 2.0, [(1.0, 0.1, 3)]))
    before = (tmp_path / "garbage.json").read_text() if (tmp_path / "garbage.json").exists() else None
    cfg = tiny_cfg.replace(rounds=1, epsilon=6.0, clients_per_round=2)
    grid = LocalGrid(3, node_config=lambda i: bad if i == 2 else {})
    strategy, _, rounds = start(cfg, grid)
    assert list(strategy.refused) == [102] and reason in strategy.refused[102]
    assert 102 not in strategy.partition_of_node and all(node != 102 for node, _ in grid.sent)
    assert rounds[0]["clients-replied"] == 2 and rounds[0]["clients-failed"] == 0
    if before is not None:
        assert (tmp_path / "garbage.json").read_text() == before  # a refused ledger is left as it was


def test_a_failed_client_is_named_from_the_message_it_answers(tiny_cfg, caplog):
    """When a node dies the SuperLink answers for it, with its own id as the sender: the
    failure must be charged to the node the message went to."""
    superlink_id = 1

    def die(node, reply):
        if node == 101:
            msg = grid.last_train_message[node]
            reply = Message(Error(code=0, reason="<class 'RuntimeError'>:<'node went away'>"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = superlink_id
        return reply

    grid = LocalGrid(3, tamper=die)
    strategy, _, rounds = start(tiny_cfg.replace(rounds=1), grid)
    assert rounds[0]["clients-failed"] == 1 and rounds[0]["clients-replied"] == 2
    assert "client 1 failed: node went away" in caplog.text
    assert 101 not in strategy.held_version_at_node  # its held tensors are resent next time


def _run_from(cfg, initial):
    grid = LocalGrid(cfg.clients)
    strategy = LoRAStrategy(cfg)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.rounds)
    return result.arrays.to_torch_state_dict()


def _products(state):
    return {k: state[k].double() @ state[k.replace("lora_B", "lora_A")].double() for k in state if "lora_B" in k}


def _ffa_and_fedsvd_with_kept_muon(tiny_cfg):
    """B·A per adapter after 3 rounds of FFA-LoRA and of FedSVD from the same orthonormal A0,
    under Muon with kept state; also returns the config and the start."""
    cfg = tiny_cfg.replace(optimizer="muon", optimizer_state="keep", epsilon=math.inf, rounds=3, lr=0.02)
    start_state = adapter_state(build_model(cfg))
    start_state = {k: (torch.linalg.qr(v.double().T)[0].T.float().contiguous() if "lora_A" in k else v)
                   for k, v in start_state.items()}
    ffa = _products(_run_from(cfg.replace(strategy="ffa"), start_state))
    svd = _products(_run_from(cfg.replace(strategy="fedsvd"), start_state))
    return ffa, svd, cfg, start_state


def _assert_same_products(svd, ffa):
    for k in ffa:
        assert torch.allclose(svd[k], ffa[k], atol=1e-4 * float(ffa[k].abs().max())), k


def test_kept_momentum_is_rotated_with_fedsvd(tiny_cfg, monkeypatch):
    """Muon with kept state: FedSVD (A rotated every round, momentum rotated along) follows
    FFA-LoRA from the same orthonormal A0 exactly; without the rotation it does not."""
    ffa, svd, cfg, start_state = _ffa_and_fedsvd_with_kept_muon(tiny_cfg)
    _assert_same_products(svd, ffa)

    import client.app as client_app_module

    monkeypatch.setattr(client_app_module, "rotate_saved_state", lambda tensors, old, new: tensors)
    unrotated = _products(_run_from(cfg.replace(strategy="fedsvd"), start_state))
    assert any(not torch.allclose(unrotated[k], ffa[k], atol=1e-3 * float(ffa[k].abs().max())) for k in ffa)


def test_kept_momentum_stays_in_step_with_a_after_a_failed_round(tiny_cfg, monkeypatch):
    """Client 0 receives a new A in round 2 and then fails before training. Its kept momentum
    is still in the coordinates of the A it last trained with, and must be rotated from that
    one in round 3: FedSVD then still follows FFA-LoRA, which sees the same failure."""
    from fedortho.nodeworker import InProcess

    real_train = InProcess.train

    def fail_once(self, work):
        if work.partition_id == 0 and work.server_round == 2:
            raise RuntimeError("simulated crash of client 0")
        return real_train(self, work)

    monkeypatch.setattr(InProcess, "train", fail_once)
    ffa, svd, _, _ = _ffa_and_fedsvd_with_kept_muon(tiny_cfg)
    _assert_same_products(svd, ffa)


def test_private_clients_do_not_report_their_training_loss(tiny_cfg):
    grid = LocalGrid(3)
    _, _, rounds = start(tiny_cfg.replace(rounds=1, epsilon=6.0), grid)
    assert rounds[0]["clients-replied"] == 3 and "train-loss" not in rounds[0]
    grid = LocalGrid(3)
    _, _, rounds = start(tiny_cfg.replace(rounds=1, epsilon=math.inf), grid)
    assert math.isfinite(rounds[0]["train-loss"])


def _ledger_epsilon(path, delta):
    """The ledger's spending, from Opacus' accountant over its recorded history."""
    import json

    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in json.loads(path.read_text())["history"]]
    return accountant.get_epsilon(delta=delta)


def test_a_privacy_ledger_makes_the_budget_cover_every_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(rounds=2, epsilon=6.0)
    ledgers = {i: tmp_path / f"node-{i}" / "ledger.json" for i in range(3)}

    def with_ledger(i):
        return {"privacy-ledger": str(ledgers[i])}

    _, _, first = start(cfg, LocalGrid(3, node_config=with_ledger))
    assert [r["clients-replied"] for r in first] == [3, 3]
    spent = [_ledger_epsilon(ledgers[i], cfg.delta) for i in range(3)]
    assert max(spent) == pytest.approx(first[-1]["epsilon-max"], rel=1e-9) and max(spent) <= cfg.epsilon
    before = {i: ledgers[i].read_text() for i in range(3)}

    # A second run (fresh Flower state on every node) starts from what the first spent:
    # the first run planned its noise for the whole budget, so nothing is left to train on.
    _, _, second = start(cfg, LocalGrid(3, node_config=with_ledger))
    assert [r["clients-exhausted"] for r in second] == [3, 3]
    assert second[0]["epsilon-max"] == pytest.approx(first[-1]["epsilon-max"], rel=1e-9)
    assert all(ledgers[i].read_text() == before[i] for i in range(3))
    # Without a ledger the second run would have spent a fresh budget.
    _, _, unguarded = start(cfg, LocalGrid(3))
    assert unguarded[0]["clients-replied"] == 3


def test_a_later_run_plans_its_noise_for_what_the_ledger_has_left(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(rounds=2, epsilon=6.0)
    with_ledger = lambda i: {"privacy-ledger": str(tmp_path / f"ledger-{i}.json")}  # noqa: E731
    # The first run stops after one of its two planned rounds: part of the budget is left.
    strategy = LoRAStrategy(cfg)
    strategy.start(grid=LocalGrid(3, node_config=with_ledger), num_rounds=1,
                   initial_arrays=ArrayRecord(adapter_state(build_model(cfg))))
    spent_first = strategy.last_round["epsilon-max"]
    assert 0 < spent_first < cfg.epsilon - 0.5

    # The second run trains both its rounds and ends within the budget, close to it.
    _, _, second = start(cfg, LocalGrid(3, node_config=with_ledger))
    assert [r["clients-replied"] for r in second] == [3, 3]
    assert spent_first < second[0]["epsilon-max"] < second[1]["epsilon-max"] <= cfg.epsilon
    assert second[1]["epsilon-max"] > cfg.epsilon - 0.1
    for i in range(3):
        assert _ledger_epsilon(tmp_path / f"ledger-{i}.json", cfg.delta) <= cfg.epsilon


def test_a_ledger_refuses_another_budget_another_owner_and_damage_and_is_kept(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg.replace(rounds=1, epsilon=6.0)
    ledgers = {i: tmp_path / f"ledger-{i}.json" for i in range(3)}
    _, _, rounds = start(cfg, LocalGrid(3, node_config=lambda i: {"privacy-ledger": str(ledgers[i])}))
    assert rounds[0]["clients-replied"] == 3
    kept = {i: ledgers[i].read_text() for i in range(3)}

    def refused(run_cfg, node_config, reason):
        # Every node refuses when first asked to describe itself, with its reason; no round runs.
        with pytest.raises(RuntimeError, match="only 0 clients available") as info:
            start(run_cfg, LocalGrid(3, node_config=node_config))
        assert reason in str(info.value)
        assert all(ledgers[i].read_text() == kept[i] for i in range(3))  # nothing lost or overwritten

    # A larger budget asked by a later run is not a fresh budget.
    refused(cfg.replace(epsilon=12.0), lambda i: {"privacy-ledger": str(ledgers[i])},
            "is kept for epsilon-budget 6.0, this run has epsilon-budget 12.0")
    refused(cfg.replace(delta=1e-6), lambda i: {"privacy-ledger": str(ledgers[i])}, "is kept for delta")
    # Another partition's client (a shared path) may not spend this partition's budget.
    refused(cfg, lambda i: {"privacy-ledger": str(ledgers[(i + 1) % 3])}, "is kept for owner partition")
    refused(cfg.replace(epsilon=math.inf), lambda i: {"privacy-ledger": str(ledgers[i])},
            "does not train without DP")
    ledgers[0].write_text(kept[0][:40])
    kept[0] = ledgers[0].read_text()
    caplog.clear()
    strategy, _, rounds = start(cfg.replace(clients_per_round=2),
                                LocalGrid(3, node_config=lambda i: {"privacy-ledger": str(ledgers[i])}))
    assert rounds[0]["clients-exhausted"] == 2 and ledgers[0].read_text() == kept[0]  # 1 and 2 spent it all
    assert "is unreadable (JSONDecodeError); refusing to train rather than start a fresh budget" in strategy.refused[100]


def test_a_private_node_restarted_with_its_ledger_trains_on(tiny_cfg, tmp_path):
    def restart_node_0(grid, rnd):
        if rnd == 2:  # comes back under a new node id, with no Flower state, before round 2 is sent
            old = grid.contexts.pop(100)
            grid.contexts[200] = Context(run_id=1, node_id=200, node_config=dict(old.node_config),
                                         state=RecordDict(), run_config={})

    cfg = tiny_cfg.replace(strategy="ffa", rounds=3, epsilon=6.0)
    with_ledger = lambda i: {"privacy-ledger": str(tmp_path / f"ledger-{i}.json")}  # noqa: E731
    _, _, rounds = start(cfg, LocalGrid(3, node_config=with_ledger, before_round=restart_node_0))
    assert rounds[2]["clients-replied"] == 3  # the server saw its spending; the ledger vouches for it
    _, _, rounds = start(cfg, LocalGrid(3, before_round=restart_node_0))
    assert rounds[2]["clients-replied"] == 2 and rounds[2]["clients-failed"] == 1  # no ledger: refuses


def test_the_ledger_lock_makes_rounds_take_turns(tmp_path):
    import threading

    from fedortho.privacy import PrivacyLedger, PrivacyState

    order, holding = [], threading.Event()
    first = PrivacyLedger(tmp_path / "ledger.json", 6.0, 1e-5, "partition 0 of 1")
    second = PrivacyLedger(tmp_path / "ledger.json", 6.0, 1e-5, "partition 0 of 1")

    def slow_round():
        with first.locked():
            holding.set()
            threading.Event().wait(0.5)
            first.write(PrivacyState(6.0, 1e-5, 2.0, [(1.0, 0.1, 2)]))
            order.append("first wrote")

    thread = threading.Thread(target=slow_round)
    thread.start()
    holding.wait()
    with second.locked():
        order.append(f"second read {len(second.read())} entries")
    thread.join()
    assert order == ["first wrote", "second read 1 entries"]


def test_a_restarted_node_takes_its_partition_over(tiny_cfg):
    def restart_node_0(grid, rnd):
        if rnd == 2:  # the SuperNode of partition 0 goes and comes back under a new node id, without state
            old = grid.contexts.pop(100)
            grid.contexts[200] = Context(run_id=1, node_id=200, node_config=dict(old.node_config),
                                         state=RecordDict(), run_config={})

    cfg = tiny_cfg.replace(strategy="ffa", rounds=3, epsilon=math.inf)
    grid = LocalGrid(3, before_round=restart_node_0)
    strategy, _, rounds = start(cfg, grid)
    # Round 2's message was already addressed to the old node; from round 3 the new one trains.
    assert [r["clients-replied"] for r in rounds] == [3, 2, 3]
    assert strategy.partition_of_node == {101: 1, 102: 2, 200: 0}
    assert any(node == 200 and any("lora_A" in k for k in keys) for node, keys in grid.sent)  # A resent


def test_a_node_back_before_its_old_id_has_gone_waits_then_takes_over(tiny_cfg):
    def restart_node_0(grid, rnd):
        if rnd == 1:  # the new node id appears while the SuperLink still lists the old one
            old = grid.contexts[100]
            grid.contexts[200] = Context(run_id=1, node_id=200, node_config=dict(old.node_config),
                                         state=RecordDict(), run_config={})
        if rnd == 2:
            grid.contexts.pop(100)

    cfg = tiny_cfg.replace(strategy="ffa", rounds=4, epsilon=math.inf)
    strategy, _, rounds = start(cfg, LocalGrid(3, before_round=restart_node_0))
    assert len(rounds) == 4 and rounds[-1]["clients-replied"] == 3
    assert strategy.partition_of_node == {101: 1, 102: 2, 200: 0}


def test_rounds_go_on_with_the_clients_still_connected(tiny_cfg, monkeypatch):
    import server.strategy as strategy_module

    monkeypatch.setattr(strategy_module, "CLIENT_WAIT_SECONDS", 2)

    def lose_node_2(grid, rnd):
        if rnd == 2:
            grid.contexts.pop(102)

    cfg = tiny_cfg.replace(rounds=3, clients_per_round=2, epsilon=math.inf)
    _, _, rounds = start(cfg, LocalGrid(3, before_round=lose_node_2))
    # Round 2 may have addressed the lost node already; round 3 samples from the two left.
    assert len(rounds) == 3 and rounds[0]["clients-replied"] == 2 and rounds[2]["clients-replied"] == 2



@pytest.mark.parametrize("epsilon, opted_in", [(6.0, False), (6.0, True), (math.inf, False)])
def test_a_client_sends_only_what_the_protocol_names(tiny_cfg, epsilon, opted_in, monkeypatch):
    """Every training reply holds two records: the tensors the rule trains, no more, and the
    metrics the protocol lists (diagnostics only where the node opted in, the training loss
    only without DP)."""
    from fedortho import protocol
    from fedortho.rules import trainable_names

    monkeypatch.delenv("FEDORTHO_REPORT_DIAGNOSTICS", raising=False)
    replies = []

    def keep(node, reply):
        replies.append(reply)
        return reply

    cfg = tiny_cfg.replace(rounds=2, epsilon=epsilon)
    grid = LocalGrid(3, tamper=keep, node_config={"report-diagnostics": "true"} if opted_in else None)
    start(cfg, grid)
    names = sorted(adapter_state(build_model(cfg)))
    allowed = set(protocol.REPLY_METRICS) | (set(protocol.DIAGNOSTIC_METRICS) if opted_in else set()) | \
        (set(protocol.NON_PRIVATE_METRICS) if epsilon == math.inf else set())
    assert len(replies) == 6
    for reply in replies:
        assert set(reply.content.keys()) == {protocol.ARRAYS, protocol.METRICS}
        assert sorted(reply.content[protocol.ARRAYS].keys()) == trainable_names(names, cfg.strategy, cfg.train_head)
        sent = set(reply.content[protocol.METRICS].keys())
        assert sent <= allowed, sent - allowed
        assert (set(protocol.DIAGNOSTIC_METRICS) - {"head-grad-norm"} <= sent) == opted_in


@pytest.mark.parametrize("epsilon", [6.0, math.inf])
def test_a_run_whose_every_client_fails_is_not_complete(tiny_cfg, tmp_path, monkeypatch, epsilon):
    """No usable update in any round: the run says so, and a run without DP never reports
    epsilon 0 (it has no privacy guarantee at all)."""
    from fedortho.nodeworker import InProcess
    from server.app import run_federation

    def crash(self, work):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(InProcess, "train", crash)
    out = tmp_path / "run"
    with pytest.raises(RunStopped, match=r"round 1: 0 of 3 sampled clients succeeded.*simulated crash\); the run "
                                         r"stopped after round 0, which is saved in"):
        run_federation(LocalGrid(3), tiny_cfg.replace(rounds=2, epsilon=epsilon, out=str(out)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] is False and "0 of 3 sampled clients succeeded" in summary["stopped"]
    assert summary["epsilon-spent"] == (0.0 if epsilon == 6.0 else "inf")


def test_nodes_keep_their_state_on_disk_through_restarts_and_a_resumed_run(tiny_cfg, tmp_path):
    """Deployment: the server never sees a client's state. A node with ``state-path`` keeps it
    on its disk, so after the server stops and resumes the run, with every SuperNode
    restarted (fresh contexts), the run ends exactly as the one never stopped. Without it a
    restarted node cannot account for its privacy and refuses to train."""
    from server.app import run_federation

    cfg = tiny_cfg.replace(rounds=4, clients=3, clients_per_round=2, epsilon=6.0, optimizer="auon",
                           optimizer_state="keep", eval_precision="float32")

    def nodes(folder):
        return lambda i: {"state-path": str(tmp_path / folder / f"node-{i}")}

    whole = tmp_path / "whole"
    run_federation(LocalGrid(3, node_config=nodes("whole-nodes")), cfg.replace(out=str(whole)))

    def stop_before_round_3(grid, server_round):
        if server_round == 3:
            raise KeyboardInterrupt  # the server is stopped between rounds 2 and 3

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_federation(LocalGrid(3, node_config=nodes("nodes"), before_round=stop_before_round_3),
                       cfg.replace(out=str(stopped)))
    assert json.loads((stopped / "checkpoint" / "checkpoint.json").read_text())["clients"] == {}  # none on the server
    summary = run_federation(LocalGrid(3, node_config=nodes("nodes")), cfg.replace(out=str(stopped)), resume=True)
    assert summary["completed"] is True and summary["resumed-after-rounds"] == [2]
    assert (stopped / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (whole / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (stopped / "privacy.jsonl").read_text() == (whole / "privacy.jsonl").read_text()

    # the same stop, but the restarted nodes kept nothing: they refuse rather than undercount
    forgetful = tmp_path / "forgetful"
    with pytest.raises(KeyboardInterrupt):
        run_federation(LocalGrid(3, before_round=stop_before_round_3), cfg.replace(out=str(forgetful)))
    with pytest.raises(RunStopped, match="privacy history is missing"):
        run_federation(LocalGrid(3), cfg.replace(out=str(forgetful)), resume=True)


def test_a_damaged_node_state_file_is_refused(tmp_path):
    from fedortho.checkpoint import CheckpointError, load_node_state, node_state_file, save_node_state

    state = {"participation": {"config": {"rounds": 1}}, "optimizer-tensors": {"arrays": {"m": torch.ones(2)}}}
    save_node_state(tmp_path, "key", 1, state)
    loaded = load_node_state(tmp_path, "key")
    assert loaded["participation"] == state["participation"]
    assert torch.equal(loaded["optimizer-tensors"]["arrays"]["m"], torch.ones(2))
    assert load_node_state(tmp_path, "other") is None  # no state for another run
    path = node_state_file(tmp_path, "key")
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"node state file {path} is damaged"):
        load_node_state(tmp_path, "key")


def test_a_deployed_node_refuses_to_train_a_partition_it_does_not_hold(tiny_cfg):
    """Nodes 100 and 101 swap partitions after discovery: the server still sends each the
    partition it learned, and each refuses; node 102 trains."""
    import logging

    from fedortho.runs import get_logger

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    get_logger().addHandler(handler)

    def swap(grid, server_round):
        grid.contexts[100].node_config["partition-id"], grid.contexts[101].node_config["partition-id"] = 1, 0

    try:
        _, _, rounds = start(tiny_cfg.replace(rounds=1, epsilon=math.inf), LocalGrid(3, before_round=swap))
    finally:
        get_logger().removeHandler(handler)
    assert rounds[0]["clients-replied"] == 1 and rounds[0]["clients-failed"] == 2
    assert "client 0 failed: NodeConfigError: this node holds partition 1, the server asks it to train partition 0; " \
           "refusing" in lines


def test_a_privacy_record_of_the_earlier_layout_is_read_as_a_privacy_state():
    """Checkpoints and nodes' state files written before PrivacyState kept parallel lists;
    a client resumed from one goes on with that history and plan."""
    from flwr.app import ConfigRecord

    from client.app import STATE_PRIVACY, _kept_privacy
    from fedortho.privacy import NoisePlan, PrivacyState

    record = {"noise-multipliers": [1.2, 0.9], "sample-rates": [0.02, 0.02], "steps": [6, 3],
              "plan-sample-rate": 0.02, "plan-steps": 24, "plan-noise-multiplier": 1.2,
              "plan-prior": "[[0.9, 0.02, 3]]", "run-epsilon": 6.0, "run-delta": 1e-5, "run-clip": 2.0}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict({STATE_PRIVACY: ConfigRecord(record)}),
                      run_config={})
    assert _kept_privacy(context) == PrivacyState(6.0, 1e-5, 2.0, [(1.2, 0.02, 6), (0.9, 0.02, 3)],
                                                  NoisePlan(1.2, 0.02, 24, ((0.9, 0.02, 3),)))
