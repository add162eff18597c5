"""Every bad input that ``verify`` must catch: a clear message naming the file, exit 2, untouched input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, folder_digest
from autoplan.fingerprint import extract_fingerprint
from autoplan.dataset import DatasetError
from autoplan.verify import verify_dataset


def rewrite(path: Path, change_array=None, spacing=None, origin=None, direction=None):
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    new = sitk.GetImageFromArray(change_array(array) if change_array else array)
    new.SetSpacing(spacing or image.GetSpacing())
    new.SetOrigin(origin or image.GetOrigin())
    new.SetDirection(direction or image.GetDirection())
    sitk.WriteImage(new, str(path))


def cli_verify(folder):
    return subprocess.run([sys.executable, "-m", "autoplan", "verify", str(folder), "--processes", "1"],
                          capture_output=True, text=True, cwd=str(ROOT))


def assert_rejected(folder, *fragments):
    """The report and the CLI both name the problem; the folder is not modified."""
    before = folder_digest(folder)
    report = verify_dataset(folder, processes=1)
    text = "\n".join(report.problems)
    assert not report.ok
    for fragment in fragments:
        assert fragment in text, text
    result = cli_verify(folder)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    with pytest.raises(DatasetError):
        extract_fingerprint(folder, processes=1)
    assert folder_digest(folder) == before
    return report


def test_clean_dataset_passes(synthetic_mr):
    report = verify_dataset(synthetic_mr, processes=2)
    assert report.ok, report.problems
    assert report.num_cases == 6
    assert cli_verify(synthetic_mr).returncode == 0


def test_missing_channel_file(dataset_copy):
    (dataset_copy / "imagesTr" / "case_002_0001.nii.gz").unlink()
    assert_rejected(dataset_copy, "case_002_0001.nii.gz", "missing channel 1")


def test_undeclared_channel_file(dataset_copy):
    src = dataset_copy / "imagesTr" / "case_002_0001.nii.gz"
    (dataset_copy / "imagesTr" / "case_002_0002.nii.gz").write_bytes(src.read_bytes())
    assert_rejected(dataset_copy, "case_002_0002.nii.gz", "not declared")


def test_missing_label_file(dataset_copy):
    (dataset_copy / "labelsTr" / "case_001.nii.gz").unlink()
    assert_rejected(dataset_copy, "case_001.nii.gz", "label file missing")


def test_undeclared_label_values(dataset_copy):
    rewrite(dataset_copy / "labelsTr" / "case_003.nii.gz", lambda a: np.where(a == 2, 7, a).astype(a.dtype))
    assert_rejected(dataset_copy, "case_003.nii.gz", "[7]", "not declared")


def test_non_consecutive_labels_in_dataset_json(dataset_copy):
    spec = json.loads((dataset_copy / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "structure_1": 1, "structure_2": 3}
    (dataset_copy / "dataset.json").write_text(json.dumps(spec))
    assert_rejected(dataset_copy, "dataset.json", "consecutive")


def test_wrong_num_training(dataset_copy):
    spec = json.loads((dataset_copy / "dataset.json").read_text())
    spec["numTraining"] = 9
    (dataset_copy / "dataset.json").write_text(json.dumps(spec))
    assert_rejected(dataset_copy, "numTraining is 9 but 6")


def test_shape_mismatch_between_image_and_label(dataset_copy):
    rewrite(dataset_copy / "labelsTr" / "case_000.nii.gz", lambda a: a[:, :-2])
    assert_rejected(dataset_copy, "case_000.nii.gz", "shape")


def test_shape_mismatch_between_channels(dataset_copy):
    rewrite(dataset_copy / "imagesTr" / "case_004_0001.nii.gz", lambda a: a[1:])
    assert_rejected(dataset_copy, "case_004", "differ in shape")


@pytest.mark.parametrize("attribute,value", [("spacing", (0.8, 0.8, 2.0)), ("origin", (5.0, 5.0, 5.0)),
                                             ("direction", (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))])
def test_geometry_mismatch_between_label_and_image(dataset_copy, attribute, value):
    rewrite(dataset_copy / "labelsTr" / "case_005.nii.gz", **{attribute: value})
    assert_rejected(dataset_copy, "case_005.nii.gz", attribute)


def test_geometry_mismatch_between_channels(dataset_copy):
    rewrite(dataset_copy / "imagesTr" / "case_001_0001.nii.gz", origin=(9.0, 9.0, 9.0))
    assert_rejected(dataset_copy, "case_001_0001.nii.gz", "origin")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_image(dataset_copy, bad):
    def poison(a):
        a = a.copy()
        a[1, 1, 1] = bad
        return a
    rewrite(dataset_copy / "imagesTr" / "case_002_0000.nii.gz", poison)
    assert_rejected(dataset_copy, "case_002_0000.nii.gz", "NaN or Inf")


def test_truncated_file(dataset_copy):
    path = dataset_copy / "imagesTr" / "case_003_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    assert_rejected(dataset_copy, "case_003_0000.nii.gz", "unreadable or truncated")


def test_not_an_image(dataset_copy):
    (dataset_copy / "labelsTr" / "case_004.nii.gz").write_text("hello")
    assert_rejected(dataset_copy, "case_004.nii.gz", "unreadable")


def test_invalid_dataset_json(dataset_copy):
    (dataset_copy / "dataset.json").write_text("{not json")
    assert_rejected(dataset_copy, "dataset.json", "not valid JSON")


def test_dataset_json_missing_keys_and_v1_labels(dataset_copy):
    (dataset_copy / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a"}}))
    report = assert_rejected(dataset_copy, "'numTraining' is missing", "'file_ending' is missing", "nnU-Net v1")
    assert len(report.problems) >= 3


def test_all_problems_reported_in_one_run(dataset_copy):
    (dataset_copy / "imagesTr" / "case_002_0001.nii.gz").unlink()
    rewrite(dataset_copy / "labelsTr" / "case_003.nii.gz", lambda a: np.where(a == 2, 5, a).astype(a.dtype))
    report = assert_rejected(dataset_copy, "case_002_0001", "case_003.nii.gz")
    assert len(report.problems) == 2


def test_empty_label_map_is_only_a_warning(dataset_copy):
    rewrite(dataset_copy / "labelsTr" / "case_000.nii.gz", lambda a: np.zeros_like(a))
    report = verify_dataset(dataset_copy, processes=1)
    assert report.ok
    assert any("case_000.nii.gz" in w and "no foreground" in w for w in report.warnings)
    result = cli_verify(dataset_copy)
    assert result.returncode == 0 and "no foreground" in result.stderr


def test_ignore_label_is_allowed(dataset_copy):
    spec = json.loads((dataset_copy / "dataset.json").read_text())
    spec["labels"]["ignore"] = 3
    (dataset_copy / "dataset.json").write_text(json.dumps(spec))
    rewrite(dataset_copy / "labelsTr" / "case_000.nii.gz", lambda a: np.where(a == 0, 3, a).astype(a.dtype))
    assert verify_dataset(dataset_copy, processes=1).ok


def test_ignore_label_must_follow_the_others(dataset_copy):
    spec = json.loads((dataset_copy / "dataset.json").read_text())
    spec["labels"]["ignore"] = 5
    (dataset_copy / "dataset.json").write_text(json.dumps(spec))
    assert_rejected(dataset_copy, "'ignore' label must be max(other labels) + 1")


# --- the DIAG fork's sparse labels (-1 = unannotated) -------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_pair(tmp_path_factory):
    """The same data twice: -1 marks declared as ``"ignore": -1`` (the DIAG fork), and the same voxels holding
    max label + 1 declared as nnU-Net's ignore label."""
    import shutil

    from autoplan.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("sparse")
    # the dataset benchmarks/make_region_fixture.py fingerprinted with nnU-Net (nnunet_ignore_fingerprint.json)
    diag = make_synthetic_dataset(root / "Dataset967_Diag", cases=4, shape=(20, 18, 10), spacing=(1, 1, 2),
                                  labels=2, seed=6, sparse=True)
    nnunet = root / "Dataset967_Nnunet"
    shutil.copytree(diag, nnunet)
    for label in (nnunet / "labelsTr").glob("*.nii.gz"):
        rewrite(label, lambda a: np.where(a == -1, 3, a.astype(np.int16)))
    spec = json.loads((nnunet / "dataset.json").read_text())
    spec["labels"]["ignore"] = 3
    (nnunet / "dataset.json").write_text(json.dumps(spec))
    return diag, nnunet


