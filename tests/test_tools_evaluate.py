"""tools/evaluate.py: nnU-Net's summary.json plus HD95/NSD on tiny hand-made NIfTI files, outputs, and bad input."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tools import evaluate as tool

ROOT = Path(__file__).resolve().parents[1]
SPACING = (2.0, 1.0, 3.0)  # x, y, z in mm; arrays are (z, y, x)
SHAPE = (4, 5, 6)


def write(path: Path, array, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def dataset_json(folder: Path, labels: dict, **extra) -> Path:
    path = folder / "dataset.json"
    path.write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz", **extra}))
    return path


@pytest.fixture
def two_cases(tmp_path):
    """Case a: label 1 is one voxel predicted one voxel off along x (2 mm); label 2 is two voxels along x, one of
    them predicted. Case b: label 1 is missed entirely; label 2 is in neither."""
    ref_a, pred_a = np.zeros(SHAPE), np.zeros(SHAPE)
    ref_a[1, 2, 2], pred_a[1, 2, 3] = 1, 1
    ref_a[2, 1, 1] = ref_a[2, 1, 2] = 2
    pred_a[2, 1, 1] = 2
    ref_b, pred_b = np.zeros(SHAPE), np.zeros(SHAPE)
    ref_b[0, 0, 0] = 1
    for case, ref, pred in (("a", ref_a, pred_a), ("b", ref_b, pred_b)):
        write(tmp_path / "ref" / f"{case}.nii.gz", ref)
        write(tmp_path / "pred" / f"{case}.nii.gz", pred)
    return tmp_path, dataset_json(tmp_path, {"background": 0, "one": 1, "two": 2})


def test_hand_checked_dice_hd95_nsd_and_outputs(two_cases):
    folder, dj = two_cases
    out = folder / "eval" / "summary.json"
    tool.main([str(folder / "ref"), str(folder / "pred"), "--dataset-json", str(dj), "--out", str(out)])
    summary = json.loads(out.read_text())
    a, b = summary["metric_per_case"]
    assert a["prediction_file"].endswith("a.nii.gz") and a["reference_file"].endswith("a.nii.gz")
    # label 1, case a: no overlap; both surfaces are the single voxels, 2 mm apart (x spacing)
    m = a["metrics"]["1"]
    assert (m["TP"], m["FP"], m["FN"], m["TN"], m["Dice"]) == (0, 1, 1, 118, 0.0)
    assert m["HD95"] == pytest.approx(2.0) and m["NSD"] == 0.0
    # label 2, case a: Dice 2*1/(2+1); distances pred->ref {0}, ref->pred {0, 2 mm}: 95th percentile of
    # {0, 2} (linear) = 1.9; 2 of the 3 edge voxels lie within 1 mm
    m = a["metrics"]["2"]
    assert m["Dice"] == pytest.approx(2 / 3) and m["IoU"] == pytest.approx(1 / 2)
    assert m["HD95"] == pytest.approx(1.9, abs=1e-6) and m["NSD"] == pytest.approx(2 / 3, abs=1e-6)
    # case b: label 1 missed (one side empty) -> inf, 0; label 2 in neither -> NaN everywhere
    assert b["metrics"]["1"]["Dice"] == 0.0 and math.isinf(b["metrics"]["1"]["HD95"])
    assert b["metrics"]["1"]["NSD"] == 0.0
    assert all(math.isnan(b["metrics"]["2"][k]) for k in ("Dice", "IoU", "HD95", "NSD"))
    # means: nanmean over cases (inf propagates), foreground_mean: plain mean over labels
    assert math.isinf(summary["mean"]["1"]["HD95"]) and summary["mean"]["1"]["NSD"] == 0.0
    assert summary["mean"]["2"]["HD95"] == pytest.approx(1.9, abs=1e-6)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(2 / 3)
    assert summary["foreground_mean"]["Dice"] == pytest.approx((0.0 + 2 / 3) / 2)
    assert math.isinf(summary["foreground_mean"]["HD95"])

    rows = list(csv.DictReader((out.parent / "summary.csv").open()))
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [
        ("a", "1", "one"), ("a", "2", "two"), ("b", "1", "one"), ("b", "2", "two")]
    assert float(rows[1]["HD95"]) == pytest.approx(1.9, abs=1e-6) and rows[2]["HD95"] == "inf"
    assert rows[3]["Dice"] == "nan" and rows[0]["TN"] == "118"
    assert (out.parent / "summary_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["summary.csv", "summary.json", "summary_dice.png"]

    # the tolerance is in mm: at 2 mm every edge voxel of label 2 counts
    tool.main([str(folder / "ref"), str(folder / "pred"), "--dataset-json", str(dj), "--out", str(out),
               "--nsd-tolerance", "2"])
    assert json.loads(out.read_text())["metric_per_case"][0]["metrics"]["2"]["NSD"] == pytest.approx(1.0)


def test_ignore_label_excludes_voxels_from_every_metric(tmp_path):
    ref, pred = np.zeros(SHAPE), np.zeros(SHAPE)
    ref[1:3, 1:4, 1:3] = 1
    ref[:, :, 4:] = 2  # ignored slab
    pred[1:3, 1:4, 1:3] = 1
    pred[0, 0, 4:] = 1  # predictions inside the ignored slab count nowhere
    write(tmp_path / "ref" / "c.nii.gz", ref)
    write(tmp_path / "pred" / "c.nii.gz", pred)
    dj = dataset_json(tmp_path, {"background": 0, "thing": 1, "ignore": 2})
    summary = tool.evaluate_predictions(tmp_path / "ref", tmp_path / "pred", dj, tmp_path / "s.json")
    m = summary["metric_per_case"][0]["metrics"]["1"]
    assert (m["TP"], m["FP"], m["FN"], m["Dice"]) == (12, 0, 0, 1.0)
    assert m["TN"] == 4 * 5 * 4 - 12  # the 40 ignored voxels are not negatives either
    assert m["HD95"] == 0.0 and m["NSD"] == 1.0
    assert set(summary["mean"]) == {"1"}


def test_regions_are_unions_keyed_as_nnunet(tmp_path):
    ref, pred = np.zeros(SHAPE), np.zeros(SHAPE)
    ref[1:3, 1:4, 1:5] = 1
    ref[1:3, 2, 2:4] = 2
    pred[1:3, 1:4, 1:5] = 1  # the whole region right, the inner one missed
    write(tmp_path / "ref" / "c.nii.gz", ref)
    write(tmp_path / "pred" / "c.nii.gz", pred)
    dj = dataset_json(tmp_path, {"background": 0, "whole": [1, 2], "inner": 2}, regions_class_order=[1, 2])
    summary = tool.evaluate_predictions(tmp_path / "ref", tmp_path / "pred", dj, tmp_path / "s.json")
    metrics = summary["metric_per_case"][0]["metrics"]
    assert list(metrics) == ["(1, 2)", "2"]
    assert metrics["(1, 2)"]["Dice"] == 1.0 and metrics["(1, 2)"]["HD95"] == 0.0 and metrics["(1, 2)"]["NSD"] == 1.0
    assert metrics["2"]["Dice"] == 0.0 and math.isinf(metrics["2"]["HD95"]) and metrics["2"]["NSD"] == 0.0
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [(r["label"], r["name"]) for r in rows] == [("(1, 2)", "whole"), ("2", "inner")]


def test_single_slice_volumes_are_measured_in_2d():
    ref, pred = np.zeros((1, 7, 7), bool), np.zeros((1, 7, 7), bool)
    ref[0, 1:5, 1:5] = True
    pred[0, 2:6, 1:5] = True
    volume = tool.surface_metrics(ref, pred, [1], (3.0, 1.0, 1.0))
    plane = tool.surface_metrics(ref[0], pred[0], [1], (1.0, 1.0))
    assert volume == plane and plane["1"]["HD95"] == pytest.approx(1.0)
    assert plane["1"]["NSD"] == pytest.approx(1.0)  # every edge voxel within 1 mm of the other edge


def run_cli(*args):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *map(str, args)],
                            capture_output=True, text=True, cwd=ROOT)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_missing_prediction_is_an_error_unless_chill(two_cases):
    folder, dj = two_cases
    (folder / "pred" / "b.nii.gz").unlink()
    result = run_cli(folder / "ref", folder / "pred", "--dataset-json", dj)
    assert result.returncode == 2
    assert str(folder / "pred" / "b.nii.gz") in result.stderr and "prediction missing" in result.stderr
    assert not (folder / "pred" / "summary.json").exists()
    tool.main([str(folder / "ref"), str(folder / "pred"), "--dataset-json", str(dj), "--chill"])
    assert len(json.loads((folder / "pred" / "summary.json").read_text())["metric_per_case"]) == 1


def test_shape_mismatch_exits_2_naming_the_file(two_cases):
    folder, dj = two_cases
    write(folder / "pred" / "a.nii.gz", np.zeros((4, 5, 7)))
    result = run_cli(folder / "ref", folder / "pred", "--dataset-json", dj)
    assert result.returncode == 2
    assert f"{folder / 'pred' / 'a.nii.gz'}: size (7, 5, 4) differs from the reference's (6, 5, 4)" in result.stderr


@pytest.mark.parametrize("what", ["spacing", "origin", "unreadable", "truncated", "dataset.json"])
def test_bad_input_exits_2_naming_the_file(two_cases, capsys, what):
    folder, dj = two_cases
    bad = folder / "pred" / "b.nii.gz"
    if what == "spacing":
        write(bad, np.zeros(SHAPE), spacing=(2.0, 1.0, 2.5))
    elif what == "origin":
        write(bad, np.zeros(SHAPE), origin=(0.0, 5.0, 0.0))
    elif what == "unreadable":
        bad.write_bytes(b"this is not a NIfTI file")
    elif what == "truncated":  # the header still reads; ITK alone would zero-fill the rest
        data = (folder / "ref" / "a.nii.gz").read_bytes()
        bad.write_bytes(data[: len(data) - 12])
    else:
        bad = dj
        dj.write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(folder / "ref"), str(folder / "pred"), "--dataset-json", str(dj)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: " in err
    assert {"spacing": "spacing (2, 1, 2.5) differs", "origin": "origin (0, 5, 0) differs",
            "unreadable": "cannot read", "truncated": "truncated or corrupt gzip data",
            "dataset.json": "cannot read dataset.json"}[what] in err
    assert not (folder / "pred" / "summary.json").exists()
