import math

import numpy as np
import pytest

from fedortho import data
from fedortho.config import ConfigError, RunConfig


def test_config_from_flower_style_mapping():
    cfg = RunConfig.from_mapping({"clients-per-round": "3", "epsilon": "inf", "train-head": "false", "lr": 1})
    assert cfg.clients_per_round == 3 and math.isinf(cfg.epsilon) and not cfg.private
    assert cfg.train_head is False and cfg.lr == 1.0
    assert RunConfig.from_mapping(cfg.to_dict(hyphenated=True)) == cfg


@pytest.mark.parametrize("values,message", [
    ({"strategi": "ffa"}, "unknown setting 'strategi'"),
    ({"rounds": "ten"}, "setting 'rounds' expects int"),
    ({"rounds": 2.5}, "setting 'rounds' expects int"),
    ({"strategy": "fedprox"}, "strategy must be one of"),
    ({"clients": 3, "clients-per-round": 5}, "cannot exceed clients"),
    ({"epsilon": -1}, "epsilon must be > 0"),
    ({"optimizer": "lion"}, "optimizer must be one of"),
    ({"seed": -1}, "seed must be in"),
])
def test_bad_config_fails_with_one_clear_line(values, message):
    with pytest.raises(ConfigError, match=message) as info:
        RunConfig.from_mapping(values)
    assert "\n" not in str(info.value)


def test_stratified_split_keeps_label_shares():
    labels = np.array([0] * 300 + [1] * 700)
    train, test = data.stratified_split(labels, 0.2, seed=1)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 1000
    assert np.mean(labels[test]) == pytest.approx(0.7, abs=0.005)


def test_embedded_dataset_split_is_fixed_and_partitions_cover_train():
    cfg = RunConfig()
    s = data.splits_for(cfg)
    assert len(s.train_texts) + len(s.test_texts) == 12808  # fresh + rotten snippets
    assert data.majority_rate(s.test_labels) == pytest.approx(0.578, abs=0.002)
    parts = [data.client_indices(cfg, i, 10) for i in range(10)]
    allidx = np.concatenate(parts)
    assert len(allidx) == len(np.unique(allidx)) == len(s.train_texts)
    skew = [abs(np.mean(s.train_labels[p]) - np.mean(s.train_labels)) for p in parts]
    iid = cfg.replace(partitioning="iid")
    iid_skew = [abs(np.mean(s.train_labels[data.client_indices(iid, i, 10)]) - np.mean(s.train_labels))
                for i in range(10)]
    assert max(skew) > 0.15 > max(iid_skew)  # Dirichlet 0.5 is label-skewed, IID is not
    other_seed = [data.client_indices(cfg.replace(seed=1), i, 10) for i in range(10)]
    assert any(len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(parts, other_seed))


def test_hugging_face_dataset_from_local_folder(tmp_path):
    import datasets

    texts = [f"review number {i} was {'good' if i % 3 else 'bad'}" for i in range(90)]
    labels = ["pos" if i % 3 else "neg" for i in range(90)]
    datasets.Dataset.from_dict({"sentence": texts, "sentiment": labels}).save_to_disk(str(tmp_path / "ds"))
    cfg = RunConfig(dataset=str(tmp_path / "ds"), text_column="sentence", label_column="sentiment")
    s = data.splits_for(cfg)
    assert s.num_labels == 2 and len(s.train_texts) + len(s.test_texts) == 90
    assert sorted(set(s.train_labels.tolist())) == [0, 1]  # "neg" -> 0, "pos" -> 1
    with pytest.raises(data.DataError, match="no column 'text'"):
        data.splits_for(RunConfig(dataset=str(tmp_path / "ds")))
    with pytest.raises(data.DataError, match="cannot load dataset"):
        data.splits_for(RunConfig(dataset=str(tmp_path / "missing")))


def test_an_exported_partition_is_what_the_simulated_client_trains(tmp_path, tiny_model_dir):
    """A node reading the folder `fedortho export-partition` wrote trains on exactly the
    tensors the simulated client of that partition trains on, labelled alike."""
    import torch

    from fedortho import data

    cfg = RunConfig(model=tiny_model_dir, clients=3, clients_per_round=3, max_train_examples=240)
    folder = tmp_path / "node-1"
    written = data.export_partition(cfg, 1, 3, str(folder))
    texts, labels, names = data.load_local(str(folder), cfg.text_column, cfg.label_column)
    simulated = data.client_dataset(cfg, 1, 3)
    assert written == len(texts) == len(simulated) > 0
    assert names == data.splits_for(cfg).label_names
    local = data.local_dataset(cfg, str(folder))
    assert all(torch.equal(a, b) for a, b in zip(local.tensors, simulated.tensors))
    with pytest.raises(data.DataError, match="exists and is not empty"):
        data.export_partition(cfg, 1, 3, str(folder))
    with pytest.raises(data.DataError, match="out of range"):
        data.export_partition(cfg, 3, 3, str(tmp_path / "node-3"))


