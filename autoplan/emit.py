"""Emit one self-contained MONAI Bundle per configuration and fold from a plans file (ours or nnU-Net's).

The structure of every config lives in ``bundles/templates``; this module fills in the plan-specific top-level ids
(patch size, batch size, cases of the fold, augmentation settings derived from the plan as nnU-Net derives them; for
a dataset with classes the classification ids, ``autoplan.multitask``) and changes nothing else in them, copies
the runtime ``bundles/scripts`` into the bundle and writes metadata and docs. A bundle never imports ``autoplan``
and holds no path of the emitting machine: every path is relative to ``bundle_root``, and the dataset is
found at run time (``scripts.data.find_dataset``) or given with ``--dataset_dir``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from autoplan import multitask
from autoplan.dataset import DatasetError, load_dataset, parse_labels
from autoplan.files import atomic_folder, write_json_atomic, write_text_atomic
from autoplan.splits import fold_cases, kfold_splits, load_splits
from bundles import SCRIPTS, TEMPLATES
from bundles.scripts.data import DATASET_RECORD, initial_patch_size
from bundles.scripts.preprocessing import resolve_configuration

BUNDLE_VERSION = "0.1.0"
PLAN_KEYS = ("patch_size", "spacing", "batch_size", "batch_dice", "architecture", "normalization_schemes")


def augmentation_settings(patch_size: list[int]) -> dict:
    """Rotation range, dummy-2D and mirroring as nnU-Net derives them from the patch (spec 5.4)."""
    two_d = len(patch_size) == 2
    if two_d:
        rotation = math.pi if max(patch_size) / min(patch_size) <= 1.5 else 15 / 360 * 2 * math.pi
        dummy_2d, mirror_axes = False, [0, 1]
    else:
        dummy_2d = max(patch_size) / patch_size[0] > 3
        rotation = math.pi if dummy_2d else 30 / 360 * 2 * math.pi
        mirror_axes = [0, 1, 2]
    return {"two_d": two_d, "dummy_2d": dummy_2d, "rotation": rotation, "mirror_axes": mirror_axes}


def bundle_values(plans: dict, configuration: str, spec: dict, fold, train: list, val: list,
                  num_folds: int = 5) -> dict:
    """The plan-specific top-level ids of train.json and inference.json for one bundle (everything else, the
    cascade's wiring included, is in the templates)."""
    config = resolve_configuration(plans, configuration)
    missing = [k for k in PLAN_KEYS if k not in config]
    if missing:
        raise ValueError(f"plans: configuration '{configuration}' lacks {', '.join(missing)} (after inherits_from)")
    labels = parse_labels(spec["labels"], spec.get("regions_class_order"))
    patch = [int(p) for p in config["patch_size"]]
    augmentation = augmentation_settings(patch)
    num_channels = len(spec.get("channel_names", spec.get("modality", {})))
    previous = config.get("previous_stage")
    return {
        "dataset_name": plans["dataset_name"],
        "configuration": configuration,
        "previous_stage": previous,
        "num_folds": num_folds,
        "fold": fold,
        "train_cases": train,
        "val_cases": val,
        "labels": spec["labels"],
        "file_ending": spec["file_ending"],
        "num_channels": num_channels,
        "in_channels": num_channels + (len(labels.foreground_labels) if previous else 0),
        "num_classes": labels.num_outputs,
        "foreground_labels": labels.foreground_labels,
        "ignore_label": labels.ignore_label,
        "regions": [list(r) if isinstance(r, tuple) else [r] for r in labels.foreground_regions]
        if labels.has_regions else None,
        "regions_class_order": labels.regions_class_order if labels.has_regions else None,
        "patch_size": patch,
        "initial_patch_size": initial_patch_size(patch, augmentation["rotation"], augmentation["dummy_2d"]),
        "batch_size": int(config["batch_size"]),
        "batch_dice": bool(config["batch_dice"]),
        "ds_outputs": config["architecture"]["arch_kwargs"]["n_stages"] - 1,
        **augmentation,
    }


def _template(name: str) -> dict:
    return json.loads((TEMPLATES / name).read_text())


def _with_values(template: dict, values: dict) -> dict:
    return {k: values.get(k, v) for k, v in template.items()} | {k: v for k, v in values.items() if k not in template}


MODALITY_WORDS = {"CT": ("ct",), "MR": ("mr", "mri", "t1", "t2", "flair", "adc", "dwi", "pd", "t1c", "t1ce", "t1w",
                                         "t2w", "t1gd", "dce", "swi", "bold"),
                  "PT": ("pet", "pt", "suv"), "US": ("us", "ultrasound"), "XR": ("xr", "xray", "x-ray", "cr", "dx")}


def channel_modality(channel_name: str) -> str:
    """A DICOM modality code for a dataset.json channel name ("T2" -> "MR"); "n/a" when the name does not say."""
    words = str(channel_name).casefold().replace("_", " ").replace("-", " ").split()
    for modality, names in MODALITY_WORDS.items():
        if any(w in names for w in words) or str(channel_name).casefold() in names:
            return modality
    return "n/a"


def _reader(file_ending: str) -> str:
    """The image reader MONAI's ``LoadImaged`` picks for the dataset's files."""
    return "nibabel" if file_ending in (".nii", ".nii.gz") else "itk"


def _installed(package: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


DEFAULT_AUTHORS = "not given (emitted by autoplan; set with autoplan emit --authors)"
DEFAULT_COPYRIGHT = "not given (set with autoplan emit --copyright)"


def _metadata(name: str, spec: dict, plans: dict, configuration: str, values: dict, authors: str | None = None,
              copyright: str | None = None) -> dict:
    """metadata.json as the model zoo's reviewers and checks read it. The input's ``spatial_shape`` is the patch
    size times n, so ``verify_net_in_out``'s default n = 1 is a valid input (one patch)."""
    import monai
    import numpy
    import torch

    channels = {str(k): v for k, v in spec.get("channel_names", spec.get("modality", {})).items()}
    modalities = [channel_modality(v) for v in channels.values()]
    spatial = [f"{p}*n" for p in values["patch_size"]]
    if values.get("regions"):
        # one output channel per region, but the label map holds regions_class_order's values, and those are what
        # MONAI Label reads from channel_def as label ids
        region_names = [k for k, v in spec["labels"].items() if k != "ignore" and v not in (0, [0])]
        out_names = {"0": "background"} | {str(v): k for v, k in zip(values["regions_class_order"], region_names)}
        max_value = max(values["regions_class_order"])
    else:
        out_names = {str(v): k for k, v in spec["labels"].items() if k != "ignore" and not isinstance(v, list)}
        out_names = dict(sorted(out_names.items(), key=lambda kv: int(kv[0])))
        max_value = max(values["foreground_labels"])
    required = {p: _installed(p) for p in ("nibabel", "pytorch-ignite", "scipy", "SimpleITK", "matplotlib",
                                           "tensorboard")}
    optional = {p: _installed(p) for p in ("mlflow", "onnxruntime")}
    dataset = spec.get("name") or plans["dataset_name"]
    label_list = ", ".join(k for k in out_names.values() if k != "background")
    image_dims = 3 if any(len(c.get("patch_size", [])) == 3 for c in plans["configurations"].values()) else 2
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"emitted by autoplan from {plans['plans_name']} ({configuration})"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {k: v for k, v in required.items() if v},
        # a superset of the required ones: MONAI 1.6 replaces required_packages_version with this when it reads
        # the file, and the model zoo's CI installs both
        "optional_packages_version": {k: v for k, v in {**required, **optional}.items() if v},
        "name": f"{dataset} {label_list} segmentation (nnU-Net {configuration}, fold {values['fold']})",
        "task": f"Segmentation of {label_list} in {dataset}",
        "description": f"nnU-Net-style {configuration} segmentation of {plans['dataset_name']}, planned by "
                       f"autoplan with {plans['experiment_planner_used']}; fold {values['fold']}.",
        "authors": authors or DEFAULT_AUTHORS,
        "copyright": copyright or DEFAULT_COPYRIGHT,
        "data_source": spec.get("reference", spec.get("name", "")),
        "data_type": _reader(spec.get("file_ending", "")),
        "image_classes": f"{len(channels)} channel(s): " + ", ".join(
            f"{k}: {v} ({m})" for (k, v), m in zip(channels.items(), modalities)),
        "label_classes": ", ".join(f"{k}: {v}" for k, v in out_names.items()),
        "pred_classes": ", ".join(f"{k}: {v}" for k, v in out_names.items()),
        "eval_metrics": {},
        "intended_use": "Research only. Not for clinical use.",
        "references": ["Isensee et al. nnU-Net. Nature Methods 18, 203-211 (2021)"],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "hounsfield" if set(modalities) == {"CT"} else "magnitude",
                "modality": modalities[0] if len(set(modalities)) == 1 else "/".join(modalities),
                "num_channels": values["in_channels"], "spatial_shape": spatial, "dtype": "float32",
                "value_range": [], "is_patch_data": True,
                "channel_def": {k: f"{v} ({m})" for (k, v), m in zip(channels.items(), modalities)}}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": values["num_classes"],
                "spatial_shape": spatial, "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": out_names}},
            "post_processed_outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": ["*"] * image_dims,
                "dtype": "uint8", "value_range": [0, max_value], "is_patch_data": False,
                "channel_def": out_names}},
        },
    }


