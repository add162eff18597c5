"""nnU-Net's evaluation (spec 7.1): per-case Dice/IoU and confusion counts, and ``summary.json``.

MONAI's metrics differ in their NaN rules and output format; model selection and users compare against nnU-Net's
``summary.json``, so its numbers and schema are reproduced here (numpy + SimpleITK only).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import SimpleITK as sitk


def labels_or_regions(labels: dict) -> list:
    """What to evaluate, from a dataset.json ``labels`` mapping (name -> int or list of ints).

    As nnU-Net's label manager: with regions (any value a list of length > 1) the non-background, non-``ignore``
    values in dataset.json order, lists as tuples; otherwise the sorted foreground label ints.
    """
    values = [v for name, v in labels.items() if name != "ignore"]
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in values):
        keys = []
        for v in values:
            if isinstance(v, (list, tuple)):
                if set(int(x) for x in v) != {0}:
                    keys.append(tuple(int(x) for x in v))
            elif int(v) != 0:
                keys.append(int(v))
        return keys
    flat = {int(x) for v in values for x in (v if isinstance(v, (list, tuple)) else [v])}
    return sorted(flat - {0})


def region_mask(seg: np.ndarray, label_or_region) -> np.ndarray:
    """Boolean mask of a label, or of the union of a region's labels."""
    if isinstance(label_or_region, (list, tuple)):
        return np.isin(seg, [int(x) for x in label_or_region])
    return seg == label_or_region


def _as_key(label_or_region):
    """Normalise to a plain int or a tuple of ints, so the string form is nnU-Net's ("1", "(1, 2)")."""
    if isinstance(label_or_region, (list, tuple)):
        return tuple(int(x) for x in label_or_region)
    return int(label_or_region)


def key_to_str(label_or_region) -> str:
    """JSON key as nnU-Net writes it: ``"1"`` for a label, ``"(1, 2, 3)"`` for a region; strings pass through."""
    return label_or_region if isinstance(label_or_region, str) else str(_as_key(label_or_region))


def str_to_key(key: str):
    """Inverse of ``key_to_str``: ``"1"`` -> 1, ``"(1, 2)"`` -> (1, 2)."""
    key = key.strip()
    if key.startswith("("):
        return tuple(int(x) for x in key.strip("()").split(",") if x.strip())
    return int(key)


def compute_case_metrics(reference: np.ndarray, prediction: np.ndarray, labels_or_regions,
                         ignore_label=None) -> dict:
    """TP, FP, FN, TN, n_pred, n_ref, Dice and IoU per label/region of one case.

    Voxels where the reference holds ``ignore_label`` count nowhere. Dice and IoU are NaN when TP+FP+FN == 0 (nothing
    to find and nothing predicted), as nnU-Net does; the summary's ``nanmean`` then skips such cases.
    """
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    use = None if ignore_label is None else reference != ignore_label
    n_used = reference.size if use is None else int(np.count_nonzero(use))
    results = {}
    for key in labels_or_regions:
        key = _as_key(key)
        ref, pred = region_mask(reference, key), region_mask(prediction, key)
        if use is not None:
            ref &= use
            pred &= use
        tp = int(np.count_nonzero(ref & pred))
        n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
        fp, fn = n_pred - tp, n_ref - tp
        union = tp + fp + fn
        results[key] = {
            "Dice": 2 * tp / (2 * tp + fp + fn) if union else float("nan"),
            "IoU": tp / union if union else float("nan"),
            "FP": fp, "TP": tp, "FN": fn, "TN": n_used - union,
            "n_pred": n_pred, "n_ref": n_ref,
        }
    return results


def summarize(per_case: list[dict], labels_or_regions) -> dict:
    """nnU-Net's summary: ``metric_per_case``, ``mean`` (nanmean over cases), ``foreground_mean``.

    ``per_case`` entries are ``{"metrics": compute_case_metrics(...), "prediction_file": ..., "reference_file": ...}``
    (a bare metrics dict is accepted too). ``foreground_mean`` is a plain mean over the per-label means, so one label
    that is NaN in every case makes it NaN, as in nnU-Net. Keys come back as strings, ready for ``save_summary``.
    """
    if not per_case:
        raise ValueError("no cases to summarize")
    keys = [key_to_str(k) for k in labels_or_regions]
    cases = []
    for entry in per_case:
        metrics = entry["metrics"] if "metrics" in entry else entry
        cases.append({
            "metrics": {key_to_str(k): {m: _plain(v) for m, v in ms.items()} for k, ms in metrics.items()},
            "prediction_file": entry.get("prediction_file"),
            "reference_file": entry.get("reference_file"),
        })
    names = list(next(iter(cases[0]["metrics"].values())).keys()) if cases[0]["metrics"] else []
    mean = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns and empty means are NaN, not errors
        for k in keys:
            mean[k] = {m: float(np.nanmean([c["metrics"][k][m] for c in cases])) for m in names}
        foreground_mean = {m: float(np.mean([mean[k][m] for k in keys if k != "0"])) for m in names}
    return {"metric_per_case": cases, "mean": mean, "foreground_mean": foreground_mean}


