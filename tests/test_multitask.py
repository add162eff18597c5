"""Multi-task bundles: segmentation plus a per-case class (dataset.json's ``classification`` block).

A tiny synthetic dataset whose class is the size of ``structure_1`` (``make_synthetic_dataset(classes=2)``) gets
3d_fullres bundles with the ``roi`` (fold 0) and ``simple`` (fold 1) heads and 2d bundles with the ``attention``
head; three of them train for two iterations each (one per head), the fourth gets fresh weights and its validation
predicted as training would leave it. Then inference, evaluation, ensembles, select, the model zoo's checks, export
and a MONAI Label training request. The class aggregation is checked on a hand-made network.
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from autoplan.emit import emit
from autoplan.fingerprint import extract_fingerprint
from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset
from autoplan.verify import verify_dataset
from bundles import TEMPLATES
from test_bundles import bundle_cmd, bundle_on_path
from test_tools_ensemble_select import ENV, ROOT, clean_scripts, one_thread, tool

DATASET = "Dataset965_Multi"
FAST = ["--epochs", "1", "--iterations_per_epoch", "2", "--val_iterations", "1", "--num_workers", "0",
        "--save_probabilities", "True"]
HEADS = {("3d_fullres", 0): "roi", ("3d_fullres", 1): "simple", ("2d", 0): "attention", ("2d", 1): "attention"}


def name(configuration: str, fold: int) -> str:
    return f"{DATASET}_{configuration}_fold{fold}"


def read_csv(path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][:2] == ["case", "class"]
    return {r[0]: (int(r[1]), np.array([float(v) for v in r[2:]])) for r in rows[1:]}


# --- the dataset -----------------------------------------------------------------------------------------------
def test_synthetic_classes_verify_and_fingerprint(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "Dataset966_V", cases=6, shape=(16, 16, 8), labels=2, classes=3, seed=2)
    spec = json.loads((raw / "dataset.json").read_text())
    assert spec["classification"]["names"] == {"0": "class_0", "1": "class_1", "2": "class_2"}
    assert sorted(spec["classification"]["cases"].values()) == [0, 0, 1, 1, 2, 2]  # balanced
    sizes = {}
    for case, cls in spec["classification"]["cases"].items():
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz")))
        sizes.setdefault(cls, []).append(int((label == 1).sum()))
    assert max(sizes[0]) < min(sizes[2])  # the class is the size of structure_1
    report = verify_dataset(raw, processes=1)
    assert report.ok and report.class_counts == {"class_0": 2, "class_1": 2, "class_2": 2}
    fingerprint, _ = extract_fingerprint(raw, processes=1)
    assert fingerprint["class_distribution"] == {"class_0": 2, "class_1": 2, "class_2": 2}
    assert {"spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
            "median_relative_size_after_cropping"} <= set(fingerprint)

    spec["classification"]["cases"].pop("case_001")
    spec["classification"]["cases"]["case_002"] = 5
    spec["classification"]["cases"]["case_999"] = 0
    (raw / "dataset.json").write_text(json.dumps(spec))
    problems = "\n".join(verify_dataset(raw, processes=1).problems)
    assert "'case_001' has no class" in problems
    assert "'case_002' has class 5, which classification 'names' does not declare" in problems
    assert "'case_999', which is not a training case" in problems


# --- the class aggregation -------------------------------------------------------------------------------------
class HandMade(nn.Module):
    """A stand-in multi-task network: lesion probability ~1 where the image is > 0.5, class logits
    ``[0, 4 * x[first voxel]]`` (so mirrored copies of a window disagree)."""

    def __init__(self):
        super().__init__()
        self.lesion_channels = [1]

    def forward(self, x, lesion=None, with_class: bool = False):
        seg = torch.cat([torch.zeros_like(x), 40 * (x - 0.5)], 1)
        if not with_class:
            return seg
        first = x.flatten(1)[:, 0]
        return [seg, torch.stack([torch.zeros_like(first), 4 * first], 1)]


def expected_probabilities(network, image, roi, starts, flips):
    probabilities, weights = [], []
    for start in starts:
        window = image[:, :, start[0]:start[0] + roi, start[1]:start[1] + roi, start[2]:start[2] + roi]
        for dims in flips:
            seg, logits = network(torch.flip(window, dims) if dims else window, None, True)
            weights.append(float(torch.softmax(seg, 1)[:, 1].sum()) + 1e-3)
            probabilities.append(torch.softmax(logits, 1)[0].double())
    weights = torch.tensor(weights, dtype=torch.float64)
    return (torch.stack(probabilities) * weights[:, None]).sum(0) / weights.sum()


def test_aggregated_class_probabilities_of_a_hand_made_network(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bundles"))
    try:
        from scripts import inference
        from scripts.classification import ClassificationOutputd, _MultiTask
        from scripts.inference import NnUNetInferer

        monkeypatch.setattr(inference, "is_multitask", lambda net: True)
        network = HandMade()
        image = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
        starts = [(a, b, c) for a in (0, 2, 4) for b in (0, 2, 4) for c in (0, 2, 4)]  # 4^3 windows, overlap 0.5
        flips = [[], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]]
        for axes, passes in (((0, 1, 2), flips), ((), [[]])):
            inferer = NnUNetInferer(roi_size=[4, 4, 4], mirror_axes=axes, overlap=0.5)
            with torch.no_grad():
                inferer(image, network)
            expected = expected_probabilities(network, image, 4, starts, passes)
            got = inferer.pop_classification()
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
            assert abs(got.sum() - 1) < 1e-9
        assert not issubclass(HandMade, _MultiTask)  # the monkeypatch above stands in for the real check
        # the postprocessing step writes the row: case,class,p_0,p_1
        from monai.data import MetaTensor

        inferer.class_outputs.append(np.array([0.25, 0.75]))
        data = {"image": MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/x/case_042_0000.nii.gz"})}
        out = ClassificationOutputd(inferer, tmp_path, ["a", "b"])(data)
        assert out["class"] == 1 and np.allclose(out["class_probabilities"], [0.25, 0.75])
        rows = read_csv(tmp_path / "classification.csv")
        assert rows["case_042"][0] == 1 and np.allclose(rows["case_042"][1], [0.25, 0.75])
        # a segmentation network leaves nothing to pop: the step is a no-op (every bundle's postprocessing has it)
        monkeypatch.setattr(inference, "is_multitask", lambda net: False)
        inferer(image, lambda x: torch.zeros(x.shape[0], 2, *x.shape[2:]))
        assert ClassificationOutputd(inferer, tmp_path / "plain", ["a", "b"])(data).keys() == data.keys()
        assert not (tmp_path / "plain").exists()
    finally:
        clean_scripts(str(ROOT / "bundles"))


# --- bundles ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multitask(tmp_path_factory):
    root = tmp_path_factory.mktemp("multitask")
    raw = make_synthetic_dataset(root / "raw" / DATASET, cases=6, shape=(20, 20, 10), spacing=(1, 1, 2), labels=2,
                                 test_cases=2, seed=4, classes=2)
    plans = run(raw, root / "work", processes=1, configurations=["3d_fullres"], folds=[0])
    out = root / "work" / "bundles"
    emit(plans, raw, out / "b", ["3d_fullres"], [1], classification_head="simple")
    emit(plans, raw, out / "c", ["2d"], [0, 1], classification_head="attention")
    for sub in ("b", "c"):
        for bundle in (out / sub).glob(f"{DATASET}_*"):
            shutil.move(bundle, out)
        shutil.rmtree(out / sub)
    bundles = {key: out / name(*key) for key in HEADS}
    for key, bundle in bundles.items():
        assert json.loads((bundle / "configs/train.json").read_text())["classification_head"] == HEADS[key]
    for key in (("3d_fullres", 0), ("3d_fullres", 1), ("2d", 0)):
        bundle_cmd(bundles[key], "run", "training", "--config_file", "configs/train.json", *FAST)
    from monai.bundle import ConfigParser

    bundle = bundles[("2d", 1)]  # fresh weights, validation as a training would leave it
    with bundle_on_path(bundle), one_thread():
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/inference.json"))
        parser["bundle_root"] = str(bundle)
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models/model.pt")
        from scripts.data import list_cases
        from scripts.inference import predict_validation

        train = json.loads((bundle / "configs/train.json").read_text())
        datalist = list_cases(raw / "imagesTr", ".nii.gz", 1, raw / "labelsTr", train["val_cases"])
        predict_validation(bundle, datalist, bundle / "eval/validation", "cpu", True)
    return raw, bundles


def test_trained_bundles_log_classification_and_score_their_validation(multitask):
    raw, bundles = multitask
    spec = json.loads((raw / "dataset.json").read_text())
    for key, bundle in bundles.items():
        train = json.loads((bundle / "configs/train.json").read_text())
        assert train["case_classes"] == {c: spec["classification"]["cases"][c]
                                         for c in train["train_cases"] + train["val_cases"]}
        summary = json.loads((bundle / "eval/validation/summary.json").read_text())
        rows = read_csv(bundle / "eval/validation/classification.csv")
        assert sorted(rows) == sorted(train["val_cases"])
        assert summary["classification"]["num_cases"] == len(train["val_cases"])
        meta = json.loads((bundle / "configs/metadata.json").read_text())
        assert meta["network_data_format"]["outputs"]["class"]["channel_def"] == {"0": "class_0", "1": "class_1"}
        assert "classification_macro_f1" in meta["eval_metrics"]
        if key != ("2d", 1):
            progress = json.loads((bundle / "eval/progress.json").read_text())
            assert len(progress["val_class_accuracy"]) == len(progress["val_class_macro_f1"]) == 1
            assert (bundle / "eval/progress.png").is_file()
            state = torch.load(bundle / "models/model.pt", weights_only=True)
            assert any(k.startswith("classification.") for k in state)


def test_custom_splits_and_a_bad_head(multitask, tmp_path):
    raw, bundles = multitask
    plans = bundles[("3d_fullres", 0)].parents[1] / "nnUNetPlans.json"
    cases = sorted(json.loads((raw / "dataset.json").read_text())["classification"]["cases"])
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": cases[:4], "val": cases[4:]}, {"train": cases[2:], "val": cases[:2]}]))
    (bundle,) = emit(plans, raw, tmp_path / "out", ["3d_fullres"], [1], splits_file=splits,
                     classification_head="attention")
    train = json.loads((bundle / "configs/train.json").read_text())
    assert train["val_cases"] == cases[:2] and sorted(train["case_classes"]) == cases
    inference = json.loads((bundle / "configs/inference.json").read_text())
    assert inference["classification_head"] == "attention" and "case_classes" not in inference
    assert inference["lesion_labels"] == [1, 2] and train["classification_names"] == ["class_0", "class_1"]
    for config, template in ((train, "train.json"), (inference, "inference.json")):  # emit only fills values
        template = json.loads((TEMPLATES / template).read_text())
        structure = [k for k, v in template.items()
                     if k == "imports" or isinstance(v, dict) and k not in ("labels", "plans", "case_classes")]
        assert [k for k in config if k in template] == list(template)
        assert not any(isinstance(config[k], dict) for k in set(config) - set(template))  # values only
        assert {k: config[k] for k in structure} == {k: template[k] for k in structure}
    with pytest.raises(ValueError, match="simple, roi, attention"):
        emit(plans, raw, tmp_path / "other", ["3d_fullres"], [0], classification_head="big")


def test_inference_writes_classification_csv_and_evaluate_scores_it(multitask, tmp_path):
    raw, bundles = multitask
    bundle = bundles[("3d_fullres", 0)]
    out = tmp_path / "pred"
    bundle_cmd(bundle, "run", "--config_file", "configs/inference.json", "--dataset_dir", raw / "imagesTs",
               "--output_dir", out, "--device", "$torch.device('cpu')")
    rows = read_csv(out / "classification.csv")
    assert sorted(rows) == ["case_006", "case_007"] and sorted(p.name for p in out.glob("*.nii.gz")) == [
        "case_006.nii.gz", "case_007.nii.gz"]
    for cls, p in rows.values():
        assert abs(p.sum() - 1) < 1e-6 and cls == int(np.argmax(p))
    no_tta = tmp_path / "no_tta"
    bundle_cmd(bundle, "run", "--config_file", "configs/inference.json", "--dataset_dir", raw / "imagesTs",
               "--output_dir", no_tta, "--device", "$torch.device('cpu')", "--use_tta", "False")
    assert not np.allclose(read_csv(no_tta / "classification.csv")["case_006"][1], rows["case_006"][1])


def write_maps(folder: Path, cases, value=1):
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        seg = np.zeros((4, 4, 4), np.uint8)
        seg[1:3, 1:3, 1:3] = value
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(folder / f"{case}.nii.gz"))


def test_evaluate_macro_f1_equals_scikit_learn(tmp_path, capsys):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from tools import evaluate

    cases = [f"c{i}" for i in range(7)]
    reference = [0, 0, 1, 1, 1, 2, 0]  # class 3 is declared but never referenced nor predicted
    predicted = [0, 1, 1, 1, 0, 0, 0]
    spec = {"labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz",
            "classification": {"names": {str(k): f"t{k}" for k in range(4)},
                               "cases": dict(zip(cases, reference))}}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    write_maps(tmp_path / "ref", cases)
    write_maps(tmp_path / "pred", cases)
    with open(tmp_path / "pred" / "classification.csv", "w") as f:
        f.write("case,class,p_0,p_1,p_2,p_3\n" + "".join(
            f"{c},{p},{','.join('1' if k == p else '0' for k in range(4))}\n" for c, p in zip(cases, predicted)))
    summary = evaluate.evaluate_predictions(tmp_path / "ref", tmp_path / "pred", tmp_path / "dataset.json")
    c = summary["classification"]
    assert c["macro_f1"] == pytest.approx(f1_score(reference, predicted, average="macro", labels=[0, 1, 2, 3],
                                                   zero_division=0))
    assert list(c["f1_per_class"].values()) == pytest.approx(list(
        f1_score(reference, predicted, average=None, labels=[0, 1, 2, 3], zero_division=0)))
    assert c["accuracy"] == pytest.approx(accuracy_score(reference, predicted))
    assert c["confusion_matrix"] == confusion_matrix(reference, predicted, labels=[0, 1, 2, 3]).tolist()
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["classification"]["macro_f1"] == c["macro_f1"]
    header = (tmp_path / "pred" / "summary.csv").read_text().splitlines()[0]
    assert header.endswith("reference_class,predicted_class")
    lines = (tmp_path / "pred" / "classification.csv").read_text().splitlines()
    (tmp_path / "pred" / "classification.csv").write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # drop c2
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tmp_path / "ref"), str(tmp_path / "pred"), "--dataset-json", str(tmp_path / "dataset.json")])
    assert exit_info.value.code == 2 and "no row for case(s) c2" in capsys.readouterr().err


def test_ensemble_averages_class_probabilities_and_select_reports_macro_f1(multitask, tmp_path):
    raw, bundles = multitask
    members = [bundles[("3d_fullres", 0)], bundles[("3d_fullres", 1)], bundles[("2d", 0)]]
    singles = {}
    for member in members:
        out = tmp_path / member.name
        assert tool("ensemble", member, "--dataset-dir", raw / "imagesTs", "--output-dir", out, "--device", "cpu",
                    "--save-probabilities") == 0
        singles[member.name] = read_csv(out / "classification.csv")
    out = tmp_path / "ensemble"
    assert tool("ensemble", *members, "--dataset-dir", raw / "imagesTs", "--output-dir", out, "--device", "cpu") == 0
    rows = read_csv(out / "classification.csv")
    for case, (cls, p) in rows.items():  # folds of 3d_fullres first, then the two configurations
        folds = (singles[members[0].name][case][1] + singles[members[1].name][case][1]) / 2
        np.testing.assert_allclose(p, (folds + singles[members[2].name][case][1]) / 2, atol=1e-6)
    averaged = tmp_path / "averaged"
    assert tool("ensemble", "average", tmp_path / members[0].name, tmp_path / members[2].name, "--output-dir",
                averaged, "--dataset-json", raw / "dataset.json") == 0
    for case, (_, p) in read_csv(averaged / "classification.csv").items():
        np.testing.assert_allclose(p, (singles[members[0].name][case][1] + singles[members[2].name][case][1]) / 2,
                                   atol=1e-6)

    result = subprocess.run([sys.executable, "-m", "autoplan", "select", members[0].parent, "--folds", "0,1",
                             "--device", "cpu", "--criterion", "dice_f1"], cwd=ROOT, capture_output=True, text=True,
                            env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    selection = members[0].parent / "selection"
    report = json.loads((selection / "report.json").read_text())
    assert report["criterion"] == "dice_f1"
    for candidate in report["candidates"]:
        assert candidate["macro_f1"] is not None
        assert candidate["score"] == pytest.approx((candidate["foreground_mean_dice"] + candidate["macro_f1"]) / 2)
    assert "classification macro-F1" in (selection / "report.md").read_text()
    final = selection / f"{DATASET}_ensemble"
    out = tmp_path / "final"
    bundle_cmd(final, "run", "--config_file", "configs/inference.json", "--dataset_dir", raw / "imagesTs",
               "--output_dir", out)
    assert sorted(read_csv(out / "classification.csv")) == ["case_006", "case_007"]
    meta = json.loads((final / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["class"]["channel_def"] == {"0": "class_0", "1": "class_1"}


def test_zoo_checks_export_and_monai_label_training(multitask, tmp_path):
    from monai.bundle import ckpt_export, verify_net_in_out

    from integration.monai_label import write_studies
    from test_monai_label_training import train_request

    raw, bundles = multitask
    for bundle in (bundles[("3d_fullres", 0)], bundles[("2d", 0)]):
        meta, config = str(bundle / "configs/metadata.json"), str(bundle / "configs/inference.json")
        with bundle_on_path(bundle), one_thread():
            verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=str(bundle))
            ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"),
                        ckpt_file=str(bundle / "models/model.pt"), meta_file=meta, config_file=config,
                        bundle_root=str(bundle))
        assert (tmp_path / "model.ts").is_file()
    bundle = shutil.copytree(bundles[("3d_fullres", 0)], tmp_path / "app" / "model" / "multitask_segmentation")
    result = subprocess.run([sys.executable, "-m", "autoplan", "export", bundle, "--onnx"], cwd=ROOT,
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-m", "autoplan", "export", bundle, "--out", tmp_path / "m.zip"],
                            cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    studies = tmp_path / "studies"
    for case in write_studies(raw, studies):  # only the labelled cases, as train_request expects
        (studies / f"{case}.nii.gz").unlink()
    log, _ = train_request(bundle, studies)  # MONAI Label's datalist: no classes (-1), segmentation trains
    assert "classification accuracy" in log
    with bundle_on_path(bundle):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/inference.json"))
        parser["bundle_root"] = str(bundle)
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(torch.load(bundle / "models/model.pt", weights_only=True), strict=True)
