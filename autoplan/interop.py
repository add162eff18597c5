"""nnU-Net v2 interop, both ways: trained nnU-Net model folders become bundles, bundles become nnU-Net model folders.

**Import** (``autoplan import-nnunet MODEL_DIR [MODEL_DIR ...] --out BUNDLES_DIR``): ``MODEL_DIR`` is what
``nnUNetv2_train`` leaves in ``$nnUNet_results/DatasetXXX_Name/``: a folder ``TRAINER__PLANS__CONFIGURATION`` with
``plans.json``, ``dataset.json`` and ``fold_K/checkpoint_final.pth``. Every fold found becomes a bundle
``<Dataset>_<configuration>_fold<K>`` (the names ``autoplan emit`` gives, so cascades and ensembles find their
siblings) with the plans' network holding the checkpoint's weights, the checkpoint's mirroring axes and, when
``nnUNetv2_find_best_configuration`` chose one for this model folder (``crossval_results_folds_*/postprocessing.json``),
nnU-Net's connected-component postprocessing (ids ``keep_largest_foreground`` / ``keep_largest_labels`` in
``inference.json``). Several folds (and every cascade) also get one ensemble bundle
``<Dataset>_<configuration>_ensemble`` (``tools/ensemble.py make-bundle``) that predicts what
``nnUNetv2_predict -f <folds>`` predicts: the folds' logits averaged, then the postprocessing; a cascade's
ensemble holds its ``3d_lowres`` folds as the previous stage. Region-based models (BraTS style: ``labels`` values
that are lists, with ``regions_class_order``) become region bundles (ids ``regions``, ``regions_class_order``; one
sigmoid output per region, painted as nnU-Net paints them), with their per-region postprocessing.

The checkpoint is read with ``torch.load(weights_only=True)``: tensors, plain containers and the few numpy types
nnU-Net pickles (``scripts.networks.load_checkpoint``); nothing else is unpickled, and nnU-Net is never imported.
Trainers that only change the schedule, budget, loss or augmentation (``nnUNetTrainer_250epochs``, ...) train the
plans' network, so their checkpoints import; a checkpoint whose weights do not fit the network the plans describe
(``nnUNetTrainerBN``, other architectures) is refused, naming the trainer.

**Export** (``autoplan export-nnunet BUNDLE [BUNDLE ...] --out RESULTS_DIR``): bundles trained here (fold bundles,
or ensemble bundles, whose members are exported) are written as
``RESULTS_DIR/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION/{plans.json, dataset.json, fold_K/checkpoint_final.pth}``
so that ``nnUNetv2_predict`` (with ``nnUNet_results=RESULTS_DIR``) predicts with them. The checkpoint holds the
weights under nnU-Net's names (its duplicate ``all_modules`` / ``decoder.encoder`` keys included, so nnU-Net's strict
``load_state_dict`` takes it), ``trainer_name`` (``nnUNetTrainer`` unless ``--trainer``), ``init_args`` and
``inference_allowed_mirroring_axes``; a region bundle's dataset.json keeps its regions and ``regions_class_order``,
from which nnU-Net builds the same outputs. A bundle whose network is not the plans' PlainConvUNet or
ResidualEncoderUNet has no nnU-Net equivalent and is refused.

Bad input is reported as one line naming the file (``InteropError``, a ``ValueError``); the CLI exits with status 2.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tempfile
from pathlib import Path

from autoplan.files import write_json_atomic

NETWORKS = {"PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}
# stock trainers that build another network than the plans describe (their weights would not fit anyway)
ARCHITECTURE_TRAINERS = ("nnUNetTrainerBN",)
POSTPROCESSING_FN = "remove_all_but_largest_component_from_segmentation"
CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


class InteropError(ValueError):
    """Bad input: reported as ``error: <message>`` with exit status 2."""


def _load_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InteropError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path}: not readable JSON ({exc})") from None


def split_model_dir_name(name: str) -> tuple[str, str, str]:
    """``TRAINER__PLANS__CONFIGURATION`` -> (trainer, plans identifier, configuration)."""
    parts = name.split("__")
    if len(parts) != 3 or not all(parts):
        raise InteropError(f"{name}: not an nnU-Net model folder name (TRAINER__PLANS__CONFIGURATION, e.g. "
                           "nnUNetTrainer__nnUNetPlans__3d_fullres)")
    return parts[0], parts[1], parts[2]


# --- import ----------------------------------------------------------------------------------------------------------
def read_nnunet_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint loaded with ``torch.load(weights_only=True)`` (nnU-Net's numpy scalars allowed)."""
    from bundles.scripts.networks import load_checkpoint

    try:
        checkpoint = load_checkpoint(str(path))
    except ValueError as exc:
        raise InteropError(str(exc)) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise InteropError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise InteropError(f"{path}: not an nnU-Net checkpoint (no network_weights)")
    return checkpoint


