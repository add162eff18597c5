"""Cross-validation splits identical to nnU-Net's ``splits_final.json`` (spec 9).

nnU-Net uses scikit-learn's ``KFold(5, shuffle=True, random_state=12345)`` over the sorted case identifiers: the
indices are shuffled by ``RandomState(12345)``, cut into consecutive folds (the first ``n % 5`` get one extra case),
and both lists are returned in ascending order. The same arithmetic is done here without scikit-learn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SEED = 12345


def kfold_splits(case_ids, n_splits: int = 5, seed: int = SEED) -> list[dict]:
    cases = sorted(case_ids)
    if len(cases) < n_splits:
        raise ValueError(f"{len(cases)} cases cannot be split into {n_splits} folds")
    indices = np.arange(len(cases))
    np.random.RandomState(seed).shuffle(indices)
    sizes = np.full(n_splits, len(cases) // n_splits)
    sizes[: len(cases) % n_splits] += 1
    splits, start = [], 0
    for size in sizes:
        val = set(indices[start:start + size].tolist())
        start += size
        splits.append({"train": [c for i, c in enumerate(cases) if i not in val],
                       "val": [c for i, c in enumerate(cases) if i in val]})
    return splits


def load_splits(path, case_ids) -> list[dict]:
    """A user-provided splits file, checked against the dataset's cases."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read splits ({exc})") from None
    known = set(case_ids)
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise ValueError(f"{path}: must be a list of {{\"train\": [...], \"val\": [...]}} entries")
    for k, split in enumerate(splits):
        unknown = sorted((set(split["train"]) | set(split["val"])) - known)
        if unknown:
            raise ValueError(f"{path}: fold {k} names cases not in the dataset: {unknown[:5]}")
    return splits


def fold_cases(splits: list[dict], fold, case_ids) -> tuple[list[str], list[str]]:
    """(train, val) for a fold; ``all`` trains and validates on every case, as nnU-Net's ``fold_all``."""
    if fold == "all":
        return sorted(case_ids), sorted(case_ids)
    fold = int(fold)
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist: the splits have {len(splits)} folds")
    return list(splits[fold]["train"]), list(splits[fold]["val"])
