"""Multi-task datasets and bundles: segmentation plus one class per case (dataset.json's ``classification`` block).

dataset.json may hold::

    "classification": {"names": {"0": "subtype0", "1": "subtype1"}, "cases": {"CASE": 0, ...}}

``check_classification`` validates the block against the training cases (``verify`` and the fingerprint run it);
``class_distribution`` counts the cases per class. When a dataset has classes, ``apply_to_bundle`` turns the
emitted train.json / inference.json / metadata.json of a plain segmentation bundle into a multi-task one: every
change is made through top-level ids and a few nested ids (``network_def#_target_``, ``inferer#_target_``, ...), so
the templates themselves stay segmentation-only. The runtime lives in ``bundles/scripts/classification.py``.
"""

from __future__ import annotations

import copy
import json

HEADS = ("simple", "roi", "attention")
DEFAULT_HEAD = "roi"


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
def _set(config: dict, path: str, value) -> None:
    """Set a nested id (``a#b#c``) of a config dict, as MONAI's ConfigParser does with such keys."""
    keys = path.split("#")
    node = config
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[keys[-1]] = value


def _replace_target(transforms: list, target: str, replacement: dict) -> bool:
    for i, t in enumerate(transforms):
        if isinstance(t, dict) and t.get("_target_") == target:
            transforms[i] = {**t, **replacement}
            return True
    return False


def classification_values(spec: dict, values: dict, head: str | None = None) -> dict:
    """The top-level ids a multi-task bundle adds (train.json gets all; inference.json those it uses)."""
    head = head or DEFAULT_HEAD
    if head not in HEADS:
        raise ValueError(f"classification head must be one of {', '.join(HEADS)}, got {head!r}")
    cases = spec["classification"]["cases"]
    fold_cases = list(values.get("train_cases", [])) + list(values.get("val_cases", []))
    return {
        "classification_head": head,
        "classification_names": class_names(spec),
        "num_classification_classes": len(class_names(spec)),
        "lesion_labels": list(values["foreground_labels"]),
        "classification_weight": 1.0,
        "classification_class_weights": None,
        "classification_sigma": 1.0,
        "case_classes": {c: int(cases[c]) for c in fold_cases if c in cases},
    }


NETWORK_IDS = {"head": "@classification_head", "num_classification_classes": "@num_classification_classes",
               "lesion_labels": "@lesion_labels", "sigma": "@classification_sigma"}
INFERENCE_IDS = ("classification_head", "classification_names", "num_classification_classes", "lesion_labels",
                 "classification_sigma")


def apply_to_train(train: dict, extra: dict) -> dict:
    """train.json of a multi-task bundle: the multi-task network, loss, batch preparation, validation metrics and
    progress plot, through ids (the segmentation parts stay as the template made them)."""
    train = copy.deepcopy(train)
    train.update(extra)
    train["imports"] = list(train["imports"]) + ["$import scripts.classification"]
    _set(train, "network_def#_target_", "scripts.classification.multitask_from_plan")
    for key, value in NETWORK_IDS.items():
        _set(train, f"network_def#{key}", value)
    train["segmentation_loss"] = train["loss"]
    train["loss"] = {"_target_": "scripts.classification.MultiTaskLoss", "segmentation_loss": "@segmentation_loss",
                     "weight": "@classification_weight", "class_weights": "@classification_class_weights"}
    train["prepare_batch"] = {"_target_": "scripts.classification.MultiTaskPrepareBatch",
                              "case_classes": "@case_classes", "lesion_labels": "@lesion_labels"}
    train["validate_prepare_batch"] = {"_target_": "scripts.classification.MultiTaskPrepareBatch",
                                       "case_classes": "@case_classes", "lesion_labels": "@lesion_labels",
                                       "reference_mask": False}
    _set(train, "train#trainer#prepare_batch", "@prepare_batch")
    _set(train, "validate#evaluator#prepare_batch", "@validate_prepare_batch")
    _set(train, "validate#key_metric#val_pseudo_dice#output_transform",
         "$scripts.classification.segmentation_output")
    train["classification_metric"] = {"_target_": "scripts.classification.ClassificationMetric",
                                      "num_classes": "@num_classification_classes", "lesion_labels": "@lesion_labels"}
    _set(train, "validate#evaluator#additional_metrics", {"val_classification": "@classification_metric"})
    handlers = train["train"]["handlers"]
    if not _replace_target(handlers, "scripts.handlers.TrainingProgress",
                           {"_target_": "scripts.classification.MultiTaskProgress",
                            "classification_metric": "@classification_metric"}):
        raise ValueError("train.json: no scripts.handlers.TrainingProgress handler to extend")
    return train


def apply_to_inference(inference: dict, train_values: dict, ensemble: bool = False) -> dict:
    """inference.json (or an ensemble's) of a multi-task bundle: the multi-task network and inferer, and
    ``classification.csv`` written by the postprocessing."""
    inference = copy.deepcopy(inference)
    inference.update({k: train_values[k] for k in INFERENCE_IDS if k in train_values})
    inference["imports"] = list(inference["imports"]) + ["$import scripts.classification"]
    if ensemble:
        _set(inference, "inferer#_target_", "scripts.classification.MultiTaskEnsembleInferer")
    else:
        _set(inference, "network_def#_target_", "scripts.classification.multitask_from_plan")
        for key, value in NETWORK_IDS.items():
            _set(inference, f"network_def#{key}", value)
        _set(inference, "inferer#_target_", "scripts.classification.MultiTaskInferer")
    inference["classification_output"] = {"_target_": "scripts.classification.ClassificationOutputd",
                                           "inferer": "@inferer", "output_dir": "@output_dir",
                                           "names": "@classification_names"}
    inference["postprocessing"]["transforms"].insert(0, "@classification_output")
    return inference


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
    if "classification_head" not in train:
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