def _fold_id(name: str):
    fold = name.removeprefix("fold_")
    return int(fold) if fold.isdigit() else fold


def find_folds(model_dir: Path, checkpoint_name: str, folds=None) -> dict:
    """``{fold: checkpoint path}`` of the model folder, ``folds`` (ints or ``all``) restricting them."""
    found = {_fold_id(p.name): p / checkpoint_name for p in sorted(model_dir.glob("fold_*"))
             if (p / checkpoint_name).is_file()}
    if folds is not None:
        wanted = [f if str(f) == "all" else int(f) for f in folds]
        missing = [f for f in wanted if f not in found]
        if missing:
            raise InteropError(f"{model_dir}: no {checkpoint_name} for fold(s) {missing} (found "
                               f"{sorted(found, key=str) or 'none'})")
        found = {f: found[f] for f in wanted}
    if not found:
        raise InteropError(f"{model_dir}: no fold_K/{checkpoint_name} (train the model, or choose --checkpoint)")
    return found


def convert_weights(weights: dict, plan_configuration: dict, in_channels: int, out_channels: int, where: str,
                    trainer: str) -> dict:
    """nnU-Net ``network_weights`` as the state dict of the bundle's network (``network_from_plan``); refused when
    they do not fit the network the plans describe."""
    from monai.networks.nets import DynUNet

    from bundles.scripts.networks import dynunet_state_dict, network_from_plan, nnunet_state_dict

    arch = plan_configuration["architecture"]
    name = str(arch["network_class_name"]).rsplit(".", 1)[-1]
    try:
        network = network_from_plan(plan_configuration, in_channels, out_channels, deep_supervision=True)
    except ValueError as exc:
        raise InteropError(f"{where}: the plans' {name} cannot be built here ({exc})") from None
    state = nnunet_state_dict({k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()})
    # checked under nnU-Net's names (what the user knows), against the plans' network built with those names
    plain = _reference_network(plan_configuration, in_channels, out_channels)
    own = dict(itertools.chain(plain.named_parameters(), plain.named_buffers()))
    missing = sorted(set(own) - set(state))
    unknown = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unknown or wrong or trainer in ARCHITECTURE_TRAINERS:
        details = []
        if missing:
            details.append(f"{len(missing)} weight(s) of the plans' network missing ({', '.join(missing[:3])})")
        if unknown:
            details.append(f"{len(unknown)} weight(s) it does not have ({', '.join(unknown[:3])})")
        if wrong:
            k = wrong[0]
            details.append(f"{len(wrong)} of another shape ({k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        if not details:
            details.append("the trainer builds another network than the plans describe")
        raise InteropError(f"{where}: trainer {trainer} trained a network that cannot be built from the plans' "
                           f"{name}: {'; '.join(details)}. Only checkpoints of trainers that keep the plans' "
                           "architecture (e.g. schedule or budget variants such as nnUNetTrainer_250epochs) import")
    if isinstance(network, DynUNet):
        state = dynunet_state_dict(state, len(arch["arch_kwargs"]["kernel_sizes"]))
    own = dict(itertools.chain(network.named_parameters(), network.named_buffers()))
    if set(own) - set(state):
        raise InteropError(f"{where}: weights {sorted(set(own) - set(state))[:3]} cannot be placed in the bundle's "
                           "network")
    network.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)  # DynUNet aliases follow
    return network.state_dict()


