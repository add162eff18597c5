"""Evaluate predicted segmentations against references: nnU-Net's ``summary.json`` plus HD95 and NSD, a CSV and a plot.

Usage (``python tools/evaluate.py`` takes the same arguments)::

    autoplan evaluate REF_DIR PRED_DIR --dataset-json dataset.json [--out PRED_DIR/summary.json]
                      [--processes 1] [--chill] [--nsd-tolerance 1.0]

Every prediction ``PRED_DIR/<case><file_ending>`` is compared with ``REF_DIR/<case><file_ending>``. Labels, regions
and the ignore label come from dataset.json (``labels``, ``file_ending``). Without ``--chill`` every reference needs a
prediction, as ``nnUNetv2_evaluate_folder``.

Outputs, each written atomically (temporary file, then ``os.replace``):

* ``summary.json`` (``--out``): nnU-Net's schema and numbers, computed by ``bundles.scripts.evaluation`` (Dice, IoU,
  TP, FP, FN, TN, n_pred, n_ref per case and label/region; ``mean`` = nanmean over cases; ``foreground_mean`` = plain
  mean over labels). Two extra keys per label, which nnU-Net ignores, are added to ``metric_per_case`` and, with the
  same averaging rules, to ``mean`` and ``foreground_mean``:

  - ``HD95``: 95th-percentile Hausdorff distance in mm (MONAI's ``compute_hausdorff_distance(percentile=95)``: the
    larger of the two directed 95th percentiles of the distances between edge voxels, with the image spacing);
  - ``NSD``: normalised surface Dice (MONAI's ``compute_surface_dice``): the fraction of edge voxels of both masks
    lying within ``--nsd-tolerance`` mm (default 1) of the other mask's edge.

  Empty masks (after removing the reference's ignore voxels from both masks, as for Dice):

  =========================  ==========  =======
  reference / prediction     HD95        NSD
  =========================  ==========  =======
  both empty                 NaN         NaN     (nothing to measure; skipped by the nanmean, like Dice)
  only one of them empty     inf         0.0     (no surface to reach: an unbounded distance)
  both present               MONAI       MONAI
  =========================  ==========  =======

  Consequently ``mean.<label>.HD95`` is ``inf`` as soon as one case misses a structure or predicts one that is
  absent, and ``foreground_mean.HD95`` is ``inf`` if any label's mean is; ``summary.csv`` has the per-case values for
  other aggregations. JSON holds ``NaN`` and ``Infinity`` literals (as nnU-Net's own summary holds ``NaN``).
  Volumes with a single slice (2-D data stored as 3-D) are measured in 2-D, so the slice is not all edge.
* ``classification`` in ``summary.json`` when dataset.json has a ``classification`` block (a multi-task dataset)
  and ``PRED_DIR/classification.csv`` exists (what multi-task bundles write): ``macro_f1`` (mean F1 over every
  declared class, a class never referenced nor predicted counting 0: scikit-learn's ``f1_score(average="macro",
  labels=<all declared classes>, zero_division=0)``), ``f1_per_class``, ``accuracy``, ``confusion_matrix`` (rows:
  reference class), ``class_names``, ``num_cases`` and ``per_case``, over the evaluated cases. A case missing from
  the CSV is bad input naming it.
* ``<stem>.csv`` next to it: one row per case and label/region with every metric (plus ``reference_class`` and
  ``predicted_class`` with a classification).
* ``<stem>_dice.png`` next to it: per-label Dice distribution over cases (box plot with the cases as points), and the
  classification's confusion matrix beside it.

Bad input (missing/unreadable dataset.json or image, a missing prediction without ``--chill``, a prediction whose
size, spacing, origin or direction differs from its reference) prints one line per problem naming the file and
exits with status 2.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bundles.scripts import evaluation
from tools.cli import fire_as

EXIT_BAD_INPUT = 2
SURFACE_METRICS = ("HD95", "NSD")
CSV_METRICS = ("Dice", "IoU", "TP", "FP", "FN", "TN", "n_ref", "n_pred") + SURFACE_METRICS
# same tolerances as evaluation's own geometry check, so the two never disagree
GEOMETRY_RTOL, GEOMETRY_ATOL = 1e-5, 1e-4


class InputError(Exception):
    """Bad input; ``problems`` holds one message per problem, each naming its file."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------------------------------------- inputs