def test_declared_minus_one_is_nnunets_ignore_label_for_fingerprint_and_plans(sparse_pair):
    from autoplan.dataset import load_dataset
    from autoplan.planner import plan

    diag, nnunet = sparse_pair
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(diag / "labelsTr" / "case_000.nii.gz"))) == -1).any()
    before = folder_digest(diag)
    assert verify_dataset(diag, processes=1).ok
    assert cli_verify(diag).returncode == 0
    labels = load_dataset(diag).labels
    assert labels.ignore_label == 3 and labels.sparse and labels.allowed_values == {-1, 0, 1, 2}
    ours, _ = extract_fingerprint(diag, processes=1)
    theirs, _ = extract_fingerprint(nnunet, processes=1)
    assert ours == theirs  # the ignore voxels are foreground for the intensity statistics, as max + 1 is in nnU-Net
    nnunet_fingerprint = json.loads((ROOT / "tests/fixtures/nnunet_ignore_fingerprint.json").read_text())
    assert ours["spacings"] == nnunet_fingerprint["spacings"]
    assert ours["shapes_after_crop"] == nnunet_fingerprint["shapes_after_crop"]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(
        nnunet_fingerprint["median_relative_size_after_cropping"])
    mine, reference = (f["foreground_intensity_properties_per_channel"]["0"] for f in (ours, nnunet_fingerprint))
    for key in ("min", "max", "median", "percentile_00_5", "percentile_99_5"):
        assert mine[key] == pytest.approx(reference[key], rel=1e-6), key
    for key in ("mean", "std"):
        assert mine[key] == pytest.approx(reference[key], abs=1e-4 * (reference["max"] - reference["min"])), key
    spec_diag = json.loads((diag / "dataset.json").read_text())
    spec_nnunet = json.loads((nnunet / "dataset.json").read_text())
    assert plan(spec_diag, ours, dataset_name="D") == plan(spec_nnunet, theirs, dataset_name="D")
    assert folder_digest(diag) == before  # the -1 files are read, never rewritten


