"""nnU-Net's evaluation as shipped in bundles (spec 7.1)."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from bundles.scripts.evaluation import (
    compute_case_metrics,
    evaluate_folder,
    key_to_str,
    labels_or_regions,
    region_mask,
    save_summary,
    str_to_key,
    summarize,
)

LABELS = {"background": 0, "a": 1, "b": 2}


def test_labels_or_regions():
    assert labels_or_regions(LABELS) == [1, 2]
    assert labels_or_regions({"background": 0, "b": 2, "a": 1, "ignore": 3}) == [1, 2]  # sorted, no ignore
    brats = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3}
    assert labels_or_regions(brats) == [(1, 2, 3), (2, 3), 3]  # dataset.json order
    assert labels_or_regions({"background": [0], "wt": [1, 2], "x": [2], "ignore": 4}) == [(1, 2), (2,)]
    assert labels_or_regions({"background": 0, "a": [1], "b": 2}) == [1, 2]  # one-label lists are no regions


def test_region_mask():
    seg = np.array([0, 1, 2, 3, 2])
    np.testing.assert_array_equal(region_mask(seg, 2), [0, 0, 1, 0, 1])
    np.testing.assert_array_equal(region_mask(seg, (2, 3)), [0, 0, 1, 1, 1])
    assert region_mask(seg, 1).dtype == bool


def test_hand_computed_counts():
    ref = np.array([[0, 1, 1, 0], [2, 2, 0, 0]])
    pred = np.array([[1, 1, 0, 0], [2, 0, 0, 2]])
    m = compute_case_metrics(ref, pred, [1, 2])
    # label 1: ref at (0,1),(0,2); pred at (0,0),(0,1) -> TP 1, FP 1, FN 1, TN 5
    assert m[1] == {"Dice": 0.5, "IoU": 1 / 3, "FP": 1, "TP": 1, "FN": 1, "TN": 5, "n_pred": 2, "n_ref": 2}
    # label 2: ref at (1,0),(1,1); pred at (1,0),(1,3) -> same counts
    assert m[2]["TP"] == 1 and m[2]["FP"] == 1 and m[2]["FN"] == 1 and m[2]["TN"] == 5
    assert all(type(v) is int for k, v in m[1].items() if k not in ("Dice", "IoU"))
    assert type(m[1]["Dice"]) is float


def test_nan_rules():
    empty = np.zeros((3, 3), dtype=np.uint8)
    m = compute_case_metrics(empty, empty, [1])[1]
    assert math.isnan(m["Dice"]) and math.isnan(m["IoU"]) and m["TN"] == 9
    pred = empty.copy()
    pred[0, 0] = 1
    m = compute_case_metrics(empty, pred, [1])[1]
    assert m["Dice"] == 0.0 and m["IoU"] == 0.0 and m["FP"] == 1
    m = compute_case_metrics(pred, empty, [1])[1]  # missed everything
    assert m["Dice"] == 0.0 and m["FN"] == 1


def test_ignore_label_excluded_everywhere():
    ref = np.array([1, 1, 3, 3, 0, 0])
    pred = np.array([1, 0, 1, 0, 0, 1])
    m = compute_case_metrics(ref, pred, [1], ignore_label=3)[1]
    # positions 2, 3 ignored -> TP 1 (0), FN 1 (1), FP 1 (5), TN 1 (4)
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (1, 1, 1, 1)
    assert m["n_pred"] == 2 and m["n_ref"] == 2
    m = compute_case_metrics(np.full(4, 3), np.ones(4, int), [1], ignore_label=3)[1]
    assert math.isnan(m["Dice"]) and m["TN"] == 0


def test_regions():
    ref = np.array([0, 1, 2, 3, 3])
    pred = np.array([1, 1, 3, 0, 2])
    m = compute_case_metrics(ref, pred, [(1, 2, 3), (2, 3), 3])
    assert set(m) == {(1, 2, 3), (2, 3), 3}
    assert (m[(1, 2, 3)]["TP"], m[(1, 2, 3)]["FP"], m[(1, 2, 3)]["FN"]) == (3, 1, 1)
    assert (m[(2, 3)]["TP"], m[(2, 3)]["FP"], m[(2, 3)]["FN"]) == (2, 0, 1)
    assert (m[3]["TP"], m[3]["FP"], m[3]["FN"]) == (0, 1, 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        compute_case_metrics(np.zeros((2, 2)), np.zeros((2, 3)), [1])


def test_string_keys():
    assert key_to_str(1) == "1" and key_to_str(np.int64(2)) == "2"
    assert key_to_str((1, 2, 3)) == "(1, 2, 3)" and key_to_str((np.int64(2), np.int16(3))) == "(2, 3)"
    assert key_to_str([2]) == "(2,)" and key_to_str("(1, 2)") == "(1, 2)"  # strings pass through
    assert str_to_key("1") == 1 and str_to_key("(1, 2, 3)") == (1, 2, 3) and str_to_key("(2,)") == (2,)


def test_summary_means():
    case1 = compute_case_metrics(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]), [1, 2])  # label 2 absent: NaN
    case2 = compute_case_metrics(np.array([1, 2, 0, 0]), np.array([1, 2, 2, 0]), [1, 2])
    per_case = [{"metrics": case1, "prediction_file": "p1", "reference_file": "r1"},
                {"metrics": case2, "prediction_file": "p2", "reference_file": "r2"}]
    s = summarize(per_case, [1, 2])
    assert set(s) == {"metric_per_case", "mean", "foreground_mean"}
    assert list(s["mean"]) == ["1", "2"] and list(s["metric_per_case"][0]["metrics"]) == ["1", "2"]
    assert s["metric_per_case"][1]["prediction_file"] == "p2" and s["metric_per_case"][1]["reference_file"] == "r2"
    assert s["mean"]["1"]["Dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["mean"]["2"]["Dice"] == pytest.approx(2 / 3)  # nanmean skips case 1's NaN
    assert s["mean"]["1"]["TP"] == 1.0 and s["mean"]["2"]["FP"] == 0.5
    assert s["foreground_mean"]["Dice"] == pytest.approx(((2 / 3 + 1) / 2 + 2 / 3) / 2)
    # a label that is NaN in every case: NaN mean, and the plain foreground mean propagates it
    s = summarize([{"metrics": case1}], [1, 2])
    assert math.isnan(s["mean"]["2"]["Dice"]) and math.isnan(s["foreground_mean"]["Dice"])
    assert s["foreground_mean"]["TP"] == 0.5
    regions = summarize([compute_case_metrics(np.array([1, 2]), np.array([2, 2]), [(1, 2)])], [(1, 2)])
    assert list(regions["mean"]) == ["(1, 2)"] and regions["mean"]["(1, 2)"]["Dice"] == 1.0


def test_save_summary_json(tmp_path):
    case = compute_case_metrics(np.zeros(3, int), np.zeros(3, int), [1])
    s = summarize([{"metrics": case, "prediction_file": "p", "reference_file": "r"}], [1])
    out = tmp_path / "eval" / "validation" / "summary.json"
    save_summary(s, out)
    text = out.read_text()
    assert '"Dice": NaN' in text and '\n    "foreground_mean"' in text
    assert text.index('"foreground_mean"') < text.index('"mean"') < text.index('"metric_per_case"')
    loaded = json.loads(text)
    assert math.isnan(loaded["mean"]["1"]["Dice"]) and loaded["metric_per_case"][0]["metrics"]["1"]["TN"] == 3
    assert [p.name for p in out.parent.iterdir()] == ["summary.json"]  # no temp file left behind


def _write(path, array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "gt", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    rng = np.random.default_rng(0)
    for case in ("c1", "c2", "c3"):
        seg = rng.integers(0, 3, size=(3, 4, 5))
        noisy = np.where(rng.random(seg.shape) < 0.2, 0, seg)
        _write(ref / f"{case}.nii.gz", seg)
        _write(pred / f"{case}.nii.gz", noisy)
    return ref, pred


def test_evaluate_folder(folders, tmp_path):
    ref, pred = folders
    out = tmp_path / "summary.json"
    s = evaluate_folder(ref, pred, ".nii.gz", LABELS, output_file=out)
    assert [c["prediction_file"] for c in s["metric_per_case"]] == [str(pred / f"c{i}.nii.gz") for i in (1, 2, 3)]
    assert s["metric_per_case"][0]["reference_file"] == str(ref / "c1.nii.gz")
    # the expectation counted with numpy on the arrays read back, not by the module's own metric function
    dice = {1: [], 2: []}
    for i, case in enumerate(("c1", "c2", "c3")):
        r = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / f"{case}.nii.gz")))
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        for label in (1, 2):
            tp, fp = int(np.sum((r == label) & (p == label))), int(np.sum((r != label) & (p == label)))
            fn, tn = int(np.sum((r == label) & (p != label))), int(np.sum((r != label) & (p != label)))
            assert 0 < fp + fn and tp > 0  # the noise makes every metric non-trivial
            got = s["metric_per_case"][i]["metrics"][str(label)]
            assert (got["TP"], got["FP"], got["FN"], got["TN"]) == (tp, fp, fn, tn)
            assert (got["n_ref"], got["n_pred"]) == (tp + fn, tp + fp)
            assert got["Dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
            assert got["IoU"] == pytest.approx(tp / (tp + fp + fn))
            dice[label].append(2 * tp / (2 * tp + fp + fn))
    for label in (1, 2):
        assert s["mean"][str(label)]["Dice"] == pytest.approx(np.mean(dice[label]))
    assert s["foreground_mean"]["Dice"] == pytest.approx((np.mean(dice[1]) + np.mean(dice[2])) / 2)
    assert json.loads(out.read_text())["mean"] == s["mean"]
    parallel = evaluate_folder(ref, pred, ".nii.gz", LABELS, processes=2)
    assert parallel == s


def test_evaluate_folder_missing_predictions(folders):
    ref, pred = folders
    (pred / "c2.nii.gz").unlink()
    with pytest.raises(ValueError, match="c2"):
        evaluate_folder(ref, pred, ".nii.gz", LABELS)
    s = evaluate_folder(ref, pred, ".nii.gz", LABELS, chill=True)
    assert len(s["metric_per_case"]) == 2
    (pred / "c1.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"2 reference case\(s\) have no prediction in .*: c1, c2 \(pass chill"):
        evaluate_folder(ref, pred, ".nii.gz", LABELS)
    (pred / "notes.txt").write_text("not a prediction")  # files of other endings are no predictions
    assert len(evaluate_folder(ref, pred, ".nii.gz", LABELS, chill=True)["metric_per_case"]) == 1
    _write(pred / "extra.nii.gz", np.zeros((3, 4, 5)))
    _write(pred / "more.nii.gz", np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match="for prediction\\(s\\): extra.nii.gz, more.nii.gz$"):
        evaluate_folder(ref, pred, ".nii.gz", LABELS, chill=True)
    for f in ("extra", "more", "c3"):
        (pred / f"{f}.nii.gz").unlink()
    with pytest.raises(ValueError, match=f"^no predictions ending in '.nii.gz' in {pred}$"):
        evaluate_folder(ref, pred, ".nii.gz", LABELS, chill=True)


@pytest.mark.parametrize("change", ["shape", "spacing", "origin", "direction"])
def test_evaluate_folder_geometry_mismatch(folders, change):
    """The message names the prediction, what differs and the reference file."""
    ref, pred = folders
    kwargs = {"spacing": (1.0, 1.0, 2.5)} if change == "spacing" else {"origin": (0.0, 5.0, 0.0)} \
        if change == "origin" else {}
    _write(pred / "c3.nii.gz", np.zeros((3, 4, 6) if change == "shape" else (3, 4, 5)), **kwargs)
    if change == "direction":
        image = sitk.ReadImage(str(pred / "c3.nii.gz"))
        image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(image, str(pred / "c3.nii.gz"))
    with pytest.raises(ValueError, match=rf"c3\.nii\.gz: {change} .* differs from the reference's .*"
                                         rf"\({ref / 'c3.nii.gz'}\)$"):
        evaluate_folder(ref, pred, ".nii.gz", LABELS)


def test_evaluate_folder_tolerates_float_noise_in_the_geometry(folders):
    """Origins (and spacings) may differ by up to 1e-4 mm, as written by tools that round differently."""
    ref, pred = folders
    image = sitk.ReadImage(str(pred / "c3.nii.gz"))
    image.SetOrigin((5e-5, 0.0, 0.0))
    sitk.WriteImage(image, str(pred / "c3.nii.gz"))
    assert len(evaluate_folder(ref, pred, ".nii.gz", LABELS)["metric_per_case"]) == 3


def test_evaluate_folder_ignore_label_from_labels(tmp_path):
    ref, pred = tmp_path / "gt", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    _write(ref / "a.nii.gz", [[[1, 1, 3, 3]]])
    _write(pred / "a.nii.gz", [[[1, 0, 1, 1]]])
    _write(ref / "b.nii.gz", [[[3, 1, 0, 0]]])
    _write(pred / "b.nii.gz", [[[1, 1, 1, 0]]])
    labels = {"background": 0, "x": 1, "y": 2, "ignore": 3}
    s = evaluate_folder(ref, pred, ".nii.gz", labels)
    m = s["metric_per_case"][0]["metrics"]["1"]
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (1, 0, 1, 0)
    m = s["metric_per_case"][1]["metrics"]["1"]
    assert (m["TP"], m["FP"], m["FN"], m["TN"]) == (1, 1, 0, 1)
    parallel = evaluate_folder(ref, pred, ".nii.gz", labels, processes=2)  # the worker processes ignore it too
    assert json.dumps(parallel, sort_keys=True) == json.dumps(s, sort_keys=True)  # label 2's NaNs included


def test_summarize_refuses_no_cases_and_handles_no_labels_and_background():
    with pytest.raises(ValueError, match="^no cases to summarize$"):
        summarize([], [1])
    assert summarize([{"metrics": {}}], []) == {"metric_per_case": [{"metrics": {}, "prediction_file": None,
                                                                     "reference_file": None}],
                                                "mean": {}, "foreground_mean": {}}
    # label 0 evaluated too: it is left out of the foreground mean
    s = summarize([compute_case_metrics(np.array([0, 1, 1]), np.array([0, 0, 1]), [0, 1])], [0, 1])
    assert s["mean"]["0"]["Dice"] == pytest.approx(2 / 3) and s["foreground_mean"]["Dice"] == pytest.approx(2 / 3)
    assert s["mean"]["1"]["Dice"] == pytest.approx(2 / 3) and s["foreground_mean"]["n_ref"] == 2


def test_save_summary_writes_numpy_values_and_keys_readable_by_all(tmp_path, monkeypatch):
    """numpy scalars and int/tuple/numpy keys are written as JSON; the file is readable by everyone (0o644); it is
    written beside the target as a hidden file that no ``*.json`` glob picks up, then renamed; a failed write
    leaves nothing behind."""
    import os
    import stat

    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: renamed.append(src) or replace(src, dst))
    out = tmp_path / "summary.json"
    save_summary({"a": np.int64(3), "b": np.float32(0.5), "keys": {(1, 2): 1, np.int64(3): 2, 4: 3}}, out)
    assert json.loads(out.read_text()) == {"a": 3, "b": 0.5, "keys": {"(1, 2)": 1, "3": 2, "4": 3}}
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
    (tmp,) = renamed
    name = os.path.basename(tmp)
    assert os.path.dirname(tmp) == str(tmp_path) and name.startswith(".") and not name.endswith(".json")
    with pytest.raises(TypeError):
        save_summary({"a": object()}, tmp_path / "broken.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
