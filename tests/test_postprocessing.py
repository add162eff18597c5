"""nnU-Net's connected-component postprocessing and its acceptance rules (spec 7.3)."""

import numpy as np
import pytest
import torch

from bundles.scripts.postprocessing import (KeepLargestComponentd, accept_all_foreground, accept_label,
                                            apply_postprocessing, keep_largest, largest_components)


def test_largest_components_full_connectivity_and_ties():
    mask = np.zeros((5, 5, 5), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True  # diagonal neighbours: one component with 26-connectivity
    mask[4, 4, 4] = True
    expected = mask.copy()
    expected[4, 4, 4] = False
    np.testing.assert_array_equal(largest_components(mask), expected)
    tie = np.zeros((1, 6, 6), bool)  # 2-D (one slice): two components of 2 voxels and one of 1
    tie[0, 0, 0:2] = tie[0, 4, 4:6] = True
    tie[0, 2, 5] = True
    expected = tie.copy()
    expected[0, 2, 5] = False
    np.testing.assert_array_equal(largest_components(tie), expected)  # ties keep every largest component
    assert not largest_components(np.zeros((3, 3), bool)).any()


def test_keep_largest_on_labels_and_the_transform():
    from monai.data import MetaTensor

    seg = np.zeros((1, 8, 8), np.uint8)
    seg[0, 0:3, 0:3] = 1
    seg[0, 2, 3] = 2  # touches label 1: same foreground component
    seg[0, 6:8, 6:8] = 2  # a separate component of label 2 (4 voxels)
    seg[0, 7, 0] = 1  # a stray label-1 voxel
    fg = keep_largest(seg, [1, 2])
    assert fg[0, 7, 0] == 0 and (fg[0, 6:8, 6:8] == 0).all() and fg[0, 2, 3] == 2 and (fg[0, 0:3, 0:3] == 1).all()
    only2 = keep_largest(seg, [2])  # label 2 alone: the 4-voxel block wins over the single touching voxel
    assert only2[0, 2, 3] == 0 and (only2[0, 6:8, 6:8] == 2).all() and only2[0, 7, 0] == 1
    chained = apply_postprocessing(seg, keep_largest_foreground=True, foreground_labels=[1, 2],
                                   keep_largest_labels=[1])
    np.testing.assert_array_equal(chained, keep_largest(fg, [1]))
    assert (seg[0, 7, 0] == 1) and seg.sum() > fg.sum()  # input untouched
    pred = MetaTensor(torch.from_numpy(seg[None].astype(np.float32)), affine=torch.diag(torch.tensor([2., 2, 2, 1])))
    out = KeepLargestComponentd("pred", keep_largest_foreground=True, foreground_labels=[1, 2])({"pred": pred})["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, pred.affine) and out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy()[0], fg)
    untouched = KeepLargestComponentd("pred")({"pred": pred})["pred"]
    assert untouched is pred


def summary(fg, per_label):
    return {"foreground_mean": {"Dice": fg}, "mean": {k: {"Dice": v} for k, v in per_label.items()}}


def test_acceptance_rules():
    base = summary(0.70, {"1": 0.6, "2": 0.8})
    assert accept_all_foreground(base, summary(0.75, {"1": 0.7, "2": 0.8}))
    assert not accept_all_foreground(base, summary(0.70, {"1": 0.6, "2": 0.8}))  # no strict increase
    assert not accept_all_foreground(base, summary(0.72, {"1": 0.65, "2": 0.79}))  # a label got worse
    assert not accept_all_foreground(base, summary(float("nan"), {"1": 0.7, "2": 0.8}))
    assert accept_all_foreground(summary(0.5, {"1": 0.5, "2": float("nan")}), summary(0.6, {"1": 0.6, "2": 0.1}))
    assert accept_label(base, summary(0.70, {"1": 0.61, "2": 0.7}), 1)  # only that label counts
    assert not accept_label(base, summary(0.80, {"1": 0.6, "2": 1.0}), 1)
    assert not accept_label(base, summary(0.80, {"1": float("nan"), "2": 1.0}), 1)


def test_largest_components_returns_a_boolean_mask_and_never_the_background():
    """Any non-zero input counts as the mask; single voxels tied at size 1 are all kept, the background never."""
    single = largest_components(np.array([0, 2, 0]))
    assert single.dtype == bool and single.tolist() == [False, True, False]
    dots = np.zeros((3, 5), bool)
    dots[0, 0] = dots[2, 4] = True  # two 1-voxel components
    np.testing.assert_array_equal(largest_components(dots), dots)


def test_keep_largest_takes_a_label_a_list_or_regions():
    seg = np.array([[1, 0, 1, 1, 0, 2, 0, 2, 2, 2]])
    assert keep_largest(seg, 1).tolist() == [[0, 0, 1, 1, 0, 2, 0, 2, 2, 2]]
    assert keep_largest(seg, [(1, 2)]).tolist() == keep_largest(seg, [1, 2]).tolist() == [
        [0, 0, 0, 0, 0, 0, 0, 2, 2, 2]]


def test_apply_postprocessing_defaults_and_all_foreground():
    """No step by default; keep-largest of all foreground without ``foreground_labels`` takes every non-zero
    value, and per-label steps take ints or region tuples alike."""
    seg = np.array([[1, 1, 0, 2, 0, 1, 2, 2]])
    assert apply_postprocessing(seg).tolist() == seg.tolist()
    assert apply_postprocessing(seg, True).tolist() == [[0, 0, 0, 0, 0, 1, 2, 2]]
    assert apply_postprocessing(seg, True).tolist() == apply_postprocessing(seg, True, [1, 2]).tolist()
    assert apply_postprocessing(seg, keep_largest_labels=[(1, 2)]).tolist() == [[0, 0, 0, 0, 0, 1, 2, 2]]
    assert apply_postprocessing(seg, keep_largest_labels=[2]).tolist() == [[1, 1, 0, 0, 0, 1, 2, 2]]


def test_keep_largest_transform_on_numpy_labels_and_regions():
    """Arrays stay arrays of their dtype; ``foreground_labels`` limits the all-foreground step; per-label steps are
    ints or regions; a missing key is an error unless allowed."""
    seg = np.array([[1, 1, 0, 2, 0, 1, 2, 2, 0, 2]], np.uint8)
    out = KeepLargestComponentd("pred", keep_largest_foreground=True, foreground_labels=[1])({"pred": seg})["pred"]
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert out.tolist() == [[1, 1, 0, 2, 0, 0, 2, 2, 0, 2]]  # only label 1's stray voxel goes
    labels = KeepLargestComponentd("pred", keep_largest_labels=[2])({"pred": seg})["pred"]
    assert labels.tolist() == [[1, 1, 0, 0, 0, 1, 2, 2, 0, 0]]
    regions = KeepLargestComponentd("pred", keep_largest_labels=[[1, 2]])({"pred": seg})["pred"]
    assert regions.tolist() == [[0, 0, 0, 0, 0, 1, 2, 2, 0, 0]]
    with pytest.raises(KeyError):
        KeepLargestComponentd("pred", keep_largest_labels=[2])({"image": seg})
    assert KeepLargestComponentd("pred", keep_largest_labels=[2], allow_missing_keys=True)({"x": 1}) == {"x": 1}


def test_accept_label_names_a_region_as_a_list_or_a_tuple():
    base = summary(0.5, {"(1, 2)": 0.5, "3": 0.5})
    better = summary(0.5, {"(1, 2)": 0.6, "3": 0.4})
    assert accept_label(base, better, [1, 2]) and accept_label(base, better, (1, 2))
    assert accept_label(base, better, "(1, 2)") and not accept_label(base, better, 3)