def test_a_server_may_hold_only_the_test_split(tmp_path, tiny_model_dir):
    import datasets

    from fedortho import data

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["rotten", "fresh"])})
    test = datasets.Dataset.from_dict({"text": ["bad film", "great film", "fine"], "label": [0, 1, 1]},
                                      features=features)
    datasets.DatasetDict({"test": test}).save_to_disk(str(tmp_path / "test-only"))
    cfg = RunConfig(model=tiny_model_dir, dataset=str(tmp_path / "test-only"), clients=2, clients_per_round=2)
    splits = data.splits_for(cfg)
    assert splits.label_names == ("rotten", "fresh") and list(splits.test_labels) == [0, 1, 1]
    assert len(splits.train_texts) == 0 and len(data.test_tensors(cfg)) == 3
    with pytest.raises(data.DataError, match="0 training examples"):
        data.client_indices(cfg, 0, 2)  # a simulation needs the clients' examples; a deployed server does not


@pytest.mark.parametrize("text", ["1e309", "Infinity", "INF", "-1e400", "nan"])
def test_only_the_literal_inf_means_no_dp(text):
    with pytest.raises(ConfigError, match=r"setting 'epsilon' is (infinite|not a number) .*only the literal inf"):
        RunConfig.from_mapping({"epsilon": text})
    assert not RunConfig.from_mapping({"epsilon": "inf"}).private
    assert RunConfig.from_mapping({"epsilon": "6"}).epsilon == 6.0


def _save(tmp_path, train, test=None, name="ds"):
    import datasets

    splits = {"train": datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(len(train))], "label": train})}
    if test is not None:
        splits["test"] = datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(len(test))], "label": test})
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / name))
    return str(tmp_path / name)


def test_datasets_need_two_labels_and_test_labels_seen_in_training(tmp_path):
    one_class = _save(tmp_path, ["pos"] * 20, name="one")
    with pytest.raises(data.DataError, match=r"has a single label \('pos'\) in its training split"):
        data.load_splits(one_class, "text", "label", 0.2, 0, 0)
    unseen = _save(tmp_path, ["pos", "neg"] * 10, ["pos", "neutral"], name="unseen")
    with pytest.raises(data.DataError, match=r"has label 'neutral' in a split that its training split lacks"):
        data.load_splits(unseen, "text", "label", 0.2, 0, 0)
    empty = _save(tmp_path, [], name="empty")
    with pytest.raises(data.DataError, match="holds no examples"):
        data.load_splits(empty, "text", "label", 0.2, 0, 0)


def test_a_missing_model_folder_is_named_as_such(tmp_path):
    from fedortho.models import ModelLoadError, check_model

    with pytest.raises(ModelLoadError, match=f"model folder {tmp_path}/none does not exist"):
        check_model(str(tmp_path / "none"), "mean")


def test_the_app_configs_defaults_are_the_run_configs():
    """`flwr run` reads settings from pyproject.toml: its keys must be RunConfig's, with the
    same defaults, and the user-level DP settings must be there to be overridden."""
    import tomllib
    from pathlib import Path

    from fedortho.config import RunConfig

    from flwr.common.config import flatten_dict, fuse_dicts

    app = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_dict(hyphenated=True)
    app_only = {"resume": ""}  # read by the ServerApp itself
    assert app == {**defaults, **app_only}  # every setting, with the same default
    # The SuperLink refuses a run whose --run-config names a key the table lacks: each
    # setting, and resume, must pass Flower's own check.
    overrides = {"resume": "/abs/run", "min-clients": 2, "fail-rate": 0.1, "user-epsilon": 2.0}
    fused = fuse_dicts(flatten_dict(app), overrides, check_keys=True)
    assert fused["resume"] == "/abs/run" and fused["min-clients"] == 2
    with pytest.raises(Exception, match="not present"):
        fuse_dicts(flatten_dict(app), {"no-such-setting": 1}, check_keys=True)
