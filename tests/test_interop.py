"""nnU-Net interop both ways against files nnU-Net 2.8.1 wrote (``tests/fixtures/nnunet_interop``, made by
``benchmarks/make_interop_fixture.py``): tiny model folders trained by ``nnUNetv2_train`` and their
``nnUNetv2_predict --save_probabilities`` outputs. No nnunetv2 is needed here.

The test images are two synthetic cases of arbitrary size and ``grid_000``, whose size puts MONAI's own window
positions where nnU-Net's are; the bundles place windows as nnU-Net does, so all three must agree within the issue's
bounds, probabilities up to nnU-Net's float16 accumulation. ``regions/`` holds a region-based (BraTS-style) model,
its predictions (sigmoid probabilities) and postprocessing, made by ``--stage regions``.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "nnunet_interop"
DATASET = "Dataset987_Interop"
RESULTS = FIXTURE / "results" / DATASET
IMAGES = FIXTURE / "imagesTs"
TRAINER = "nnUNetTrainer_autoplanInterop"
GRID = "grid_000"
NO_PP = {"keep_largest_foreground": False, "keep_largest_labels": []}


def model_dir(configuration: str, plans: str = "nnUNetPlans"):
    return RESULTS / f"{TRAINER}__{plans}__{configuration}"


def autoplan(*args):
    return subprocess.run([sys.executable, "-m", "autoplan", *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT))


def predict(bundle, out, images=IMAGES, **overrides):
    """The bundle's own configs/inference.json on the fixture's test images, in this process, on the CPU."""
    from monai.bundle import ConfigWorkflow

    scripts_parent = str(ROOT / "bundles")  # ``scripts`` = the runtime every bundle ships a copy of
    if scripts_parent not in sys.path:
        sys.path.insert(0, scripts_parent)
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                              meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                              workflow_type="infer", bundle_root=str(bundle), dataset_dir=str(images),
                              output_dir=str(out), save_probabilities=True, device="$torch.device('cpu')",
                              **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return out


def compare(ours, theirs) -> dict:
    """Per case: voxel agreement, foreground Dice per label, largest probability difference."""
    import SimpleITK as sitk

    result = {}
    for f in sorted(theirs.glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / f.name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        assert a.shape == b.shape, f.name
        dice = {int(v): 2 * ((a == v) & (b == v)).sum() / ((a == v).sum() + (b == v).sum())
                for v in (set(np.unique(a)) | set(np.unique(b))) - {0}}
        record = {"agreement": float((a == b).mean()), "dice": dice}
        npz = f.name.replace(".nii.gz", ".npz")
        if (theirs / npz).is_file() and (ours / npz).is_file():
            p, q = np.load(ours / npz)["probabilities"], np.load(theirs / npz)["probabilities"]
            assert p.shape == q.shape, npz
            record["max_dp"] = float(np.abs(p - q).max())
        result[f.name[:-len(".nii.gz")]] = record
    assert result, f"no predictions in {theirs}"
    return result


def assert_agrees(figures: dict, max_dp: float = 2e-2):
    """The issue's bounds on every case: voxel agreement >= 0.999 and per-label Dice >= 0.99 between the two label
    maps; probabilities equal up to nnU-Net's float16 accumulation of the windows. The bundles place and weight the
    sliding windows as nnU-Net does, so arbitrary image sizes agree as well as ``grid_000``."""
    for case, record in figures.items():
        assert record["agreement"] >= 0.999, (case, record)
        assert all(d >= 0.99 for d in record["dice"].values()), (case, record)
        dp = record.get("max_dp", record.get("max_probability_difference"))
        assert dp is None or dp <= max_dp, (case, record)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The 3d_fullres model folder (folds 0 and 1) imported once."""
    from autoplan.interop import import_nnunet

    out = tmp_path_factory.mktemp("imported")
    return {p.name: p for p in import_nnunet(model_dir("3d_fullres"), out=out)}