def _selected_crossval(model_dir: Path):
    """The cross-validation folder whose postprocessing ``inference_information.json`` (one folder up, written by
    ``nnUNetv2_find_best_configuration``) selected, when it selected this model folder alone; else None."""
    path = model_dir.parent / "inference_information.json"
    if not path.is_file():
        return None
    best = _load_json(path).get("best_model_or_ensemble") or {}
    selected = best.get("selected_model_or_models") or []
    names = [f"{m.get('trainer')}__{m.get('plans_identifier')}__{m.get('configuration')}" for m in selected]
    if names != [model_dir.name] or not best.get("postprocessing_file"):
        return None
    folder = model_dir / Path(str(best["postprocessing_file"]).replace("\\", "/")).parent.name
    return folder if (folder / "postprocessing.json").is_file() else None


def _postprocessing_members(target):
    """The label values a ``labels_or_regions`` entry keeps the largest component of (the union of its labels):
    a label, a region (a list in the JSON), or a list of labels and regions; None when it is none of these."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(target):
        return [target]
    if not isinstance(target, list) or not target:
        return None
    members = []
    for item in target:
        if is_int(item):
            members.append(item)
        elif isinstance(item, list) and item and all(map(is_int, item)):
            members.extend(item)
        else:
            return None
    return sorted(set(members))


def read_postprocessing(model_dir: Path, foreground: list):
    """nnU-Net's postprocessing chosen for this model folder, in the bundles' form, or None when there is none.

    ``nnUNetv2_find_best_configuration`` writes it as ``crossval_results_folds_*/postprocessing.json`` (the
    ``.pkl`` beside it, pickled functions, is never read). When ``inference_information.json`` one folder up selected
    this model folder, its cross-validation folder is used; otherwise the one over the most folds.
    Every step keeps the largest component of the union of some labels: the first one of all foreground labels
    becomes ``keep_largest_foreground``, the others (a label; for region-based models a region, which the JSON
    holds as a list of labels) ``keep_largest_labels`` entries, an int or a list of labels, in nnU-Net's order.
    """
    folder = _selected_crossval(model_dir)
    files = [folder / "postprocessing.json"] if folder else sorted(
        model_dir.glob("crossval_results_folds_*/postprocessing.json"), key=lambda p: (len(p.parent.name), p))
    if not files:
        return None
    path = files[-1]
    data = _load_json(path)
    fns, kwargs = data.get("postprocessing_fns"), data.get("postprocessing_kwargs")
    if not isinstance(fns, list) or not isinstance(kwargs, list) or len(fns) != len(kwargs):
        raise InteropError(f"{path}: expected postprocessing_fns and postprocessing_kwargs lists of equal length")
    keep_fg, labels = False, []
    for i, (fn, kw) in enumerate(zip(fns, kwargs)):
        target = (kw or {}).get("labels_or_regions") if isinstance(kw, dict) else None
        if fn != POSTPROCESSING_FN or target is None:
            raise InteropError(f"{path}: postprocessing {fn}({kw}) is not nnU-Net's keep-largest-component; the "
                               "bundles apply only that one")
        members = _postprocessing_members(target)
        if members is None:
            raise InteropError(f"{path}: keep-largest of {target!r} is not a label, a region (list of labels) or a "
                               "list of them")
        unknown = [m for m in members if m not in foreground]
        if unknown:
            raise InteropError(f"{path}: keep-largest of {target!r} names label(s) {unknown}, not among the "
                               f"foreground labels {foreground}")
        if i == 0 and isinstance(target, list) and members == sorted(foreground):
            keep_fg = True
        else:
            labels.append(members[0] if len(members) == 1 else members)
    return {"keep_largest_foreground": keep_fg, "keep_largest_labels": labels, "source": str(path)}


def _with_postprocessing(inference: dict, postprocessing: dict) -> dict:
    """inference.json with nnU-Net's keep-largest-component steps switched on (the template's ids
    ``keep_largest_foreground`` and ``keep_largest_labels``, which ``--keep_largest_foreground False`` etc. turn
    off again)."""
    return {**inference, "keep_largest_foreground": postprocessing["keep_largest_foreground"],
            "keep_largest_labels": postprocessing["keep_largest_labels"]}


def read_model_dir(model_dir, checkpoint: str = "final", folds=None) -> dict:
    """What an nnU-Net model folder holds: names, plans, dataset.json, fold checkpoints, postprocessing."""
    from autoplan.dataset import parse_labels

    model_dir = Path(str(model_dir))
    if not model_dir.is_dir():
        raise InteropError(f"{model_dir}: no such folder (an nnU-Net model folder TRAINER__PLANS__CONFIGURATION)")
    if checkpoint not in CHECKPOINTS:
        raise InteropError(f"--checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    trainer, plans_identifier, configuration = split_model_dir_name(model_dir.name)
    plans = _load_json(model_dir / "plans.json")
    spec = _load_json(model_dir / "dataset.json")
    if configuration not in plans.get("configurations", {}):
        raise InteropError(f"{model_dir / 'plans.json'}: has no configuration {configuration!r}")
    try:
        labels = parse_labels(spec.get("labels", {}), spec.get("regions_class_order"))
    except Exception as exc:  # noqa: BLE001 - any malformed labels entry is bad input
        raise InteropError(f"{model_dir / 'dataset.json'}: {exc}") from None
    if labels.has_regions and len(labels.regions_class_order or []) != len(labels.foreground_regions):
        raise InteropError(f"{model_dir / 'dataset.json'}: region-based labels need regions_class_order, one label "
                           f"per region ({len(labels.foreground_regions)} regions), got "
                           f"{spec.get('regions_class_order')!r}")
    for key in ("file_ending", "labels"):
        if key not in spec:
            raise InteropError(f"{model_dir / 'dataset.json'}: lacks {key!r}")
    checkpoints = find_folds(model_dir, CHECKPOINTS[checkpoint], folds)
    return {"dir": model_dir, "trainer": trainer, "plans_identifier": plans_identifier,
            "configuration": configuration, "plans": plans, "spec": spec, "checkpoints": checkpoints,
            "foreground": list(labels.foreground_labels),
            "postprocessing": read_postprocessing(model_dir, list(labels.foreground_labels))}


def _splits(plans: dict, splits_file=None):
    """nnU-Net's splits_final.json (given, else ``$nnUNet_preprocessed/<dataset>/splits_final.json``), or None."""
    import os

    if splits_file is None:
        base = os.environ.get("nnUNet_preprocessed")
        candidate = Path(base) / plans.get("dataset_name", "") / "splits_final.json" if base else None
        if candidate is None or not candidate.is_file():
            return None
        splits_file = candidate
    splits = json.loads(Path(str(splits_file)).read_text()) if Path(str(splits_file)).is_file() else None
    if not isinstance(splits, list):
        raise InteropError(f"{splits_file}: not a splits_final.json (a list of {{train, val}})")
    return splits


