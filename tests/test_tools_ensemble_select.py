"""tools/ensemble.py (predict, average, make-bundle) and tools/find_best.py (``autoplan select``: nnU-Net's
find_best_configuration + postprocessing).

One tiny synthetic dataset gets 3d_fullres and 2d bundles for all 5 folds. Instead of training, every fold gets
freshly initialised weights and its validation cases are predicted with probabilities (``predict_validation``), as
training would leave them. To give selection a known outcome, the 2d networks' output layer is set to a constant
(background with probability 0.6 everywhere) and the 3d_fullres folds' validation results are replaced by controlled
ones (the reference plus a stray label-1 voxel, as confident probabilities): 3d_fullres must win (the pair
only ties with it), and its postprocessing must accept exactly the all-foreground step. One 2d fold's npz files are
deleted so that select must predict its validation cases again.
"""

import contextlib
import json
import math
import os
import shutil
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
DATASET = "Dataset961_Ens"
FOLDS = [0, 1, 2, 3, 4]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def clean_scripts(path=None):
    if path is not None and path in sys.path:
        sys.path.remove(path)
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@contextlib.contextmanager
def one_thread():
    """Two cores, often shared: torch's default threading only adds contention on these tiny networks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tool(name: str, *args) -> int:
    """Run tools/<name>.py's main in this process (faster than a subprocess); returns the exit status."""
    module = __import__(f"tools.{name}", fromlist=["main"])
    try:
        with one_thread():
            return module.main([str(a) for a in args])
    finally:
        clean_scripts(str(ROOT / "bundles"))


def cli(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV)


def bundle_name(configuration: str, fold: int) -> str:
    return f"{DATASET}_{configuration}_fold{fold}"


def read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_geometry(prediction: Path, image: Path):
    a, b = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(image))
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())


def controlled_validation(bundle: Path, raw: Path):
    """Replace a fold's validation results: reference + a stray label-1 voxel, probabilities 0.98 one-hot."""
    from scipy import ndimage

    folder = bundle / "eval" / "validation"
    for f in sorted(folder.glob("*.nii.gz")):
        reference = sitk.ReadImage(str(raw / "labelsTr" / f.name))
        seg = sitk.GetArrayFromImage(reference).astype(np.uint8)
        body = read(raw / "imagesTr" / f"{f.name[:-7]}_0000.nii.gz") != 0  # inside the crop, unlike the corners
        free = body & ~ndimage.binary_dilation(seg > 0, np.ones((3, 3, 3), bool), iterations=2)
        seg[tuple(np.argwhere(free)[0])] = 1  # its own component, away from every structure
        probabilities = np.full((3, *seg.shape), 0.02 / 3, np.float32)
        for c in range(3):
            probabilities[c][seg == c] += 0.98
        image = sitk.GetImageFromArray(seg)
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(f), True)
        np.savez_compressed(folder / f"{f.name[:-7]}.npz", probabilities=probabilities)
    (folder / "summary.json").unlink(missing_ok=True)


def constant_background(network: torch.nn.Module) -> None:
    """Zero the output convolution's weights; bias log(3), 0, 0: softmax (0.6, 0.2, 0.2) everywhere."""
    conv = [m for m in network.output_block.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)][-1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([math.log(3.0), 0.0, 0.0]))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    raw = make_synthetic_dataset(root / "raw" / DATASET, cases=5, shape=(24, 24, 12), spacing=(1, 1, 2), labels=2,
                                 test_cases=1, seed=3)
    run(raw, root / "work", processes=1, configurations=["3d_fullres", "2d"], folds=FOLDS)
    bundles = root / "work" / "bundles"
    from monai.bundle import ConfigParser

    with one_thread():
        for k, bundle in enumerate(sorted(bundles.glob(f"{DATASET}_*_fold*"))):
            sys.path.insert(0, str(bundle))
            try:
                parser = ConfigParser()
                parser.read_config(str(bundle / "configs" / "inference.json"))
                parser["bundle_root"] = str(bundle)
                torch.manual_seed(k)
                network = parser.get_parsed_content("network_def")
                if "_2d_" in bundle.name:
                    constant_background(network)
                torch.save(network.state_dict(), bundle / "models" / "model.pt")
                from scripts.data import list_cases
                from scripts.inference import predict_validation

                train = json.loads((bundle / "configs" / "train.json").read_text())
                datalist = list_cases(raw / "imagesTr", ".nii.gz", 1, raw / "labelsTr", train["val_cases"])
                predict_validation(bundle, datalist, bundle / "eval" / "validation", "cpu", True)
            finally:
                clean_scripts(str(bundle))
    for fold in FOLDS:
        controlled_validation(bundles / bundle_name("3d_fullres", fold), raw)
    for npz in (bundles / bundle_name("2d", 1) / "eval" / "validation").glob("*.npz"):
        npz.unlink()
    return raw, bundles