def load_dataset_json(path) -> dict:
    """dataset.json as a dict, with ``labels`` and ``file_ending`` checked; InputError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: dataset.json not found")
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read dataset.json ({exc})") from None
    problems = []
    if not isinstance(spec, dict):
        raise InputError(f"{path}: expected a JSON object")
    labels = spec.get("labels")
    if not isinstance(labels, dict) or not labels:
        problems.append(f"{path}: 'labels' must be a non-empty mapping of name -> int or list of ints")
    else:
        for name, value in labels.items():
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                problems.append(f"{path}: label {name!r} must be an int or a list of ints, not {value!r}")
        if labels.get("background", 0) != 0:
            problems.append(f"{path}: 'background' must be 0, not {labels['background']!r}")
        if "ignore" in labels and not isinstance(labels["ignore"], int):
            problems.append(f"{path}: the 'ignore' label must be a single int, not {labels['ignore']!r}")
    if not isinstance(spec.get("file_ending"), str) or not spec.get("file_ending"):
        problems.append(f"{path}: 'file_ending' (e.g. \".nii.gz\") is missing")
    if problems:
        raise InputError(problems)
    if not evaluation.labels_or_regions(labels):
        raise InputError(f"{path}: no foreground label or region to evaluate")
    return spec


def _listing(folder: Path, file_ending: str) -> list[str]:
    return sorted(f.name for f in folder.iterdir() if f.name.endswith(file_ending) and f.is_file())


def find_pairs(reference_dir, prediction_dir, file_ending: str, chill: bool = False):
    """``(pairs, problems)``: (reference, prediction) paths of every prediction that has a reference, and one message
    per prediction without reference or (unless ``chill``) reference without prediction.

    Paths are ``os.path.join(folder, name)`` with the folders as given, as ``evaluate_folder`` writes them. Missing
    folders or no predictions at all raise InputError.
    """
    problems = []
    for what, folder in (("reference", reference_dir), ("prediction", prediction_dir)):
        if not Path(folder).is_dir():
            problems.append(f"{folder}: {what} folder not found")
    if problems:
        raise InputError(problems)
    predictions = _listing(Path(prediction_dir), file_ending)
    references = _listing(Path(reference_dir), file_ending)
    refs = set(references)
    for name in predictions:
        if name not in refs:
            problems.append(f"{os.path.join(prediction_dir, name)}: no reference {name} in {reference_dir}")
    if not chill:
        preds = set(predictions)
        for name in references:
            if name not in preds:
                problems.append(f"{os.path.join(prediction_dir, name)}: prediction missing (reference "
                                f"{os.path.join(reference_dir, name)}; --chill evaluates only what is predicted)")
    if not predictions:
        raise InputError(problems + [f"{prediction_dir}: no predictions ending in {file_ending!r}"])
    pairs = [(os.path.join(os.fspath(reference_dir), n), os.path.join(os.fspath(prediction_dir), n))
             for n in predictions if n in refs]
    return pairs, problems


def _sitk_reason(exc: Exception) -> str:
    """The useful line of a SimpleITK exception (they start with a C++ source location)."""
    text = str(exc)
    for marker in ("sitk::ERROR:", "itk::ERROR:", "ERROR:"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _header(path: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot read ({_sitk_reason(exc)})") from None
    return reader


def check_pair(reference_file: str, prediction_file: str) -> list[str]:
    """Header-only checks of one pair: both readable, single-component 2-D/3-D images on the same grid."""
    problems = []
    headers = {}
    for f in (reference_file, prediction_file):
        if not os.path.isfile(f):
            problems.append(f"{f}: file not found")
            continue
        try:
            h = _header(f)
        except InputError as exc:
            problems.extend(exc.problems)
            continue
        if h.GetDimension() not in (2, 3):
            problems.append(f"{f}: {h.GetDimension()}-D image; expected a 2-D or 3-D label map")
        elif h.GetNumberOfComponents() != 1:
            problems.append(f"{f}: {h.GetNumberOfComponents()} components per voxel; expected a label map")
        else:
            headers[f] = h
    if len(headers) < 2:
        return problems
    ref, pred = headers[reference_file], headers[prediction_file]
    if ref.GetDimension() != pred.GetDimension() or ref.GetSize() != pred.GetSize():
        return [f"{prediction_file}: size {_fmt(pred.GetSize())} differs from the reference's {_fmt(ref.GetSize())} "
                f"({reference_file})"]
    for what, r, p in (("spacing", ref.GetSpacing(), pred.GetSpacing()), ("origin", ref.GetOrigin(), pred.GetOrigin()),
                       ("direction", ref.GetDirection(), pred.GetDirection())):
        if not np.allclose(r, p, rtol=GEOMETRY_RTOL, atol=GEOMETRY_ATOL):
            problems.append(f"{prediction_file}: {what} {_fmt(p)} differs from the reference's {_fmt(r)} "
                            f"({reference_file})")
    return problems


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + ")"


# --------------------------------------------------------------------------------------------- surface metrics

def _crop_to_union(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Crop to the union's bounding box plus one voxel (distances do not depend on the crop; it saves memory)."""
    union = np.logical_or.reduce(masks)
    coords = np.nonzero(union)
    box = tuple(slice(max(int(c.min()) - 1, 0), int(c.max()) + 2) for c in coords)
    return [m[box] for m in masks]