def _fold_cases(splits, fold) -> tuple[list, list]:
    if splits is None:
        return [], []
    if fold == "all":
        cases = sorted({c for s in splits for c in s["train"] + s["val"]})
        return cases, cases
    if not isinstance(fold, int) or fold >= len(splits):
        return [], []
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def _import_folds(model: dict, tmp: Path, splits) -> list[Path]:
    """One fold bundle per checkpoint of ``model``, written into ``tmp``."""
    import torch

    from autoplan.emit import bundle_values, write_bundle
    from bundles.scripts.preprocessing import resolve_configuration

    plans, spec, configuration = model["plans"], model["spec"], model["configuration"]
    config = resolve_configuration(plans, configuration)
    written = []
    for fold, path in model["checkpoints"].items():
        checkpoint = read_nnunet_checkpoint(path)
        trainer = str(checkpoint.get("trainer_name") or model["trainer"])
        ckpt_config = (checkpoint.get("init_args") or {}).get("configuration", configuration)
        if ckpt_config != configuration:
            raise InteropError(f"{path}: a checkpoint of configuration {ckpt_config!r} in a {configuration!r} "
                               "model folder")
        train, val = _fold_cases(splits, fold)
        values = bundle_values(plans, configuration, spec, fold, train, val, len(splits) if splits else 5)
        axes = checkpoint.get("inference_allowed_mirroring_axes")
        values["mirror_axes"] = [int(a) for a in axes] if axes is not None else []
        weights = convert_weights(checkpoint["network_weights"], config, values["in_channels"],
                                  values["num_classes"], str(path), trainer)
        name = f"{plans['dataset_name']}_{configuration}_fold{fold}"
        bundle = write_bundle(tmp, name, plans, spec, configuration, values)
        if model["postprocessing"]:
            inference_file = bundle / "configs" / "inference.json"
            inference = _with_postprocessing(json.loads(inference_file.read_text()), model["postprocessing"])
            inference_file.write_text(json.dumps(inference, indent=4))
        meta_file = bundle / "configs" / "metadata.json"
        meta = json.loads(meta_file.read_text())
        source = {"model_folder": model["dir"].name, "fold": fold, "checkpoint": path.name, "trainer": trainer,
                  "epochs_trained": checkpoint.get("current_epoch"), "mirror_axes": values["mirror_axes"],
                  "postprocessing": model["postprocessing"]}
        meta["changelog"] = {meta["version"]: f"imported by autoplan from the nnU-Net model folder "
                                              f"{model['dir'].name}, fold {fold} ({path.name})"}
        meta["description"] = (f"nnU-Net v2 {configuration} model of {plans['dataset_name']} trained by nnU-Net "
                               f"({trainer}, plans {model['plans_identifier']}), fold {fold}, imported by autoplan.")
        meta["nnunet_import"] = source
        meta_file.write_text(json.dumps(meta, indent=4))
        torch.save(weights, bundle / "models" / "model.pt")
        written.append(bundle)
        print(f"{model['dir'].name} fold {fold}: {trainer}, mirroring axes {values['mirror_axes']}"
              + (f", postprocessing {_pp_text(model['postprocessing'])}" if model["postprocessing"] else ""))
    return written


