"""Choose the best configuration or ensemble from cross-validation, and its postprocessing (nnU-Net's
``nnUNetv2_find_best_configuration``, spec 7.2 and 7.3).

Usage (``python tools/find_best.py`` takes the same arguments)::

    autoplan select BUNDLES_DIR [--configurations 2d,3d_fullres] [--folds 0,1,2,3,4] [--dataset-dir RAW]
                    [--dataset NAME] [--disable-ensembling] [--processes 1] [--device cpu] [--no-bundle]
                    [--criterion dice|dice_f1]

``BUNDLES_DIR`` holds the trained fold bundles ``<Dataset>_<configuration>_fold<k>`` (what ``autoplan run`` emits
into ``WORK/bundles``). Steps:

1. Candidates: every configuration with bundles there (or ``--configurations``), in nnU-Net's order ``2d``,
   ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres`` (others after, by name). ``3d_cascade_fullres`` (any
   configuration with a ``previous_stage``) counts only when all folds of its previous stage exist too. Every
   candidate needs every fold of ``--folds``.
2. Each configuration's folds' ``eval/validation/CASE<ending>`` are collected into ``selection/crossval/<config>/``
   (a case predicted by two folds is an error) and evaluated against ``<dataset_dir>/labelsTr`` (``dataset_dir``
   from the bundles' train.json, or ``--dataset-dir``): score = foreground mean Dice.
3. Every unordered pair of candidates is an ensemble: the folds' validation ``CASE.npz`` probabilities are averaged
   (``selection/ensembles/ensemble___<a>___<b>/``, geometry from ``<a>``'s label maps) and evaluated the same way.
   Bundles trained with ``save_probabilities`` false have no npz; their validation is then predicted again by
   ``python -m monai.bundle run evaluating --config_file "['configs/train.json','configs/evaluate.json']"
   --save_probabilities True`` in the bundle (its own code, one process per fold: a full sliding-window prediction
   with TTA of the fold's validation cases plus a few seconds of start-up). The new ``eval/validation`` replaces the
   old one (swapped in by rename). Missing validation label maps are regenerated the same way.
4. Best = highest score (NaN counts as lowest); ties go to the first in order, single configurations before
   ensembles. Multi-task bundles (a dataset with classes): the folds' ``classification.csv`` are merged (and
   averaged for a pair) like the label maps, every candidate's classification macro-F1 is reported beside its Dice,
   and the choice stays by Dice unless ``--criterion dice_f1`` scores each candidate by the mean of its foreground
   mean Dice and its macro-F1.
5. Postprocessing on the best (spec 7.3): keep the largest connected component of all foreground (full
   connectivity), accepted iff the foreground mean Dice strictly increases and no label's mean Dice decreases; then,
   with more than one label, keep the largest component of each label in turn on the current best result, accepted
   iff that label's mean Dice strictly increases. Results in ``selection/postprocessing/`` and
   ``selection/postprocessing.json``.
6. ``selection/<Dataset>_ensemble``: the best model as ONE MONAI Bundle (``autoplan ensemble make-bundle``): all
   folds of the best configuration (nnU-Net's final model of a configuration is its 5-fold ensemble), or of both
   configurations of the best pair, with the chosen postprocessing in its ``configs/inference.json``.
7. ``selection/report.json`` and ``selection/report.md``: every candidate with its scores, the winner, the
   postprocessing decisions with Dice before and after, how to predict.

The whole ``selection/`` folder is built in a temporary folder and renamed into place (an old one is replaced).
Bad input (no bundles, several datasets, missing folds or validation results of an untrained fold, mismatched
labels, a case predicted twice) prints ``error: ...`` naming the file and exits with status 2.
"""

import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from tools import ensemble
from tools.ensemble import ToolError

DEFAULT_ORDER = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
BUNDLE_NAME = re.compile(r"^(?P<prefix>.+)_fold(?P<fold>\d+)$")


