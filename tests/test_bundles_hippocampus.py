"""A bundle emitted from nnU-Net's own Hippocampus plans trains (briefly) and predicts on the real data."""

import json
import os
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from conftest import HIPPOCAMPUS, HIPPOCAMPUS_PLANS, requires_shared, sklearn_splits
from autoplan.emit import emit

pytestmark = requires_shared


def test_bundle_from_nnunet_plans_trains_and_predicts(tmp_path):
    bundle, = emit(HIPPOCAMPUS_PLANS / "nnUNetPlans.json", HIPPOCAMPUS, tmp_path / "bundles", ["3d_fullres"], [0])
    assert bundle.name == "Dataset004_Hippocampus_3d_fullres_fold0"
    train = json.loads((bundle / "configs/train.json").read_text())
    assert train["patch_size"] == [40, 56, 40] and train["batch_size"] == 9
    assert train["initial_patch_size"] == [73, 80, 64]  # spec 5.4's example
    cases = sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS / "labelsTr").glob("*.nii.gz"))
    assert train["val_cases"] == sklearn_splits(cases)[0]["val"] and len(train["val_cases"]) == 52
    # a short run on a few cases: the full fold takes far longer than a test may
    few_train, few_val = train["train_cases"][:4], train["val_cases"][:2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                             "configs/train.json", "--train_cases", json.dumps(few_train), "--val_cases",
                             json.dumps(few_val), "--batch_size", "2", "--epochs", "1", "--iterations_per_epoch", "2",
                             "--val_iterations", "1", "--num_workers", "0"],
                            cwd=bundle, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((bundle / "eval/validation/summary.json").read_text())
    assert sorted(c["prediction_file"].rsplit("/", 1)[-1] for c in summary["metric_per_case"]) == \
        sorted(f"{c}.nii.gz" for c in few_val)
    assert set(summary["mean"]) == {"1", "2"}
    out = tmp_path / "pred"
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                             "--output_dir", str(out), "--use_tta", "False"],
                            cwd=bundle, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    prediction = sitk.ReadImage(str(out / "hippocampus_118.nii.gz"))  # the default dataset_dir is imagesTs
    image = sitk.ReadImage(str(HIPPOCAMPUS / "imagesTs" / "hippocampus_118_0000.nii.gz"))
    assert prediction.GetSize() == image.GetSize()
    assert np.allclose(prediction.GetSpacing(), image.GetSpacing())
    assert np.allclose(prediction.GetOrigin(), image.GetOrigin())
    assert np.allclose(prediction.GetDirection(), image.GetDirection())