def surface_metrics(reference: np.ndarray, prediction: np.ndarray, labels_or_regions, spacing,
                    ignore_label=None, tolerance: float = 1.0) -> dict:
    """HD95 (mm) and NSD per label/region of one case, with MONAI's metrics; keys as in summary.json ("1", "(1, 2)").

    ``spacing`` is per array axis (SimpleITK arrays are z, y, x, so the reverse of ``GetSpacing()``). Voxels where
    the reference holds ``ignore_label`` are removed from both masks. Empty-mask rules: both empty -> NaN, NaN; one
    empty -> inf, 0.0.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    reference, prediction = np.asarray(reference), np.asarray(prediction)
    spacing = [float(s) for s in spacing]
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} != prediction shape {prediction.shape}")
    if len(spacing) != reference.ndim:
        raise ValueError(f"{len(spacing)} spacings for a {reference.ndim}-D array")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"NSD tolerance must be a finite number >= 0, not {tolerance}")
    kept = [i for i, n in enumerate(reference.shape) if n > 1]
    if 2 <= len(kept) < reference.ndim:  # a single slice: measure in 2-D, otherwise the whole slice is edge
        shape = [reference.shape[i] for i in kept]
        reference, prediction = reference.reshape(shape), prediction.reshape(shape)
        spacing = [spacing[i] for i in kept]
    use = None if ignore_label is None else reference != ignore_label
    results = {}
    for key in labels_or_regions:
        ref, pred = evaluation.region_mask(reference, key), evaluation.region_mask(prediction, key)
        if use is not None:
            ref &= use
            pred &= use
        has_ref, has_pred = bool(ref.any()), bool(pred.any())
        if not has_ref and not has_pred:
            hd95, nsd = float("nan"), float("nan")
        elif not (has_ref and has_pred):
            hd95, nsd = float("inf"), 0.0
        else:
            ref, pred = _crop_to_union([ref, pred])
            y = torch.from_numpy(np.ascontiguousarray(ref))[None, None]
            y_pred = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hd95 = float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                        spacing=spacing)[0, 0])
                nsd = float(compute_surface_dice(y_pred, y, [float(tolerance)], include_background=True,
                                                 spacing=spacing)[0, 0])
        results[evaluation.key_to_str(key)] = {"HD95": hd95, "NSD": nsd}
    return results


def _check_gzip(path: str) -> None:
    """Decompress a ``.gz`` file in full: ITK silently zero-fills truncated NIfTI files, the gzip CRC does not lie."""
    import gzip
    import zlib

    if not path.endswith(".gz"):
        return
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read (truncated or corrupt gzip data: {exc})") from None


def case_surface_metrics(reference_file: str, prediction_file: str, labels_or_regions, ignore_label=None,
                         tolerance: float = 1.0) -> dict:
    """Read one pair with SimpleITK and compute ``surface_metrics`` in mm; InputError naming the file on failure."""
    import SimpleITK as sitk

    images = []
    for f in (reference_file, prediction_file):
        _check_gzip(f)
        try:
            images.append(sitk.ReadImage(f))
        except RuntimeError as exc:
            raise InputError(f"{f}: cannot read ({_sitk_reason(exc)})") from None
    ref, pred = images
    if ref.GetSize() != pred.GetSize():
        raise InputError(f"{prediction_file}: size {_fmt(pred.GetSize())} differs from the reference's "
                         f"{_fmt(ref.GetSize())} ({reference_file})")
    spacing = ref.GetSpacing()[::-1]
    return surface_metrics(sitk.GetArrayViewFromImage(ref), sitk.GetArrayViewFromImage(pred), labels_or_regions,
                           spacing, ignore_label, tolerance)


def _surface_worker(args):
    reference_file, prediction_file, keys, ignore_label, tolerance = args
    try:
        import torch

        torch.set_num_threads(1)
        return case_surface_metrics(reference_file, prediction_file, keys, ignore_label, tolerance)
    except InputError as exc:
        return exc.problems  # exceptions with custom arguments do not cross process boundaries reliably


# ------------------------------------------------------------------------------------------------------ outputs

def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def label_names(labels: dict) -> dict:
    """summary key ("1", "(1, 2)") -> the name dataset.json gives it."""
    names = {}
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        if isinstance(value, list):
            names.setdefault(evaluation.key_to_str(tuple(value)), name)
            if len(value) == 1:  # without regions a one-element list is a plain label
                names.setdefault(evaluation.key_to_str(value[0]), name)
        else:
            names.setdefault(evaluation.key_to_str(value), name)
    return names


def _case_id(path: str, file_ending: str) -> str:
    name = os.path.basename(path)
    return name[: -len(file_ending)] if name.endswith(file_ending) else name


def summary_csv(summary: dict, names: dict, file_ending: str) -> str:
    """One row per case and label/region: identifiers, files and every metric (``nan``/``inf`` spelt out)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    classes = (summary.get("classification") or {}).get("per_case")
    extra = ["reference_class", "predicted_class"] if classes is not None else []
    writer.writerow(["case", "label", "name", *CSV_METRICS, "reference_file", "prediction_file", *extra])
    for case in summary["metric_per_case"]:
        case_id = _case_id(case["prediction_file"], file_ending)
        row_extra = [classes[case_id]["reference"], classes[case_id]["predicted"]] if classes is not None else []
        for key, metrics in case["metrics"].items():
            writer.writerow([case_id, key, names.get(key, key), *[metrics.get(m, "") for m in CSV_METRICS],
                             case["reference_file"], case["prediction_file"], *row_extra])
    return buffer.getvalue()