SETTINGS_SKIPPED = ("imports", "labels", "train_cases", "val_cases", "plans")


def _settings_table(config: dict) -> str:
    """Every top-level id holding a plain value, as the config holds it: the bundle's overridable settings (the
    classification ids only in a multi-task bundle: they do nothing in a segmentation-only one)."""
    skipped = SETTINGS_SKIPPED + (() if config.get("classification_head") else multitask.TEMPLATE_IDS)
    rows = [f"| `{k}` | `{json.dumps(v)}` |" for k, v in config.items()
            if k not in skipped and not isinstance(v, dict) and not (isinstance(v, str) and v[:1] in "$@%")
            and not (isinstance(v, list) and any(isinstance(x, (dict, str)) for x in v))]
    return "\n".join(["| id | value |", "|---|---|", *rows])


def _readme(name: str, spec: dict, plans: dict, configuration: str, train: dict, inference: dict) -> str:
    """The bundle's docs, written from the values its configs hold (so an edited template cannot leave them stale)."""
    config = resolve_configuration(plans, configuration)
    kw = config["architecture"]["arch_kwargs"]
    network = config["architecture"]["network_class_name"].rsplit(".", 1)[-1]
    spacing = " x ".join(f"{s:.3g}" for s in config["spacing"])
    optimizer = train["optimizer"]["_target_"].rsplit(".", 1)[-1]
    loss = train["loss_component"]["_target_"].rsplit(".", 1)[-1]
    inferer = inference["inferer"]
    cascade = (f" The previous stage's (`{train['previous_stage']}`) prediction of each case is appended as one-hot "
               "channels: in training the cross-validation predictions of its sibling fold bundles, at inference "
               "the file `CASE" + train["file_ending"] + "` in `previous_stage_dir` (default `eval/previous_stage/`)."
               if train["previous_stage"] else "")
    return f"""# {name}

A MONAI Bundle emitted by autoplan: nnU-Net v2's `{configuration}` configuration of
`{plans['dataset_name']}`, cross-validation fold {train['fold']} ({len(train['train_cases'])} training cases,
{len(train['val_cases'])} validation cases).

## The dataset
{spec.get('description', spec.get('name', ''))}

Channels: {', '.join(f"{k}: {v}" for k, v in spec.get('channel_names', {}).items())}.
Labels: {', '.join(f"{k} = {v}" for k, v in spec['labels'].items())}. Licence: {spec.get('licence', 'see the data source')}.

## The plan in plain words
Images are transposed by {plans['transpose_forward']}, cropped to their non-zero region, normalized per channel
({', '.join(config['normalization_schemes'])}) and resampled to {spacing} mm. The network
({network}, {kw['n_stages']} stages, features {kw['features_per_stage']}) sees patches of
{' x '.join(map(str, train['patch_size']))} voxels, {train['batch_size']} per batch, with deep supervision and
`{loss}` loss{' (batch Dice)' if train['batch_dice'] else ''}. Training: {optimizer} (lr {train['learning_rate']},
momentum {train['momentum']}{', Nesterov' if train['nesterov'] else ''}, weight decay {train['weight_decay']}) with
poly decay (power {train['poly_power']}), gradient norm clipped at {train['grad_clip_norm']}, {train['epochs']} epochs
of {train['iterations_per_epoch']} iterations, {train['oversample_foreground_percent']:.0%} of each batch centred on
foreground, nnU-Net's augmentation{' (dummy 2-D: in-plane rotation)' if train['dummy_2d'] else ''}.{cascade}
Inference uses a sliding window (overlap {inferer['overlap']}, {inferer['mode']} weighting) with mirroring
test-time augmentation over axes {inference['mirror_axes']}.

## Data
Bundles hold no path of the machine that made them. Without `--dataset_dir`, a bundle looks for its dataset in the
folder named by `../dataset_dir.txt` (written by `autoplan emit` beside the bundles), then in
`$nnUNet_raw/{plans['dataset_name']}`; elsewhere, pass `--dataset_dir /path/to/{plans['dataset_name']}`.

## Train
From this folder:

    python -m monai.bundle run training --config_file configs/train.json
    python -m monai.bundle run training --config_file configs/train.json --epochs 2 --iterations_per_epoch 5
    python -m monai.bundle run training --config_file configs/train.json --dataset_dir /path/to/Dataset --tracking mlflow
    torchrun --nproc_per_node=2 -m monai.bundle run training --config_file "['configs/train.json','configs/multi_gpu_train.json']"

An interrupted training resumes from `models/resume/checkpoint_latest.pt` when rerun with the same
`epochs` and data; any other rerun starts a new training from `models/model.pt`. Outputs: `models/model.pt`
(final weights, used for inference), `models/model_best.pt` (best EMA pseudo-Dice), `eval/progress.png`,
`eval/tensorboard/`, and the validation cases' predictions with `summary.json` in `eval/validation/`. Preprocessed data is cached in
`../preprocessed/` (shared by the folds; override `--cache_dir`). `--initial_weights PATH` starts from saved weights
(another bundle's `model.pt` or an nnU-Net `checkpoint_final.pth` of the same architecture). The loss is
`loss_component` wrapped in deep supervision: replace it with any MONAI loss through an extra config file.

## Settings
Each id below can be overridden on the command line (`--ID VALUE`); these are the values in `configs/train.json`.

{_settings_table(train)}

## Infer

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/imagesTs --output_dir out

`--use_tta False` disables mirroring; `--save_probabilities True` also writes `CASE.npz` for ensembling. Inputs are
folders of `CASE_XXXX{train['file_ending']}` files (one per channel), or a single image file.

{monai_label_docs(name, trainable=True)}
{deploy_docs(name, train['in_channels'], train['patch_size'])}
{safety_docs()}"""