# --- finding the fold bundles ----------------------------------------------------------------------------------
def find_bundles(bundles_dir: Path) -> dict:
    """``{dataset: {configuration: {fold: bundle path}}}`` of the fold bundles in ``bundles_dir``."""
    found: dict = {}
    for path in sorted(bundles_dir.iterdir()):
        match = BUNDLE_NAME.match(path.name)
        if not match or not path.is_dir() or not (path / "configs" / "inference.json").is_file():
            continue
        inference = ensemble.load_json(path / "configs" / "inference.json")
        if "members" in inference:
            continue  # an ensemble bundle
        configuration = inference.get("configuration")
        plans_path = path / "configs" / "plans.json"
        plans = ensemble.load_json(plans_path)
        dataset = plans.get("dataset_name") or match.group("prefix").rsplit("_" + str(configuration), 1)[0]
        if not isinstance(configuration, str) or not match.group("prefix").endswith("_" + configuration):
            raise ToolError(f"{path / 'configs' / 'inference.json'}: configuration {configuration!r} does not match "
                         f"the folder name {path.name}")
        folds = found.setdefault(dataset, {}).setdefault(configuration, {})
        folds[int(match.group("fold"))] = path
    return found


def order_configurations(names) -> list:
    return sorted(names, key=lambda c: (DEFAULT_ORDER.index(c) if c in DEFAULT_ORDER else len(DEFAULT_ORDER), c))


def previous_stage(bundle: Path):
    from bundles.scripts.preprocessing import resolve_configuration

    inference = ensemble.load_json(bundle / "configs" / "inference.json")
    plans = ensemble.load_json(bundle / "configs" / "plans.json")
    return resolve_configuration(plans, inference["configuration"]).get("previous_stage")


def choose_candidates(configs: dict, folds: list, wanted, bundles_dir: Path) -> tuple:
    """Candidate configurations in nnU-Net's order, and the skipped ones with the reason."""
    names = order_configurations(configs)
    if wanted:
        unknown = [c for c in wanted if c not in configs]
        if unknown:
            raise ToolError(f"{bundles_dir}: no bundles of configuration(s) {', '.join(unknown)} "
                         f"(found {', '.join(names) or 'none'})")
        names = [c for c in names if c in wanted]
    candidates, skipped = [], []
    for name in names:
        previous = previous_stage(next(iter(configs[name].values())))
        if previous and not all(f in configs.get(previous, {}) for f in folds):
            skipped.append({"configuration": name,
                            "reason": f"its previous stage {previous} lacks fold(s) "
                                      f"{[f for f in folds if f not in configs.get(previous, {})]}"})
            continue
        missing = [f for f in folds if f not in configs[name]]
        if missing:
            example = bundles_dir / f"{next(iter(configs[name].values())).name.rsplit('_fold', 1)[0]}_fold{missing[0]}"
            raise ToolError(f"{example}: missing; configuration {name} lacks fold(s) {missing} (train them, or pass "
                         f"--folds / --configurations)")
        candidates.append(name)
    if not candidates:
        raise ToolError(f"{bundles_dir}: no configuration has all folds {folds}")
    return candidates, skipped


# --- validation results ----------------------------------------------------------------------------------------
def fold_facts(bundle: Path, dataset_dir_override=None) -> dict:
    train_path = bundle / "configs" / "train.json"
    train = ensemble.load_json(train_path)
    dataset = ensemble.load_json(bundle / "configs" / "dataset.json")
    val_cases = train.get("val_cases")
    if not isinstance(val_cases, list):
        raise ToolError(f"{train_path}: val_cases must be a list of case names")
    dataset_dir = str(dataset_dir_override) if dataset_dir_override else train.get("dataset_dir", "")
    if not isinstance(dataset_dir, str) or dataset_dir[:1] in ("", "$", "@", "%"):
        from bundles.scripts.data import find_dataset

        dataset_dir = find_dataset(bundle, train.get("dataset_name", ""))
    if not dataset_dir:
        raise ToolError(f"{train_path}: the dataset of {bundle.name} is not found on this machine (no "
                        f"{bundle.parent / 'dataset_dir.txt'}, no $nnUNet_raw); pass --dataset-dir")
    return {"bundle": bundle, "val_cases": val_cases, "dataset_dir": dataset_dir, "spec": dataset,
            "file_ending": dataset.get("file_ending", ".nii.gz")}


def validation_complete(facts: dict, need_npz: bool) -> bool:
    folder = facts["bundle"] / "eval" / "validation"
    for case in facts["val_cases"]:
        if not (folder / f"{case}{facts['file_ending']}").is_file():
            return False
        if need_npz and not (folder / f"{case}.npz").is_file():
            return False
    return True


