"""Generate ``tests/fixtures/nnunet_interop/``: tiny nnU-Net v2 model folders trained by nnU-Net 2.8.1 itself, with
``nnUNetv2_predict`` outputs, for the import/export tests (``tests/test_interop.py``), so that CI needs no nnunetv2.

What it does (nnU-Net runs in the venv of ``nnunet_venv.py``; only its command-line tools are called):

1. ``models``: a synthetic dataset (``autoplan.synthetic``, 8 training + 2 test cases of about 32 x 32 x 24 voxels,
   two structures) in ``nnUNet_raw``; ``nnUNetv2_extract_fingerprint`` and ``nnUNetv2_plan_experiment``; the plans
   are then shrunk into a *tiny plan* (features 4-8-16, small patches so that a test image takes several tiles) and
   given a ``3d_lowres`` stage (1.6 mm, an in-plane first kernel, so that the non-DynUNet network is used) with its
   ``3d_cascade_fullres``, plus a ResEnc plans file (``nnUNetResEncUNetMPlans``, the same preprocessing);
   ``nnUNetv2_preprocess``; a 2-fold ``splits_final.json``; ``nnUNetv2_train`` with a tiny trainer subclass
   (``nnUNetTrainer_autoplanInterop``: a few epochs of a few iterations, 2-D mirroring restricted to axis 1, found
   through ``nnUNet_extTrainer``) for 3d_fullres folds 0 1, 2d fold 0, 3d_lowres folds 0 1, 3d_cascade_fullres
   fold 0 and ResEnc 3d_fullres fold 0; ``nnUNetv2_find_best_configuration`` (3d_fullres, folds 0 1) for the
   postprocessing; ``nnUNetv2_predict --save_probabilities`` on the test images (3d_fullres ``-f 0 1`` and ``-f 0``,
   2d, 3d_lowres, the cascade from the lowres predictions, ResEnc) and ``nnUNetv2_apply_postprocessing``.
   The model folders (checkpoints as nnU-Net wrote them; no validation outputs, logs or plots), the predictions (no
   ``.pkl``) and the test images are copied into the fixture.
2. ``export`` (needs ``autoplan`` importable, i.e. this checkout): imports the fixture's 3d_fullres model with
   ``autoplan import-nnunet``, emits and trains a bundle here (a few iterations), exports both with
   ``autoplan export-nnunet``; in the venv each exported checkpoint is loaded, strictly, into the network class
   nnU-Net builds from the plans, and ``nnUNetv2_predict`` predicts with the exported folders; the label maps and
   probabilities are compared with the bundles' own inference. The figures go to the fixture's
   ``export_check.json`` and are printed.
3. ``regions`` (needs this checkout too): a region-based (BraTS-style) synthetic dataset, 3 nested regions with
   ``regions_class_order``, planned and shrunk to the tiny 3d_fullres plan; nnU-Net trains folds 0 1 (sigmoid
   outputs), chooses the postprocessing and predicts the 2 test images with ``--save_probabilities``; a forced
   region postprocessing is applied as in stage 1. Written to ``tests/fixtures/nnunet_interop/regions/`` (the stages
   above keep it); then the model is imported, its ensemble exported and checked with nnU-Net as in stage 2, into
   ``regions/export_check.json``.

Usage::

    python benchmarks/make_interop_fixture.py [--venv DIR] [--work DIR] [--stage models|export|regions|all]

``--work`` keeps the nnU-Net folders (default: a temporary folder, removed at the end). About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from nnunet_venv import ensure_nnunet_venv, venv_bin  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "nnunet_interop"
DATASET_ID = 987
DATASET = f"Dataset{DATASET_ID:03d}_Interop"
TRAINER = "nnUNetTrainer_autoplanInterop"
RESENC_PLANS = "nnUNetResEncUNetMPlans"
FEATURES = [4, 8, 16]

TRAINER_SOURCE = '''"""The interop fixture's tiny budget: nnUNetTrainer, a few short epochs; 2-D mirrors axis 1 only."""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_autoplanInterop(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_iterations_per_epoch = 20
        self.num_val_iterations_per_epoch = 2

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \\
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if len(self.configuration_manager.patch_size) == 2:
            mirror_axes = (1,)
            self.inference_allowed_mirroring_axes = mirror_axes
        return rotation, dummy_2d, initial_patch_size, mirror_axes
