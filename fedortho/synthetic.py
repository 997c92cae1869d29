"""A synthetic sentiment dataset of any size, for scale tests and benchmarks.

The embedded dataset has about 10,000 training examples; a population of 100,000 clients
needs more. Each text is a few neutral words and one word from its label's list, so the
task is learnable but not trivial for a small model; the labels are balanced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

POSITIVE = ("great", "wonderful", "moving", "brilliant", "charming", "superb", "delightful", "fresh")
NEGATIVE = ("dull", "tedious", "awful", "boring", "clumsy", "bland", "weak", "stale")
NEUTRAL = ("the", "film", "story", "cast", "plot", "scene", "movie", "director", "script", "actor", "music",
           "ending", "a", "is", "was", "and", "with", "its", "this", "of")


def synthetic_texts(rows: int, seed: int = 0, words: int = 8) -> tuple[list[str], np.ndarray]:
    """(texts, labels): ``rows`` texts of ``words`` words, label 1 (fresh) or 0 (rotten)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=rows)
    neutral = np.array(NEUTRAL)[rng.integers(0, len(NEUTRAL), size=(rows, words - 1))]
    signal = np.where(labels == 1, np.array(POSITIVE)[rng.integers(0, len(POSITIVE), size=rows)],
                      np.array(NEGATIVE)[rng.integers(0, len(NEGATIVE), size=rows)])
    where = rng.integers(0, words, size=rows)
    texts = [" ".join([*row[:k], word, *row[k:]]) for row, word, k in zip(neutral.tolist(), signal.tolist(),
                                                                           where.tolist())]
    return texts, labels.astype(np.int64)


def write_synthetic_dataset(folder: str | Path, train_rows: int, test_rows: int = 1000, seed: int = 0) -> Path:
    """Save a train and a test split with ``datasets.save_to_disk``: a folder the run's
    ``dataset`` setting can name."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["rotten", "fresh"])})
    splits = {}
    for name, rows, split_seed in (("train", train_rows, seed), ("test", test_rows, seed + 1)):
        texts, labels = synthetic_texts(rows, split_seed)
        splits[name] = datasets.Dataset.from_dict({"text": texts, "label": labels.tolist()}, features=features)
    datasets.disable_progress_bars()
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return Path(folder)