def regenerate_validation(facts: dict, dataset_dir_override=None, device=None) -> None:
    """Predict a fold's validation cases again with probabilities, in the bundle's own process and code."""
    import subprocess

    bundle = facts["bundle"]
    if not (bundle / "models" / "model.pt").is_file():
        raise ToolError(f"{bundle / 'models' / 'model.pt'}: missing; fold {bundle.name} has no validation results and "
                     "is not trained")
    for rel in ("configs/train.json", "configs/evaluate.json"):
        if not (bundle / rel).is_file():
            raise ToolError(f"{bundle / rel}: missing; cannot predict the fold's validation cases again")
    eval_dir = bundle / "eval"
    eval_dir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=eval_dir, prefix=".validation.tmp"))
    command = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
               "['configs/train.json','configs/evaluate.json']", "--save_probabilities", "True",
               "--output_dir", str(tmp)]
    if dataset_dir_override:
        command += ["--dataset_dir", str(dataset_dir_override)]
    if device:
        command += ["--device", f"$torch.device('{device}')"]
    print(f"predicting the validation cases of {bundle.name} again (probabilities needed)", flush=True)
    try:
        result = subprocess.run(command, cwd=bundle, capture_output=True, text=True)
        if result.returncode != 0 or not (tmp / "validation").is_dir():
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise ToolError(f"{bundle}: predicting its validation cases failed:\n  " + "\n  ".join(tail))
        target = eval_dir / "validation"
        old = None
        if target.exists():
            old = eval_dir / f".validation.old.{os.getpid()}"
            target.rename(old)
        (tmp / "validation").rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def collect_crossval(config: str, facts_by_fold: dict, out: Path) -> dict:
    """Copy every fold's validation label maps into ``out``; ``{case: npz path or None}``."""
    out.mkdir(parents=True)
    owner, npz = {}, {}
    for fold, facts in sorted(facts_by_fold.items()):
        folder = facts["bundle"] / "eval" / "validation"
        ending = facts["file_ending"]
        for f in sorted(folder.glob(f"*{ending}")):
            if f.name.startswith("."):
                continue
            case = f.name[: -len(ending)]
            if case in owner:
                raise ToolError(f"{f}: case {case} of {config} is predicted twice (folds {owner[case]} and {fold}); "
                             "the folds' validation cases must not overlap")
            owner[case] = fold
            shutil.copyfile(f, out / f.name)
            npz[case] = folder / f"{case}.npz" if (folder / f"{case}.npz").is_file() else None
    if not owner:
        raise ToolError(f"configuration {config}: no validation predictions in its folds' eval/validation")
    merge_classification([f["bundle"] / "eval" / "validation" for _, f in sorted(facts_by_fold.items())], out)
    return npz


def merge_classification(folders: list, out: Path) -> None:
    """Multi-task folds: their validation ``classification.csv`` rows together in ``out/classification.csv``."""
    from bundles.scripts.classification import CSV_NAME, read_classification_csv, write_classification_csv

    files = [Path(f) / CSV_NAME for f in folders if (Path(f) / CSV_NAME).is_file()]
    if files:
        rows = {case: p for f in files for case, (_, p) in read_classification_csv(f).items()}
        write_classification_csv(out / CSV_NAME, rows)


def evaluate(folder: Path, labels_dir: Path, spec: dict, processes: int) -> dict:
    from bundles.scripts.evaluation import evaluate_folder, save_summary
    from tools.evaluate import InputError, classification_summary

    summary = evaluate_folder(labels_dir, folder, spec.get("file_ending", ".nii.gz"), spec["labels"],
                              processes=processes, output_file=folder / "summary.json", chill=True)
    try:
        classification = classification_summary(summary, spec, folder)  # multi-task: folder/classification.csv
    except InputError as exc:
        raise ToolError("; ".join(exc.problems)) from None
    if classification is not None:
        summary["classification"] = classification
        save_summary(summary, folder / "summary.json")
    return summary


def score(summary: dict) -> float:
    value = float(summary["foreground_mean"]["Dice"])
    return value


CRITERIA = ("dice", "dice_f1")