def _pp_expected() -> dict:
    """The fixture's postprocessing.json as the bundles' ids."""
    data = json.loads(next(model_dir("3d_fullres").glob("crossval_results_folds_*/postprocessing.json")).read_text())
    keep_fg, labels = False, []
    for kwargs in data["postprocessing_kwargs"]:
        target = kwargs["labels_or_regions"]
        if isinstance(target, list) and len(target) > 1:
            keep_fg = True
        else:
            labels.append(int(target if isinstance(target, int) else target[0]))
    return {"keep_largest_foreground": keep_fg, "keep_largest_labels": labels}


# --- import ----------------------------------------------------------------------------------------------------------
def test_import_writes_a_bundle_per_fold_and_their_ensemble(imported):
    assert sorted(imported) == [f"{DATASET}_3d_fullres_ensemble", f"{DATASET}_3d_fullres_fold0",
                                f"{DATASET}_3d_fullres_fold1"]
    fold0 = imported[f"{DATASET}_3d_fullres_fold0"]
    inference = json.loads((fold0 / "configs" / "inference.json").read_text())
    plans = json.loads((model_dir("3d_fullres") / "plans.json").read_text())
    assert inference["plans"] == plans and inference["mirror_axes"] == [0, 1, 2]
    meta = json.loads((fold0 / "configs" / "metadata.json").read_text())
    assert meta["nnunet_import"]["trainer"] == TRAINER and meta["nnunet_import"]["checkpoint"] == "checkpoint_final.pth"
    pp = _pp_expected()
    assert {k: inference.get(k, False if k == "keep_largest_foreground" else []) for k in pp} == pp
    ensemble = json.loads((imported[f"{DATASET}_3d_fullres_ensemble"] / "configs" / "inference.json").read_text())
    assert [m["fold"] for m in ensemble["members"]] == [0, 1]
    assert {k: ensemble[k] for k in pp} == pp
    # the weights are the checkpoint's (DynUNet-renamed): its network loads them strictly
    from bundles.scripts.networks import network_from_plan
    from bundles.scripts.preprocessing import resolve_configuration

    net = network_from_plan(resolve_configuration(plans, "3d_fullres"), 1, 3)
    net.load_state_dict(torch.load(fold0 / "models" / "model.pt", weights_only=True))


def test_ensemble_bundle_predicts_what_nnunet_predicts_with_folds_0_1(imported, tmp_path):
    ensemble = imported[f"{DATASET}_3d_fullres_ensemble"]
    figures = compare(predict(ensemble, tmp_path / "plain", **NO_PP), FIXTURE / "predictions" / "3d_fullres")
    assert_agrees(figures)
    # find_best_configuration chose no postprocessing for these tiny models: the default is then the same
    figures = compare(predict(ensemble, tmp_path / "pp"), FIXTURE / "predictions" / "3d_fullres_postprocessed")
    assert_agrees(figures)


def test_nnunet_postprocessing_is_applied_as_nnunet_applies_it(tmp_path):
    """postprocessing.json as find_best_configuration writes it when it keeps the largest foreground component and
    then label 2's (``forced_postprocessing``); nnU-Net applied the same steps with nnUNetv2_apply_postprocessing."""
    from autoplan.interop import import_nnunet

    folder = _copy_model(tmp_path, f"{TRAINER}__nnUNetPlans__3d_fullres")
    shutil.copyfile(FIXTURE / "forced_postprocessing" / "postprocessing.json",
                    folder / "crossval_results_folds_0_1" / "postprocessing.json")
    bundles = {p.name: p for p in import_nnunet(folder, out=tmp_path / "b")}
    ensemble = bundles[f"{DATASET}_3d_fullres_ensemble"]
    config = json.loads((ensemble / "configs" / "inference.json").read_text())
    assert config["keep_largest_foreground"] is True and config["keep_largest_labels"] == [2]
    fold = json.loads((bundles[f"{DATASET}_3d_fullres_fold0"] / "configs" / "inference.json").read_text())
    assert fold["keep_largest_foreground"] is True and fold["keep_largest_labels"] == [2]
    figures = compare(predict(ensemble, tmp_path / "pp"),
                      FIXTURE / "predictions" / "3d_fullres_forced_postprocessing")
    assert_agrees(figures)


def test_fold_bundle_predicts_what_nnunet_predicts_with_that_fold(imported, tmp_path):
    figures = compare(predict(imported[f"{DATASET}_3d_fullres_fold0"], tmp_path, **NO_PP),
                      FIXTURE / "predictions" / "3d_fullres_f0")
    assert_agrees(figures)


