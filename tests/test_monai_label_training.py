"""MONAI Label's active-learning loop trains a bundle: its training task's overrides, applied exactly as MONAI Label
0.8.5 applies them (``monailabel/tasks/train/bundle.py``), without MONAI Label installed.

MONAI Label calls ``monai.bundle.run(run_id="run", init_id=None, final_id=None, ...)`` with ``bundle_root``,
``train#trainer#max_epochs``, ``train#dataset#data`` / ``validate#dataset#data`` (its datastore's
``{"image": path, "label": path}`` split 80/20), ``device`` as a string and ``train#handlers`` with a
``CheckpointLoader`` of ``models/model.pt`` inserted at the head when that file exists. The bundle here sits where
its emitting machine's dataset cannot be found, as in a MONAI Label app folder.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset
from integration.monai_label import write_studies
from test_bundles import bundle_on_path

RUN = """
import json, sys
import monai.bundle
bundle, overrides = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, bundle)
monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=bundle + "/configs/metadata.json",
                 config_file=bundle + "/configs/train.json", **overrides)
"""


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """A bundle in ``model/<name>`` of an app folder and a studies folder in MONAI Label's layout."""
    root = tmp_path_factory.mktemp("label")
    raw = make_synthetic_dataset(root / "raw" / "Dataset962_Label", cases=5, shape=(24, 24, 12), spacing=(1, 1, 2),
                                 labels=2, seed=5)
    run(raw, root / "work", processes=1, configurations=["3d_fullres"], folds=[0])
    bundle = shutil.copytree(root / "work" / "bundles" / "Dataset962_Label_3d_fullres_fold0",
                             root / "app" / "model" / "autoplan_3d_fullres")
    studies = root / "studies"
    write_studies(raw, studies)
    return bundle, studies


def train_request(bundle, studies, max_epochs: int = 1):
    """What MONAI Label's BundleTrainTask hands to monai.bundle.run for ``{"max_epochs": N, "device": "cpu"}``."""
    datalist = [{"image": str(p), "label": str(studies / "labels" / "final" / p.name)}
                for p in sorted(studies.glob("*.nii.gz"))]
    train = json.loads((bundle / "configs/train.json").read_text())
    handlers = train["train"]["handlers"]
    if (bundle / "models" / "model.pt").exists():
        handlers.insert(0, {"_target_": "CheckpointLoader", "load_path": str(bundle / "models" / "model.pt"),
                            "load_dict": {"model": "$@network"}, "strict": False})
    overrides = {"bundle_root": str(bundle), "train#trainer#max_epochs": max_epochs, "train#dataset#data": datalist[:4],
                 "device": "cpu", "train#handlers": handlers, "validate#dataset#data": datalist[4:],
                 # a tiny budget for the test; MONAI Label itself leaves these at the bundle's values
                 "iterations_per_epoch": 2, "val_iterations": 1, "num_workers": 0}
    result = subprocess.run([sys.executable, "-c", RUN, str(bundle), json.dumps(overrides)], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "nnUNet_raw": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr, datalist


def state(bundle):
    return torch.load(bundle / "models" / "model.pt", weights_only=True)


def final_lr(bundle) -> float:
    """The learning rate the schedule left in the optimizer after the run's last epoch."""
    resume = torch.load(bundle / "models/resume/checkpoint_latest.pt", weights_only=True)
    return resume["optimizer"]["param_groups"][0]["lr"]


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_two_train_requests_each_train_and_an_edited_label_reaches_training(app):
    bundle, studies = app
    log, datalist = train_request(bundle, studies)
    first = state(bundle)
    progress = json.loads((bundle / "eval/progress.json").read_text())
    assert progress["epoch"] == [1] and progress["lr"] == [0.01]  # the epoch's own rate
    assert final_lr(bundle) == pytest.approx(0.0)  # the schedule ends with max_epochs 1, not with the bundle's 1000
    summary = json.loads((bundle / "eval/validation/summary.json").read_text())  # on MONAI Label's validation split
    assert [os.path.basename(c["reference_file"]) for c in summary["metric_per_case"]] == [
        os.path.basename(d["label"]) for d in datalist[4:]]
    cache_dir = bundle.parent / "preprocessed"
    (seg_file,) = cache_dir.glob("*/case_000_seg.npy")
    cached = np.load(seg_file)

    label_path = studies / "labels" / "final" / "case_000.nii.gz"  # a clinician corrects a label and submits it
    label = sitk.ReadImage(str(label_path))
    corrected = sitk.GetArrayFromImage(label)
    corrected[corrected == 2] = 1
    edited = sitk.GetImageFromArray(corrected)
    edited.CopyInformation(label)
    sitk.WriteImage(edited, str(label_path))

    log, _ = train_request(bundle, studies)
    assert "new training from" in log and "finished all 1 epochs" in log  # not a no-op resume of the last run
    second = state(bundle)
    assert changed(first, second)
    recached = np.load(seg_file)
    assert (cached == 2).any() and not (recached == 2).any() and (recached == 1).sum() > (cached == 1).sum()
    assert json.loads((bundle / "eval/progress.json").read_text())["lr"] == [0.01] and final_lr(bundle) == 0.0


def test_only_loadable_models_are_offered(app):
    """MONAI Label offers every ``models/*.pt`` as a model; each must load into the network (the resume state
    lives in ``models/resume/``)."""
    from monai.bundle import ConfigParser

    bundle, studies = app
    if not (bundle / "models/model.pt").exists():
        train_request(bundle, studies)
    assert sorted(p.name for p in (bundle / "models").glob("*.pt")) == ["model.pt", "model_best.pt"]
    assert (bundle / "models/resume/checkpoint_latest.pt").is_file()
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/inference.json"))
        parser["bundle_root"] = str(bundle)
        network = parser.get_parsed_content("network_def")
        for model in (bundle / "models").glob("*.pt"):
            network.load_state_dict(torch.load(model, weights_only=True), strict=True)


def test_inference_loads_only_the_image_as_label_and_deploy_expect(app):
    """MONAI Label re-wraps each ``LoadImaged`` as ``LoadImageTensord(keys=t.keys)`` (no missing keys allowed) and
    MONAI Deploy drops it: the one loader of ``preprocessing`` loads ``image`` alone, whatever the configuration
    (a cascade's previous stage is read by ``NnUNetPreprocessd`` from its file)."""
    from monai.bundle import ConfigParser
    from monai.transforms import LoadImaged

    bundle, studies = app
    with bundle_on_path(bundle):
        for previous_stage in (None, "3d_lowres"):
            parser = ConfigParser()
            parser.read_config(str(bundle / "configs/inference.json"))
            parser["bundle_root"], parser["previous_stage"] = str(bundle), previous_stage
            transforms = parser.get_parsed_content("preprocessing").transforms
            loaders = [t for t in transforms if isinstance(t, LoadImaged)]
            assert len(loaders) == 1 and tuple(loaders[0].keys) == ("image",)
            item = {"image": str(studies / "case_000.nii.gz")}
            if previous_stage:
                item["prev"] = str(studies / "labels" / "final" / "case_000.nii.gz")
            out = parser.get_parsed_content("preprocessing")(item)
            channels = 1 + (2 if previous_stage else 0)  # the image, and one channel per foreground label
            assert out["image"].shape[0] == channels and "prev" not in out