def _pp_text(pp: dict) -> str:
    steps = (["keep the largest foreground component"] if pp["keep_largest_foreground"] else []) + \
        [f"keep the largest component of {'labels' if isinstance(label, list) else 'label'} {label}"
         for label in pp["keep_largest_labels"]]
    return ", then ".join(steps) or "none"


def _previous_stage_dir(model: dict):
    """The model folder of a cascade's previous stage beside it (same trainer and plans), or None."""
    from bundles.scripts.preprocessing import resolve_configuration

    previous = resolve_configuration(model["plans"], model["configuration"]).get("previous_stage")
    if not previous:
        return None, None
    return previous, model["dir"].parent / f"{model['trainer']}__{model['plans_identifier']}__{previous}"


def import_nnunet(*model_dirs, out=None, checkpoint: str = "final", folds=None, splits=None) -> list[Path]:
    """Import nnU-Net model folders as bundles into ``out``; returns the bundle folders written (see the module
    docstring). A cascade folder's previous stage is imported too when it lies beside it and was not given."""
    from tools.ensemble import ToolError, make_bundle

    if out is None:
        raise InteropError("--out is required")
    if not model_dirs:
        raise InteropError("no model folder given")
    models = [read_model_dir(d, checkpoint, folds) for d in model_dirs]
    given = {m["dir"].resolve() for m in models}
    for model in list(models):
        previous, previous_dir = _previous_stage_dir(model)
        if previous is None:
            continue
        present = any(m["configuration"] == previous and m["plans"].get("plans_name") ==
                      model["plans"].get("plans_name") for m in models)
        if present:
            continue
        if not previous_dir.is_dir():
            raise InteropError(f"{model['dir']}: a {model['configuration']} model needs its previous stage "
                               f"{previous!r}: pass its model folder too (none found beside it)")
        print(f"{model['dir'].name}: its previous stage {previous_dir.name} is imported too")
        models.insert(0, read_model_dir(previous_dir, checkpoint, None))
        given.add(previous_dir.resolve())
    # previous stages first, so that the cascade's ensemble finds them
    models.sort(key=lambda m: _previous_stage_dir(m)[0] is not None)
    out = Path(str(out))
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".import-nnunet-"))
    written = []
    try:
        for model in models:
            splits_list = _splits(model["plans"], splits)
            fold_bundles = _import_folds(model, tmp, splits_list)
            for bundle in fold_bundles:
                if (out / bundle.name).exists():
                    raise InteropError(f"{out / bundle.name}: already exists (remove it, or import into another "
                                       "--out)")
            written.extend(fold_bundles)
            is_cascade = _previous_stage_dir(model)[0] is not None
            if len(fold_bundles) > 1 or is_cascade:
                name = f"{model['plans']['dataset_name']}_{model['configuration']}_ensemble"
                if (out / name).exists():
                    raise InteropError(f"{out / name}: already exists (remove it, or import into another --out)")
                pp_file = None
                if model["postprocessing"]:
                    pp_file = tmp / f".{name}.postprocessing.json"
                    pp_file.write_text(json.dumps({k: model["postprocessing"][k]
                                                   for k in ("keep_largest_foreground", "keep_largest_labels")}))
                fold_list = ", ".join(str(f) for f in model["checkpoints"])
                title = (f"{model['plans']['dataset_name']} {model['configuration']} nnU-Net model "
                         f"({model['dir'].name}, folds {fold_list})")
                try:
                    make_bundle(*fold_bundles, out=tmp / name, postprocessing=pp_file, name=title)
                except ToolError as exc:
                    raise InteropError(str(exc)) from None
                if pp_file is not None:
                    pp_file.unlink()
                written.append(tmp / name)
        final = []
        for bundle in written:
            target = out / bundle.name
            bundle.rename(target)
            final.append(target)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- export ----------------------------------------------------------------------------------------------------------
