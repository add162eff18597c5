"""Cross-validation splits (spec 9): scikit-learn's KFold as the oracle, and the splits-file checks."""

import json

import pytest

from conftest import sklearn_splits
from autoplan.splits import fold_cases, kfold_splits, load_splits


@pytest.mark.parametrize("n", [5, 6, 9, 12, 13, 260])
def test_kfold_splits_equal_scikit_learn(n):
    """Ids are sorted first; fold sizes differ by at most one case, the larger folds first."""
    ids = [f"case_{i:03d}" for i in range(n)][::-1]  # given in reverse: the order must not matter
    assert kfold_splits(ids) == sklearn_splits(ids)


def test_fewer_cases_than_folds_is_an_error():
    with pytest.raises(ValueError, match="4 cases cannot be split into 5 folds"):
        kfold_splits(["a", "b", "c", "d"])


def test_load_splits_accepts_a_valid_file(tmp_path):
    splits = [{"train": ["a", "b"], "val": ["c"]}, {"train": ["c"], "val": ["a", "b"]}]
    (tmp_path / "splits.json").write_text(json.dumps(splits))
    assert load_splits(tmp_path / "splits.json", ["a", "b", "c"]) == splits


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read splits"),
    ('{"train": [], "val": []}', r'must be a list of \{"train": \[...\], "val": \[...\]\} entries'),
    ('[{"train": ["a"]}]', "must be a list of"),
    ('[["a"]]', "must be a list of"),
    ('[{"train": ["a"], "val": ["b"]}, {"train": ["zz", "a", "yy"], "val": []}]',
     r"fold 1 names cases not in the dataset: \['yy', 'zz'\]"),
])
def test_load_splits_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "splits.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        load_splits(path, ["a", "b"])


def test_load_splits_reports_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json: cannot read splits"):
        load_splits(tmp_path / "nope.json", ["a"])


def test_fold_cases():
    """A fold number picks its split; ``all`` trains and validates on every case (sorted)."""
    splits = [{"train": ["b", "a"], "val": ["c"]}, {"train": ["c"], "val": ["b", "a"]}]
    assert fold_cases(splits, 1, ["a", "b", "c"]) == (["c"], ["b", "a"])
    assert fold_cases(splits, "0", ["a", "b", "c"]) == (["b", "a"], ["c"])
    assert fold_cases(splits, "all", ["c", "a", "b"]) == (["a", "b", "c"], ["a", "b", "c"])
    for bad in (2, -1):
        with pytest.raises(ValueError, match=f"fold {bad} does not exist: the splits have 2 folds"):
            fold_cases(splits, bad, ["a", "b", "c"])
