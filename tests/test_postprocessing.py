"""nnU-Net's connected-component postprocessing and its acceptance rules (spec 7.3)."""

import numpy as np
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