def test_2d_with_the_checkpoints_mirroring_axes(tmp_path):
    from autoplan.interop import import_nnunet

    (bundle,) = import_nnunet(model_dir("2d"), out=tmp_path / "b")
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["two_d"] and inference["mirror_axes"] == [1]  # the trainer's choice, from the checkpoint
    assert_agrees(compare(predict(bundle, tmp_path / "p"), FIXTURE / "predictions" / "2d_f0"))


def test_resenc_plans(tmp_path):
    from autoplan.interop import import_nnunet

    (bundle,) = import_nnunet(model_dir("3d_fullres", "nnUNetResEncUNetMPlans"), out=tmp_path / "b")
    assert_agrees(compare(predict(bundle, tmp_path / "p"), FIXTURE / "predictions" / "resenc_3d_fullres_f0"))


def test_cascade_brings_its_lowres_stage_and_predicts_like_nnunet(tmp_path):
    """nnU-Net: 3d_lowres -f 0 1, then 3d_cascade_fullres -f 0 on those predictions; here one ensemble bundle."""
    result = autoplan("import-nnunet", model_dir("3d_cascade_fullres"), "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names == [f"{DATASET}_3d_cascade_fullres_ensemble", f"{DATASET}_3d_cascade_fullres_fold0",
                     f"{DATASET}_3d_lowres_ensemble", f"{DATASET}_3d_lowres_fold0", f"{DATASET}_3d_lowres_fold1"]
    lowres = compare(predict(tmp_path / "b" / f"{DATASET}_3d_lowres_ensemble", tmp_path / "low"),
                     FIXTURE / "predictions" / "3d_lowres")
    assert_agrees(lowres)
    cascade = compare(predict(tmp_path / "b" / f"{DATASET}_3d_cascade_fullres_ensemble", tmp_path / "casc"),
                      FIXTURE / "predictions" / "3d_cascade_fullres_f0")
    assert_agrees(cascade)


def test_checkpoint_best_and_fold_selection(tmp_path):
    from autoplan.interop import import_nnunet

    (bundle,) = import_nnunet(model_dir("3d_fullres"), out=tmp_path, checkpoint="best", folds=[0])
    assert bundle.name == f"{DATASET}_3d_fullres_fold0"  # one fold: no ensemble
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["nnunet_import"]["checkpoint"] == "checkpoint_best.pth"
    from bundles.scripts.networks import load_checkpoint

    best = load_checkpoint(model_dir("3d_fullres") / "fold_0" / "checkpoint_best.pth")["network_weights"]
    ours = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert torch.equal(ours["output_block.conv.conv.weight"], best["decoder.seg_layers.1.weight"])


def _copy_model(tmp_path, name: str):
    dst = tmp_path / DATASET / name
    shutil.copytree(model_dir("3d_fullres"), dst)
    return dst


def test_a_trainer_with_another_architecture_is_refused_by_name(tmp_path):
    folder = _copy_model(tmp_path, "nnUNetTrainerBN__nnUNetPlans__3d_fullres")
    for fold in ("fold_0", "fold_1"):
        path = folder / fold / "checkpoint_final.pth"
        checkpoint = torch.load(path, weights_only=False)
        weights = checkpoint["network_weights"]
        for key in [k for k in weights if k.endswith(".norm.weight")]:
            weights[key.replace(".weight", ".running_mean")] = torch.zeros_like(weights[key])
        checkpoint["trainer_name"] = "nnUNetTrainerBN"
        torch.save(checkpoint, path)
    result = autoplan("import-nnunet", folder, "--out", tmp_path / "out")
    assert result.returncode == 2 and "nnUNetTrainerBN" in result.stderr, result.stderr
    assert "cannot be built from the plans" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any(p for p in (tmp_path / "out").iterdir()
                                                      if not p.name.startswith("."))


def test_a_schedule_only_trainer_is_accepted(tmp_path):
    """``nnUNetTrainer_250epochs``-style trainers train the plans' network: their checkpoints import."""
    from autoplan.interop import import_nnunet

    folder = _copy_model(tmp_path, "nnUNetTrainer_250epochs__nnUNetPlans__3d_fullres")
    written = import_nnunet(folder, out=tmp_path / "out", folds=[1])
    assert [p.name for p in written] == [f"{DATASET}_3d_fullres_fold1"]


