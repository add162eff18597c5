"""Region-based and sparse-label datasets through the bundles: emit, train, infer, ensemble and select.

A tiny BraTS-like synthetic dataset (regions (1, 2, 3), (2, 3), (3,), ``regions_class_order`` [1, 2, 3]) gets
3d_fullres bundles for all five folds. Fold 0 is trained for a few iterations; the other folds get freshly
initialised weights and predict their validation cases with probabilities, as training would leave them, so that
``select`` and the ensemble tools have every fold. A second dataset adds the DIAG fork's -1 marks to the regions,
and a third trains the fork's class-weighted loss on plain labels with -1 marks and nnU-Net's normal sampling.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset
from bundles.scripts.evaluation import evaluate_folder

ROOT = Path(__file__).resolve().parents[1]
DATASET = "Dataset964_Regions"
FOLDS = [0, 1, 2, 3, 4]
ORDER = [1, 2, 3]
FAST = ["--epochs", "1", "--iterations_per_epoch", "2", "--val_iterations", "1", "--num_workers", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV)


def train(bundle: Path, *overrides):
    result = cli("-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", *FAST, *overrides,
                 cwd=bundle)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def probabilities(path) -> np.ndarray:
    return np.load(path)["probabilities"]


def paint(p: np.ndarray) -> np.ndarray:
    """nnU-Net's region export, written out: later regions overwrite earlier ones where their sigmoid > 0.5."""
    seg = np.zeros(p.shape[1:], np.uint8)
    for channel, value in enumerate(ORDER):
        seg[p[channel] > 0.5] = value
    return seg


def bundle_name(fold: int) -> str:
    return f"{DATASET}_3d_fullres_fold{fold}"


