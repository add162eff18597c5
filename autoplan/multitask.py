"""Multi-task datasets and bundles: segmentation plus one class per case (dataset.json's ``classification`` block).

dataset.json may hold::

    "classification": {"names": {"0": "subtype0", "1": "subtype1"}, "cases": {"CASE": 0, ...}}

``check_classification`` validates the block against the training cases (``verify`` and the fingerprint run it);
``class_distribution`` counts the cases per class. The bundle templates hold the multi-task wiring, switched off by
``classification_head: null``; for a dataset with classes ``classification_values`` gives the top-level ids that
``autoplan.emit`` fills in (the head, class names, the fold's ``case_classes``, ...), and ``apply_to_metadata`` and
``readme_section`` describe the second output. The runtime lives in ``bundles/scripts/classification.py``.
"""

from __future__ import annotations

import copy
import json

HEADS = ("simple", "roi", "attention")
DEFAULT_HEAD = "roi"
# the templates' top-level classification ids (train.json has them all)
TEMPLATE_IDS = ("classification_head", "classification_names", "case_classes", "lesion_labels",
                "classification_weight", "classification_class_weights", "classification_sigma")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def class_names(spec: dict) -> list[str]:
    """The declared class names in class order ([] when the dataset has no classification block)."""
    names = (spec.get("classification") or {}).get("names") or {}
    return [str(names[k]) for k in sorted(names, key=int)] if isinstance(names, dict) else []


def has_classes(spec: dict) -> bool:
    return "classification" in spec


def check_classification(spec: dict, case_ids, where: str) -> list[str]:
    """Problems of dataset.json's ``classification`` block: its structure, a training case without a class, a class
    that is not declared, a class for a case that does not exist. [] when the block is absent or fine."""
    if "classification" not in spec:
        return []
    block = spec["classification"]
    if not isinstance(block, dict) or not isinstance(block.get("names"), dict) or not isinstance(
            block.get("cases"), dict):
        return [f"{where}: 'classification' must be {{\"names\": {{\"0\": \"name\", ...}}, \"cases\": "
                "{\"CASE\": 0, ...}}"]
    names, cases = block["names"], block["cases"]
    problems = []
    if len(names) < 2 or sorted(names) != sorted(str(i) for i in range(len(names))):
        problems.append(f"{where}: classification 'names' keys must be \"0\"..\"K-1\" with K >= 2, "
                        f"got {sorted(names)}")
    declared = {int(k) for k in names if str(k).isdigit()}
    for case in sorted(case_ids):
        if case not in cases:
            problems.append(f"{where}: training case '{case}' has no class in classification 'cases'")
    for case, value in sorted(cases.items()):
        if not _is_int(value) or value not in declared:
            problems.append(f"{where}: case '{case}' has class {value!r}, which classification 'names' does not "
                            f"declare (declared: {sorted(declared)})")
        elif case not in set(case_ids):
            problems.append(f"{where}: classification 'cases' names '{case}', which is not a training case")
    return problems


def class_distribution(spec: dict, case_ids=None) -> dict:
    """``{class name: number of cases}`` in class order, over ``case_ids`` (default: every case of the block)."""
    if not has_classes(spec):
        return {}
    cases = spec["classification"]["cases"]
    names = class_names(spec)
    counts = {name: 0 for name in names}
    for case in (case_ids if case_ids is not None else cases):
        value = cases.get(case)
        if _is_int(value) and 0 <= value < len(names):
            counts[names[value]] += 1
    return counts


# --- bundles ---------------------------------------------------------------------------------------------------
def classification_values(spec: dict, values: dict, head: str | None = None) -> dict:
    """The values of the templates' classification ids for one fold's bundle (inference.json takes those it has);
    the loss weights and ``classification_sigma`` keep the templates' defaults."""
    head = head or DEFAULT_HEAD
    if head not in HEADS:
        raise ValueError(f"classification head must be one of {', '.join(HEADS)}, got {head!r}")
    cases = spec["classification"]["cases"]
    fold_cases = list(values.get("train_cases", [])) + list(values.get("val_cases", []))
    return {
        "classification_head": head,
        "classification_names": class_names(spec),
        "lesion_labels": list(values["foreground_labels"]),
        "case_classes": {c: int(cases[c]) for c in fold_cases if c in cases},
    }


def apply_to_metadata(meta: dict, names: list[str], head: str) -> dict:
    """metadata.json declares the second output: the case's class, ``channel_def`` = the class names."""
    meta = copy.deepcopy(meta)
    fmt = meta["network_data_format"]
    fmt["outputs"]["class"] = {
        "type": "probabilities", "format": "classes", "num_channels": len(names), "spatial_shape": [],
        "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
        "channel_def": {str(i): n for i, n in enumerate(names)}}
    # after postprocessing: the case's probabilities (and argmax) in output_dir/classification.csv
    fmt.setdefault("post_processed_outputs", {})["class"] = dict(fmt["outputs"]["class"])
    meta["task"] = meta["task"] + f", and case classification ({', '.join(names)})"
    meta["description"] = (meta["description"] + f" Multi-task: a '{head}' classification head predicts one of "
                           f"{len(names)} classes per case (classification.csv).")
    meta["pred_classes"] = meta.get("pred_classes", "") + "; case classes: " + ", ".join(
        f"{i}: {n}" for i, n in enumerate(names))
    return meta


def readme_section(train: dict) -> str:
    """The bundle README's section on the classification head ("" for a segmentation-only bundle)."""
    if not train.get("classification_head"):
        return ""
    names = ", ".join(f"{i} = {n}" for i, n in enumerate(train["classification_names"]))
    return f"""
## Classification
Besides the label map, this bundle predicts one class per case ({names}) with a `{train['classification_head']}`
head (`classification_head`: `simple`, `roi` or `attention`; docs/bundles.md of autoplan describes them) on the
segmentation encoder; the lesion is labels {train['lesion_labels']} (`lesion_labels`). The loss is the
segmentation loss plus `classification_weight` ({train['classification_weight']}) x cross-entropy
(`classification_class_weights`: {json.dumps(train['classification_class_weights'])}). Each validation logs the
classification accuracy and macro-F1 of the validation patches holding a lesion, in `eval/progress.png` and
`eval/progress.json`. Inference also writes `classification.csv` (`case,class,p_0,...`) to `output_dir`: the
sliding windows' and mirrored copies' class probabilities averaged with the predicted lesion mass of each as weight.
The head is part of the network: train and infer with the same `classification_head`.
"""