def dice_plot(summary: dict, names: dict) -> bytes:
    """PNG: per-label Dice over cases, a box plot with every case as a point (NaN cases left out)."""
    from matplotlib.figure import Figure

    keys = list(summary["mean"])
    values = [[c["metrics"][k]["Dice"] for c in summary["metric_per_case"]] for k in keys]
    values = [[v for v in vs if v is not None and math.isfinite(v)] for vs in values]
    classification = summary.get("classification")
    width = max(4.0, 1.2 * len(keys) + 2)
    fig = Figure(figsize=(width + (4.5 if classification else 0), 4.0), dpi=100)
    if classification:
        ax, cm_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [width, 4.5]})
        _confusion_plot(cm_ax, classification)
    else:
        ax = fig.subplots()
    positions = list(range(1, len(keys) + 1))
    shown = [(p, v) for p, v in zip(positions, values) if v]
    if shown:
        ax.boxplot([v for _, v in shown], positions=[p for p, _ in shown], widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for p, v in zip(positions, values):
        if v:
            ax.scatter(p + rng.uniform(-0.12, 0.12, len(v)), v, s=10, alpha=0.6, color="tab:blue", zorder=3)
        else:
            ax.text(p, 0.5, "no cases", ha="center", va="center", color="grey")
    ax.set_xticks(positions)
    ax.set_xticklabels([f"{names.get(k, k)}\n{k}" for k in keys], fontsize=8)
    ax.set_xlim(0.5, len(keys) + 0.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    fg = summary["foreground_mean"].get("Dice", float("nan"))
    ax.set_title(f"Dice per case ({len(summary['metric_per_case'])} cases), foreground mean {fg:.4f}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _confusion_plot(ax, classification: dict) -> None:
    """The classification's confusion matrix (rows: reference), with macro-F1 and accuracy in the title."""
    matrix = np.asarray(classification["confusion_matrix"])
    names = [classification["class_names"][str(k)] for k in range(len(matrix))]
    ax.imshow(matrix, cmap="Blues")
    for (r, c), value in np.ndenumerate(matrix):
        ax.text(c, r, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8, rotation=30)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("reference class")
    ax.set_title(f"macro-F1 {classification['macro_f1']:.4f}, accuracy {classification['accuracy']:.4f}", fontsize=10)


def output_paths(out) -> tuple[Path, Path, Path]:
    """summary JSON, CSV (same stem) and Dice plot (``<stem>_dice.png``) paths."""
    out = Path(out)
    return out, out.with_suffix(".csv"), out.with_name(out.stem + "_dice.png")


# --------------------------------------------------------------------------------------------------------- main

def evaluate_predictions(reference_dir, prediction_dir, dataset_json, out=None, processes: int = 1,
                         chill: bool = False, nsd_tolerance: float = 1.0) -> dict:
    """Library form of the CLI: validates, evaluates, writes the three outputs and returns the summary.

    Raises InputError (one message per problem, each naming its file) on bad input.
    """
    spec = load_dataset_json(dataset_json)
    labels, file_ending = spec["labels"], spec["file_ending"]
    try:
        nsd_tolerance = float(nsd_tolerance)
    except (TypeError, ValueError):
        raise InputError(f"--nsd-tolerance must be a number, not {nsd_tolerance!r}") from None
    if not (math.isfinite(nsd_tolerance) and nsd_tolerance >= 0):
        raise InputError(f"--nsd-tolerance must be a finite number >= 0, not {nsd_tolerance}")
    try:
        processes = max(1, int(processes))
    except (TypeError, ValueError):
        raise InputError(f"--processes must be an integer, not {processes!r}") from None
    out = Path(os.path.join(os.fspath(prediction_dir), "summary.json") if out is None else os.fspath(out))
    if out.suffix != ".json":
        raise InputError(f"{out}: the summary file must end with .json")

    pairs, problems = find_pairs(reference_dir, prediction_dir, file_ending, chill)
    problems += [p for r, q in pairs for p in check_pair(r, q)]
    if problems:
        raise InputError(problems)

    keys = evaluation.labels_or_regions(labels)
    ignore_label = labels.get("ignore")
    jobs = [(r, p, keys, ignore_label, nsd_tolerance) for r, p in pairs]
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            surface = list(pool.map(_surface_worker, jobs))
    else:
        surface = [_surface_worker(job) for job in jobs]
    problems = [p for s in surface if isinstance(s, list) for p in s]
    if problems:
        raise InputError(problems)

    try:
        summary = evaluation.evaluate_folder(reference_dir, prediction_dir, file_ending, labels, ignore_label,
                                             processes=processes, chill=chill)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(str(exc)) from None
    by_prediction = {p: s for (_, p), s in zip(pairs, surface)}
    for case in summary["metric_per_case"]:
        extra = by_prediction[case["prediction_file"]]
        for key, metrics in case["metrics"].items():
            metrics.update(extra[key])
    summary = evaluation.summarize(summary["metric_per_case"], keys)  # means of the extra keys, same rules
    classification = classification_summary(summary, spec, prediction_dir)
    if classification is not None:
        summary["classification"] = classification

    json_path, csv_path, png_path = output_paths(out)
    names = label_names(labels)
    evaluation.save_summary(summary, json_path)
    _write_atomic(csv_path, summary_csv(summary, names, file_ending).encode())
    _write_atomic(png_path, dice_plot(summary, names))
    return summary


def classification_summary(summary: dict, spec: dict, prediction_dir):
    """summary.json's ``classification`` (``bundles.scripts.classification.evaluate_classification``) when
    dataset.json has a ``classification`` block and ``PRED_DIR/classification.csv`` exists, else None."""
    from bundles.scripts.classification import CSV_NAME, evaluate_classification

    csv_file = Path(os.fspath(prediction_dir)) / CSV_NAME
    if not spec.get("classification") or not csv_file.is_file():
        return None
    ending = spec["file_ending"]
    cases = [_case_id(c["prediction_file"], ending) for c in summary["metric_per_case"]]
    try:
        return evaluate_classification(cases, csv_file, spec["classification"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"dataset.json: malformed 'classification' block ({exc!r})") from None
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _report(summary: dict, out: Path, names: dict) -> str:
    lines = [f"{'label':<24}{'Dice':>9}{'IoU':>9}{'HD95 mm':>10}{'NSD':>9}"]
    for key, m in summary["mean"].items():
        lines.append(f"{names.get(key, key)[:14] + ' ' + key:<24}{m['Dice']:>9.4f}{m['IoU']:>9.4f}{m['HD95']:>10.3f}"
                     f"{m['NSD']:>9.4f}")
    fg = summary["foreground_mean"]
    lines.append(f"{'foreground mean':<24}{fg['Dice']:>9.4f}{fg['IoU']:>9.4f}{fg['HD95']:>10.3f}{fg['NSD']:>9.4f}")
    if "classification" in summary:
        c = summary["classification"]
        lines.append(f"classification: macro-F1 {c['macro_f1']:.4f}, accuracy {c['accuracy']:.4f} "
                     f"({c['num_cases']} cases)")
    json_path, csv_path, png_path = output_paths(out)
    lines.append(f"{len(summary['metric_per_case'])} cases; wrote {json_path}, {csv_path.name}, {png_path.name}")
    return "\n".join(lines)


def evaluate(ref_dir, pred_dir, dataset_json, out=None, processes: int = 1, chill: bool = False,
             nsd_tolerance: float = 1.0):
    """Evaluate predictions like nnUNetv2_evaluate_folder (same summary.json), plus HD95 and NSD, a CSV and a plot.

    Exit status 2, with one line per problem naming the file, on bad input.

    Args:
        ref_dir: folder of reference label maps (e.g. labelsTr).
        pred_dir: folder of predictions, named as the references.
        dataset_json: the dataset's dataset.json (labels, regions, ignore label, file_ending).
        out: summary JSON to write (default PRED_DIR/summary.json); <stem>.csv and <stem>_dice.png go beside it.
        processes: worker processes.
        chill: evaluate only the predicted cases instead of requiring a prediction for every reference.
        nsd_tolerance: normalised surface Dice tolerance in mm.
    """
    out_path = Path(os.path.join(str(pred_dir), "summary.json") if out is None else str(out))
    try:
        summary = evaluate_predictions(str(ref_dir), str(pred_dir), str(dataset_json), out_path, processes,
                                       bool(chill), nsd_tolerance)
    except InputError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    print(_report(summary, out_path, label_names(load_dataset_json(str(dataset_json))["labels"])))


def main(argv=None, prog="evaluate.py"):
    fire_as(prog, evaluate, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