def _reference_network(plan_configuration: dict, in_channels: int, out_channels: int):
    """The plans' network built with nnU-Net's module names (ours, never DynUNet): its weight names and shapes."""
    from bundles.scripts.networks import plain_from_plan, resenc_from_plan

    arch = plan_configuration["architecture"]
    name = str(arch["network_class_name"]).rsplit(".", 1)[-1]
    builder = {"PlainConvUNet": plain_from_plan, "ResidualEncoderUNet": resenc_from_plan}[name]
    return builder(arch["arch_kwargs"], in_channels, out_channels, deep_supervision=True)


def _with_nnunet_aliases(weights: dict) -> dict:
    """nnU-Net's modules register some weights twice: every conv unit's conv and norm again under
    ``all_modules.0`` / ``all_modules.1`` (conv, norm: no dropout in nnU-Net's plans) and the whole encoder again under
    ``decoder.encoder``. nnU-Net's ``load_state_dict`` is strict, so the exported state dict has them too."""
    out = dict(weights)
    for key, value in weights.items():
        match = re.match(r"^(.*)\.(conv|norm)\.(weight|bias)$", key)
        if match and not match.group(1).endswith(("transpconvs", "seg_layers")):
            out[f"{match.group(1)}.all_modules.{0 if match.group(2) == 'conv' else 1}.{match.group(3)}"] = value
    for key, value in list(out.items()):
        if key.startswith("encoder."):
            out[f"decoder.{key}"] = value
    return out


