"""Planner rules (spec 3.2-3.8) on hand-made fingerprints, including the spec's worked examples (3.11)."""

import json
import subprocess
import sys

from pathlib import Path

import pytest

from autoplan.planner import Planner, fullres_target_spacing, normalization_schemes, plan, transpose_axes


def fingerprint(spacings, shapes, relative_size=1.0, channels=1):
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
                     "percentile_99_5": 1.0, "std": 1.0} for c in range(channels)},
        "median_relative_size_after_cropping": relative_size,
    }


def dataset_json(num_labels, num_training, channels=("CT",), ending=".nii.gz", extra_labels=None):
    labels = {"background": 0, **{f"l{i}": i for i in range(1, num_labels)}, **(extra_labels or {})}
    return {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
            "numTraining": num_training, "file_ending": ending}


def config_summary(plans, name):
    c = plans["configurations"][name]
    return c["patch_size"], c["batch_size"]


def test_hippocampus_like_default_and_resenc_m():
    fp = fingerprint([[1.0, 1.0, 1.0]] * 260, [[36, 50, 35]] * 260)
    plans = plan(dataset_json(3, 260, ("MRI",)), fp)
    assert config_summary(plans, "3d_fullres") == ([40, 56, 40], 9)
    assert config_summary(plans, "2d") == ([56, 40], 366)
    assert "3d_lowres" not in plans["configurations"]
    assert plans["configurations"]["3d_fullres"]["batch_dice"] is False
    assert plans["configurations"]["2d"]["batch_dice"] is True
    resenc = plan(dataset_json(3, 260, ("MRI",)), fp, "resenc-m")
    assert config_summary(resenc, "3d_fullres") == ([40, 56, 40], 58)
    assert resenc["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_blocks_per_stage"] == [1, 3, 4, 6]


