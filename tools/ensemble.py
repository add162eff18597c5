"""Ensembles of autoplan bundles: predict with several bundles, average saved probabilities, or package an ensemble
as one MONAI Bundle.

Usage (``python tools/ensemble.py`` takes the same arguments)::

    autoplan ensemble BUNDLE [BUNDLE ...] --dataset-dir IN --output-dir OUT [--use-tta True]
                      [--fold-averaging logits|probabilities] [--save-probabilities] [--postprocessing FILE]
                      [--device cpu]
    autoplan ensemble average DIR [DIR ...] --output-dir OUT [--dataset-json FILE] [--reference-images DIR]
                      [--file-ending .nii.gz] [--save-probabilities]
    autoplan ensemble make-bundle BUNDLE [BUNDLE ...] --out ENSEMBLE_BUNDLE [--postprocessing FILE]
                      [--name NAME]

``--help`` after a command describes its options.

**Predict** (no command): every case of ``IN`` (a folder of ``CASE_XXXX<ending>`` files, or one image) is predicted
by every bundle, with mirroring TTA unless ``--use-tta False``, and written to ``OUT/CASE<ending>`` with the input's
geometry (``--save-probabilities`` also writes ``CASE.npz``). Bundles may be folds of one configuration and/or
several configurations; they must share dataset.json's labels, channels and file ending. Averaging follows nnU-Net:
the folds of one configuration average their **logits** on the configuration's preprocessed grid (as
``nnUNetv2_predict -f 0 1 2 3 4``), and configurations average their softmax **probabilities** on the original grid
(as ``nnUNetv2_ensemble``); ``--fold-averaging probabilities`` averages the probabilities of every bundle with equal
weight instead. This runs exactly the inference that ``make-bundle`` packages (the same template, network, inferer
and postprocessing, from ``bundles/scripts``), without copying weights. A cascade bundle (``3d_cascade_fullres``)
needs its previous stage: pass the ``3d_lowres`` bundles too, or keep them beside it (then they only feed the
cascade).

**average**: like ``nnUNetv2_ensemble``: for every ``CASE.npz`` present in all folders, the ``probabilities`` are
averaged and turned into a label map (argmax; regions are painted when ``--dataset-json`` declares them). The npz
files hold no geometry, so each label map copies the geometry of a reference image: ``--reference-images DIR``
(``CASE_0000<ending>`` or ``CASE<ending>`` there), otherwise the label map ``CASE<ending>`` that the first folder's
prediction wrote next to its npz (bundles always write both). The file ending comes from ``--file-ending``, else
dataset.json, else the first folder's files.

**make-bundle**: one new MONAI Bundle holding all member weights that predicts their ensemble with a single
``configs/inference.json`` (ids ``network_def`` = ``scripts.ensemble.EnsembleNetwork``, ``inferer`` =
``scripts.ensemble.EnsembleInferer``, ``preprocessing`` = ``LoadImaged`` only, ``postprocessing`` = argmax, optional
keep-largest-component steps from ``--postprocessing`` (the ``postprocessing.json`` written by
``autoplan select``), ``SaveImaged``). Its ``members`` id holds each member's plans and inference settings (in the
config itself, so nothing is read relative to ``bundle_root``), ``models/model.pt`` the members' weights (keys
``members.<i>.*``), ``scripts/`` the repository's ``bundles/scripts``.

**Multi-task bundles** (a dataset with classes, ``classification.csv`` beside the label maps): predict and
make-bundle average the class probabilities as the segmentation's, the folds of a configuration first, then the
configurations (members that only feed a cascade do not count); average writes the mean of the folders'
``classification.csv`` rows when every folder has one. Members must declare the same class names.

Bad input (no bundles, a folder that is not a trained bundle, members with different labels or channels, no common
npz, a missing reference image) prints ``error: ...`` naming the file and exits with status 2. Outputs are written
atomically: files are produced in a temporary folder and moved into place with ``os.replace`` / ``rename``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from bundles import SCRIPTS, TEMPLATES
from tools.cli import fire_as

EXIT_BAD_INPUT = 2
TEMPLATE = TEMPLATES / "ensemble_inference.json"
VERSION = "0.1.0"


class ToolError(Exception):
    """Bad input: reported as ``error: <message>`` with exit status 2."""


# --- reading bundles -------------------------------------------------------------------------------------------
def load_json(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ToolError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise ToolError(f"{path}: not readable JSON ({exc})") from None


def _literal(config: dict, key: str, path: Path, default=None):
    """A top-level id that must be a plain value (not an ``@reference`` or ``$expression``)."""
    value = config.get(key, default)
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ToolError(f"{path}: '{key}' must be a plain value to ensemble this bundle, found {value!r}")
    return value


def foreground_labels_of(labels: dict) -> list:
    values = {int(v) for k, v in labels.items() if k not in ("background", "ignore") and not isinstance(v, list)}
    return sorted(values - {0})


def read_member(bundle, averaged: bool = True) -> dict:
    """A trained single-configuration bundle: its member description (an entry of the ensemble's ``members``) and
    dataset facts."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise ToolError(f"{bundle}: not a bundle folder")
    for rel in ("configs/inference.json", "configs/plans.json", "configs/dataset.json"):
        if not (bundle / rel).is_file():
            raise ToolError(f"{bundle / rel}: missing ({bundle} is not an autoplan bundle)")
    if not (bundle / "models" / "model.pt").is_file():
        raise ToolError(f"{bundle / 'models' / 'model.pt'}: missing (train the bundle first)")
    inference_path = bundle / "configs" / "inference.json"
    inference = load_json(inference_path)
    if "members" in inference:
        raise ToolError(f"{inference_path}: {bundle} is an ensemble bundle; pass its member bundles instead")
    plans = load_json(bundle / "configs" / "plans.json")
    spec = load_json(bundle / "configs" / "dataset.json")
    configuration = _literal(inference, "configuration", inference_path)
    if configuration not in plans.get("configurations", {}):
        raise ToolError(f"{bundle / 'configs' / 'plans.json'}: has no configuration {configuration!r}")
    labels = spec.get("labels", {})
    train = load_json(bundle / "configs" / "train.json") if (bundle / "configs" / "train.json").is_file() else {}
    fold = train.get("fold")
    if fold is None:
        match = re.search(r"_fold(\w+)$", bundle.name)
        fold = match.group(1) if match else None
    inferer = {k: v for k, v in (inference.get("inferer") or {}).items()
               if k in ("overlap", "mode", "sigma_scale") and not (isinstance(v, str) and v[:1] in "$@%")}
    num_channels = int(_literal(inference, "num_channels", inference_path))
    member = {
        "name": bundle.name,
        "configuration": configuration,
        "fold": fold,
        "averaged": averaged,
        "patch_size": [int(p) for p in _literal(inference, "patch_size", inference_path)],
        "two_d": bool(_literal(inference, "two_d", inference_path, False)),
        "mirror_axes": [int(a) for a in _literal(inference, "mirror_axes", inference_path, [])],
        "in_channels": int(_literal(inference, "in_channels", inference_path, num_channels)),
        "num_classes": int(_literal(inference, "num_classes", inference_path)),
        "foreground_labels": list(_literal(inference, "foreground_labels", inference_path,
                                           foreground_labels_of(labels))),
        "regions_class_order": _literal(inference, "regions_class_order", inference_path, None),
        "inferer": inferer,
        "plans": plans,
    }
    if inference.get("classification_head"):  # a multi-task bundle (autoplan.multitask)
        member["classification"] = {
            "head": _literal(inference, "classification_head", inference_path),
            "num_classification_classes": len(_literal(inference, "classification_names", inference_path)),
            "lesion_labels": list(_literal(inference, "lesion_labels", inference_path)),
            "sigma": float(_literal(inference, "classification_sigma", inference_path, 1.0))}
    return {"bundle": bundle, "member": member, "spec": spec, "num_channels": num_channels,
            "file_ending": spec.get("file_ending", _literal(inference, "file_ending", inference_path)),
            "dataset_dir": inference.get("dataset_dir", ""), "train": train}


def _channels(spec: dict) -> dict:
    return spec.get("channel_names", spec.get("modality", {}))


def check_compatible(infos: list) -> None:
    """Members must share labels, channels, file ending and number of outputs (the first bundle is the reference)."""
    first = infos[0]
    first_json = first["bundle"] / "configs" / "dataset.json"
    for info in infos[1:]:
        path = info["bundle"] / "configs" / "dataset.json"
        for what, get in (("labels", lambda i: i["spec"].get("labels")),
                          ("channel_names", lambda i: _channels(i["spec"])),
                          ("regions_class_order", lambda i: i["spec"].get("regions_class_order")),
                          ("classification names", lambda i: (i["spec"].get("classification") or {}).get("names")),
                          ("file_ending", lambda i: i["file_ending"]),
                          ("number of outputs", lambda i: i["member"]["num_classes"])):
            if get(info) != get(first):
                raise ToolError(f"{path}: {what} {get(info)!r} differ from {first_json}'s {get(first)!r}; "
                                "ensemble members must share labels and channels")


def _previous_stage(member: dict):
    from bundles.scripts.preprocessing import resolve_configuration

    return resolve_configuration(member["plans"], member["configuration"]).get("previous_stage")


def add_previous_stages(infos: list) -> list:
    """Cascade members need their previous stage; if the user did not pass it, its fold bundles beside the cascade
    bundle are added as members that only feed the cascade (``averaged: false``)."""
    infos = list(infos)
    present = {(i["member"]["plans"].get("plans_name"), i["member"]["configuration"]) for i in infos}
    for info in list(infos):
        previous = _previous_stage(info["member"])
        plans = info["member"]["plans"]
        if not previous or (plans.get("plans_name"), previous) in present:
            continue
        dataset = plans.get("dataset_name") or info["bundle"].name.split(f"_{info['member']['configuration']}_")[0]
        siblings = sorted(p for p in info["bundle"].parent.glob(f"{dataset}_{previous}_fold*")
                          if (p / "models" / "model.pt").is_file())
        if not siblings:
            raise ToolError(f"{info['bundle']}: a {info['member']['configuration']} bundle needs its previous stage "
                            f"{previous!r}: pass its trained {previous} bundles too (none found beside it)")
        print(f"cascade: {len(siblings)} {previous} bundle(s) beside {info['bundle'].name} feed its previous stage")
        infos.extend(read_member(p, averaged=False) for p in siblings)
        present.add((plans.get("plans_name"), previous))
    return infos


def read_members(bundles) -> list:
    bundles = [Path(str(b)) for b in bundles]
    if not bundles:
        raise ToolError("no bundles given")
    seen = set()
    for b in bundles:
        key = b.resolve()
        if key in seen:
            raise ToolError(f"{b}: given twice")
        seen.add(key)
    infos = [read_member(b) for b in bundles]
    check_compatible(infos)
    infos = add_previous_stages(infos)
    check_compatible(infos)
    return infos


def read_postprocessing(path, foreground: list) -> dict:
    """``keep_largest_foreground`` (bool) and ``keep_largest_labels`` (labels) from a postprocessing JSON file."""
    path = Path(str(path))
    data = load_json(path)
    if not isinstance(data, dict):
        raise ToolError(f"{path}: expected a JSON object with keep_largest_foreground and keep_largest_labels")
    keep_fg = data.get("keep_largest_foreground", False)
    labels = data.get("keep_largest_labels", [])
    if not isinstance(keep_fg, bool):
        raise ToolError(f"{path}: keep_largest_foreground must be true or false, got {keep_fg!r}")
    def is_label(v):
        return isinstance(v, int) and not isinstance(v, bool) and v in foreground

    if not isinstance(labels, list) or any(not (is_label(v) or (isinstance(v, list) and v and all(map(is_label, v))))
                                           for v in labels):
        raise ToolError(f"{path}: keep_largest_labels must be a list of foreground labels {foreground} (or, for "
                        f"regions, of lists of them), got {labels!r}")
    return {"keep_largest_foreground": keep_fg, "keep_largest_labels": labels}


def load_state_dict(path) -> dict:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is bad input
        raise ToolError(f"{path}: not a readable checkpoint ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ToolError(f"{path}: expected a state dict")
    return state


# --- the ensemble's inference config ---------------------------------------------------------------------------
def ensemble_config(infos: list, postprocessing: dict | None = None) -> dict:
    """The ensemble template with the dataset's values and the members' descriptions."""
    config = json.loads(TEMPLATE.read_text())
    first = infos[0]
    labels = first["spec"]["labels"]
    values = {
        "labels": labels,
        "file_ending": first["file_ending"],
        "num_channels": first["num_channels"],
        "num_classes": first["member"]["num_classes"],
        "foreground_labels": first["member"]["foreground_labels"],
        "regions_class_order": first["member"]["regions_class_order"],
        "keep_largest_foreground": bool((postprocessing or {}).get("keep_largest_foreground", False)),
        "keep_largest_labels": list((postprocessing or {}).get("keep_largest_labels", [])),
        "members": [info["member"] for info in infos],
    }
    dataset_dir = first["dataset_dir"]
    if isinstance(dataset_dir, str) and dataset_dir and not dataset_dir.startswith(("$", "@")):
        values["dataset_dir"] = dataset_dir
    if any(info["member"].get("classification") for info in infos):  # multi-task members: classification.csv too
        from autoplan.multitask import class_names

        values["classification_names"] = class_names(first["spec"])
    for key, value in values.items():
        config[key] = value
    return config


def _repo_scripts_on_path() -> None:
    """The ensemble template imports ``scripts.*``: here that is the repository's ``bundles/scripts``."""
    path = str(SCRIPTS.parent)
    if path not in sys.path:
        sys.path.insert(0, path)


def _publish(tmp: Path, out: Path) -> None:
    """Move everything from ``tmp`` into ``out`` (rename when ``out`` does not exist, else file by file)."""
    if not out.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private
        tmp.rename(out)
        return
    if not out.is_dir():
        raise ToolError(f"{out}: exists and is not a folder")
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)


def run_ensemble(infos: list, dataset_dir: Path, output_dir: Path, use_tta: bool = True,
                 fold_averaging: str = "logits", save_probabilities: bool = False, postprocessing: dict | None = None,
                 device: str | None = None) -> list:
    """Run the ensemble template in this process with the members' own weights; returns the cases predicted."""
    import torch
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    _repo_scripts_on_path()
    work = Path(tempfile.mkdtemp(prefix="autoplan-ensemble-"))
    try:
        parser = ConfigParser(ensemble_config(infos, postprocessing))
        parser.update({"bundle_root": str(work), "dataset_dir": str(dataset_dir), "output_dir": str(output_dir),
                       "use_tta": bool(use_tta), "fold_averaging": fold_averaging,
                       "save_probabilities": bool(save_probabilities)})
        if device:
            parser["device"] = f"$torch.device({str(device)!r})"
        datalist = parser.get_parsed_content("datalist")
        if not datalist:
            raise ToolError(f"{dataset_dir}: no images named CASE_XXXX{infos[0]['file_ending']}")
        network = parser.get_parsed_content("network")
        for i, info in enumerate(infos):
            path = info["bundle"] / "models" / "model.pt"
            try:
                network.members[i].load_state_dict(load_state_dict(path))
            except RuntimeError as exc:
                raise ToolError(f"{path}: does not fit the bundle's network ({str(exc).splitlines()[0]})") from None
        set_determinism(seed=0)
        evaluator = parser.get_parsed_content("evaluator")
        with torch.no_grad():
            evaluator.run()
        return datalist
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- commands --------------------------------------------------------------------------------------------------
def predict(*bundles, dataset_dir=None, output_dir=None, use_tta: bool = True, fold_averaging: str = "logits",
            save_probabilities: bool = False, postprocessing=None, device=None):
    """Predict every case of --dataset-dir with the ensemble of BUNDLE... and write label maps to --output-dir.

    Args:
        bundles: trained bundle folders (folds and/or configurations of one dataset).
        dataset_dir: a folder of CASE_XXXX<ending> images, or one image file.
        output_dir: where CASE<ending> (and with --save-probabilities CASE.npz) are written.
        use_tta: mirroring test-time augmentation (default True).
        fold_averaging: 'logits' (nnU-Net: folds of a configuration average logits) or 'probabilities'.
        save_probabilities: also write CASE.npz with the ensemble's probabilities (nnU-Net's layout).
        postprocessing: a postprocessing.json (from autoplan select) to apply to the label maps.
        device: e.g. cpu or cuda:0 (default: cuda:0 when available).
    """
    if fold_averaging not in ("logits", "probabilities"):
        raise ToolError(f"--fold-averaging must be 'logits' or 'probabilities', got {fold_averaging!r}")
    if dataset_dir is None or output_dir is None:
        raise ToolError("--dataset-dir and --output-dir are required")
    infos = read_members(bundles)
    dataset_dir, out = Path(str(dataset_dir)), Path(str(output_dir))
    if not dataset_dir.exists():
        raise ToolError(f"{dataset_dir}: no such folder or file")
    foreground = infos[0]["member"]["foreground_labels"]
    pp = read_postprocessing(postprocessing, foreground) if postprocessing else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        cases = run_ensemble(infos, dataset_dir, tmp, use_tta, fold_averaging, save_probabilities, pp, device)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {len(cases)} case(s) predicted by {len(infos)} bundle(s) to {out}")


def _find_file_ending(folder: Path, cases: list):
    for case in cases:
        for f in sorted(folder.glob(f"{case}.*")):
            if f.suffix != ".npz" and not f.name.startswith("."):
                return f.name[len(case):]
    return None


def average(*folders, output_dir=None, dataset_json=None, reference_images=None, file_ending=None,
            save_probabilities: bool = False):
    """Average the CASE.npz probabilities common to all folders and write label maps (like nnUNetv2_ensemble).

    Args:
        folders: prediction folders holding CASE.npz (e.g. from --save_probabilities True).
        output_dir: where CASE<ending> (and with --save-probabilities the averaged CASE.npz) are written.
        dataset_json: dataset.json with labels (regions) and file_ending.
        reference_images: folder with CASE_0000<ending> or CASE<ending> images to copy geometry from (default:
            the first folder's CASE<ending> label maps).
        file_ending: e.g. .nii.gz (default: from dataset.json, else from the first folder's files).
        save_probabilities: also write the averaged CASE.npz.

    When every folder holds a classification.csv (multi-task bundles), the output gets their mean, case by case.
    """
    from bundles.scripts.ensemble import (average_probability_files, common_cases, probabilities_to_labels,
                                          save_probabilities_npz, write_label_map)

    folders = [Path(str(f)) for f in folders]
    if not folders:
        raise ToolError("no folders given")
    if output_dir is None:
        raise ToolError("--output-dir is required")
    for folder in folders:
        if not folder.is_dir():
            raise ToolError(f"{folder}: no such folder")
    cases = common_cases(folders)
    if not cases:
        raise ToolError(f"no CASE.npz common to all of: {', '.join(map(str, folders))}")
    spec = load_json(dataset_json) if dataset_json else {}
    ending = file_ending or spec.get("file_ending") or _find_file_ending(folders[0], cases)
    if reference_images is not None:
        reference_images = Path(str(reference_images))
        if not reference_images.is_dir():
            raise ToolError(f"{reference_images}: no such folder")
    if not ending:
        raise ToolError(f"{folders[0]}: cannot tell the file ending (no CASE<ending> beside the npz files); "
                        "pass --file-ending or --dataset-json")
    references = {}
    for case in cases:
        if reference_images is not None:
            candidates = [reference_images / f"{case}_0000{ending}", reference_images / f"{case}{ending}"]
        else:
            candidates = [folders[0] / f"{case}{ending}"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ToolError(f"{candidates[0]}: missing; the geometry of {case} comes from it "
                            f"({'--reference-images' if reference_images is not None else 'pass --reference-images'})")
        references[case] = found[0]
    out = Path(str(output_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        for case in cases:
            probabilities = average_probability_files([f / f"{case}.npz" for f in folders])
            seg = probabilities_to_labels(probabilities, spec.get("labels"), spec.get("regions_class_order"))
            write_label_map(seg, references[case], tmp / f"{case}{ending}")
            if save_probabilities:
                save_probabilities_npz(probabilities, tmp / f"{case}.npz")
        average_classification(folders, cases, tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {len(cases)} averaged case(s) from {len(folders)} folder(s) to {out}")


def average_classification(folders: list, cases: list, out: Path) -> None:
    """Multi-task predictions: ``out/classification.csv`` with the mean class probabilities of ``cases`` over every
    folder's ``classification.csv`` (when every folder has one)."""
    from bundles.scripts.classification import CSV_NAME, average_classification_files, write_classification_csv

    files = [Path(f) / CSV_NAME for f in folders]
    if not all(f.is_file() for f in files):
        return
    try:
        write_classification_csv(out / CSV_NAME, average_classification_files(files, cases))
    except ValueError as exc:
        raise ToolError(str(exc)) from None


def _spatial_dims(infos: list) -> int:
    """Dimensionality of the images (3 unless every member and the plans are 2-D only)."""
    for info in infos:
        configs = info["member"]["plans"].get("configurations", {})
        if not info["member"]["two_d"] or any(name != "2d" for name in configs):
            return 3
    return 2


def ensemble_metadata(infos: list, name: str, version: str, postprocessing: dict | None) -> dict:
    averaged = [i for i in infos if i["member"]["averaged"]]
    base_path = averaged[0]["bundle"] / "configs" / "metadata.json"
    meta = load_json(base_path) if base_path.is_file() else {}
    from bundles.scripts.ensemble import member_groups

    members = [i["member"] for i in infos]
    groups = member_groups(members)
    configurations = sorted({m["configuration"] for m in members if m["averaged"]})
    dataset = members[0]["plans"].get("dataset_name", "dataset")
    steps = []
    if postprocessing and postprocessing.get("keep_largest_foreground"):
        steps.append("largest foreground component")
    if postprocessing and postprocessing.get("keep_largest_labels"):
        steps.append(f"largest component of label(s) {postprocessing['keep_largest_labels']}")
    meta.update({
        "version": version,
        "changelog": {version: f"ensemble of {len(infos)} autoplan bundle(s): "
                               f"{', '.join(i['bundle'].name for i in infos)}"},
        "name": name or f"{dataset} segmentation (nnU-Net ensemble of {', '.join(configurations)}, "
                        f"{len(averaged)} bundles)",
        "task": f"{dataset} segmentation (ensemble of {', '.join(configurations)})",
        "eval_metrics": {},  # the members' fold validations do not measure the ensemble
        "description": (f"nnU-Net-style ensemble for {dataset}: {len(averaged)} bundle(s) of "
                        f"{', '.join(configurations)}; folds of a configuration average logits, configurations "
                        f"average probabilities" + (f"; postprocessing keeps the {' and the '.join(steps)}"
                                                    if steps else "") + "."),
        "ensemble_members": [i["member"]["name"] for i in infos],
    })
    fmt = meta.setdefault("network_data_format", {})
    image = fmt.setdefault("inputs", {}).setdefault("image", {})
    image["num_channels"] = infos[0]["num_channels"] if len(groups) > 1 else members[0]["in_channels"]
    if len(groups) > 1:  # the network's input is no single tensor; the inferer takes the whole image
        image["spatial_shape"] = ["*"] * _spatial_dims(infos)
        image["is_patch_data"] = False
    return meta


def _readme(name: str, infos: list, postprocessing: dict | None, single_group: bool) -> str:
    members = "\n".join(f"| {i} | {info['bundle'].name} | {info['member']['configuration']} | {info['member']['fold']} "
                        f"| {'averaged' if info['member']['averaged'] else 'previous stage only'} |"
                        for i, info in enumerate(infos))
    pp = postprocessing or {}
    steps = []
    if pp.get("keep_largest_foreground"):
        steps.append("keep only the largest connected component of all foreground")
    for label in pp.get("keep_largest_labels", []):
        steps.append(f"keep only the largest connected component of label {label}")
    pp_text = ("; then ".join(steps) + " (full connectivity; removed voxels become background)") if steps else "none"
    from autoplan.emit import deploy_docs, monai_label_docs, safety_docs

    first = infos[0]["member"]
    classification_text = ("""
Classification: the members with a classification head also predict each case's class; the folds of a configuration
average their class probabilities, then the configurations average theirs, and `classification.csv`
(`case,class,p_0,...`) is written to `output_dir`.
""" if any(info["member"].get("classification") for info in infos) else "")
    multi_group_deploy = """## MONAI Deploy
Pass this folder as `bundle_path` to MONAI Deploy's `MonaiBundleInferenceOperator` (the operator puts it on
`sys.path` and loads `models/model.pt`); it runs from any working directory, and a channel-less image gets its
channel. The TorchScript and ONNX forms, and the model zoo's `verify_net_in_out` and `ckpt_export` checks, do not
apply to this ensemble: members of different configurations need different preprocessing, so the network has no
single-tensor forward and the `inferer` does the prediction (list the bundle in the zoo's
`exclude_verify_shape_list` and `exclude_verify_torchscript_list`). Ensembles of one configuration's folds have them.
"""
    return f"""# {name}

An ensemble of autoplan (nnU-Net v2 style) bundles, packaged as one MONAI Bundle by `autoplan ensemble make-bundle`.

| # | member | configuration | fold | role |
|---|---|---|---|---|
{members}

## How it predicts
`preprocessing` only loads the image. The `inferer` (`scripts.ensemble.EnsembleInferer`) runs, for every
configuration, that configuration's nnU-Net preprocessing, the sliding-window prediction of each of its folds with
mirroring test-time augmentation, averages the folds' logits, restores them to the original grid and takes the
softmax; the configurations' probabilities are averaged (nnU-Net's ensembling). `postprocessing` takes the argmax,
applies the chosen connected-component steps and writes `CASE<ending>` with the input's geometry. With one
configuration, `network_def`'s forward is the folds' mean logits, so `python -m monai.bundle verify_net_in_out
network_def --meta_file configs/metadata.json --config_file configs/inference.json` checks it.

Postprocessing: {pp_text}.
{classification_text}
## Infer

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/imagesTs --output_dir out

`--use_tta False` disables mirroring, `--save_probabilities True` also writes `CASE.npz`, `--fold_averaging
probabilities` averages every member's probabilities instead of the folds' logits,
`--keep_largest_foreground False --keep_largest_labels "[]"` disables the postprocessing.

{monai_label_docs(name, trainable=False)}
{deploy_docs(name, first["in_channels"], first["patch_size"]) if single_group else multi_group_deploy}
{safety_docs()}"""


def make_bundle(*bundles, out=None, postprocessing=None, name=None, version: str = VERSION):
    """Write ONE MONAI Bundle that holds every member's weights and predicts their ensemble.

    Args:
        bundles: trained bundle folders sharing dataset.json's labels and channels.
        out: the new bundle folder (must not exist).
        postprocessing: postprocessing.json (from autoplan select) built into inference.json.
        name: the bundle's human-readable name in metadata.json (default: dataset, configurations, member count).
        version: the bundle's version (default 0.1.0).
    """
    import torch

    if out is None:
        raise ToolError("--out is required")
    infos = read_members(bundles)
    out = Path(str(out))
    if out.exists():
        raise ToolError(f"{out}: already exists (remove it, or choose another --out)")
    foreground = infos[0]["member"]["foreground_labels"]
    pp = read_postprocessing(postprocessing, foreground) if postprocessing else None
    from bundles.scripts.ensemble import member_groups

    single_group = len(member_groups([i["member"] for i in infos])) == 1
    name = str(name) if name else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    try:
        configs = tmp / "configs"
        configs.mkdir()
        first = infos[0]["bundle"]
        (configs / "inference.json").write_text(json.dumps(ensemble_config(infos, pp), indent=4))
        shutil.copyfile(first / "configs" / "dataset.json", configs / "dataset.json")
        (configs / "metadata.json").write_text(json.dumps(ensemble_metadata(infos, name, str(version), pp), indent=4))
        logging_conf = first / "configs" / "logging.conf"
        shutil.copyfile(logging_conf if logging_conf.is_file() else TEMPLATES / "logging.conf",
                        configs / "logging.conf")
        if postprocessing:
            shutil.copyfile(str(postprocessing), configs / "postprocessing.json")
        (tmp / "models").mkdir()
        state = {}
        for i, info in enumerate(infos):
            for key, value in load_state_dict(info["bundle"] / "models" / "model.pt").items():
                state[f"members.{i}.{key}"] = value
        torch.save(state, tmp / "models" / "model.pt")
        shutil.copytree(SCRIPTS, tmp / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(_readme(out.name, infos, pp, single_group))
        if (first / "docs" / "data_license.txt").is_file():
            shutil.copyfile(first / "docs" / "data_license.txt", tmp / "docs" / "data_license.txt")
        if (first / "LICENSE").is_file():
            shutil.copyfile(first / "LICENSE", tmp / "LICENSE")
        else:
            from autoplan.emit import MIT_LICENSE

            (tmp / "LICENSE").write_text(MIT_LICENSE)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote ensemble bundle {out} ({len(infos)} member(s))")


COMMANDS = {"average": average, "make-bundle": make_bundle, "make_bundle": make_bundle, "predict": predict}


def run_cli(commands: dict, default, doc: str, argv, prog: str) -> int:
    """fire dispatch with the tools' error convention: bad input -> ``error: ...`` on stderr, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(doc, file=sys.stdout if argv else sys.stderr)
        except BrokenPipeError:  # e.g. piped into head
            pass
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] in commands:
        fn, rest, name = commands[argv[0]], argv[1:], f"{prog} {argv[0]}"
    elif default is not None:
        fn, rest, name = default, argv, prog
    else:
        print(f"error: unknown command {argv[0]!r} (try --help)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        fire_as(name, fn, rest)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def main(argv=None, prog="ensemble.py") -> int:
    return run_cli(COMMANDS, predict, __doc__, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