def monai_label_docs(name: str, trainable: bool) -> str:
    """The README's MONAI Label section (fold and ensemble bundles alike)."""
    training = ("\"Train\" uses the studies' `labels/final/` (split 80/20); each request trains `max_epochs` epochs on "
                "from `models/model.pt`, with the learning-rate schedule over those epochs, and an edited label is "
                "preprocessed again. Only `models/model.pt` and `models/model_best.pt` are offered as models."
                if trainable else "The bundle serves inference only (it has no `train.json`).")
    return f"""## MONAI Label
MONAI Label's `monaibundle` sample app serves this bundle (MONAI Label 0.8.5; `pydicom<3` is MONAI Label's own pin,
pydicom 3 breaks its import):

    pip install monailabel==0.8.5 "pydicom<3"
    monailabel apps --download --name monaibundle --output apps
    cp -r {name} apps/monaibundle/model/{name}
    monailabel start_server --app apps/monaibundle --studies STUDIES --conf models {name} --conf zoo_source github

The folder must sit in the app's `model/` folder under its own name (a name containing "segmentation" makes MONAI
Label serve it as a segmentation model); `zoo_source` other than `monaihosting` makes the app use that local folder
and download nothing. Inference returns the label map in the image's geometry, with the labels of
`network_data_format.outputs.pred.channel_def` in metadata.json. {training}
"""