def _plain(value):
    """numpy scalars -> Python numbers (json cannot write numpy ints)."""
    return value.item() if isinstance(value, np.generic) else value


def _jsonable(obj):
    if isinstance(obj, dict):
        return {key_to_str(k) if isinstance(k, (int, tuple, np.integer)) else k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return _plain(obj)


def save_summary(summary: dict, path) -> None:
    """Write ``summary`` as JSON (sorted keys, indent 4, NaN as ``NaN``) atomically: temp file, then ``os.replace``."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".summary-", suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(summary), f, sort_keys=True, indent=4)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_geometry(ref: sitk.Image, pred: sitk.Image, ref_file: str, pred_file: str) -> None:
    """A prediction must lie on its reference's grid; otherwise voxel-wise metrics are meaningless."""
    checks = [("shape", ref.GetSize(), pred.GetSize()), ("spacing", ref.GetSpacing(), pred.GetSpacing()),
              ("origin", ref.GetOrigin(), pred.GetOrigin()), ("direction", ref.GetDirection(), pred.GetDirection())]
    for what, r, p in checks:
        if len(r) != len(p) or not np.allclose(r, p, rtol=1e-5, atol=1e-4):
            raise ValueError(f"{pred_file}: {what} {tuple(p)} differs from the reference's {tuple(r)} ({ref_file})")


def evaluate_case(reference_file: str, prediction_file: str, labels_or_regions, ignore_label=None) -> dict:
    """Read one reference/prediction pair with SimpleITK, check geometry, and compute its metrics."""
    ref, pred = sitk.ReadImage(reference_file), sitk.ReadImage(prediction_file)
    _check_geometry(ref, pred, reference_file, prediction_file)
    metrics = compute_case_metrics(sitk.GetArrayViewFromImage(ref), sitk.GetArrayViewFromImage(pred),
                                   labels_or_regions, ignore_label)
    return {"metrics": metrics, "prediction_file": prediction_file, "reference_file": reference_file}


def evaluate_folder(reference_dir, prediction_dir, file_ending: str, labels: dict, ignore_label=None,
                    processes: int = 1, output_file=None, chill: bool = False) -> dict:
    """nnU-Net's ``evaluate_folder``: every prediction in ``prediction_dir`` against the same-named reference.

    Without ``chill``, references lacking a prediction are an error (as nnU-Net's CLI). ``ignore_label`` defaults to
    the ``ignore`` entry of ``labels``. Returns the summary and writes it to ``output_file`` when given.
    """
    reference_dir, prediction_dir = os.fspath(reference_dir), os.fspath(prediction_dir)
    if ignore_label is None:
        ignore_label = labels.get("ignore")

    def listing(folder):
        return sorted(f for f in os.listdir(folder)
                      if f.endswith(file_ending) and os.path.isfile(os.path.join(folder, f)))

    predictions, references = listing(prediction_dir), listing(reference_dir)
    orphans = sorted(set(predictions) - set(references))
    if orphans:
        raise ValueError(f"no reference in {reference_dir} for prediction(s): {', '.join(orphans)}")
    if not chill:
        missing = sorted(f[: -len(file_ending)] for f in set(references) - set(predictions))
        if missing:
            raise ValueError(f"{len(missing)} reference case(s) have no prediction in {prediction_dir}: "
                             f"{', '.join(missing)} (pass chill=True to evaluate only the predicted cases)")
    if not predictions:
        raise ValueError(f"no predictions ending in {file_ending!r} in {prediction_dir}")
    jobs = [(os.path.join(reference_dir, f), os.path.join(prediction_dir, f)) for f in predictions]
    return evaluate_files(jobs, labels, ignore_label, processes, output_file)


def evaluate_files(pairs: list, labels: dict, ignore_label=None, processes: int = 1, output_file=None) -> dict:
    """Every ``(reference file, prediction file)`` pair scored and summarised as nnU-Net's ``summary.json``."""
    keys = labels_or_regions(labels)
    n = len(pairs)
    if processes > 1 and n > 1:
        with ProcessPoolExecutor(min(processes, n), mp_context=multiprocessing.get_context("spawn")) as pool:
            per_case = list(pool.map(evaluate_case, *zip(*pairs), [keys] * n, [ignore_label] * n))
    else:
        per_case = [evaluate_case(r, p, keys, ignore_label) for r, p in pairs]
    summary = summarize(per_case, keys)
    if output_file is not None:
        save_summary(summary, output_file)
    return summary