def fresh_fold(bundle: Path, raw: Path, seed: int) -> None:
    """Random weights and the fold's validation predictions with probabilities (what training would leave)."""
    from monai.bundle import ConfigParser

    sys.path.insert(0, str(bundle))
    try:
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        torch.manual_seed(seed)
        torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
        from scripts.data import list_cases
        from scripts.inference import predict_validation

        val = json.loads((bundle / "configs" / "train.json").read_text())["val_cases"]
        datalist = list_cases(raw / "imagesTr", ".nii.gz", 1, raw / "labelsTr", val)
        predict_validation(bundle, datalist, bundle / "eval" / "validation", "cpu", True)
    finally:
        sys.path.remove(str(bundle))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def regions(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    raw = make_synthetic_dataset(root / "raw" / DATASET, cases=5, shape=(24, 24, 12), spacing=(1, 1, 2), labels=3,
                                 test_cases=1, seed=4, regions=True)
    run(raw, root / "work", processes=1, configurations=["3d_fullres"], folds=FOLDS)
    bundles = root / "work" / "bundles"
    train(bundles / bundle_name(0), "--save_probabilities", "True")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fold in FOLDS[1:]:
            fresh_fold(bundles / bundle_name(fold), raw, fold)
    finally:
        torch.set_num_threads(threads)
    return raw, bundles


def test_region_bundle_declares_regions_and_trains(regions):
    raw, bundles = regions
    bundle = bundles / bundle_name(0)
    train_config = json.loads((bundle / "configs/train.json").read_text())
    assert train_config["regions"] == [[1, 2, 3], [2, 3], [3]] and train_config["num_classes"] == 3
    assert json.loads((bundle / "configs/inference.json").read_text())["regions_class_order"] == ORDER
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    outputs = meta["network_data_format"]
    # MONAI Label reads channel_def as label name -> value in the label map: the regions_class_order values
    names = {"0": "background", "1": "region_1", "2": "region_2", "3": "region_3"}
    assert outputs["outputs"]["pred"]["channel_def"] == names and outputs["outputs"]["pred"]["num_channels"] == 3
    assert outputs["post_processed_outputs"]["pred"]["channel_def"] == names
    progress = json.loads((bundle / "eval/progress.json").read_text())
    assert len(progress["val_pseudo_dice_per_class"][0]) == 3  # one pseudo-Dice per region
    assert set(meta["eval_metrics"]) >= {"dice_region_1", "dice_region_2", "dice_region_3", "mean_dice"}
    validation = bundle / "eval" / "validation"
    summary = json.loads((validation / "summary.json").read_text())
    assert set(summary["mean"]) == {"(1, 2, 3)", "(2, 3)", "(3,)"}
    for npz in validation.glob("*.npz"):  # the regions' sigmoids, painted in regions_class_order
        p = probabilities(npz)
        assert p.shape[0] == 3 and p.min() >= 0 and p.max() <= 1
        assert not np.allclose(p.sum(0), 1)  # not a softmax
        np.testing.assert_array_equal(read(validation / f"{npz.name[:-4]}.nii.gz"), paint(p))


def test_region_ensemble_averages_sigmoids_and_paints_them(regions, tmp_path):
    raw, bundles = regions
    members = [bundles / bundle_name(f) for f in (0, 1)]
    out = tmp_path / "pred"
    result = cli("-m", "autoplan", "ensemble", *members, "--dataset-dir", raw / "imagesTs", "--output-dir", out,
                 "--save-probabilities", "--fold-averaging", "probabilities", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    singles = []
    for bundle in members:
        single = tmp_path / bundle.name
        result = cli("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
                     raw / "imagesTs", "--output_dir", single, "--save_probabilities", "True", cwd=bundle)
        assert result.returncode == 0, result.stderr[-3000:]
        singles.append(probabilities(single / "case_005.npz"))
        np.testing.assert_array_equal(read(single / "case_005.nii.gz"), paint(singles[-1]))
    mean = (singles[0] + singles[1]) / 2
    np.testing.assert_allclose(probabilities(out / "case_005.npz"), mean, atol=1e-6)
    np.testing.assert_array_equal(read(out / "case_005.nii.gz"), paint(mean))
    # the ensemble bundle, run by MONAI, paints the same
    ens = tmp_path / "Regions_ensemble"
    result = cli("-m", "autoplan", "ensemble", "make-bundle", *members, "--out", ens)
    assert result.returncode == 0, result.stderr[-3000:]
    result = cli("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
                 raw / "imagesTs", "--output_dir", tmp_path / "bundle_out", "--fold_averaging", "probabilities",
                 cwd=ens)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(read(tmp_path / "bundle_out" / "case_005.nii.gz"), paint(mean))


def test_select_scores_and_postprocesses_regions(regions):
    raw, bundles = regions
    result = cli("-m", "autoplan", "select", bundles, "--device", "cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    selection = bundles / "selection"
    report = json.loads((selection / "report.json").read_text())
    assert [c["name"] for c in report["candidates"]] == ["3d_fullres"]
    spec = json.loads((raw / "dataset.json").read_text())
    summary = evaluate_folder(raw / "labelsTr", selection / report["candidates"][0]["folder"], ".nii.gz",
                              spec["labels"], chill=True)
    assert report["candidates"][0]["foreground_mean_dice"] == pytest.approx(summary["foreground_mean"]["Dice"])
    pp = json.loads((selection / "postprocessing.json").read_text())
    steps = {s["step"] for s in pp["steps"]}  # nnU-Net's search: all foreground, then each region on its own
    assert steps == {"keep_largest_foreground", "keep_largest_label_(1, 2, 3)", "keep_largest_label_(2, 3)",
                     "keep_largest_label_(3,)"}
    final = json.loads((selection / f"{DATASET}_ensemble" / "configs/inference.json").read_text())
    assert final["regions_class_order"] == ORDER


@pytest.mark.parametrize("kind", ["regions", "labels"])
def test_sparse_minus_one_labels_train_and_validate(tmp_path, kind):
    """-1 marks every odd slice unannotated; regions train with the masked region loss, labels with the
    class-weighted Dice + CE and nnU-Net's normal sampling. The validation scores skip the -1 voxels."""
    name = "Dataset965_SparseRegions" if kind == "regions" else "Dataset966_SparseLabels"
    raw = make_synthetic_dataset(tmp_path / "raw" / name, cases=5, shape=(24, 24, 12), spacing=(1, 1, 2), labels=2,
                                 seed=5, regions=kind == "regions", sparse=True)
    assert (read(raw / "labelsTr" / "case_000.nii.gz") == -1).any()
    run(raw, tmp_path / "work", processes=1, configurations=["3d_fullres"], folds=[0])
    bundle = tmp_path / "work" / "bundles" / f"{name}_3d_fullres_fold0"
    config = json.loads((bundle / "configs/train.json").read_text())
    assert config["ignore_label"] == 3 and config["labels"]["ignore"] == -1
    extra = [] if kind == "regions" else ["--class_weights", "[1.0, 2.0, 4.0]", "--sparse_sampling", "False"]
    train(bundle, *extra)
    progress = json.loads((bundle / "eval/progress.json").read_text())
    assert np.isfinite(progress["train_loss"][0]) and len(progress["val_pseudo_dice_per_class"][0]) == 2
    summary = json.loads((bundle / "eval/validation/summary.json").read_text())
    spec = json.loads((raw / "dataset.json").read_text())
    again = evaluate_folder(raw / "labelsTr", bundle / "eval/validation", ".nii.gz", spec["labels"], chill=True)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(again["foreground_mean"]["Dice"])
    case = summary["metric_per_case"][0]
    reference = read(case["reference_file"])
    key = next(iter(case["metrics"]))
    annotated = int((reference != -1).sum())
    metrics = case["metrics"][key]
    assert metrics["TP"] + metrics["FP"] + metrics["FN"] + metrics["TN"] == annotated  # -1 voxels count nowhere


def test_region_bundle_passes_the_zoo_checks_and_predicts_the_same_after_export(regions, tmp_path):
    """MONAI's workflow properties and ``verify_net_in_out`` (defaults: one patch, the output's 3 region channels
    from metadata.json); zipped by ``autoplan export``, installed elsewhere, the bundle predicts the same label map."""
    from monai.bundle import ConfigWorkflow

    from tools import export

    raw, bundles = regions
    bundle = bundles / bundle_name(1)
    result = cli("-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                 "--config_file", "configs/inference.json", cwd=bundle)
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(bundle))
    try:
        for config, kind in (("train.json", "train"), ("inference.json", "infer")):
            workflow = ConfigWorkflow(config_file=str(bundle / "configs" / config),
                                      meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                                      workflow_type=kind, bundle_root=str(bundle), initialize=[])
            workflow.initialize()
            assert workflow.check_properties() == []
    finally:
        sys.path.remove(str(bundle))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]
    archive = export.export_bundle(bundle, tmp_path / f"{bundle.name}.zip")
    installed = export.install_bundle(archive, tmp_path / "installed")
    predictions = []
    for folder in (bundle, installed):
        out = tmp_path / f"pred_{len(predictions)}"
        result = cli("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
                     raw / "imagesTs", "--output_dir", out, "--use_tta", "False", cwd=folder)
        assert result.returncode == 0, result.stderr[-3000:]
        predictions.append(read(out / "case_005.nii.gz"))
    np.testing.assert_array_equal(predictions[0], predictions[1])
    assert set(np.unique(predictions[0])) <= {0, *ORDER}