def deploy_docs(name: str, in_channels: int, patch_size) -> str:
    """The README's MONAI Deploy and TorchScript/ONNX sections (fold and ensemble bundles alike)."""
    shape = json.dumps([1, in_channels, *patch_size])
    return f"""## MONAI Deploy
`configs/inference.json` reads no file relative to `bundle_root` (the plans are in the config), so the bundle runs
from any working directory, and `scripts.preprocessing.ChannelFirstd` gives a channel-less image (what the App SDK's
DICOM and NIfTI loaders hand over) its channel. With MONAI Deploy App SDK 4.0 (`pip install monai-deploy-app-sdk==4.0.0
pydicom highdicom`, the SDK imports the last two without listing them), there are two ways to package it:

1. **The bundle folder.** Ship the folder `{name}/` with the app and pass it as the operator's bundle:
   `MonaiBundleInferenceOperator(fragment, app_context=..., bundle_path=Path("/opt/app/{name}"),
   input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)], output_mapping=[IOMapping("pred", Image,
   IOType.IN_MEMORY)])`. The operator puts `bundle_path` on `sys.path` (so `scripts` imports) and loads
   `models/model.pt` into `network`. Nothing goes on `PYTHONPATH`.
2. **TorchScript.** `python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file
   models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json` scripts the network
   (`--use_trace True --input_shape "{shape}"` traces it instead) and stores metadata.json and inference.json in the
   file's `extra/`. Give the operator that file as its model: `bundle_path=Path("model.ts")`, or package it as the
   app's model (`monai-deploy package APP --models model.ts ...`). The configs still name this bundle's transforms
   and inferer (`scripts.*`), so the folder `{name}/` (the one holding `scripts/`) goes on the app's `PYTHONPATH`,
   or `{name}/scripts/` is copied beside the app's `app.py`.

Either way the output is the label map (`uint8`, one channel) in the input's geometry.

The runtime package is called `scripts`, MONAI's convention: `monai.bundle run`, MONAI Label (which unloads a
cached `scripts` before loading each bundle) and the Deploy operator put the bundle folder on `sys.path` and
import `scripts.*`. Two bundles with *different* `scripts` packages cannot share one Python process outside MONAI
Label (the first imported wins); bundles emitted by one autoplan version ship identical `scripts`, so they can.
Serve bundles of other origins from separate processes (one Deploy app per bundle).

## TorchScript and ONNX
Scripting (above, what the model zoo's `ckpt_export` check does) and tracing both give the network's output. ONNX:
`autoplan export {name} --onnx` writes `models/model.onnx` (dynamic batch and spatial axes; it checks that
onnxruntime's logits equal PyTorch's within 1e-4); then `--network_backend onnxruntime` runs inference through ONNX
Runtime with the same pre- and postprocessing:

    python -m monai.bundle run --config_file configs/inference.json --network_backend onnxruntime --dataset_dir IMAGES
"""


