"""Fingerprint: cropping, weighted statistics and the nnU-Net schema on synthetic data (spec section 2)."""

import json

import numpy as np
import pytest

from autoplan.fingerprint import extract_fingerprint, weighted_statistics, write_fingerprint
from autoplan.synthetic import make_synthetic_dataset
from bundles.scripts.cropping import bounding_box, crop_to_nonzero

NNUNET_KEYS = {"spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
               "median_relative_size_after_cropping"}


def test_crop_fills_holes_and_marks_outside():
    data = np.zeros((2, 6, 8, 8), np.float32)
    data[0, 1:5, 2:7, 2:7] = 1.0
    data[0, 2:4, 4, 4] = 0.0  # an enclosed hole stays inside the mask
    data[1, 3, 1, 3] = 5.0  # the second channel widens the box
    seg = np.zeros((1, 6, 8, 8), np.uint8)
    seg[0, 2, 3, 3] = 1
    cropped, cropped_seg, bbox = crop_to_nonzero(data, seg)
    assert bbox == [(1, 5), (1, 7), (2, 7)]
    assert cropped.shape == (2, 4, 6, 5)
    assert cropped_seg[0, 1, 2, 1] == 1
    assert cropped_seg[0, 2, 3, 2] == 0  # the filled hole is inside
    assert cropped_seg[0, 0, 0, 0] == -1  # outside the mask
    assert cropped_seg.min() == -1 and cropped_seg.dtype == np.int16


def test_empty_mask_keeps_whole_image():
    assert bounding_box(np.zeros((3, 4, 5), bool)) == [(0, 3), (0, 4), (0, 5)]


def test_weighted_statistics_equal_numpy_on_expanded_values():
    rng = np.random.default_rng(0)
    values = rng.normal(size=50).astype(np.float32)
    counts = rng.integers(1, 6, size=50)
    expanded = np.repeat(values, counts).astype(np.float64)
    stats = weighted_statistics(values, counts.astype(np.float64))
    assert stats["mean"] == pytest.approx(expanded.mean())
    assert stats["std"] == pytest.approx(expanded.std())
    assert stats["median"] == pytest.approx(np.median(expanded))
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(expanded, 0.5))
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(expanded, 99.5))
    assert (stats["min"], stats["max"]) == (pytest.approx(expanded.min()), pytest.approx(expanded.max()))


def test_fingerprint_schema_and_values(synthetic_mr, tmp_path):
    out = tmp_path / "dataset_fingerprint.json"
    fp, warnings = write_fingerprint(synthetic_mr, out, processes=2)
    assert warnings == []
    on_disk = json.loads(out.read_text())
    assert NNUNET_KEYS <= set(on_disk)
    assert list(on_disk) == sorted(on_disk)  # nnU-Net writes sorted keys
    assert len(on_disk["spacings"]) == 6 and len(on_disk["case_identifiers"]) == 6
    for spacing in on_disk["spacings"]:
        assert spacing == pytest.approx([3.0, 0.8, 0.8])  # (z, y, x), reversed from ITK's (x, y, z)
    assert set(on_disk["foreground_intensity_properties_per_channel"]) == {"0", "1"}
    assert on_disk["median_relative_size_after_cropping"] < 1.0  # MR background is 0 and gets cropped
    for shape, case in zip(on_disk["shapes_after_crop"], on_disk["per_case"]):
        assert 0 < sum(case["class_voxel_counts"].values()) <= np.prod(shape)  # -1 (outside the mask) not counted
        assert set(case["class_voxel_counts"]) <= {"0", "1", "2"}
        assert case["foreground_intensity_per_channel"]["0"]["min"] > 0
    channel0 = on_disk["foreground_intensity_properties_per_channel"]["0"]
    assert channel0["min"] <= channel0["percentile_00_5"] <= channel0["median"] <= channel0["percentile_99_5"]
    assert channel0["percentile_99_5"] <= channel0["max"] and channel0["std"] > 0


def test_fingerprint_statistics_match_brute_force(tmp_path):
    """Pool every foreground voxel of each case with equal per-case weight, as nnU-Net's sampling expects."""
    import SimpleITK as sitk

    raw = make_synthetic_dataset(tmp_path / "Dataset902_CT", cases=3, shape=(20, 20, 10), modality="CT", labels=2)
    fp, _ = extract_fingerprint(raw, processes=1)
    pooled, weights = [], []
    for case in sorted((raw / "labelsTr").iterdir()):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTr" / f"{case.name[:-7]}_0000.nii.gz")))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
        voxels = image[label > 0].astype(np.float64)
        pooled.append(voxels)
        weights.append(np.full(voxels.size, 1.0 / voxels.size))
    values, w = np.concatenate(pooled), np.concatenate(weights)
    stats = fp["foreground_intensity_properties_per_channel"]["0"]
    assert stats["mean"] == pytest.approx(np.average(values, weights=w), rel=1e-5)
    assert stats["min"] == values.min() and stats["max"] == values.max()
    # CT: air (-1000) everywhere outside the body, so nothing is cropped
    assert fp["median_relative_size_after_cropping"] == 1.0
    assert fp["shapes_after_crop"][0] == list(sitk.GetArrayFromImage(sitk.ReadImage(
        str(raw / "imagesTr" / "case_000_0000.nii.gz"))).shape)


def test_two_dimensional_png_dataset(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "Dataset903_2D", cases=4, shape=(40, 30), labels=2)
    fp, _ = extract_fingerprint(raw, processes=1)
    assert all(s == [999.0, 1.0, 1.0] for s in fp["spacings"])
    assert all(shape[0] == 1 for shape in fp["shapes_after_crop"])