def test_undeclared_minus_one_is_refused_with_the_fix(dataset_copy):
    label = dataset_copy / "labelsTr" / "case_002.nii.gz"
    rewrite(label, lambda a: np.where(np.arange(a.shape[0])[:, None, None] % 2 == 1, -1, a.astype(np.int16)))
    report = assert_rejected(dataset_copy, f"{label}: label value -1 (unannotated voxels) but dataset.json declares "
                                           "no ignore label; add \"ignore\": -1 to its \"labels\"")
    assert len([p for p in report.problems if "-1" in p]) == 1  # one line per file


def test_ignore_must_be_max_plus_one_or_minus_one(dataset_copy):
    spec = json.loads((dataset_copy / "dataset.json").read_text())
    spec["labels"]["ignore"] = 7
    (dataset_copy / "dataset.json").write_text(json.dumps(spec))
    assert_rejected(dataset_copy, "the 'ignore' label must be max(other labels) + 1 = 3 (nnU-Net), or -1 (the DIAG "
                                  "fork's sparse labels), got 7")


def test_non_integer_label_values(dataset_copy):
    rewrite(dataset_copy / "labelsTr" / "case_004.nii.gz",
            lambda a: np.where(a == 1, 1.5, a).astype(np.float32))
    assert_rejected(dataset_copy, "case_004.nii.gz", "non-integer values [1.5]")


def test_label_file_without_images_is_a_warning_naming_it(dataset_copy):
    """A label with no images is not a case (numTraining still counts 6); like nnU-Net, verify does not fail."""
    src = dataset_copy / "labelsTr" / "case_000.nii.gz"
    (dataset_copy / "labelsTr" / "case_077.nii.gz").write_bytes(src.read_bytes())
    report = verify_dataset(dataset_copy, processes=1)
    assert report.ok and report.num_cases == 6, report.problems
    assert any("case_077.nii.gz" in w and "no images" in w for w in report.warnings), report.warnings
    result = cli_verify(dataset_copy)
    assert result.returncode == 0 and "case_077.nii.gz" in result.stderr


@pytest.mark.parametrize("bad_name", ["case_002_000.nii.gz", "case_002-0000.nii.gz", "case_002_00000.nii.gz"])
def test_channel_file_not_named_case_xxxx(dataset_copy, bad_name):
    """A channel file without a 4-digit _XXXX suffix is named, and its case then misses that channel."""
    (dataset_copy / "imagesTr" / "case_002_0000.nii.gz").rename(dataset_copy / "imagesTr" / bad_name)
    report = assert_rejected(dataset_copy, bad_name, "does not follow CASE_XXXX.nii.gz",
                             "case_002_0000.nii.gz", "missing channel 0")
    assert len(report.problems) == 2, report.problems