@pytest.fixture(scope="module")
def single_predictions(setup, tmp_path_factory):
    """Each of three bundles' own inference.json on imagesTs, with probabilities."""
    from monai.bundle import ConfigWorkflow

    raw, bundles = setup
    out = tmp_path_factory.mktemp("single")
    with one_thread():
        for name in (bundle_name("3d_fullres", 0), bundle_name("3d_fullres", 1), bundle_name("2d", 0)):
            bundle = bundles / name
            sys.path.insert(0, str(bundle))
            try:
                workflow = ConfigWorkflow(config_file=str(bundle / "configs/inference.json"),
                                          meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                                          workflow_type="infer", bundle_root=str(bundle), device="cpu",
                                          dataset_dir=str(raw / "imagesTs"), output_dir=str(out / name),
                                          save_probabilities=True)
                workflow.initialize()
                workflow.run()
                workflow.finalize()
            finally:
                clean_scripts(str(bundle))
    return out


@pytest.fixture(scope="module")
def two_config_prediction(setup, tmp_path_factory):
    raw, bundles = setup
    out = tmp_path_factory.mktemp("ens") / "pred"
    assert tool("ensemble", bundles / bundle_name("3d_fullres", 0), bundles / bundle_name("2d", 0), "--dataset-dir",
                raw / "imagesTs", "--output-dir", out, "--save-probabilities", "--device", "cpu") == 0
    return out


def probabilities(path) -> np.ndarray:
    return np.load(path)["probabilities"]


# --- ensemble predict ------------------------------------------------------------------------------------------
def test_ensemble_of_two_configurations_is_the_mean_of_their_probabilities(setup, single_predictions,
                                                                          two_config_prediction):
    raw, _ = setup
    out = two_config_prediction
    assert sorted(p.name for p in out.iterdir()) == ["case_005.nii.gz", "case_005.npz"]
    expected = (probabilities(single_predictions / bundle_name("3d_fullres", 0) / "case_005.npz")
                + probabilities(single_predictions / bundle_name("2d", 0) / "case_005.npz")) / 2
    np.testing.assert_allclose(probabilities(out / "case_005.npz"), expected, atol=1e-6)
    np.testing.assert_array_equal(read(out / "case_005.nii.gz"), np.argmax(expected, 0))
    assert_geometry(out / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")


def test_folds_of_one_configuration_average_logits_or_probabilities(setup, single_predictions, tmp_path):
    from bundles.scripts.data import load_case
    from bundles.scripts.inference import NnUNetInferer
    from bundles.scripts.networks import network_from_plan
    from bundles.scripts.preprocessing import PlanSettings, logits_to_original, preprocess_case, resolve_configuration

    raw, bundles = setup
    folds = [bundles / bundle_name("3d_fullres", f) for f in (0, 1)]
    image = raw / "imagesTs" / "case_005_0000.nii.gz"
    assert tool("ensemble", *folds, "--dataset-dir", image, "--output-dir", tmp_path / "p", "--save-probabilities",
                "--fold-averaging", "probabilities", "--device", "cpu") == 0
    mean = sum(probabilities(single_predictions / f.name / "case_005.npz") for f in folds) / 2
    np.testing.assert_allclose(probabilities(tmp_path / "p" / "case_005.npz"), mean, atol=1e-6)
    # default: nnU-Net's multi-fold prediction averages logits on the preprocessed grid, then restores
    assert tool("ensemble", *folds, "--dataset-dir", image, "--output-dir", tmp_path / "l", "--save-probabilities",
                "--device", "cpu") == 0
    logits = []
    data, _, spacing = load_case([str(image)])
    for bundle in folds:
        plans = json.loads((bundle / "configs/plans.json").read_text())
        config = json.loads((bundle / "configs/inference.json").read_text())
        plan = PlanSettings.from_plans(plans, "3d_fullres")
        pre, _, props = preprocess_case(data, spacing, plan)
        network = network_from_plan(resolve_configuration(plans, "3d_fullres"), 1, 3, True)
        network.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True))
        network.eval()
        with torch.no_grad(), one_thread():
            logits.append(NnUNetInferer(config["patch_size"], config["mirror_axes"])(
                torch.from_numpy(pre)[None], network)[0].numpy())
    expected = logits_to_original(np.mean(logits, 0), props, plan, return_probabilities=True)[1]
    np.testing.assert_allclose(probabilities(tmp_path / "l" / "case_005.npz"), expected, atol=1e-5)