def test_prostate_like_anisotropic_presets():
    fp = fingerprint([[3.6, 0.625, 0.625]] * 32, [[20, 320, 320]] * 32, channels=2)
    dj = dataset_json(3, 32, ("T2", "ADC"))
    default = plan(dj, fp)
    assert config_summary(default, "3d_fullres") == ([20, 320, 256], 2)
    assert config_summary(default, "2d") == ([320, 320], 32)
    kw = default["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    assert kw["strides"] == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert kw["features_per_stage"] == [32, 64, 128, 256, 320, 320, 320]
    assert config_summary(plan(dj, fp, "resenc-m"), "3d_fullres") == ([20, 256, 256], 2)
    assert config_summary(plan(dj, fp, "resenc-l"), "3d_fullres") == ([20, 320, 320], 5)


def test_large_ct_gets_lowres_and_cascade():
    fp = fingerprint([[2.5, 0.8, 0.8]] * 100, [[200, 512, 512]] * 100)
    plans = plan(dataset_json(14, 100), fp)
    configs = plans["configurations"]
    assert list(configs) == ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]
    assert config_summary(plans, "3d_fullres") == ([64, 192, 160], 2)
    assert configs["3d_fullres"]["architecture"]["arch_kwargs"]["kernel_sizes"][0] == [1, 3, 3]
    lowres = configs["3d_lowres"]
    assert lowres["patch_size"] == [96, 160, 160] and lowres["batch_size"] == 2
    assert lowres["median_image_size_in_voxels"] == [153, 245, 245]
    assert lowres["spacing"] == pytest.approx([2.5 * 1.03**9, 0.8 * 1.03**25, 0.8 * 1.03**25])
    assert lowres["next_stage"] == "3d_cascade_fullres" and lowres["batch_dice"] is False
    assert configs["3d_fullres"]["batch_dice"] is True
    assert configs["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert config_summary(plans, "2d") == ([512, 512], 12)


def test_anisotropic_target_spacing_uses_tenth_percentile():
    spacings = [[5.0 + 0.1 * i, 0.7, 0.7] for i in range(20)]
    shapes = [[30, 400, 400]] * 20
    target = fullres_target_spacing(fingerprint(spacings, shapes))
    assert target[0] == pytest.approx(5.19)  # np.percentile([5.0 .. 6.9], 10) = 5.19
    # not anisotropic in voxels (axis 0 not 3x smaller than the others): the median is kept
    iso_voxels = fullres_target_spacing(fingerprint(spacings, [[300, 400, 400]] * 20))
    assert iso_voxels[0] == pytest.approx(5.95)


def test_tenth_percentile_below_in_plane_spacing_is_raised():
    spacings = [[4.0, 1.0, 1.0]] * 15 + [[0.5, 1.0, 1.0]] * 5  # 10th percentile 0.5 < 1.0
    target = fullres_target_spacing(fingerprint(spacings, [[10, 100, 100]] * 20))
    assert target[0] == pytest.approx(1.0 + 1e-5)


def test_transpose_moves_coarse_axis_first():
    assert transpose_axes([1.0, 1.0, 1.0]) == ([0, 1, 2], [0, 1, 2])
    assert transpose_axes([0.7, 0.7, 3.0]) == ([2, 0, 1], [1, 2, 0])
    fp = fingerprint([[0.8, 0.8, 5.0]] * 10, [[512, 512, 40]] * 10)
    plans = plan(dataset_json(2, 10), fp)
    assert plans["transpose_forward"] == [2, 0, 1] and plans["transpose_backward"] == [1, 2, 0]
    assert plans["configurations"]["3d_fullres"]["spacing"][0] == 5.0
    assert plans["original_median_shape_after_transp"] == [40, 512, 512]


def test_normalization_and_mask_rules():
    dj = dataset_json(2, 10, ("CT", "T1", "noNorm", "rescale_to_0_1", "rgb_to_0_1", "zscore"))
    schemes, mask = normalization_schemes(dj, {"median_relative_size_after_cropping": 0.5})
    assert schemes == ["CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                       "RGBTo01Normalization", "ZScoreNormalization"]
    assert mask == [False, True, False, False, False, True]
    _, mask = normalization_schemes(dj, {"median_relative_size_after_cropping": 0.75})
    assert not any(mask)


def test_ignore_label_counts_as_an_output_for_the_estimate():
    fp = fingerprint([[1.0, 1.0, 1.0]] * 40, [[160, 160, 160]] * 40)
    without = Planner(dataset_json(3, 40), fp)
    with_ignore = Planner(dataset_json(3, 40, extra_labels={"ignore": 3}), fp)
    assert with_ignore.num_classes == without.num_classes + 1


def test_gpu_memory_target_scales_batch_size():
    fp = fingerprint([[1.0, 1.0, 1.0]] * 500, [[60, 60, 60]] * 500)
    small = plan(dataset_json(3, 500), fp, "resenc-m")["configurations"]["3d_fullres"]["batch_size"]
    big = plan(dataset_json(3, 500), fp, "resenc-m", gpu_memory_gb=80)["configurations"]["3d_fullres"]["batch_size"]
    assert big == pytest.approx(10 * small, rel=0.05)


def test_patch_shrinks_to_fit_memory():
    fp = fingerprint([[1.0, 1.0, 1.0]] * 50, [[300, 300, 300]] * 50)
    plans = plan(dataset_json(2, 50), fp)
    patch, bs = config_summary(plans, "3d_fullres")
    assert patch == [128, 128, 128] and bs == 2


def test_two_dimensional_dataset_has_only_2d():
    fp = fingerprint([[999.0, 1.0, 1.0]] * 30, [[1, 300, 200]] * 30)
    plans = plan(dataset_json(2, 30, ("R",), ending=".png"), fp)
    assert list(plans["configurations"]) == ["2d"]
    assert plans["image_reader_writer"] == "NaturalImage2DIO"
    assert plans["configurations"]["2d"]["spacing"] == [1.0, 1.0]


def test_plan_command_reads_json_only_and_imports_no_torch(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json(3, 20, ("MRI",))))
    (tmp_path / "fp.json").write_text(json.dumps(fingerprint([[1.0, 1.0, 1.0]] * 20, [[36, 50, 35]] * 20)))
    code = ("import sys; from autoplan.cli import main; "
            f"main(['plan', '--dataset-json', r'{tmp_path / 'dataset.json'}', '--fingerprint', r'{tmp_path / 'fp.json'}', "
            f"'--out', r'{tmp_path / 'plans.json'}']); "
            "bad = [m for m in ('torch', 'monai', 'SimpleITK', 'nibabel') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [40, 56, 40]