def nnunet_weights(state: dict, plan_configuration: dict, in_channels: int, out_channels: int, where: str) -> dict:
    """A bundle network's state dict (``models/model.pt``) as nnU-Net ``network_weights``."""
    import torch
    from monai.networks.nets import DynUNet

    from bundles.scripts.networks import dynunet_state_dict, network_from_plan

    arch = plan_configuration["architecture"]
    name = str(arch["network_class_name"]).rsplit(".", 1)[-1]
    if name not in NETWORKS:
        raise InteropError(f"{where}: network {arch['network_class_name']!r} has no nnU-Net equivalent here "
                           f"(exportable: {', '.join(NETWORKS)})")
    try:
        network = network_from_plan(plan_configuration, in_channels, out_channels, deep_supervision=True)
        network.load_state_dict(state)
    except (ValueError, RuntimeError) as exc:
        raise InteropError(f"{where}: the weights are not those of the plans' {name}, so they have no nnU-Net "
                           f"equivalent ({str(exc).splitlines()[0]})") from None
    own = dict(itertools.chain(network.named_parameters(), network.named_buffers()))
    plain = _reference_network(plan_configuration, in_channels, out_channels)
    reference = dict(itertools.chain(plain.named_parameters(), plain.named_buffers()))
    if isinstance(network, DynUNet):
        names = dynunet_state_dict({k: k for k in reference}, len(arch["arch_kwargs"]["kernel_sizes"]))
        weights = {nn_key: own[dyn_key] for dyn_key, nn_key in names.items() if dyn_key in own}
        for key, value in reference.items():  # conv biases: DynUNet has none (the InstanceNorm after it cancels one)
            if key not in weights and key.endswith(".conv.bias"):
                weights[key] = torch.zeros_like(value)
    else:
        weights = own
    missing = sorted(set(reference) - set(weights))
    wrong = sorted(k for k in reference if k in weights and weights[k].shape != reference[k].shape)
    if missing or wrong or set(weights) - set(reference):
        raise InteropError(f"{where}: cannot name the weights as nnU-Net's {name} does ({len(missing)} missing, "
                           f"{len(wrong)} of another shape)")
    return _with_nnunet_aliases({k: v.detach().clone().float().contiguous() for k, v in weights.items()})


def _literal(config: dict, key: str, where: Path, default=None):
    value = config.get(key, default)
    if isinstance(value, str) and value[:1] in "$@%":
        raise InteropError(f"{where}: {key!r} must be a plain value to export the bundle, found {value!r}")
    return value


def _bundle_models(bundle: Path) -> list[dict]:
    """The models of one bundle folder: a fold bundle is one, an ensemble bundle one per member."""
    from tools.ensemble import load_state_dict, ToolError

    inference_file = bundle / "configs" / "inference.json"
    for rel in ("configs/inference.json", "configs/dataset.json"):
        if not (bundle / rel).is_file():
            raise InteropError(f"{bundle / rel}: missing ({bundle} is not an autoplan bundle)")
    weights_file = bundle / "models" / "model.pt"
    if not weights_file.is_file():
        raise InteropError(f"{weights_file}: missing (train the bundle first)")
    inference = _load_json(inference_file)
    spec = _load_json(bundle / "configs" / "dataset.json")
    try:
        state = load_state_dict(weights_file)
    except ToolError as exc:
        raise InteropError(str(exc)) from None
    if "members" in inference:
        models = []
        for i, member in enumerate(_literal(inference, "members", inference_file)):
            prefix = f"members.{i}."
            models.append({"where": f"{bundle} (member {member.get('name', i)})", "plans": member["plans"],
                           "configuration": member["configuration"], "fold": member.get("fold"),
                           "in_channels": int(member["in_channels"]), "num_classes": int(member["num_classes"]),
                           "mirror_axes": member.get("mirror_axes", []), "spec": spec,
                           "state": {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}})
        return models
    target = str((inference.get("network_def") or {}).get("_target_", ""))
    if not target.endswith("network_from_plan"):
        raise InteropError(f"{inference_file}: network_def is {target or 'not a plain config'!r}, not the plans' "
                           "nnU-Net network: it has no nnU-Net equivalent")
    plans_file = bundle / "configs" / "plans.json"
    plans = _load_json(plans_file) if plans_file.is_file() else _literal(inference, "plans", inference_file)
    train_file = bundle / "configs" / "train.json"
    fold = _load_json(train_file).get("fold") if train_file.is_file() else None
    if fold is None:
        match = re.search(r"_fold(\w+)$", bundle.name)
        fold = (int(match.group(1)) if match.group(1).isdigit() else match.group(1)) if match else None
    return [{"where": str(bundle), "plans": plans, "fold": fold,
             "configuration": _literal(inference, "configuration", inference_file),
             "in_channels": int(_literal(inference, "in_channels", inference_file)),
             "num_classes": int(_literal(inference, "num_classes", inference_file)),
             "mirror_axes": _literal(inference, "mirror_axes", inference_file, []), "spec": spec, "state": state}]