def test_a_checkpoint_holding_other_objects_is_refused(tmp_path):
    import argparse

    folder = _copy_model(tmp_path, f"{TRAINER}__nnUNetPlans__3d_fullres")
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["extra"] = argparse.Namespace(run="anything a pickle can build")
    torch.save(checkpoint, path)
    result = autoplan("import-nnunet", folder, "--out", tmp_path / "out", "--folds", 0)
    assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("problem", ["name", "missing", "nofolds", "cascade_alone"])
def test_bad_model_folders_are_refused_clearly(tmp_path, problem):
    if problem == "name":
        folder = tmp_path / "not_a_model"
        shutil.copytree(model_dir("3d_fullres"), folder)
        expected = "TRAINER__PLANS__CONFIGURATION"
    elif problem == "missing":
        folder, expected = tmp_path / f"{TRAINER}__nnUNetPlans__3d_fullres", "no such folder"
    elif problem == "nofolds":
        folder = _copy_model(tmp_path, f"{TRAINER}__nnUNetPlans__3d_fullres")
        for fold in folder.glob("fold_*"):
            shutil.rmtree(fold)
        expected = "checkpoint_final.pth"
    else:
        folder = tmp_path / DATASET / f"{TRAINER}__nnUNetPlans__3d_cascade_fullres"
        shutil.copytree(model_dir("3d_cascade_fullres"), folder)
        expected = "previous stage"
    result = autoplan("import-nnunet", folder, "--out", tmp_path / "out")
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_postprocessing_json_becomes_the_bundle_steps(tmp_path):
    from autoplan.interop import InteropError, read_postprocessing

    folder = tmp_path / "m"
    (folder / "crossval_results_folds_0_1").mkdir(parents=True)
    pp = folder / "crossval_results_folds_0_1" / "postprocessing.json"
    fn = "remove_all_but_largest_component_from_segmentation"
    pp.write_text(json.dumps({"postprocessing_fns": [fn, fn],
                              "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]}))
    assert read_postprocessing(folder, [1, 2]) == {"keep_largest_foreground": True, "keep_largest_labels": [2],
                                                   "source": str(pp)}
    pp.write_text(json.dumps({"postprocessing_fns": [], "postprocessing_kwargs": []}))
    assert read_postprocessing(folder, [1, 2])["keep_largest_foreground"] is False
    pp.write_text(json.dumps({"postprocessing_fns": ["something_else"], "postprocessing_kwargs": [{}]}))
    with pytest.raises(InteropError, match="keep-largest"):
        read_postprocessing(folder, [1, 2])


# --- export ----------------------------------------------------------------------------------------------------------
def _nnunet_checkpoint(folder, fold=0):
    from bundles.scripts.networks import load_checkpoint

    return load_checkpoint(folder / f"fold_{fold}" / "checkpoint_final.pth")


@pytest.mark.parametrize("configuration,plans", [("3d_fullres", "nnUNetPlans"), ("3d_lowres", "nnUNetPlans"),
                                                 ("3d_fullres", "nnUNetResEncUNetMPlans")])
def test_export_names_the_weights_as_nnunet_does(tmp_path, configuration, plans):
    """The exported state dict has exactly the keys and shapes of nnU-Net's own checkpoint (aliases included);
    DynUNet's bias-free convs export zero biases (cancelled by the InstanceNorm), every other weight is the same."""
    from autoplan.interop import export_nnunet, import_nnunet

    bundles = import_nnunet(model_dir(configuration, plans), out=tmp_path / "b", folds=[0])
    (path,) = export_nnunet(*bundles, out=tmp_path / "results")
    assert path == tmp_path / "results" / DATASET / f"nnUNetTrainer__{plans}__{configuration}" / "fold_0" / \
        "checkpoint_final.pth"
    exported, original = _nnunet_checkpoint(path.parent.parent), _nnunet_checkpoint(model_dir(configuration, plans))
    ours, theirs = exported["network_weights"], original["network_weights"]
    assert list(ours) == list(theirs) or sorted(ours) == sorted(theirs)
    dynunet = configuration == "3d_fullres" and plans == "nnUNetPlans"
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key
        conv_bias = key.endswith((".conv.bias", ".all_modules.0.bias")) and ".convs." in key
        if dynunet and conv_bias:
            assert not ours[key].any(), key
        else:
            assert torch.equal(ours[key], value), key
    assert exported["trainer_name"] == "nnUNetTrainer"
    assert exported["init_args"]["configuration"] == configuration and exported["init_args"]["fold"] == 0
    assert exported["inference_allowed_mirroring_axes"] == original["inference_allowed_mirroring_axes"]
    folder = path.parent.parent
    assert json.loads((folder / "plans.json").read_text()) == json.loads(
        (model_dir(configuration, plans) / "plans.json").read_text())
    # and it imports again to the same bundle weights
    (again,) = import_nnunet(folder, out=tmp_path / "again")
    first = torch.load(bundles[0] / "models" / "model.pt", weights_only=True)
    second = torch.load(again / "models" / "model.pt", weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_export_of_an_ensemble_bundle_writes_every_member(imported, tmp_path):
    result = autoplan("export-nnunet", imported[f"{DATASET}_3d_fullres_ensemble"], "--out", tmp_path / "r",
                      "--trainer", "nnUNetTrainer_250epochs")
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "r" / DATASET / "nnUNetTrainer_250epochs__nnUNetPlans__3d_fullres"
    assert sorted(p.name for p in folder.glob("fold_*/checkpoint_final.pth")) == ["checkpoint_final.pth"] * 2
    assert {p.parent.name for p in folder.glob("fold_*/checkpoint_final.pth")} == {"fold_0", "fold_1"}
    again = autoplan("export-nnunet", imported[f"{DATASET}_3d_fullres_fold0"], "--out", tmp_path / "r",
                     "--trainer", "nnUNetTrainer_250epochs")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_export_refuses_a_network_without_nnunet_equivalent(imported, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(imported[f"{DATASET}_3d_fullres_fold0"], bundle)
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    inference["network_def"] = {"_target_": "SegResNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3}
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    result = autoplan("export-nnunet", bundle, "--out", tmp_path / "r")
    assert result.returncode == 2 and "no nnU-Net equivalent" in result.stderr and "Traceback" not in result.stderr
    # plans naming a network nnU-Net's exporter here does not know
    bundle2 = tmp_path / "b2"
    shutil.copytree(imported[f"{DATASET}_3d_fullres_fold0"], bundle2)
    plans = json.loads((bundle2 / "configs" / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "somewhere.MedNeXt"
    (bundle2 / "configs" / "plans.json").write_text(json.dumps(plans))
    result = autoplan("export-nnunet", bundle2, "--out", tmp_path / "r")
    assert result.returncode == 2 and "no nnU-Net equivalent" in result.stderr


def test_export_needs_an_nnunet_dataset_name(imported, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(imported[f"{DATASET}_3d_fullres_fold0"], bundle)
    plans = json.loads((bundle / "configs" / "plans.json").read_text())
    plans["dataset_name"] = "Interop"
    (bundle / "configs" / "plans.json").write_text(json.dumps(plans))
    result = autoplan("export-nnunet", bundle, "--out", tmp_path / "r")
    assert result.returncode == 2 and "--dataset-name" in result.stderr
    result = autoplan("export-nnunet", bundle, "--out", tmp_path / "r", "--dataset-name", "Dataset123_Interop")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r" / "Dataset123_Interop" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0").is_dir()


def test_the_generator_checked_export_with_nnunet():
    """What ``make_interop_fixture.py`` measured with nnU-Net itself: every exported checkpoint loads strictly into
    nnU-Net's network class (the round trip keeps its logits), and ``nnUNetv2_predict`` with the exported folders
    agrees with the bundles' own inference."""
    check = json.loads((FIXTURE / "export_check.json").read_text())
    assert check["strict_loads"] and all(r["strict_load"] for r in check["strict_loads"].values())
    for record in check["strict_loads"].values():
        assert record.get("max_abs_logit_difference_vs_original", 0.0) < 1e-4, record
    assert set(check["comparisons"]) == {"roundtrip_ensemble_f01", "trained_here_f0"}
    for figures in check["comparisons"].values():
        # recorded when the bundles still placed windows as MONAI does: agreement >= 0.995 there, not 0.999
        for case, record in figures["cases"].items():
            assert record["agreement"] >= 0.995, (case, record)


def test_nothing_imports_nnunet():
    """The product reads nnU-Net's files; only the fixture generator and benchmarks run nnU-Net (in their venv)."""
    import re

    pattern = re.compile(r"^\s*(import|from)\s+(nnunetv2|dynamic_network_architectures|batchgenerators)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("autoplan", "bundles", "tools")
                 for p in sorted((ROOT / folder).rglob("*.py")) if pattern.search(p.read_text())]
    assert offenders == []


def test_inference_information_names_the_postprocessing_folder():
    """find_best_configuration's inference_information.json selected the 3d_fullres folder: its
    crossval_results_folds_0_1 is where the postprocessing comes from (none chosen for these tiny models)."""
    from autoplan.interop import _selected_crossval, read_postprocessing

    assert _selected_crossval(model_dir("3d_fullres")) == model_dir("3d_fullres") / "crossval_results_folds_0_1"
    assert _selected_crossval(model_dir("2d")) is None
    pp = read_postprocessing(model_dir("3d_fullres"), [1, 2])
    assert pp["keep_largest_foreground"] is False and pp["keep_largest_labels"] == []
    assert read_postprocessing(model_dir("2d"), [1, 2]) is None



# --- region-based models (BraTS style) -------------------------------------------------------------------------------
REGIONS = FIXTURE / "regions"  # ``make_interop_fixture.py --stage regions``
REGIONS_DATASET = "Dataset988_InteropRegions"
REGIONS_MODEL = REGIONS / "results" / REGIONS_DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
REGION_LISTS = [[1, 2, 3], [2, 3], [3]]


@pytest.fixture(scope="module")
def imported_regions(tmp_path_factory):
    """The region model folder (3 nested regions, folds 0 and 1) imported once."""
    from autoplan.interop import import_nnunet

    return {p.name: p for p in import_nnunet(REGIONS_MODEL, out=tmp_path_factory.mktemp("regions"))}


def test_region_model_imports_as_sigmoid_region_bundles(imported_regions):
    from bundles.scripts.networks import network_from_plan
    from bundles.scripts.preprocessing import resolve_configuration

    assert sorted(imported_regions) == [f"{REGIONS_DATASET}_3d_fullres_{s}" for s in ("ensemble", "fold0", "fold1")]
    fold0 = imported_regions[f"{REGIONS_DATASET}_3d_fullres_fold0"]
    inference = json.loads((fold0 / "configs" / "inference.json").read_text())
    train = json.loads((fold0 / "configs" / "train.json").read_text())
    assert train["regions"] == REGION_LISTS and train["regions_class_order"] == [1, 2, 3]
    assert inference["regions_class_order"] == [1, 2, 3]
    assert inference["num_classes"] == 3  # one sigmoid output per region, no background channel
    # find_best_configuration kept the largest component of region (3,) ([3] in its postprocessing.json)
    pp = json.loads((REGIONS_MODEL / "crossval_results_folds_0_1" / "postprocessing.json").read_text())
    assert pp["postprocessing_kwargs"] == [{"labels_or_regions": [3]}]
    assert inference["keep_largest_foreground"] is False and inference["keep_largest_labels"] == [3]
    ensemble = json.loads((imported_regions[f"{REGIONS_DATASET}_3d_fullres_ensemble"] / "configs" /
                           "inference.json").read_text())
    assert ensemble["regions_class_order"] == [1, 2, 3] and [m["fold"] for m in ensemble["members"]] == [0, 1]
    plans = json.loads((REGIONS_MODEL / "plans.json").read_text())
    net = network_from_plan(resolve_configuration(plans, "3d_fullres"), 1, 3)
    net.load_state_dict(torch.load(fold0 / "models" / "model.pt", weights_only=True))  # strict: 3 outputs


@pytest.mark.parametrize("bundle,reference", [("ensemble", "3d_fullres"), ("fold0", "3d_fullres_f0")])
def test_region_bundles_predict_what_nnunet_predicts(imported_regions, tmp_path, bundle, reference):
    """Label maps painted from the regions' sigmoids as nnU-Net paints them; the saved probabilities are the
    regions' sigmoids (3 channels), within nnU-Net's float16 accumulation of nnU-Net's."""
    figures = compare(predict(imported_regions[f"{REGIONS_DATASET}_3d_fullres_{bundle}"], tmp_path,
                              images=REGIONS / "imagesTs", **NO_PP), REGIONS / "predictions" / reference)
    assert len(figures) == 2
    assert_agrees(figures)
    for case, record in figures.items():
        # fold 0 alone paints no voxel of label 2 on these images
        assert {1, 3} <= set(record["dice"]) <= {1, 2, 3} and (bundle == "fold0" or 2 in record["dice"]), record
        assert record["max_dp"] is not None
    theirs = np.load(next((REGIONS / "predictions" / reference).glob("*.npz")))["probabilities"]
    assert theirs.shape[0] == 3 and theirs.min() >= 0 and theirs.max() <= 1


def test_region_ensemble_postprocesses_as_find_best_configuration_chose(imported_regions, tmp_path):
    """With the postprocessing imported from find_best_configuration (on by default) the ensemble predicts what
    nnUNetv2_apply_postprocessing made of nnUNetv2_predict -f 0 1 with that choice."""
    ours = predict(imported_regions[f"{REGIONS_DATASET}_3d_fullres_ensemble"], tmp_path, images=REGIONS / "imagesTs")
    assert_agrees(compare(ours, REGIONS / "predictions" / "3d_fullres_postprocessed"))


def test_region_postprocessing_is_applied_as_nnunet_applies_it(tmp_path):
    """postprocessing.json as find_best_configuration writes it for regions (the foreground, then region (2, 3),
    then the regions (1,) and (2,) together: tuples, lists in the JSON); nnU-Net applied it with
    nnUNetv2_apply_postprocessing."""
    from autoplan.interop import import_nnunet

    folder = tmp_path / REGIONS_DATASET / REGIONS_MODEL.name
    shutil.copytree(REGIONS_MODEL, folder)
    shutil.copyfile(REGIONS / "forced_postprocessing" / "postprocessing.json",
                    folder / "crossval_results_folds_0_1" / "postprocessing.json")
    bundles = {p.name: p for p in import_nnunet(folder, out=tmp_path / "b")}
    ensemble = bundles[f"{REGIONS_DATASET}_3d_fullres_ensemble"]
    for bundle in (ensemble, bundles[f"{REGIONS_DATASET}_3d_fullres_fold1"]):
        config = json.loads((bundle / "configs" / "inference.json").read_text())
        assert config["keep_largest_foreground"] is True and config["keep_largest_labels"] == [[2, 3], [1, 2]]
    ours = predict(ensemble, tmp_path / "pp", images=REGIONS / "imagesTs")
    assert_agrees(compare(ours, REGIONS / "predictions" / "3d_fullres_forced_postprocessing"))
    # the steps change these predictions, so the comparison above could tell them apart
    predictions = REGIONS / "predictions"
    plain = compare(predictions / "3d_fullres", predictions / "3d_fullres_forced_postprocessing")
    assert max(r["agreement"] for r in plain.values()) < 0.999


def test_region_postprocessing_json_entries(tmp_path):
    """Regions (lists) and lists of them become unions in keep_largest_labels; labels outside the foreground or
    malformed entries are refused naming the file."""
    from autoplan.interop import InteropError, read_postprocessing

    pp = tmp_path / "m" / "crossval_results_folds_0_1" / "postprocessing.json"
    pp.parent.mkdir(parents=True)
    fn = "remove_all_but_largest_component_from_segmentation"

    def steps(*targets):
        pp.write_text(json.dumps({"postprocessing_fns": [fn] * len(targets),
                                  "postprocessing_kwargs": [{"labels_or_regions": t} for t in targets]}))
        return read_postprocessing(tmp_path / "m", [1, 2, 3])

    assert steps([1, 2, 3], [2, 3], [3]) == {"keep_largest_foreground": True, "keep_largest_labels": [[2, 3], 3],
                                             "source": str(pp)}
    # a region equal to the whole foreground after another step stays in its place
    assert steps([3], [3, 2, 1])["keep_largest_labels"] == [3, [1, 2, 3]]
    assert steps([[1, 2], [3]])["keep_largest_foreground"] is True
    for bad, message in (([2, 4], "label\\(s\\) \\[4\\]"), ([[1, "x"]], "not a label, a region"), ([], "not a label")):
        with pytest.raises(InteropError, match=message) as info:
            steps(bad)
        assert str(pp) in str(info.value)


def test_region_model_without_regions_class_order_is_refused(tmp_path):
    folder = tmp_path / REGIONS_DATASET / REGIONS_MODEL.name
    shutil.copytree(REGIONS_MODEL, folder)
    spec = json.loads((folder / "dataset.json").read_text())
    spec["regions_class_order"] = [1, 2]
    (folder / "dataset.json").write_text(json.dumps(spec))
    result = autoplan("import-nnunet", folder, "--out", tmp_path / "out")
    assert result.returncode == 2 and "regions_class_order" in result.stderr and "dataset.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_region_export_round_trips(imported_regions, tmp_path):
    """The exported folder's dataset.json holds the regions and regions_class_order, the checkpoints nnU-Net's
    weights (3 region outputs; DynUNet's cancelled conv biases as zeros), and they import again to the same bundles."""
    from autoplan.interop import export_nnunet, import_nnunet

    paths = export_nnunet(imported_regions[f"{REGIONS_DATASET}_3d_fullres_ensemble"], out=tmp_path / "r")
    folder = tmp_path / "r" / REGIONS_DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert sorted(paths) == [folder / f"fold_{f}" / "checkpoint_final.pth" for f in (0, 1)]
    spec = json.loads((folder / "dataset.json").read_text())
    assert [spec["labels"][f"region_{k}"] for k in (1, 2, 3)] == REGION_LISTS
    assert spec["regions_class_order"] == [1, 2, 3]
    for fold in (0, 1):
        ours = _nnunet_checkpoint(folder, fold)
        theirs = _nnunet_checkpoint(REGIONS_MODEL, fold)["network_weights"]
        assert ours["init_args"]["dataset_json"]["regions_class_order"] == [1, 2, 3]
        assert sorted(ours["network_weights"]) == sorted(theirs)
        for key, value in theirs.items():
            mine = ours["network_weights"][key]
            if ".convs." in key and key.endswith((".conv.bias", ".all_modules.0.bias")):
                assert mine.shape == value.shape and not mine.any(), key
            else:
                assert torch.equal(mine, value), key
        heads = [v for k, v in ours["network_weights"].items() if "seg_layers" in k and k.endswith("weight")]
        assert heads and all(v.shape[0] == 3 for v in heads)
    again = {p.name: p for p in import_nnunet(folder, out=tmp_path / "again")}
    for fold in (0, 1):
        name = f"{REGIONS_DATASET}_3d_fullres_fold{fold}"
        first = torch.load(imported_regions[name] / "models" / "model.pt", weights_only=True)
        second = torch.load(again[name] / "models" / "model.pt", weights_only=True)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_the_generator_checked_region_export_with_nnunet():
    """What ``make_interop_fixture.py --stage regions`` measured with nnU-Net: the exported region checkpoints load
    strictly into nnU-Net's network (3 outputs, the original logits), and nnUNetv2_predict with the exported folder
    agrees with the ensemble bundle, probabilities included."""
    check = json.loads((REGIONS / "export_check.json").read_text())
    assert len(check["strict_loads"]) == 2 and all(r["strict_load"] for r in check["strict_loads"].values())
    for record in check["strict_loads"].values():
        assert record["max_abs_logit_difference_vs_original"] < 1e-4, record
    assert check["exported_dataset_json"]["regions_class_order"] == [1, 2, 3]
    figures = check["comparisons"]["roundtrip_ensemble_f01"]
    assert figures["min_agreement"] >= 0.999 and figures["min_dice"] >= 0.99, figures
    assert all(c["max_probability_difference"] <= 2e-2 for c in figures["cases"].values()), figures
