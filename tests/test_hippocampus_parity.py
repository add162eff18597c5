"""Parity with what nnU-Net 2.8.1 wrote for the real Dataset004_Hippocampus (in ../shared)."""

import json

import pytest

from conftest import HIPPOCAMPUS, HIPPOCAMPUS_PLANS, requires_shared
from autoplan.fingerprint import extract_fingerprint
from autoplan.planner import plan

pytestmark = requires_shared

PLANS = {"default": "nnUNetPlans", "resenc-m": "nnUNetResEncUNetMPlans", "resenc-l": "nnUNetResEncUNetLPlans"}
CONFIG_KEYS = ["batch_size", "patch_size", "spacing", "median_image_size_in_voxels", "normalization_schemes",
               "use_mask_for_norm", "batch_dice", "next_stage", "previous_stage", "inherits_from", "data_identifier"]
ARCH_KEYS = ["n_stages", "features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage",
             "n_conv_per_stage_decoder"]


@pytest.fixture(scope="module")
def our_fingerprint():
    fingerprint, _ = extract_fingerprint(HIPPOCAMPUS, processes=2)
    return fingerprint


@pytest.fixture(scope="module")
def reference_fingerprint():
    return json.loads((HIPPOCAMPUS_PLANS / "dataset_fingerprint.json").read_text())


def test_fingerprint_geometry_is_identical(our_fingerprint, reference_fingerprint):
    assert our_fingerprint["spacings"] == reference_fingerprint["spacings"]
    assert our_fingerprint["shapes_after_crop"] == reference_fingerprint["shapes_after_crop"]
    assert our_fingerprint["median_relative_size_after_cropping"] == pytest.approx(
        reference_fingerprint["median_relative_size_after_cropping"])


def test_intensity_statistics_match_nnunet(our_fingerprint, reference_fingerprint):
    """Order statistics are exact (a case's quota exceeds its foreground, so every voxel is used); mean and std, which
    nnU-Net estimates from its random draw, agree within 1e-4 of the 0.5-99.5 percentile range."""
    ours = our_fingerprint["foreground_intensity_properties_per_channel"]
    ref = reference_fingerprint["foreground_intensity_properties_per_channel"]
    assert set(ours) == set(ref)
    for channel, stats in ref.items():
        assert set(ours[channel]) == set(stats)
        for key in ("min", "max", "median", "percentile_00_5", "percentile_99_5"):
            assert ours[channel][key] == stats[key], (channel, key)
        tolerance = 1e-4 * (stats["percentile_99_5"] - stats["percentile_00_5"])
        for key in ("mean", "std"):
            assert abs(ours[channel][key] - stats[key]) <= tolerance, (channel, key, ours[channel][key], stats[key])


@pytest.mark.parametrize("planner", list(PLANS))
@pytest.mark.parametrize("source", ["reference", "ours"])
def test_plans_equal_nnunet_field_by_field(planner, source, our_fingerprint, reference_fingerprint):
    fingerprint = reference_fingerprint if source == "reference" else our_fingerprint
    dataset_json = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    ours = plan(dataset_json, fingerprint, planner, dataset_name="Dataset004_Hippocampus")
    ref = json.loads((HIPPOCAMPUS_PLANS / f"{PLANS[planner]}.json").read_text())
    assert list(ours["configurations"]) == list(ref["configurations"])
    for key in ("transpose_forward", "transpose_backward", "original_median_spacing_after_transp",
                "original_median_shape_after_transp", "plans_name", "experiment_planner_used", "image_reader_writer"):
        assert ours[key] == ref[key], key
    if source == "reference":
        assert ours["foreground_intensity_properties_per_channel"] == ref["foreground_intensity_properties_per_channel"]
        assert json.dumps(ours, indent=4) == json.dumps(ref, indent=4)  # byte-identical plans
    for name, config in ref["configurations"].items():
        for key in CONFIG_KEYS:
            assert ours["configurations"][name].get(key) == config.get(key), (name, key)
        ours_arch = ours["configurations"][name]["architecture"]
        assert ours_arch["network_class_name"] == config["architecture"]["network_class_name"]
        for key in ARCH_KEYS:
            assert ours_arch["arch_kwargs"].get(key) == config["architecture"]["arch_kwargs"].get(key), (name, key)