def export_nnunet(*bundles, out=None, trainer: str = "nnUNetTrainer", dataset_name=None) -> list[Path]:
    """Write bundles as nnU-Net model folders under ``out`` (an ``nnUNet_results`` folder); returns the checkpoint
    files written (see the module docstring)."""
    import torch

    from bundles.scripts.preprocessing import resolve_configuration

    if out is None:
        raise InteropError("--out is required")
    if not bundles:
        raise InteropError("no bundle given")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(trainer)):
        raise InteropError(f"--trainer {trainer!r}: not a trainer class name")
    out = Path(str(out))
    planned = {}  # checkpoint path -> (model, folder)
    folders = {}  # model folder -> (plans, dataset.json)
    for bundle in bundles:
        bundle = Path(str(bundle))
        if not bundle.is_dir():
            raise InteropError(f"{bundle}: not a bundle folder")
        for model in _bundle_models(bundle):
            plans = model["plans"]
            dataset = str(dataset_name or plans.get("dataset_name", ""))
            if not re.fullmatch(r"Dataset\d{3}_.+", dataset):
                raise InteropError(f"{model['where']}: dataset name {dataset!r} is not nnU-Net's DatasetXXX_Name; "
                                   "pass --dataset-name DatasetXXX_Name")
            if model["fold"] is None:
                raise InteropError(f"{model['where']}: cannot tell its fold (no 'fold' in train.json)")
            plans = {**plans, "dataset_name": dataset}
            folder = out / dataset / f"{trainer}__{plans['plans_name']}__{model['configuration']}"
            if folder in folders and folders[folder] != (plans, model["spec"]):
                raise InteropError(f"{model['where']}: its plans or dataset.json differ from another bundle's "
                                   f"exported to {folder}")
            folders[folder] = (plans, model["spec"])
            path = folder / f"fold_{model['fold']}" / "checkpoint_final.pth"
            if path in planned:
                raise InteropError(f"{model['where']}: fold {model['fold']} of {folder.name} is given twice")
            if path.exists():
                raise InteropError(f"{path}: already exists (remove it, or export into another --out)")
            if folder.is_dir() and (folder / "plans.json").is_file() and _load_json(folder / "plans.json") != plans:
                raise InteropError(f"{folder / 'plans.json'}: differs from {model['where']}'s plans")
            config = resolve_configuration(plans, model["configuration"])
            model["weights"] = nnunet_weights(model["state"], config, model["in_channels"], model["num_classes"],
                                              model["where"])
            planned[path] = (model, folder)
    written = []
    for path, (model, folder) in planned.items():
        plans, spec = folders[folder]
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in (("plans.json", plans), ("dataset.json", spec)):
            if not (folder / name).is_file():
                write_json_atomic(folder / name, data)
        axes = [int(a) for a in model["mirror_axes"]]
        checkpoint = {
            "network_weights": model["weights"],
            "optimizer_state": None,
            "grad_scaler_state": None,
            "logging": {},
            "_best_ema": None,
            "current_epoch": 0,
            "init_args": {"plans": plans, "configuration": model["configuration"], "fold": model["fold"],
                          "dataset_json": spec, "device": torch.device("cpu")},
            "trainer_name": str(trainer),
            "inference_allowed_mirroring_axes": tuple(axes) if axes else None,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(path)
        written.append(path)
        print(f"wrote {path} ({model['where']})")
    return written
