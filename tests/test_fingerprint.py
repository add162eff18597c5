"""Fingerprint: cropping, weighted statistics and the nnU-Net schema on synthetic data (spec section 2)."""

import json

import numpy as np
import pytest

from autoplan.dataset import DatasetError
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


@pytest.mark.parametrize("max_count", [1, 5])
def test_weighted_statistics_equal_numpy_on_expanded_values(max_count):
    """Each value counted ``weight`` times: numpy's statistics of the expanded array (all distinct, or with runs)."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=50).astype(np.float32)
    counts = rng.integers(1, max_count + 1, size=50)
    expanded = np.repeat(values, counts).astype(np.float64)
    p005, p50, p995 = np.percentile(expanded, [0.5, 50, 99.5])
    expected = {"max": expanded.max(), "mean": expanded.mean(), "median": p50, "min": expanded.min(),
                "percentile_00_5": p005, "percentile_99_5": p995, "std": expanded.std()}
    assert weighted_statistics(values, counts.astype(np.float64)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


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


@pytest.fixture
def small_foreground_ct(tmp_path):
    """Four uncropped CT cases of distinct random intensities whose labels hold 4, 8, 12 and 0 foreground voxels;
    returns (raw dir, [voxels], [shape])."""
    import SimpleITK as sitk

    raw = make_synthetic_dataset(tmp_path / "Dataset902_CT", cases=4, shape=(20, 20, 10), modality="CT", labels=2)
    rng = np.random.default_rng(5)
    foreground, shapes = [], []
    for i, (count, label_value) in enumerate([(4, 1), (8, 2), (12, 1), (0, 1)]):
        path = raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz"
        original = sitk.ReadImage(str(path))
        image = sitk.GetImageFromArray(rng.uniform(-900, 900, sitk.GetArrayViewFromImage(original).shape)
                                       .astype(np.float32))
        image.CopyInformation(original)
        sitk.WriteImage(image, str(path))
        label = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        label.reshape(-1)[7:7 + 3 * count:3] = label_value  # scattered voxels, in raster order
        written = sitk.GetImageFromArray(label)
        written.CopyInformation(image)
        sitk.WriteImage(written, str(raw / "labelsTr" / f"case_{i:03d}.nii.gz"))
        foreground.append(sitk.GetArrayFromImage(image)[label > 0].astype(np.float64))
        shapes.append(list(label.shape))
    return raw, foreground, shapes


def numpy_statistics(values) -> dict:
    p005, p50, p995 = np.percentile(values, [0.5, 50, 99.5])
    return {"max": values.max(), "mean": values.mean(), "median": p50, "min": values.min(), "percentile_00_5": p005,
            "percentile_99_5": p995, "std": values.std()}


def pooled_statistics(raw, total_samples, monkeypatch):
    import autoplan.fingerprint

    monkeypatch.setattr(autoplan.fingerprint, "TOTAL_SAMPLES", total_samples)
    fp, _ = extract_fingerprint(raw, processes=1)
    return fp, fp["foreground_intensity_properties_per_channel"]["0"]


def test_fingerprint_statistics_equal_brute_force_when_every_voxel_is_used(small_foreground_ct, monkeypatch):
    """96 samples over 4 cases, 24 per case: each case's voxels count 24 / n times (6, 3 and 2 times repeated); the
    case without foreground adds nothing and has no per-case statistics."""
    raw, foreground, shapes = small_foreground_ct
    fp, pooled = pooled_statistics(raw, 96, monkeypatch)
    expanded = np.concatenate([np.repeat(v, 24 // len(v)) for v in foreground[:3]])
    assert pooled == pytest.approx(numpy_statistics(expanded), rel=1e-12, abs=1e-9)
    for case, voxels in zip(fp["per_case"], foreground[:3]):
        assert case["foreground_intensity_per_channel"]["0"] == pytest.approx(numpy_statistics(voxels), rel=1e-6)
    assert fp["per_case"][3]["foreground_intensity_per_channel"] == {"0": None}
    sizes = [int(np.prod(shape)) for shape in shapes]
    assert [c["class_voxel_counts"] for c in fp["per_case"]] == [
        {"0": sizes[0] - 4, "1": 4}, {"0": sizes[1] - 8, "2": 8}, {"0": sizes[2] - 12, "1": 12}, {"0": sizes[3]}]
    assert [c["relative_size_after_cropping"] for c in fp["per_case"]] == [1.0] * 4  # CT: air, nothing cropped
    assert fp["median_relative_size_after_cropping"] == 1.0
    assert fp["shapes_after_crop"] == shapes and fp["case_identifiers"] == [f"case_{i:03d}" for i in range(4)]


def test_fingerprint_statistics_mix_weighted_and_drawn_cases(small_foreground_ct, monkeypatch):
    """8 samples per case: 4 voxels count twice, 8 voxels (exactly the quota) once each, 12 voxels are more than the
    quota, so nnU-Net's draw of 8 with replacement (RandomState(1234)) stands for them."""
    raw, foreground, _ = small_foreground_ct
    _, pooled = pooled_statistics(raw, 32, monkeypatch)
    drawn = np.random.RandomState(1234).choice(foreground[2], 8, replace=True)
    expected = numpy_statistics(np.concatenate([np.repeat(foreground[0], 2), foreground[1], drawn]))
    assert pooled == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_fingerprint_statistics_equal_nnunets_draw_when_cases_are_large(small_foreground_ct, monkeypatch):
    """3 samples per case, fewer than any case's foreground: nnU-Net's draw with replacement (RandomState(1234))."""
    raw, foreground, _ = small_foreground_ct
    _, pooled = pooled_statistics(raw, 12, monkeypatch)
    drawn = np.concatenate([np.random.RandomState(1234).choice(v, 3, replace=True) for v in foreground[:3]])
    assert pooled == pytest.approx(numpy_statistics(drawn), rel=1e-12, abs=1e-9)


def test_fingerprint_without_any_foreground_is_an_error(tmp_path):
    import SimpleITK as sitk

    raw = make_synthetic_dataset(tmp_path / "Dataset904_Empty", cases=2, shape=(12, 12, 6), labels=1)
    for label in (raw / "labelsTr").iterdir():
        sitk.WriteImage(sitk.ReadImage(str(label)) * 0, str(label))
    with pytest.raises(DatasetError) as error:
        extract_fingerprint(raw, processes=1)
    assert error.value.problems == [f"{raw}: no case has foreground, so intensity statistics are undefined"]


def test_fingerprint_lists_the_problems_of_every_case(dataset_copy):
    import SimpleITK as sitk

    for case in ("case_001", "case_003"):
        label = sitk.ReadImage(str(dataset_copy / "labelsTr" / f"{case}.nii.gz"))
        sitk.WriteImage(label * 0 + 7, str(dataset_copy / "labelsTr" / f"{case}.nii.gz"))
    with pytest.raises(DatasetError) as error:
        extract_fingerprint(dataset_copy, processes=1)
    assert [p.split(":")[0] for p in error.value.problems] == [
        str(dataset_copy / "labelsTr" / f"{case}.nii.gz") for case in ("case_001", "case_003")]
    assert all("label values [7] are not declared" in p for p in error.value.problems)


def test_two_dimensional_png_dataset(tmp_path):
    raw = make_synthetic_dataset(tmp_path / "Dataset903_2D", cases=4, shape=(40, 30), labels=2)
    fp, _ = extract_fingerprint(raw, processes=1)
    assert all(s == [999.0, 1.0, 1.0] for s in fp["spacings"])
    assert all(shape[0] == 1 for shape in fp["shapes_after_crop"])