'''


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Env:
    """The nnU-Net folders of one run and the environment its tools need."""

    def __init__(self, venv: Path, work: Path):
        self.venv, self.work = venv, work
        self.raw, self.pre, self.results = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
        self.trainers = work / "ext_trainers"
        self.env = {**os.environ, "nnUNet_raw": str(self.raw), "nnUNet_preprocessed": str(self.pre),
                    "nnUNet_results": str(self.results), "nnUNet_compile": "f", "nnUNet_n_proc_DA": "1",
                    "nnUNet_def_n_proc": "1", "nnUNet_extTrainer": str(self.trainers), "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1", "nnUNet_npp": "1", "nnUNet_nps": "1"}

    def tool(self, name: str, *args, log: str | None = None, env: dict | None = None) -> None:
        cmd = [str(venv_bin(self.venv.parent.parent, name)), *[str(a) for a in args]]
        _log(" ".join([name, *[str(a) for a in args]]))
        logfile = self.work / "logs" / f"{log or name}.log"
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "a") as out:
            done = subprocess.run(cmd, env={**self.env, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"{name} failed (exit {done.returncode}); see {logfile}")

    def python(self, code: str, *args) -> str:
        done = subprocess.run([str(self.venv), "-c", code, *[str(a) for a in args]], env=self.env,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"venv python failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def model_dir(self, configuration: str, plans: str = "nnUNetPlans") -> Path:
        return self.results / DATASET / f"{TRAINER}__{plans}__{configuration}"


# --- stage 1: nnU-Net's models and predictions ----------------------------------------------------------------------
def tiny_plans(plans: dict) -> dict:
    """nnU-Net's plans shrunk to a tiny network, with a 3d_lowres stage and its cascade."""
    plans = json.loads(json.dumps(plans))
    configs = plans["configurations"]
    full = configs["3d_fullres"]
    full["patch_size"] = [12, 16, 16]
    full["batch_size"] = 2
    full["architecture"]["arch_kwargs"].update(n_stages=3, features_per_stage=FEATURES,
                                               kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                                               n_conv_per_stage=[2, 2, 2], n_conv_per_stage_decoder=[2, 2])
    two = configs["2d"]
    two["patch_size"] = [16, 16]
    two["batch_size"] = 4
    two["architecture"]["arch_kwargs"].update(n_stages=3, features_per_stage=FEATURES, kernel_sizes=[[3, 3]] * 3,
                                              strides=[[1, 1], [2, 2], [2, 2]], n_conv_per_stage=[2, 2, 2],
                                              n_conv_per_stage_decoder=[2, 2])
    low = json.loads(json.dumps(full))
    low.update(data_identifier="nnUNetPlans_3d_lowres", spacing=[1.6, 1.6, 1.6], patch_size=[8, 12, 12],
               next_stage="3d_cascade_fullres",
               median_image_size_in_voxels=[round(s / 1.6, 1) for s in full["median_image_size_in_voxels"]])
    low["architecture"]["arch_kwargs"]["kernel_sizes"] = [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    configs["3d_lowres"] = low
    configs["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    return plans


def resenc_plans(plans: dict) -> dict:
    """The tiny plan's 3d_fullres as a ResEnc U-Net (nnU-Net's ResidualEncoderUNet), same preprocessing."""
    plans = json.loads(json.dumps(plans))
    full = plans["configurations"]["3d_fullres"]
    kw = full["architecture"]["arch_kwargs"]
    kw.pop("n_conv_per_stage")
    kw.update(n_blocks_per_stage=[1, 2, 2], n_conv_per_stage_decoder=[1, 1])
    full["architecture"]["network_class_name"] = \
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    plans.update(plans_name=RESENC_PLANS, experiment_planner_used="nnUNetPlannerResEncM",
                 configurations={"3d_fullres": full})
    return plans


PREDICTIONS = {
    # name: (plans, configuration, folds, previous stage predictions)
    "3d_fullres": ("nnUNetPlans", "3d_fullres", [0, 1], None),
    "3d_fullres_f0": ("nnUNetPlans", "3d_fullres", [0], None),
    "2d_f0": ("nnUNetPlans", "2d", [0], None),
    "3d_lowres": ("nnUNetPlans", "3d_lowres", [0, 1], None),
    "3d_cascade_fullres_f0": ("nnUNetPlans", "3d_cascade_fullres", [0], "3d_lowres"),
    "resenc_3d_fullres_f0": (RESENC_PLANS, "3d_fullres", [0], None),
}
TRAININGS = [("nnUNetPlans", "3d_fullres", 0), ("nnUNetPlans", "3d_fullres", 1), ("nnUNetPlans", "2d", 0),
             ("nnUNetPlans", "3d_lowres", 0), ("nnUNetPlans", "3d_lowres", 1),
             ("nnUNetPlans", "3d_cascade_fullres", 0), (RESENC_PLANS, "3d_fullres", 0)]


GRID_CASE = "grid_000"


def write_grid_case(raw: Path) -> None:
    """A test image without zero background (the crop keeps it whole) of 24 x 32 x 32 voxels at the plan's 1 mm, so
    that 3d_fullres (patch 12 x 16 x 16) and 2d (16 x 16) tile it with both systems' windows at the same positions
    (27 windows of step 6 / 8): there the bundles and nnU-Net agree to numerical precision. The other test images
    have arbitrary sizes, where MONAI's and nnU-Net's tile positions differ."""
    import numpy as np
    import SimpleITK as sitk

    from autoplan.synthetic import make_case

    path = raw / "imagesTs" / f"{GRID_CASE}_0000.nii.gz"
    if path.is_file():
        return
    rng = np.random.default_rng(7)
    (image,), _ = make_case(rng, (24, 32, 32), (1.0, 1.0, 1.0), 1, 2, "MR")
    outside = image == 0
    image[outside] = rng.uniform(5, 30, int(outside.sum()))
    itk = sitk.GetImageFromArray(image.astype(np.float32))
    itk.SetSpacing((1.0, 1.0, 1.0))
    itk.SetOrigin((10.0, -20.0, 5.0))
    sitk.WriteImage(itk, str(path), useCompression=True)


def make_models(e: Env) -> None:
    from autoplan.synthetic import make_synthetic_dataset

    raw = e.raw / DATASET
    if not raw.is_dir():
        make_synthetic_dataset(raw, cases=8, shape=(32, 32, 24), labels=2, test_cases=2, seed=3)
    write_grid_case(raw)
    pre = e.pre / DATASET
    if not (pre / "splits_final.json").is_file():
        e.tool("nnUNetv2_extract_fingerprint", "-d", DATASET_ID, "-np", 1)
        e.tool("nnUNetv2_plan_experiment", "-d", DATASET_ID, "-np", 1)
        plans = tiny_plans(json.loads((pre / "nnUNetPlans.json").read_text()))
        (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=4))
        (pre / f"{RESENC_PLANS}.json").write_text(json.dumps(resenc_plans(plans), indent=4))
        e.tool("nnUNetv2_preprocess", "-d", DATASET_ID, "-plans_name", "nnUNetPlans", "-c", "2d", "3d_fullres",
               "3d_lowres", "-np", 1, 1, 1)
        cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
        splits = [{"train": cases[4:], "val": cases[:4]}, {"train": cases[:4], "val": cases[4:]}]
        (pre / "splits_final.json").write_text(json.dumps(splits, indent=4))
    e.trainers.mkdir(parents=True, exist_ok=True)
    (e.trainers / f"{TRAINER}.py").write_text(TRAINER_SOURCE)
    for plans, configuration, fold in TRAININGS:
        if (e.model_dir(configuration, plans) / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            continue
        e.tool("nnUNetv2_train", DATASET_ID, configuration, fold, "-tr", TRAINER, "-p", plans, "-device", "cpu",
               log=f"train_{plans}_{configuration}_{fold}", env={"nnUNet_n_proc_DA": "0"})
    if not (e.model_dir("3d_fullres") / "crossval_results_folds_0_1" / "postprocessing.json").is_file():
        e.tool("nnUNetv2_find_best_configuration", DATASET_ID, "-c", "3d_fullres", "-tr", TRAINER, "-f", 0, 1,
               "--disable_ensembling", "-np", 1)
    images = raw / "imagesTs"
    predictions = e.work / "predictions"
    for name, (plans, configuration, folds, previous) in PREDICTIONS.items():
        out = predictions / name
        if out.is_dir():
            continue
        extra = ["-prev_stage_predictions", predictions / previous] if previous else []
        e.tool("nnUNetv2_predict", "-i", images, "-o", out, "-d", DATASET_ID, "-c", configuration, "-p", plans,
               "-tr", TRAINER, "-f", *folds, "--save_probabilities", "-device", "cpu", "-npp", 1, "-nps", 1, *extra,
               log=f"predict_{name}")
    forced_postprocessing(e)
    pp = predictions / "3d_fullres_postprocessed"
    if not pp.is_dir():
        crossval = e.model_dir("3d_fullres") / "crossval_results_folds_0_1"
        e.tool("nnUNetv2_apply_postprocessing", "-i", predictions / "3d_fullres", "-o", pp, "-pp_pkl_file",
               crossval / "postprocessing.pkl", "-np", 1, "-plans_json", crossval / "plans.json")


FORCED_PP = "forced_postprocessing"
_FORCED_PP = r"""
import sys
from batchgenerators.utilities.file_and_folder_operations import save_json, save_pickle
from nnunetv2.postprocessing.remove_connected_components import (
    remove_all_but_largest_component_from_segmentation as keep_largest)
kwargs = [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]
save_pickle(([keep_largest, keep_largest], kwargs), sys.argv[1] + "/postprocessing.pkl")
save_json({"postprocessing_fns": [keep_largest.__name__] * 2, "postprocessing_kwargs": kwargs},
          sys.argv[1] + "/postprocessing.json")
"""


def forced_postprocessing(e: Env) -> None:
    """The tiny models gain nothing from postprocessing, so find_best_configuration chooses none. To check that the
    bundles apply nnU-Net's steps as nnU-Net does, this writes the files find_best_configuration writes when it
    keeps the largest foreground component and then label 2's (nnU-Net's own function in the pickle) and applies
    them with ``nnUNetv2_apply_postprocessing`` to the 3d_fullres predictions."""
    folder = e.work / FORCED_PP
    out = e.work / "predictions" / "3d_fullres_forced_postprocessing"
    if out.is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    e.python(_FORCED_PP, folder)
    e.tool("nnUNetv2_apply_postprocessing", "-i", e.work / "predictions" / "3d_fullres", "-o", out, "-pp_pkl_file",
           folder / "postprocessing.pkl", "-np", 1, "-plans_json", e.model_dir("3d_fullres") / "plans.json")


def copy_models_into_fixture(e: Env) -> None:
    """The model folders (checkpoints, plans, dataset.json, postprocessing.json), predictions and test images."""
    tmp = FIXTURE.with_name(f".{FIXTURE.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    results = tmp / "results" / DATASET
    for model in sorted((e.results / DATASET).glob(f"{TRAINER}__*")):
        dst = results / model.name
        dst.mkdir(parents=True)
        for name in ("plans.json", "dataset.json"):
            shutil.copyfile(model / name, dst / name)
        for fold in sorted(model.glob("fold_*")):
            (dst / fold.name).mkdir()
            for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
                keep_best = model.name.endswith("__nnUNetPlans__3d_fullres") and fold.name == "fold_0"
                if (fold / name).is_file() and (name == "checkpoint_final.pth" or keep_best):
                    shutil.copyfile(fold / name, dst / fold.name / name)
        for crossval in sorted(model.glob("crossval_results_folds_*")):
            (dst / crossval.name).mkdir()
            for name in ("postprocessing.json", "postprocessing.pkl"):
                shutil.copyfile(crossval / name, dst / crossval.name / name)
    info = e.results / DATASET / "inference_information.json"
    if info.is_file():
        shutil.copyfile(info, results / info.name)
    for folder in sorted((e.work / "predictions").iterdir()):
        dst = tmp / "predictions" / folder.name
        dst.mkdir(parents=True)
        for f in sorted(folder.iterdir()):
            if f.name.endswith((".nii.gz", ".npz")):
                shutil.copyfile(f, dst / f.name)
    shutil.copytree(e.raw / DATASET / "imagesTs", tmp / "imagesTs")
    (tmp / FORCED_PP).mkdir()
    shutil.copyfile(e.work / FORCED_PP / "postprocessing.json", tmp / FORCED_PP / "postprocessing.json")
    shutil.copyfile(e.raw / DATASET / "dataset.json", tmp / "dataset.json")
    if (FIXTURE / "export_check.json").is_file():
        shutil.copyfile(FIXTURE / "export_check.json", tmp / "export_check.json")
    if REGIONS_FIXTURE.is_dir():  # the regions stage's files
        shutil.copytree(REGIONS_FIXTURE, tmp / REGIONS_FIXTURE.name)
    shutil.rmtree(FIXTURE, ignore_errors=True)
    tmp.rename(FIXTURE)
    size = sum(f.stat().st_size for f in FIXTURE.rglob("*") if f.is_file())
    _log(f"wrote {FIXTURE} ({size / 1e6:.2f} MB)")


# --- stage 2: export, checked with nnU-Net ------------------------------------------------------------------------
_LOAD_STRICT = r"""
import json, sys, torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
pairs, out = json.loads(sys.argv[1]), {}
torch.manual_seed(0)
for exported, original in pairs:
    ckpt = torch.load(exported, map_location="cpu", weights_only=False)
    folder = exported.rsplit("/fold_", 1)[0]
    plans = PlansManager(folder + "/plans.json")
    dataset_json = json.load(open(folder + "/dataset.json"))
    config = plans.get_configuration(ckpt["init_args"]["configuration"])
    trainer = recursive_find_trainer_class_by_name(ckpt["trainer_name"])
    channels = determine_num_input_channels(plans, config, dataset_json)
    heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    net = trainer.build_network_architecture(plans, config, channels, heads, enable_deep_supervision=False)
    net.load_state_dict(ckpt["network_weights"])  # strict, as nnUNetPredictor does
    record = {"network_class": type(net).__name__, "strict_load": True,
              "mirror_axes": list(ckpt["inference_allowed_mirroring_axes"] or [])}
    if original:
        ref = trainer.build_network_architecture(plans, config, channels, heads, enable_deep_supervision=False)
        ref.load_state_dict(torch.load(original, map_location="cpu", weights_only=False)["network_weights"])
        shape = [2, channels, *config.patch_size]
        x = torch.randn(*shape)
        net.eval(); ref.eval()
        with torch.no_grad():
            record["max_abs_logit_difference_vs_original"] = float((net(x) - ref(x)).abs().max())
    out[exported] = record
print(json.dumps(out))
"""


NO_POSTPROCESSING = ["--keep_largest_foreground", "False", "--keep_largest_labels", "[]"]


def _run_bundle(bundle: Path, images: Path, out: Path, extra=()) -> None:
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    extra = list(extra) if "keep_largest_foreground" in config else []
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
           str(images), "--output_dir", str(out), "--save_probabilities", "True", "--device", "cpu", *extra]
    _log(f"bundle inference: {bundle.name}")
    done = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"inference of {bundle} failed:\n{done.stderr[-3000:]}")


def _autoplan(*args) -> None:
    _log("autoplan " + " ".join(map(str, args)))
    done = subprocess.run([sys.executable, "-m", "autoplan", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"autoplan {args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def compare_folders(ours: Path, theirs: Path) -> dict:
    """Per case: voxel agreement of the label maps, Dice of every foreground label, largest probability
    difference; with the overall minimum agreement and Dice."""
    import numpy as np
    import SimpleITK as sitk

    cases = {}
    for f in sorted(theirs.glob("*.nii.gz")):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / f.name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        dice = {}
        for label in sorted((set(np.unique(a)) | set(np.unique(b))) - {0}):
            denominator = int((a == label).sum() + (b == label).sum())
            dice[str(label)] = float(2 * ((a == label) & (b == label)).sum() / denominator)
        record = {"agreement": float((a == b).mean()), "dice": dice}
        npz_ours, npz_theirs = ours / f.name.replace(".nii.gz", ".npz"), f.with_name(f.name.replace(".nii.gz", ".npz"))
        if npz_ours.is_file() and npz_theirs.is_file():
            p, q = (np.load(x)["probabilities"] for x in (npz_ours, npz_theirs))
            record["max_probability_difference"] = float(np.abs(p - q).max())
        cases[f.name[:-len(".nii.gz")]] = record
    return {"cases": cases, "min_agreement": min(c["agreement"] for c in cases.values()),
            "min_dice": min((d for c in cases.values() for d in c["dice"].values()), default=1.0)}


def export_check(e: Env) -> None:
    """Import -> export round trip and a bundle trained here, exported and predicted by nnU-Net (see the docstring)."""
    work = e.work / "export_check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models = FIXTURE / "results" / DATASET
    images = FIXTURE / "imagesTs"
    imported = work / "imported"
    _autoplan("import-nnunet", models / f"{TRAINER}__nnUNetPlans__3d_fullres", "--out", imported)
    _autoplan("import-nnunet", models / f"{TRAINER}__nnUNetPlans__3d_lowres", "--out", work / "imported_lowres")
    _autoplan("import-nnunet", models / f"{TRAINER}__{RESENC_PLANS}__3d_fullres", "--out", work / "imported_resenc")
    ensemble = imported / f"{DATASET}_3d_fullres_ensemble"
    roundtrip = work / "results_roundtrip"
    _autoplan("export-nnunet", ensemble, work / "imported_lowres" / f"{DATASET}_3d_lowres_fold0",
              work / "imported_resenc" / f"{DATASET}_3d_fullres_fold0", "--out", roundtrip)

    # a bundle trained here: emitted from the fixture's plan, a short CPU training
    bundles = work / "bundles"
    plans = models / f"{TRAINER}__nnUNetPlans__3d_fullres" / "plans.json"
    splits = e.pre / DATASET / "splits_final.json"
    _autoplan("emit", plans, e.raw / DATASET, "--out", bundles, "--configurations", "3d_fullres", "--folds", 0,
              "--splits", splits)
    trained = bundles / f"{DATASET}_3d_fullres_fold0"
    _log("training the bundle here (a short CPU run)")
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                           "configs/train.json", "--epochs", "4", "--iterations_per_epoch", "20", "--val_iterations",
                           "2", "--num_workers", "0", "--device", "cpu"], cwd=trained, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"training failed:\n{done.stderr[-3000:]}")
    exported = work / "results_trained"
    _autoplan("export-nnunet", trained, "--out", exported)

    # nnU-Net's own network class takes every exported checkpoint (strict load), and the round trip keeps the logits
    pairs = []
    for ckpt in sorted(roundtrip.rglob("checkpoint_final.pth")):
        model, fold = ckpt.parent.parent.name, ckpt.parent.name
        plans_id, configuration = model.split("__")[1:]
        source = models / f"{TRAINER}__{plans_id}__{configuration}" / fold / "checkpoint_final.pth"
        pairs.append([str(ckpt), str(source) if source.is_file() else None])
    pairs += [[str(c), None] for c in sorted(exported.rglob("checkpoint_final.pth"))]
    loads = json.loads(e.python(_LOAD_STRICT, json.dumps(pairs)).strip().splitlines()[-1])

    # nnUNetv2_predict with the exported folders against the bundles' own inference
    results = {"strict_loads": {str(Path(k).relative_to(work)): v for k, v in loads.items()}, "comparisons": {}}
    runs = {
        "roundtrip_ensemble_f01": (roundtrip, "nnUNetPlans", [0, 1], ensemble),
        "trained_here_f0": (exported, "nnUNetPlans", [0], trained),
    }
    for name, (results_dir, plans_id, folds, bundle) in runs.items():
        theirs, ours = work / f"nnunet_{name}", work / f"bundle_{name}"
        e.tool("nnUNetv2_predict", "-i", images, "-o", theirs, "-d", DATASET_ID, "-c", "3d_fullres", "-p", plans_id,
               "-tr", "nnUNetTrainer", "-f", *folds, "--save_probabilities", "-device", "cpu", "-npp", 1, "-nps", 1,
               log=f"predict_{name}", env={"nnUNet_results": str(results_dir)})
        _run_bundle(bundle, images, ours, NO_POSTPROCESSING)  # nnUNetv2_predict does not postprocess
        results["comparisons"][name] = compare_folders(ours, theirs)
    path = FIXTURE / "export_check.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    _log(f"wrote {path}")
    for name, figures in results["comparisons"].items():
        _log(f"{name}: min voxel agreement {figures['min_agreement']:.5f}, min Dice {figures['min_dice']:.4f}; "
             + ", ".join(f"{case}: {c['agreement']:.5f} / max |dp| {c.get('max_probability_difference', 0):.2e}"
                         for case, c in figures["cases"].items()))


# --- stage 3: a region-based (BraTS-style) model, both ways ----------------------------------------------------
REGIONS_ID = 988
REGIONS_DATASET = f"Dataset{REGIONS_ID:03d}_InteropRegions"
REGIONS_FIXTURE = FIXTURE / "regions"
_FORCED_REGION_PP = r"""
import sys
from batchgenerators.utilities.file_and_folder_operations import save_json, save_pickle
from nnunetv2.postprocessing.remove_connected_components import (
    remove_all_but_largest_component_from_segmentation as keep_largest)
kwargs = [{"labels_or_regions": [1, 2, 3]}, {"labels_or_regions": (2, 3)}, {"labels_or_regions": [(1,), (2,)]}]
save_pickle(([keep_largest] * 3, kwargs), sys.argv[1] + "/postprocessing.pkl")
save_json({"postprocessing_fns": [keep_largest.__name__] * 3, "postprocessing_kwargs": kwargs},
          sys.argv[1] + "/postprocessing.json")
"""


def make_region_models(e: Env) -> None:
    """nnU-Net's region-based models (3 nested regions, sigmoid outputs) and predictions: the tiny 3d_fullres plan,
    folds 0 and 1, find_best_configuration, ``nnUNetv2_predict --save_probabilities`` (folds 0 1, fold 0), the
    postprocessing find_best_configuration chose applied to the folds 0 1 predictions, and a forced region
    postprocessing applied by nnU-Net: keep the largest foreground component, then of region (2, 3), then of the
    regions (1,) and (2,) together (nnU-Net's function in the pickle, its kwargs as find_best_configuration writes
    them; the last step changes these predictions, whose regions are single components)."""
    from autoplan.synthetic import make_synthetic_dataset

    raw = e.raw / REGIONS_DATASET
    if not raw.is_dir():
        make_synthetic_dataset(raw, cases=8, shape=(32, 32, 24), labels=3, test_cases=2, seed=11, regions=True)
    pre = e.pre / REGIONS_DATASET
    if not (pre / "splits_final.json").is_file():
        e.tool("nnUNetv2_extract_fingerprint", "-d", REGIONS_ID, "-np", 1)
        e.tool("nnUNetv2_plan_experiment", "-d", REGIONS_ID, "-np", 1)
        plans = tiny_plans(json.loads((pre / "nnUNetPlans.json").read_text()))
        plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
        (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=4))
        e.tool("nnUNetv2_preprocess", "-d", REGIONS_ID, "-plans_name", "nnUNetPlans", "-c", "3d_fullres", "-np", 1)
        cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
        splits = [{"train": cases[4:], "val": cases[:4]}, {"train": cases[:4], "val": cases[4:]}]
        (pre / "splits_final.json").write_text(json.dumps(splits, indent=4))
    e.trainers.mkdir(parents=True, exist_ok=True)
    (e.trainers / f"{TRAINER}.py").write_text(TRAINER_SOURCE)
    model = e.results / REGIONS_DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    for fold in (0, 1):
        if not (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            e.tool("nnUNetv2_train", REGIONS_ID, "3d_fullres", fold, "-tr", TRAINER, "-device", "cpu",
                   log=f"regions_train_{fold}", env={"nnUNet_n_proc_DA": "0"})
    if not (model / "crossval_results_folds_0_1" / "postprocessing.json").is_file():
        e.tool("nnUNetv2_find_best_configuration", REGIONS_ID, "-c", "3d_fullres", "-tr", TRAINER, "-f", 0, 1,
               "--disable_ensembling", "-np", 1, log="regions_find_best")
    predictions = e.work / "regions_predictions"
    for name, folds in (("3d_fullres", [0, 1]), ("3d_fullres_f0", [0])):
        if not (predictions / name).is_dir():
            e.tool("nnUNetv2_predict", "-i", raw / "imagesTs", "-o", predictions / name, "-d", REGIONS_ID, "-c",
                   "3d_fullres", "-tr", TRAINER, "-f", *folds, "--save_probabilities", "-device", "cpu", "-npp", 1,
                   "-nps", 1, log=f"regions_predict_{name}")
    crossval = model / "crossval_results_folds_0_1"
    if not (predictions / "3d_fullres_postprocessed").is_dir():
        e.tool("nnUNetv2_apply_postprocessing", "-i", predictions / "3d_fullres", "-o",
               predictions / "3d_fullres_postprocessed", "-pp_pkl_file", crossval / "postprocessing.pkl", "-np", 1,
               "-plans_json", crossval / "plans.json", log="regions_apply_postprocessing")
    folder, out = e.work / f"regions_{FORCED_PP}", predictions / "3d_fullres_forced_postprocessing"
    if not out.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        e.python(_FORCED_REGION_PP, folder)
        e.tool("nnUNetv2_apply_postprocessing", "-i", predictions / "3d_fullres", "-o", out, "-pp_pkl_file",
               folder / "postprocessing.pkl", "-np", 1, "-plans_json", model / "plans.json",
               log="regions_apply_postprocessing")


def copy_region_models_into_fixture(e: Env) -> None:
    """``tests/fixtures/nnunet_interop/regions/``: the model folder (final checkpoints, plans, dataset.json,
    crossval postprocessing.json), the predictions (no ``.pkl``), the test images and the forced postprocessing."""
    tmp = REGIONS_FIXTURE.with_name(f".{REGIONS_FIXTURE.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = e.results / REGIONS_DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    dst = tmp / "results" / REGIONS_DATASET / model.name
    dst.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(model / name, dst / name)
    for fold in sorted(model.glob("fold_*")):
        (dst / fold.name).mkdir()
        shutil.copyfile(fold / "checkpoint_final.pth", dst / fold.name / "checkpoint_final.pth")
    for crossval in sorted(model.glob("crossval_results_folds_*")):
        (dst / crossval.name).mkdir()
        shutil.copyfile(crossval / "postprocessing.json", dst / crossval.name / "postprocessing.json")
    info = e.results / REGIONS_DATASET / "inference_information.json"
    if info.is_file():
        shutil.copyfile(info, dst.parent / info.name)
    for folder in sorted((e.work / "regions_predictions").iterdir()):
        (tmp / "predictions" / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir()):
            if f.name.endswith((".nii.gz", ".npz")):
                shutil.copyfile(f, tmp / "predictions" / folder.name / f.name)
    shutil.copytree(e.raw / REGIONS_DATASET / "imagesTs", tmp / "imagesTs")
    (tmp / FORCED_PP).mkdir()
    shutil.copyfile(e.work / f"regions_{FORCED_PP}" / "postprocessing.json", tmp / FORCED_PP / "postprocessing.json")
    if (REGIONS_FIXTURE / "export_check.json").is_file():
        shutil.copyfile(REGIONS_FIXTURE / "export_check.json", tmp / "export_check.json")
    shutil.rmtree(REGIONS_FIXTURE, ignore_errors=True)
    tmp.rename(REGIONS_FIXTURE)
    size = sum(f.stat().st_size for f in REGIONS_FIXTURE.rglob("*") if f.is_file())
    _log(f"wrote {REGIONS_FIXTURE} ({size / 1e6:.2f} MB)")


def region_export_check(e: Env) -> None:
    """The fixture's region model imported, its ensemble exported; nnU-Net's network class strictly loads both
    exported checkpoints (logits compared with the original ones) and ``nnUNetv2_predict`` with the exported folder
    is compared with the bundle's own inference. Figures go to ``regions/export_check.json``."""
    work = e.work / "regions_export_check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model = REGIONS_FIXTURE / "results" / REGIONS_DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"
    _autoplan("import-nnunet", model, "--out", work / "imported")
    ensemble = work / "imported" / f"{REGIONS_DATASET}_3d_fullres_ensemble"
    exported = work / "results_roundtrip"
    _autoplan("export-nnunet", ensemble, "--out", exported)
    pairs = [[str(c), str(model / c.parent.name / "checkpoint_final.pth")]
             for c in sorted(exported.rglob("checkpoint_final.pth"))]
    loads = json.loads(e.python(_LOAD_STRICT, json.dumps(pairs)).strip().splitlines()[-1])
    theirs, ours = work / "nnunet_roundtrip_ensemble_f01", work / "bundle_roundtrip_ensemble_f01"
    e.tool("nnUNetv2_predict", "-i", REGIONS_FIXTURE / "imagesTs", "-o", theirs, "-d", REGIONS_ID, "-c", "3d_fullres",
           "-tr", "nnUNetTrainer", "-f", 0, 1, "--save_probabilities", "-device", "cpu", "-npp", 1, "-nps", 1,
           log="regions_predict_exported", env={"nnUNet_results": str(exported)})
    _run_bundle(ensemble, REGIONS_FIXTURE / "imagesTs", ours, NO_POSTPROCESSING)
    exported_spec = json.loads(next(exported.rglob("dataset.json")).read_text())
    results = {"strict_loads": {str(Path(k).relative_to(work)): v for k, v in loads.items()},
               "exported_dataset_json": {k: exported_spec.get(k) for k in ("labels", "regions_class_order")},
               "comparisons": {"roundtrip_ensemble_f01": compare_folders(ours, theirs)}}
    path = REGIONS_FIXTURE / "export_check.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    _log(f"wrote {path}")
    figures = results["comparisons"]["roundtrip_ensemble_f01"]
    _log(f"regions roundtrip_ensemble_f01: min voxel agreement {figures['min_agreement']:.5f}, min Dice "
         f"{figures['min_dice']:.4f}; " + ", ".join(f"{case}: max |dp| {c.get('max_probability_difference', 0):.2e}"
                                                    for case, c in figures["cases"].items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    ap.add_argument("--work", default=None, help="keep nnU-Net's folders here (default: a temporary folder)")
    ap.add_argument("--stage", choices=("models", "export", "regions", "all"), default="all")
    args = ap.parse_args(argv)
    python = ensure_nnunet_venv(args.venv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="autoplan-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    e = Env(python, work)
    try:
        if args.stage in ("models", "all"):
            make_models(e)
            copy_models_into_fixture(e)
        if args.stage in ("export", "all"):
            export_check(e)
        if args.stage in ("regions", "all"):
            make_region_models(e)
            copy_region_models_into_fixture(e)
            region_export_check(e)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