def test_average_equals_the_mean_of_the_npz_files(setup, single_predictions, tmp_path):
    raw, _ = setup
    folders = [single_predictions / bundle_name("3d_fullres", 0), single_predictions / bundle_name("2d", 0)]
    out = tmp_path / "avg"
    assert tool("ensemble", "average", *folders, "--output-dir", out, "--save-probabilities") == 0
    mean = sum(probabilities(f / "case_005.npz") for f in folders) / 2
    np.testing.assert_allclose(probabilities(out / "case_005.npz"), mean, atol=1e-7)
    np.testing.assert_array_equal(read(out / "case_005.nii.gz"), np.argmax(mean, 0))
    assert_geometry(out / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")
    # geometry from --reference-images instead of the first folder's label maps; labels from dataset.json
    assert tool("ensemble", "average", *folders, "--output-dir", tmp_path / "avg2", "--reference-images",
                raw / "imagesTs", "--dataset-json", raw / "dataset.json") == 0
    np.testing.assert_array_equal(read(tmp_path / "avg2" / "case_005.nii.gz"), read(out / "case_005.nii.gz"))
    assert_geometry(tmp_path / "avg2" / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")


# --- make-bundle -----------------------------------------------------------------------------------------------
def monai_label_style(bundle: Path, image: Path, expected: Path):
    """What MONAI Label and MONAI Deploy do with a bundle: build network_def and load models/model.pt, run
    ``preprocessing`` (LoadImaged with meta data), call ``inferer(image[None], network)``, then ``postprocessing``
    without SaveImaged."""
    from monai.bundle import ConfigParser
    from monai.transforms import LoadImaged

    sys.path.insert(0, str(bundle))
    try:
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/inference.json"))
        parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')"})
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True))
        network.eval()
        inferer = parser.get_parsed_content("inferer")
        post = [t for t in parser.get_parsed_content("postprocessing").transforms
                if "SaveImage" not in type(t).__name__]
        data = LoadImaged("image", image_only=False, ensure_channel_first=True)({"image": str(image)})
        with torch.no_grad(), one_thread():
            data["pred"] = inferer(inputs=data["image"][None], network=network)[0]
        for transform in post:
            data = transform(data)
    finally:
        clean_scripts(str(bundle))
    pred = data["pred"]
    assert pred.shape == (1, *data["image"].shape[1:]) and np.allclose(pred.affine, data["image"].affine)
    np.testing.assert_array_equal(pred.numpy()[0].transpose(2, 1, 0), read(expected))