def macro_f1(summary: dict):
    """The classification's macro-F1 of a summary (None without a classification)."""
    classification = summary.get("classification")
    return None if classification is None else float(classification["macro_f1"])


def candidate_score(dice: float, f1, criterion: str) -> float:
    """``dice``: the foreground mean Dice (nnU-Net's). ``dice_f1``: the mean of foreground mean Dice and the
    classification's macro-F1 (the Dice alone for a candidate without a classification)."""
    if criterion == "dice_f1" and f1 is not None:
        return (dice + f1) / 2
    return dice


def _sort_key(value: float) -> float:
    return -math.inf if math.isnan(value) else value


def best_candidate(results: list, key: str = "foreground_mean_dice") -> dict:
    """The highest ``key`` (foreground mean Dice); NaN is lowest; ties keep the first (singles come before
    ensembles)."""
    best = results[0]
    for result in results[1:]:
        if _sort_key(result[key]) > _sort_key(best[key]):
            best = result
    return best


def ensemble_pair(a: str, b: str, npz: dict, crossval: dict, out: Path, spec: dict) -> None:
    """Average the two configurations' validation probabilities into label maps in ``out``."""
    from bundles.scripts.ensemble import average_probability_files, probabilities_to_labels, write_label_map

    if set(npz[a]) != set(npz[b]):
        raise ToolError(f"configurations {a} and {b} did not predict the same validation cases "
                     f"(only in {a}: {sorted(set(npz[a]) - set(npz[b]))[:5]}, "
                     f"only in {b}: {sorted(set(npz[b]) - set(npz[a]))[:5]})")
    out.mkdir(parents=True)
    ending = spec.get("file_ending", ".nii.gz")
    for case in sorted(npz[a]):
        files = [npz[a][case], npz[b][case]]
        for config, f in zip((a, b), files):
            if f is None:
                raise ToolError(f"{crossval[config]}: no probabilities (CASE.npz) for {case}")
        probabilities = average_probability_files(files)
        seg = probabilities_to_labels(probabilities, spec.get("labels"), spec.get("regions_class_order"))
        write_label_map(seg, crossval[a] / f"{case}{ending}", out / f"{case}{ending}")
    ensemble.average_classification([crossval[a], crossval[b]], sorted(npz[a]), out)


# --- postprocessing --------------------------------------------------------------------------------------------
def postprocess_folder(source: Path, out: Path, labels: list, ending: str) -> None:
    """Keep the largest component of the union of ``labels`` in every label map of ``source``."""
    import SimpleITK as sitk

    from bundles.scripts.postprocessing import keep_largest

    out.mkdir(parents=True)
    for f in sorted(source.glob(f"*{ending}")):
        if f.name.startswith("."):
            continue
        image = sitk.ReadImage(str(f))
        seg = keep_largest(sitk.GetArrayFromImage(image), labels)
        result = sitk.GetImageFromArray(seg)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(out / f.name), True)


def _dice_table(summary: dict) -> dict:
    return {"foreground_mean": float(summary["foreground_mean"]["Dice"]),
            "per_label": {k: float(v["Dice"]) for k, v in summary["mean"].items()}}