def test_image_of_an_undeclared_case_without_its_label(dataset_copy):
    """Images whose case has no label file: the expected label path is named."""
    for c in (0, 1):
        src = dataset_copy / "imagesTr" / f"case_000_{c:04d}.nii.gz"
        (dataset_copy / "imagesTr" / f"extra_{c:04d}.nii.gz").write_bytes(src.read_bytes())
    assert_rejected(dataset_copy, "labelsTr/extra.nii.gz", "label file missing for case 'extra'")


def _regions(dataset_copy, regions_class_order):
    spec = json.loads((dataset_copy / "dataset.json").read_text())
    spec["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    if regions_class_order is not None:
        spec["regions_class_order"] = regions_class_order
    (dataset_copy / "dataset.json").write_text(json.dumps(spec))


def test_region_dataset_with_regions_class_order_passes(dataset_copy):
    """BraTS-style regions: label values are those named in any region (0, 1, 2)."""
    _regions(dataset_copy, [1, 2])
    report = verify_dataset(dataset_copy, processes=1)
    assert report.ok, report.problems
    assert cli_verify(dataset_copy).returncode == 0


def test_region_dataset_label_values_outside_the_regions(dataset_copy):
    _regions(dataset_copy, [1, 2])
    rewrite(dataset_copy / "labelsTr" / "case_001.nii.gz", lambda a: np.where(a == 2, 3, a).astype(a.dtype))
    assert_rejected(dataset_copy, "case_001.nii.gz", "[3]", "not declared")


@pytest.mark.parametrize("order, message", [(None, "need 'regions_class_order'"),
                                            ([1], "'regions_class_order' needs 2 entries")])
def test_region_dataset_without_a_fitting_regions_class_order(dataset_copy, order, message):
    _regions(dataset_copy, order)
    assert_rejected(dataset_copy, "dataset.json", message)


def _natural_2d_dataset(root, ending, colour_case=None):
    """Three 1-channel 2-D cases written by SimpleITK as ``ending`` files (8-bit: BMP holds nothing wider)."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        label = np.zeros((20, 24), np.uint8)
        label[5:12, 6:15] = 1
        image = (rng.integers(0, 100, (20, 24)) + 100 * label).astype(np.uint8)
        if i == colour_case:
            sitk.WriteImage(sitk.GetImageFromArray(np.stack([image, 255 - image, 200 * label], -1), isVector=True),
                            str(root / "imagesTr" / f"img_{i:03d}_0000{ending}"))
        else:
            sitk.WriteImage(sitk.GetImageFromArray(image), str(root / "imagesTr" / f"img_{i:03d}_0000{ending}"))
        sitk.WriteImage(sitk.GetImageFromArray(label), str(root / "labelsTr" / f"img_{i:03d}{ending}"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "RGB"}, "numTraining": 3,
                                                   "labels": {"background": 0, "cell": 1}, "file_ending": ending}))
    return root


@pytest.mark.parametrize("ending", [".tif", ".tiff", ".bmp", ".png"])
def test_natural_2d_images_are_read(tmp_path, ending):
    """PNG/BMP/TIFF are read as (1, H, W) with spacing (999, 1, 1), as nnU-Net's NaturalImage2DIO does."""
    from autoplan.image_io import read_array

    root = _natural_2d_dataset(tmp_path / "Dataset950_Cells", ending)
    report = verify_dataset(root, processes=1)
    assert report.ok and report.num_cases == 3, report.problems
    array, geometry = read_array(root / "imagesTr" / f"img_000_0000{ending}")
    assert array.shape == (1, 20, 24) and geometry.spacing == (999.0, 1.0, 1.0)
    assert cli_verify(root).returncode == 0


@pytest.mark.parametrize("ending", [".tif", ".bmp"])
def test_colour_natural_image_is_rejected(tmp_path, ending):
    """A real colour image is refused (one file per channel); a grey one that ITK reads as R = G = B is not (above:
    SimpleITK reads the 8-bit grey BMPs it writes as RGB)."""
    root = _natural_2d_dataset(tmp_path / "Dataset951_Cells", ending, colour_case=1)
    assert_rejected(root, f"img_001_0000{ending}", "3 colour components")