def test_make_bundle_runs_with_monai_and_equals_the_tool(setup, two_config_prediction, tmp_path):
    from monai.bundle import ConfigWorkflow

    raw, bundles = setup
    members = [bundles / bundle_name("3d_fullres", 0), bundles / bundle_name("2d", 0)]
    ens = tmp_path / "Tiny_ensemble"
    assert tool("ensemble", "make-bundle", *members, "--out", ens) == 0
    for f in ("configs/inference.json", "configs/metadata.json", "configs/dataset.json",
              "configs/logging.conf", "models/model.pt", "scripts/ensemble.py", "scripts/postprocessing.py",
              "scripts/inference.py", "LICENSE", "docs/README.md"):
        assert (ens / f).is_file(), f
    meta = json.loads((ens / "configs/metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["name"] == f"{DATASET} segmentation (nnU-Net ensemble of 2d, 3d_fullres, 2 bundles)"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] == "structure_2"
    state = torch.load(ens / "models/model.pt", weights_only=True)
    for i, member in enumerate(members):
        own = torch.load(member / "models/model.pt", weights_only=True)
        assert all(torch.equal(state[f"members.{i}.{k}"], v) for k, v in own.items())
    assert len(state) == sum(len(torch.load(m / "models/model.pt", weights_only=True)) for m in members)
    config = json.loads((ens / "configs/inference.json").read_text())
    assert config["preprocessing"]["transforms"][0] == {"_target_": "LoadImaged", "keys": "image",
                                                        "image_only": True, "ensure_channel_first": True}
    sys.path.insert(0, str(ens))
    try:
        workflow = ConfigWorkflow(config_file=str(ens / "configs/inference.json"),
                                  meta_file=str(ens / "configs/metadata.json"), logging_file=False,
                                  workflow_type="infer", bundle_root=str(ens), initialize=[])
        workflow.initialize()
        assert workflow.check_properties() == []
    finally:
        clean_scripts(str(ens))
    monai_label_style(ens, raw / "imagesTs" / "case_005_0000.nii.gz", two_config_prediction / "case_005.nii.gz")
    out = tmp_path / "out"
    result = cli("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
                 raw / "imagesTs", "--output_dir", out, "--save_probabilities", "True", cwd=ens)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(read(out / "case_005.nii.gz"), read(two_config_prediction / "case_005.nii.gz"))
    np.testing.assert_allclose(probabilities(out / "case_005.npz"),
                               probabilities(two_config_prediction / "case_005.npz"), atol=1e-6)
    assert_geometry(out / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")
    # members of different configurations take different inputs: no single-tensor forward to verify
    result = cli("-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                 "--config_file", "configs/inference.json", cwd=ens)
    assert result.returncode != 0 and "EnsembleInferer" in result.stderr


def test_make_bundle_of_one_configuration_verifies_net_in_out(setup, tmp_path):
    _, bundles = setup
    ens = tmp_path / "folds_ensemble"
    assert tool("ensemble", "make-bundle", *[bundles / bundle_name("2d", f) for f in (0, 1)], "--out", ens) == 0
    result = cli("-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                 "--config_file", "configs/inference.json", cwd=ens)
    assert result.returncode == 0, result.stderr[-3000:]


# --- select ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selection(setup):
    _, bundles = setup
    result = cli("-m", "autoplan", "select", bundles, "--device", "cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return bundles / "selection"


def test_select_reports_every_candidate_and_picks_the_best(setup, selection):
    raw, bundles = setup
    report = json.loads((selection / "report.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    assert names == ["2d", "3d_fullres", "ensemble___2d___3d_fullres"]
    spec = json.loads((raw / "dataset.json").read_text())
    for c in report["candidates"]:  # scores are the evaluation of the folders they point to
        summary = evaluate_folder(raw / "labelsTr", selection / c["folder"], ".nii.gz", spec["labels"], chill=True)
        assert c["foreground_mean_dice"] == pytest.approx(summary["foreground_mean"]["Dice"])
        assert len(summary["metric_per_case"]) == 5  # every case once, from its own fold
    scores = [c["foreground_mean_dice"] for c in report["candidates"]]
    assert report["best"]["name"] == names[scores.index(max(scores))]  # first of the best: singles first
    assert report["best"]["name"] == "3d_fullres"  # the controlled 3d_fullres results win (the pair only ties)
    assert report["regenerated"] == [bundle_name("2d", 1)]  # its npz files had been deleted
    assert any((bundles / bundle_name("2d", 1) / "eval" / "validation").glob("*.npz"))
    # the pair is the average of the folds' validation probabilities
    ensemble_folder = selection / "ensembles" / "ensemble___2d___3d_fullres"
    for f in sorted(ensemble_folder.glob("*.nii.gz")):
        case = f.name[:-7]
        npz = [next((bundles / bundle_name(c, k) / "eval" / "validation" / f"{case}.npz" for k in FOLDS
                     if (bundles / bundle_name(c, k) / "eval" / "validation" / f"{case}.npz").is_file()))
               for c in ("2d", "3d_fullres")]
        np.testing.assert_array_equal(read(f), np.argmax((probabilities(npz[0]) + probabilities(npz[1])) / 2, 0))
    markdown = (selection / "report.md").read_text()
    for name in names:
        assert name in markdown
    assert "autoplan ensemble " + " ".join(report["best"]["bundles"]) in markdown  # how to predict


def components(mask: np.ndarray) -> list:
    """Connected components (26-/8-neighbourhood) of a boolean mask by a plain flood fill: the test's own oracle,
    independent of scipy's labelling that the postprocessing uses. Largest first, as lists of voxel indices."""
    offsets = [d for d in np.ndindex(*([3] * mask.ndim)) if any(v != 1 for v in d)]
    seen, found = np.zeros(mask.shape, bool), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, members = True, [start], []
        while stack:
            voxel = stack.pop()
            members.append(voxel)
            for d in offsets:
                n = tuple(v + o - 1 for v, o in zip(voxel, d))
                if all(0 <= i < size for i, size in zip(n, mask.shape)) and mask[n] and not seen[n]:
                    seen[n] = True
                    stack.append(n)
        found.append(members)
    return sorted(found, key=len, reverse=True)


def largest_only(seg: np.ndarray, labels) -> np.ndarray:
    """Voxels of ``labels`` outside their union's largest component(s) set to 0, by the flood-fill oracle."""
    parts = components(np.isin(seg, labels))
    out = seg.copy()
    for part in parts:
        if len(part) < len(parts[0]):
            out[tuple(np.array(part).T)] = 0
    return out


def test_select_postprocessing_follows_the_rules(setup, selection, tmp_path):
    raw, _ = setup
    report = json.loads((selection / "report.json").read_text())
    pp = json.loads((selection / "postprocessing.json").read_text())
    assert report["postprocessing"]["keep_largest_foreground"] == pp["keep_largest_foreground"]
    spec = json.loads((raw / "dataset.json").read_text())

    def evaluate_with(folder, step):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        out.mkdir()
        for f in folder.glob("*.nii.gz"):
            image = sitk.ReadImage(str(f))
            result = sitk.GetImageFromArray(step(sitk.GetArrayFromImage(image)))
            result.CopyInformation(image)
            sitk.WriteImage(result, str(out / f.name))
        return out, evaluate_folder(raw / "labelsTr", out, ".nii.gz", spec["labels"], chill=True)

    best = selection / report["best"]["folder"]
    # the rule is only tested if there is something to remove: some prediction has more than one component
    assert max(len(components(np.isin(read(f), [1, 2]))) for f in best.glob("*.nii.gz")) > 1
    baseline = evaluate_folder(raw / "labelsTr", best, ".nii.gz", spec["labels"], chill=True)
    folder, processed = evaluate_with(best, lambda s: largest_only(s, [1, 2]))
    fg_better = processed["foreground_mean"]["Dice"] > baseline["foreground_mean"]["Dice"]
    none_worse = all(processed["mean"][k]["Dice"] >= baseline["mean"][k]["Dice"] for k in ("1", "2"))
    assert pp["keep_largest_foreground"] == (fg_better and none_worse)
    # the stray voxel makes it a clear win here; afterwards every label is one component (no strict increase)
    assert pp["keep_largest_foreground"] is True
    assert pp["keep_largest_labels"] == []
    current, current_folder = (processed, folder) if pp["keep_largest_foreground"] else (baseline, best)
    for label in (1, 2):
        folder, processed = evaluate_with(current_folder, lambda s: largest_only(s, [label]))
        accepted = processed["mean"][str(label)]["Dice"] > current["mean"][str(label)]["Dice"]
        assert (label in pp["keep_largest_labels"]) == accepted
        if accepted:
            current, current_folder = processed, folder
    assert pp["dice_after"]["foreground_mean"] == pytest.approx(current["foreground_mean"]["Dice"])
    steps = {s["step"]: s for s in pp["steps"]}
    assert set(steps) == {"keep_largest_foreground", "keep_largest_label_1", "keep_largest_label_2"}
    assert steps["keep_largest_foreground"]["before"]["foreground_mean"] == pytest.approx(
        baseline["foreground_mean"]["Dice"])
    for f in (selection / "postprocessing" / "postprocessed").glob("*.nii.gz"):
        np.testing.assert_array_equal(read(f), read(current_folder / f.name))


def test_select_builds_the_final_bundle_with_its_postprocessing(setup, selection, tmp_path):
    raw, bundles = setup
    final = selection / f"{DATASET}_ensemble"
    config = json.loads((final / "configs/inference.json").read_text())
    assert config["keep_largest_foreground"] is True and config["keep_largest_labels"] == []
    members = config["members"]  # in the config itself: nothing is read relative to bundle_root
    assert [m["name"] for m in members] == [bundle_name("3d_fullres", f) for f in FOLDS]
    out = tmp_path / "final"
    result = cli("-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
                 raw / "imagesTs", "--output_dir", out, "--use_tta", "False", cwd=final)
    assert result.returncode == 0, result.stderr[-3000:]
    seg = read(out / "case_005.nii.gz")
    assert_geometry(out / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")
    assert len(components(np.isin(seg, [1, 2]))) == 1  # postprocessed: one foreground component
    # the tool with the member bundles and the same postprocessing predicts the same
    assert tool("ensemble", *[bundles / m["name"] for m in members], "--dataset-dir", raw / "imagesTs",
                "--output-dir", tmp_path / "tool", "--use-tta", "False", "--postprocessing",
                selection / "postprocessing.json", "--device", "cpu") == 0
    np.testing.assert_array_equal(read(tmp_path / "tool" / "case_005.nii.gz"), seg)


def test_cascade_member_gets_its_previous_stage(setup):
    """A cascade member (here a fake 3d_cascade_fullres whose previous stage is 2d) sees the previous stage's
    label map as one-hot channels; the previous stage's members only feed it (averaged: false)."""
    from monai.transforms import LoadImaged

    from bundles.scripts.data import load_case
    from bundles.scripts.ensemble import EnsembleInferer, EnsembleNetwork
    from bundles.scripts.inference import NnUNetInferer
    from bundles.scripts.preprocessing import (PlanSettings, logits_to_original, one_hot, preprocess_case,
                                               preprocess_previous_stage)

    raw, bundles = setup
    plans = json.loads((bundles / bundle_name("3d_fullres", 0) / "configs/plans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "2d"}
    base = {"fold": 0, "inferer": {}, "plans": plans, "num_classes": 3, "foreground_labels": [1, 2]}
    cascade = dict(base, name="c", configuration="3d_cascade_fullres", averaged=True,
                   patch_size=plans["configurations"]["3d_fullres"]["patch_size"], two_d=False,
                   mirror_axes=[0, 1, 2], in_channels=3)
    previous = dict(base, name="p", configuration="2d", averaged=False,
                    patch_size=plans["configurations"]["2d"]["patch_size"], two_d=True, mirror_axes=[0, 1],
                    in_channels=1)
    torch.manual_seed(0)
    network = EnsembleNetwork([cascade, previous]).eval()
    image = raw / "imagesTs" / "case_005_0000.nii.gz"
    loaded = LoadImaged("image", image_only=True, ensure_channel_first=True)({"image": str(image)})["image"]
    with torch.no_grad(), one_thread():
        out = EnsembleInferer([cascade, previous], use_tta=False)(loaded[None], network)
        data, _, spacing = load_case([str(image)])
        plan2d, plan = PlanSettings.from_plans(plans, "2d"), PlanSettings.from_plans(plans, "3d_cascade_fullres")
        pre, _, props = preprocess_case(data, spacing, plan2d)
        logits = NnUNetInferer(previous["patch_size"], [], two_d=True)(torch.from_numpy(pre)[None],
                                                                       network.members[1])[0].numpy()
        seg = logits_to_original(logits, props, plan2d)[0]
        pre, _, props = preprocess_case(data, spacing, plan)
        x = np.concatenate([pre, one_hot(preprocess_previous_stage(seg[None], props, plan), [1, 2])])
        logits = NnUNetInferer(cascade["patch_size"], [])(torch.from_numpy(x)[None], network.members[0])[0].numpy()
    expected = logits_to_original(logits, props, plan, return_probabilities=True)[1]
    np.testing.assert_allclose(out[0].numpy().transpose(0, 3, 2, 1), expected, atol=1e-6)
    assert out.meta["filename_or_obj"] == str(image)


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_inputs_exit_2(setup, tmp_path, capsys):
    raw, bundles = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tool("find_best", empty) == 2
    assert "no bundles" in capsys.readouterr().err
    partial = tmp_path / "partial"  # 3d_fullres lacks fold 4
    partial.mkdir()
    for c, f in [(c, f) for c in ("3d_fullres", "2d") for f in FOLDS if (c, f) != ("3d_fullres", 4)]:
        (partial / bundle_name(c, f)).symlink_to(bundles / bundle_name(c, f), target_is_directory=True)
    assert tool("find_best", partial) == 2
    err = capsys.readouterr().err
    assert "fold(s) [4]" in err and bundle_name("3d_fullres", 4) in err
    odd = tmp_path / bundle_name("2d", 0)  # a copy whose dataset.json declares other labels
    shutil.copytree(bundles / bundle_name("2d", 0), odd, ignore=shutil.ignore_patterns("eval"))
    spec = json.loads((odd / "configs/dataset.json").read_text())
    spec["labels"] = {"background": 0, "a": 1, "b": 2, "c": 3}
    (odd / "configs/dataset.json").write_text(json.dumps(spec))
    assert tool("ensemble", "make-bundle", bundles / bundle_name("3d_fullres", 0), odd, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert str(odd / "configs" / "dataset.json") in err and "labels" in err and not (tmp_path / "x").exists()
    assert tool("ensemble", tmp_path / "empty", "--dataset-dir", raw / "imagesTs", "--output-dir", tmp_path / "o") == 2
    assert "configs/inference.json" in capsys.readouterr().err
    assert tool("ensemble", "--dataset-dir", raw / "imagesTs", "--output-dir", tmp_path / "o") == 2
    assert "no bundles" in capsys.readouterr().err
    assert tool("ensemble", "average", raw / "imagesTs", "--output-dir", tmp_path / "o") == 2
    assert "no CASE.npz" in capsys.readouterr().err
    assert tool("ensemble", "make-bundle", bundles / bundle_name("2d", 0), "--out", bundles / bundle_name("2d", 1)) == 2
    assert "already exists" in capsys.readouterr().err
    twice = tmp_path / "twice"  # a case in two folds' validation results
    twice.mkdir()
    for f in FOLDS:
        if f < 2:
            shutil.copytree(bundles / bundle_name("2d", f), twice / bundle_name("2d", f))
        else:
            (twice / bundle_name("2d", f)).symlink_to(bundles / bundle_name("2d", f), target_is_directory=True)
    a, b = (twice / bundle_name("2d", f) / "eval" / "validation" for f in (0, 1))
    extra = next(a.glob("*.nii.gz"))
    shutil.copyfile(extra, b / extra.name)
    assert tool("find_best", twice, "--no-bundle") == 2  # copied bundles: no dataset_dir.txt beside them
    assert "pass --dataset-dir" in capsys.readouterr().err
    assert tool("find_best", twice, "--no-bundle", "--dataset-dir", raw) == 2
    assert "predicted twice" in capsys.readouterr().err
    assert not (twice / "selection").exists() and not list(twice.glob(".selection*"))


def test_best_candidate_ties_and_nan():
    from tools.find_best import best_candidate

    results = [{"name": "2d", "foreground_mean_dice": float("nan")}, {"name": "3d", "foreground_mean_dice": 0.8},
               {"name": "3d_lowres", "foreground_mean_dice": 0.8}, {"name": "ensemble", "foreground_mean_dice": 0.8}]
    assert best_candidate(results)["name"] == "3d"
    results.append({"name": "ensemble2", "foreground_mean_dice": 0.81})
    assert best_candidate(results)["name"] == "ensemble2"