def determine_postprocessing(folder: Path, summary: dict, labels_dir: Path, spec: dict, work: Path,
                             processes: int) -> dict:
    """Spec 7.3 on ``folder`` (already evaluated as ``summary``); intermediate folders go to ``work``."""
    from bundles.scripts.evaluation import key_to_str, labels_or_regions
    from bundles.scripts.postprocessing import accept_all_foreground, accept_label

    ending = spec.get("file_ending", ".nii.gz")
    keys = labels_or_regions(spec["labels"])  # labels, or regions (tuples) for region-based datasets
    foreground = sorted({int(v) for k in keys for v in (k if isinstance(k, tuple) else [k])})
    steps = []
    current_folder, current = folder, summary
    trial = work / "keep_largest_foreground"
    postprocess_folder(current_folder, trial, foreground, ending)
    processed = evaluate(trial, labels_dir, spec, processes)
    accepted = accept_all_foreground(current, processed)
    steps.append({"step": "keep_largest_foreground", "labels": foreground, "accepted": accepted,
                  "rule": "foreground mean Dice strictly increases and no label's mean Dice decreases",
                  "before": _dice_table(current), "after": _dice_table(processed)})
    keep_foreground = accepted
    if accepted:
        current_folder, current = trial, processed
    keep_labels = []
    if len(keys) > 1:  # each label, or each region (the union of its labels), on its own
        for label in keys:
            members = list(label) if isinstance(label, tuple) else [label]
            trial = work / f"keep_largest_label_{'-'.join(map(str, members))}"
            postprocess_folder(current_folder, trial, members, ending)
            processed = evaluate(trial, labels_dir, spec, processes)
            accepted = accept_label(current, processed, label)
            name = key_to_str(label)
            steps.append({"step": f"keep_largest_label_{name}", "labels": members, "accepted": accepted,
                          "rule": f"mean Dice of {'region' if isinstance(label, tuple) else 'label'} {name} "
                                  "strictly increases",
                          "before": _dice_table(current), "after": _dice_table(processed)})
            if accepted:
                keep_labels.append(members if isinstance(label, tuple) else label)
                current_folder, current = trial, processed
    final = work / "postprocessed"
    shutil.copytree(current_folder, final)
    return {"keep_largest_foreground": keep_foreground, "keep_largest_labels": keep_labels,
            "foreground_labels": foreground, "steps": steps,
            "dice_before": _dice_table(summary), "dice_after": _dice_table(current),
            "postprocessed_folder": str(final.relative_to(work.parent))}


# --- report ----------------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def report_markdown(report: dict) -> str:
    labels = list(report["candidates"][0]["mean_dice"]) if report["candidates"] else []
    f1 = any(c.get("macro_f1") is not None for c in report["candidates"])
    criterion = ("mean of foreground mean Dice and classification macro-F1" if report.get("criterion") == "dice_f1"
                 else "foreground mean Dice")
    lines = [f"# Model selection for {report['dataset']}", "",
             f"Folds {report['folds']}; score = {criterion} of the cross-validation predictions "
             f"(nnU-Net's find_best_configuration{' chooses by Dice alone' if f1 else ''}).", "",
             "| candidate | kind | foreground mean Dice | " + ("classification macro-F1 | " if f1 else "")
             + " | ".join(f"Dice {l}" for l in labels) + " |",
             "|---|---|---|" + ("---|" if f1 else "") + "---|" * len(labels)]
    for c in report["candidates"]:
        mark = " **(best)**" if c["name"] == report["best"]["name"] else ""
        lines.append(f"| {c['name']}{mark} | {c['kind']} | {_fmt(c['foreground_mean_dice'])} | "
                     + (f"{_fmt(c.get('macro_f1'))} | " if f1 else "")
                     + " | ".join(_fmt(c["mean_dice"].get(l)) for l in labels) + " |")
    for s in report["skipped"]:
        lines.append(f"\nSkipped {s['configuration']}: {s['reason']}.")
    pp = report["postprocessing"]
    lines += ["", f"**Best:** {report['best']['name']} (foreground mean Dice "
                  f"{_fmt(report['best']['foreground_mean_dice'])}).", "", "## Postprocessing", "",
              "| step | accepted | foreground mean Dice before | after | " +
              " | ".join(f"Dice {l} before | after" for l in labels) + " |",
              "|---|---|---|---|" + "---|---|" * len(labels)]
    for s in pp["steps"]:
        lines.append(f"| {s['step']} | {'yes' if s['accepted'] else 'no'} | {_fmt(s['before']['foreground_mean'])} | "
                     f"{_fmt(s['after']['foreground_mean'])} | " +
                     " | ".join(f"{_fmt(s['before']['per_label'].get(l))} | {_fmt(s['after']['per_label'].get(l))}"
                                for l in labels) + " |")
    chosen = []
    if pp["keep_largest_foreground"]:
        chosen.append("keep the largest foreground component")
    chosen += [f"keep the largest component of label {l}" for l in pp["keep_largest_labels"]]
    lines += ["", f"Chosen: {', then '.join(chosen) if chosen else 'no postprocessing'}. Foreground mean Dice "
                  f"{_fmt(pp['dice_before']['foreground_mean'])} -> {_fmt(pp['dice_after']['foreground_mean'])}."]
    if report.get("final_bundle"):
        lines += ["", "## Predict", "", f"The final model is the bundle `{report['final_bundle']}` "
                  f"({len(report['best']['bundles'])} member bundles, postprocessing built in):", "",
                  f"    cd {report['final_bundle']}",
                  "    python -m monai.bundle run --config_file configs/inference.json --dataset_dir IMAGES "
                  "--output_dir OUT", "",
                  "or, with the member bundles in place:", "",
                  "    autoplan ensemble " + " ".join(report["best"]["bundles"]) +
                  " --dataset-dir IMAGES --output-dir OUT --postprocessing selection/postprocessing.json"]
    if report["regenerated"]:
        lines += ["", "Validation predictions made again (for probabilities): " + ", ".join(report["regenerated"])
                  + "."]
    return "\n".join(lines) + "\n"


