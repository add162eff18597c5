"""The bundle's preprocessing against nnU-Net 2.8.1's own ``DefaultPreprocessor``
(tests/fixtures/nnunet_preprocessed.npz, written by benchmarks/make_preprocessing_fixture.py with nnU-Net's code):
three Hippocampus cases read from their files, and two synthetic 2-channel cases (CT and masked z-score
normalization, a transposition, a cropped border with a filled hole) resampled with and without separate z and in
2-D. nnU-Net resamples with scikit-image; these tests do not need it."""

import json

import numpy as np
import pytest

from bundles.scripts.data import load_case
from bundles.scripts.preprocessing import PlanSettings, preprocess_case
from conftest import HIPPOCAMPUS, HIPPOCAMPUS_PLANS, ROOT, requires_shared

FIXTURE = np.load(ROOT / "tests" / "fixtures" / "nnunet_preprocessed.npz")


def stored(key):
    """An array of the fixture (stored as distinct values and an index map where that is smaller)."""
    if key in FIXTURE.files:
        return FIXTURE[key]
    return FIXTURE[key + "__values"][FIXTURE[key + "__index"]]


def assert_same_as_nnunet(key, data, seg, properties):
    theirs = json.loads(str(FIXTURE[f"{key}/properties"]))
    assert properties["shape_before_cropping"] == theirs["shape_before_cropping"]
    assert [list(b) for b in properties["bbox_used_for_cropping"]] == theirs["bbox_used_for_cropping"]
    assert (properties["shape_after_cropping_and_before_resampling"]
            == theirs["shape_after_cropping_and_before_resampling"])
    expected = stored(f"{key}/data")
    assert data.dtype == np.float32 and data.shape == expected.shape
    np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(seg, FIXTURE[f"{key}/seg"])


@requires_shared
@pytest.mark.parametrize("case", ["hippocampus_001", "hippocampus_003", "hippocampus_004"])
def test_hippocampus_case_is_preprocessed_as_nnunet_does(case):
    """Read by the bundle's loader (MONAI's LoadImage) from the raw files, with nnU-Net's reference plans."""
    plans = json.loads((HIPPOCAMPUS_PLANS / "nnUNetPlans.json").read_text())
    data, seg, spacing = load_case([HIPPOCAMPUS / "imagesTr" / f"{case}_0000.nii.gz"],
                                   HIPPOCAMPUS / "labelsTr" / f"{case}.nii.gz")
    out, out_seg, properties = preprocess_case(data, spacing, PlanSettings.from_plans(plans, "3d_fullres"), seg)
    assert_same_as_nnunet(f"{case}/3d_fullres", out, out_seg, properties)


@pytest.mark.parametrize("configuration", ["3d_fullres", "3d_iso", "2d"])
@pytest.mark.parametrize("case", ["aniso", "mild"])
def test_synthetic_case_is_resampled_as_nnunet_does(case, configuration):
    plans = json.loads(str(FIXTURE["synthetic_plans"]))
    raw, raw_seg = FIXTURE[f"{case}/raw_data"], FIXTURE[f"{case}/raw_seg"]
    plan = PlanSettings.from_plans(plans, configuration)
    data, seg, properties = preprocess_case(raw.copy(), list(FIXTURE[f"{case}/spacing"]), plan,
                                            raw_seg.astype(np.int16))
    assert properties["shape_after_resampling"] != list(raw.shape[1:])  # it was resampled
    assert properties["bbox_used_for_cropping"][1] != [0, raw.shape[2]]  # the zero border was cropped
    assert_same_as_nnunet(f"{case}/{configuration}", data, seg, properties)
    assert set(np.unique(seg)) == {-1, 0, 1, 2}


def test_the_fixture_covers_separate_z_and_plain_resampling():
    """aniso is resampled with separate z in 3d_fullres (spacing 3.1/0.7 > 3); mild and 3d_iso without."""
    from bundles.scripts.resampling import separate_z_axis

    assert separate_z_axis([3.1, 0.7, 0.8], [2.0, 0.75, 0.6]) == 0
    assert separate_z_axis([1.3, 0.9, 1.1], [1.0, 1.0, 1.0]) is None
    assert separate_z_axis([1.3, 0.9, 1.1], [2.0, 0.75, 0.6]) == 0  # decided by the target spacing