def safety_docs() -> str:
    """The README's warning that running a bundle runs its code."""
    return """## Trust
Running a bundle executes its configs: `$` expressions are Python and `_target_` names any callable, and
`scripts/` is imported. Run only bundles from people you trust. `autoplan export install` checks a zip's SHA-256
manifest and the configs' structure without evaluating anything; checkpoints are loaded with
`torch.load(weights_only=True)`.
"""


MIT_LICENSE = """MIT License

Copyright (c) the users of this bundle

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def write_bundle(out: Path, name: str, plans: dict, spec: dict, configuration: str, values: dict,
                 authors: str | None = None, copyright: str | None = None) -> Path:
    """Write one bundle folder atomically: built in a temp folder, then renamed into place."""
    target = out / name
    if target.exists():
        raise FileExistsError(f"{target}: bundle already exists (remove it, or emit into another folder)")
    with atomic_folder(target) as tmp:
        configs = tmp / "configs"
        configs.mkdir()
        train = _with_values(_template("train.json"), values)
        inference_template = _template("inference.json")
        # the plans are embedded, so inference reads no file relative to bundle_root (MONAI Deploy runs a bundle
        # from another working directory without setting bundle_root)
        inference = _with_values(inference_template, {k: v for k, v in {**values, "plans": plans}.items()
                                                      if k in inference_template})
        (configs / "train.json").write_text(json.dumps(train, indent=4))
        (configs / "inference.json").write_text(json.dumps(inference, indent=4))
        for extra in ("evaluate.json", "multi_gpu_train.json", "logging.conf"):
            shutil.copyfile(TEMPLATES / extra, configs / extra)
        (configs / "plans.json").write_text(json.dumps(plans, indent=4))
        (configs / "dataset.json").write_text(json.dumps(spec, indent=4))
        meta = _metadata(name, spec, plans, configuration, values, authors, copyright)
        if values.get("classification_head"):  # a multi-task dataset (autoplan.multitask)
            meta = multitask.apply_to_metadata(meta, values["classification_names"], values["classification_head"])
        (configs / "metadata.json").write_text(json.dumps(meta, indent=4))
        shutil.copytree(SCRIPTS, tmp / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (tmp / "docs").mkdir()
        (tmp / "docs" / "README.md").write_text(_readme(name, spec, plans, configuration, train, inference)
                                                + multitask.readme_section(train))
        if spec.get("licence") or spec.get("license"):
            (tmp / "docs" / "data_license.txt").write_text(str(spec.get("licence") or spec.get("license")) + "\n")
        (tmp / "LICENSE").write_text(MIT_LICENSE)
        (tmp / "models").mkdir()
    return target


def emit(plans_file, raw_dir, out, configurations=None, folds=(0, 1, 2, 3, 4), splits_file=None,
         authors: str | None = None, copyright: str | None = None,
         classification_head: str | None = None) -> list[Path]:
    """Emit bundles for the chosen configurations and folds; writes ``out/splits_final.json`` too. ``authors`` and
    ``copyright`` go into metadata.json (only the user can say who owns the model). A dataset with a
    ``classification`` block gets multi-task bundles with ``classification_head`` (simple, roi or attention)."""
    plans = json.loads(Path(plans_file).read_text())
    raw_dir, out = Path(raw_dir), Path(out)
    dataset = load_dataset(raw_dir)
    if dataset.problems:
        raise DatasetError(dataset.problems, dataset.warnings)
    case_ids = [c.identifier for c in dataset.cases]
    problems = multitask.check_classification(dataset.spec, case_ids, str(dataset.json_path))
    if problems:
        raise DatasetError(problems)
    available = list(plans["configurations"])
    configurations = list(configurations or available)
    for c in configurations:
        if c not in available:
            raise ValueError(f"{plans_file}: has no configuration '{c}' (has {', '.join(available)})")
    folds = [folds] if isinstance(folds, (int, str)) else list(folds)
    splits_path = Path(splits_file) if splits_file else raw_dir / "splits_final.json"
    splits = load_splits(splits_path, case_ids) if splits_path.is_file() else kfold_splits(case_ids)
    write_json_atomic(out / "splits_final.json", splits)
    # where this machine keeps the dataset: beside the bundles, never inside them (see scripts.data.find_dataset)
    write_text_atomic(out / DATASET_RECORD, f"{raw_dir.resolve()}\n")
    written = []
    for configuration in configurations:
        for fold in folds:
            train, val = fold_cases(splits, fold, case_ids)
            values = bundle_values(plans, configuration, dataset.spec, fold, train, val, len(splits))
            if multitask.has_classes(dataset.spec):
                values.update(multitask.classification_values(dataset.spec, values, classification_head))
            name = f"{plans['dataset_name']}_{configuration}_fold{fold}"
            written.append(write_bundle(out, name, plans, dataset.spec, configuration, values, authors, copyright))
    return written