# --- the command -----------------------------------------------------------------------------------------------
def _as_list(value, cast=str):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [cast(v) for v in value]
    return [cast(v) for v in str(value).split(",") if str(v).strip()]


def select(bundles_dir, configurations=None, folds="0,1,2,3,4", dataset_dir=None, dataset=None,
           disable_ensembling: bool = False, processes: int = 1, device=None, no_bundle: bool = False,
           criterion: str = "dice"):
    """Find the best configuration or pair of configurations by cross-validation Dice, its postprocessing, and
    package it as one bundle (nnU-Net's find_best_configuration).

    Args:
        bundles_dir: folder with the trained <Dataset>_<configuration>_fold<k> bundles.
        configurations: restrict to these configurations (comma-separated; default: all found).
        folds: the folds every candidate must have (default 0,1,2,3,4).
        dataset_dir: the raw dataset (imagesTr, labelsTr) if it moved since the bundles were emitted.
        dataset: the dataset name (plans' dataset_name) when BUNDLES_DIR holds bundles of several datasets.
        disable_ensembling: only single configurations (no npz needed).
        processes: evaluation worker processes.
        device: device for regenerated validation predictions (e.g. cpu).
        no_bundle: skip building the final ensemble bundle.
        criterion: dice (nnU-Net's: foreground mean Dice) or dice_f1 (multi-task: the mean of foreground mean Dice
            and the classification macro-F1). Either way every candidate's macro-F1 is reported.
    """
    if criterion not in CRITERIA:
        raise ToolError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    bundles_dir = Path(str(bundles_dir))
    if not bundles_dir.is_dir():
        raise ToolError(f"{bundles_dir}: no such folder")
    folds = _as_list(folds, int)
    wanted = _as_list(configurations)
    found = find_bundles(bundles_dir)
    if not found:
        raise ToolError(f"{bundles_dir}: no bundles named <Dataset>_<configuration>_fold<k> with "
                        "configs/inference.json")
    if dataset is not None:
        if str(dataset) not in found:
            raise ToolError(f"{bundles_dir}: no bundles of dataset {dataset} (found {', '.join(sorted(found))})")
        found = {str(dataset): found[str(dataset)]}
    if len(found) > 1:
        raise ToolError(f"{bundles_dir}: bundles of several datasets ({', '.join(sorted(found))}); pass --dataset NAME")
    dataset, configs = next(iter(found.items()))
    candidates, skipped = choose_candidates(configs, folds, wanted, bundles_dir)
    # members of all candidates (and previous stages) must share labels and channels
    needed = set(candidates) | {previous_stage(configs[c][folds[0]]) for c in candidates} - {None}
    infos = [ensemble.read_member(configs[c][f]) if (configs[c][f] / "models" / "model.pt").is_file() else None
             for c in order_configurations(needed) for f in folds]
    spec_checks = [i for i in infos if i is not None]
    if spec_checks:
        ensemble.check_compatible(spec_checks)
    facts = {c: {f: fold_facts(configs[c][f], dataset_dir) for f in folds} for c in order_configurations(needed)}
    spec = facts[candidates[0]][folds[0]]["spec"]
    for c in facts:
        for f, fact in facts[c].items():
            if fact["spec"].get("labels") != spec.get("labels"):
                raise ToolError(f"{fact['bundle'] / 'configs' / 'dataset.json'}: labels differ from "
                             f"{facts[candidates[0]][folds[0]]['bundle'] / 'configs' / 'dataset.json'}")
    labels_dir = Path(facts[candidates[0]][folds[0]]["dataset_dir"]) / "labelsTr"
    if not labels_dir.is_dir():
        raise ToolError(f"{labels_dir}: no such folder (the reference labels; pass --dataset-dir if the dataset moved)")
    need_npz = len(candidates) > 1 and not disable_ensembling
    regenerated = []
    for c in order_configurations(needed):  # previous stages first: a cascade's validation reads theirs
        for f in folds:
            if not validation_complete(facts[c][f], need_npz and c in candidates):
                regenerate_validation(facts[c][f], dataset_dir, device)
                regenerated.append(configs[c][f].name)

    selection = bundles_dir / "selection"
    tmp = Path(tempfile.mkdtemp(dir=bundles_dir, prefix=".selection.tmp"))
    try:
        results, crossval, npz = [], {}, {}
        for c in candidates:
            crossval[c] = tmp / "crossval" / c
            npz[c] = collect_crossval(c, facts[c], crossval[c])
            summary = evaluate(crossval[c], labels_dir, spec, processes)
            results.append({"name": c, "kind": "single", "configurations": [c],
                            "bundles": [configs[c][f].name for f in folds],
                            "folder": str(crossval[c].relative_to(tmp)), "foreground_mean_dice": score(summary),
                            "macro_f1": macro_f1(summary),
                            "mean_dice": {k: float(v["Dice"]) for k, v in summary["mean"].items()},
                            "summary": summary})
        if need_npz:
            for i, a in enumerate(candidates):
                for b in candidates[i + 1:]:
                    name = f"ensemble___{a}___{b}"
                    folder = tmp / "ensembles" / name
                    ensemble_pair(a, b, npz, crossval, folder, spec)
                    summary = evaluate(folder, labels_dir, spec, processes)
                    results.append({"name": name, "kind": "ensemble", "configurations": [a, b],
                                    "bundles": [configs[x][f].name for x in (a, b) for f in folds],
                                    "folder": str(folder.relative_to(tmp)), "foreground_mean_dice": score(summary),
                                    "macro_f1": macro_f1(summary),
                                    "mean_dice": {k: float(v["Dice"]) for k, v in summary["mean"].items()},
                                    "summary": summary})
        for r in results:
            r["score"] = candidate_score(r["foreground_mean_dice"], r["macro_f1"], criterion)
        best = best_candidate(results, "score")
        pp = determine_postprocessing(tmp / best["folder"], best["summary"], labels_dir, spec,
                                      tmp / "postprocessing", processes)
        pp_file = tmp / "postprocessing.json"
        pp_file.write_text(json.dumps(pp, indent=4))
        final_name = None
        if not no_bundle:
            final_name = f"{dataset}_ensemble"
            ensemble.make_bundle(*[bundles_dir / b for b in best["bundles"]], out=tmp / final_name,
                                 postprocessing=pp_file)
        report = {
            "dataset": dataset,
            "bundles_dir": str(bundles_dir.resolve()),
            "folds": folds,
            "score": "foreground_mean Dice" if criterion == "dice" else "mean of foreground_mean Dice and macro-F1",
            "criterion": criterion,
            "candidates": [{k: v for k, v in r.items() if k != "summary"} for r in results],
            "best": {k: v for k, v in best.items() if k != "summary"},
            "skipped": skipped,
            "postprocessing": {k: v for k, v in pp.items()},
            "final_bundle": f"selection/{final_name}" if final_name else None,
            "regenerated": regenerated,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=4))
        (tmp / "report.md").write_text(report_markdown(report))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if selection.exists():
            old = bundles_dir / f".selection.old.{os.getpid()}"
            selection.rename(old)
        tmp.rename(selection)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    f1 = f", classification macro-F1 {_fmt(best['macro_f1'])}" if best.get("macro_f1") is not None else ""
    print(f"best: {best['name']} (foreground mean Dice {_fmt(best['foreground_mean_dice'])}{f1}); postprocessing: "
          f"keep largest foreground {pp['keep_largest_foreground']}, labels {pp['keep_largest_labels']}; "
          f"report: {selection / 'report.md'}")


def main(argv=None, prog="find_best.py") -> int:
    return ensemble.run_cli({}, select, __doc__, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
