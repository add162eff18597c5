"""Region-based (BraTS-style) training and export, and the DIAG fork's class-weighted loss.

Parity with nnU-Net comes from ``tests/fixtures/nnunet_regions.pt``, written by ``benchmarks/make_region_fixture.py``
with nnU-Net 2.8.1's own transforms, loss and label manager; the other expectations are computed by hand.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bundles.scripts.losses import DeepSupervisedLoss, NnUNetRegionDiceBCE, nnunet_loss, region_masks
from bundles.scripts.metrics import PseudoDice
from bundles.scripts.preprocessing import (PlanSettings, labels_from_probabilities, logits_to_original,
                                           paint_regions)
from conftest import process_group_of_one

FIXTURE = Path(__file__).parent / "fixtures" / "nnunet_regions.pt"
BRATS = [[1, 2, 3], [2, 3], [3]]


def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


# --- targets and export, by hand ----------------------------------------------------------------------------------
def test_region_targets_are_the_regions_binary_masks():
    label_map = torch.tensor([0, 1, 2, 3, 4, 3, 0]).float().reshape(1, 1, 7, 1, 1)
    masks = region_masks(label_map, BRATS)[0, :, :, 0, 0]
    expected = torch.tensor([[0, 1, 1, 1, 0, 1, 0],   # whole tumour: 1, 2, 3
                             [0, 0, 1, 1, 0, 1, 0],   # tumour core: 2, 3
                             [0, 0, 0, 1, 0, 1, 0]])  # enhancing: 3 (4 is the ignore label: in no region)
    assert torch.equal(masks, expected.float())


def test_regions_are_painted_in_regions_class_order_later_ones_winning():
    probabilities = np.array([[0.9, 0.9, 0.9, 0.2, 0.5],   # whole
                              [0.1, 0.8, 0.7, 0.9, 0.6],   # core
                              [0.0, 0.0, 0.6, 0.9, 0.1]],  # enhancing
                             np.float32)
    # voxel 3: core and enhancing above 0.5 without whole: painted by the last one that is above (3);
    # voxel 4: exactly 0.5 is not above the threshold
    np.testing.assert_array_equal(paint_regions(probabilities, [1, 2, 3]), [1, 2, 3, 3, 2])
    np.testing.assert_array_equal(paint_regions(probabilities, [3, 2, 1]), [3, 2, 1, 1, 2])
    assert labels_from_probabilities(probabilities, [1, 2, 3]).dtype == np.uint8
    np.testing.assert_array_equal(labels_from_probabilities(probabilities), [0, 0, 0, 1, 1])  # argmax without


def test_region_pseudo_dice_counts_each_region_on_its_sigmoid():
    label = torch.tensor([0, 1, 2, 3, 3, 4]).reshape(1, 1, 6, 1, 1).float()
    # logits > 0 means sigmoid > 0.5
    pred = torch.tensor([[1, 1, 1, 1, -1, 1],      # whole: TP 3 (1,2,3), FP 1 (0), FN 1; ignore voxel 5 masked
                         [-1, -1, 1, 1, 1, 1],     # core: TP 3, FP 0, FN 0
                         [-1, -1, -1, -1, 1, 1]],  # enhancing: TP 1, FN 1
                        dtype=torch.float32).reshape(1, 3, 6, 1, 1)
    metric = PseudoDice(num_classes=3, ignore_label=4, regions=BRATS)
    metric.reset()
    metric.update((pred, label))
    metric.compute()
    assert metric.last_per_class == pytest.approx([6 / 8, 1.0, 2 / 3])


@pytest.mark.parametrize("batch_dice, ddp", [(False, False), (True, False), (True, True)])
def test_class_weighted_loss_equals_the_hand_computed_value(batch_dice, ddp, tmp_path):
    """Two voxels, three classes. Logits give softmax rows p(a) = (0.5, 0.25, 0.25) at the class-1 voxel and
    p(b) = (0.2, 0.2, 0.6) at the class-2 voxel; weights (1, 2, 3).
    CE = (2 * -ln 0.25 + 3 * -ln 0.6) / (2 + 3). Dice per foreground class (smooth 1e-5):
    class 1: 2 * 0.25 / (1 + 0.45), class 2: 2 * 0.6 / (1 + 0.85); weighted Dice = (2 d1 + 3 d2) / 5.
    One sample: a batch Dice is the same, also inside a (1-rank) process group, where its sums are added over the
    ranks."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])).T.reshape(1, 3, 2, 1, 1)
    target = torch.tensor([1, 2]).reshape(1, 1, 2, 1, 1)
    ce = (2 * -np.log(0.25) + 3 * -np.log(0.6)) / 5
    d1 = (2 * 0.25 + 1e-5) / (1 + 0.45 + 1e-5)
    d2 = (2 * 0.6 + 1e-5) / (1 + 0.85 + 1e-5)
    expected = ce - (2 * d1 + 3 * d2) / 5
    unweighted = -np.log([0.25, 0.6]).mean() - (d1 + d2) / 2
    # with an ignore label the weighted terms see only annotated voxels: a third voxel marked 3 changes nothing
    logits3 = torch.cat([logits, torch.randn(1, 3, 1, 1, 1)], 2)
    target3 = torch.cat([target, torch.tensor([3]).reshape(1, 1, 1, 1, 1)], 2)
    with process_group_of_one(tmp_path) if ddp else nullcontext():
        weighted = float(nnunet_loss(batch_dice, class_weights=[1, 2, 3])(logits, target))
        plain = float(nnunet_loss(batch_dice)(logits, target))
        ignoring = float(nnunet_loss(batch_dice, 3, class_weights=[1, 2, 3])(logits3, target3))
    assert weighted == pytest.approx(expected, rel=1e-5) and ignoring == pytest.approx(expected, rel=1e-5)
    assert plain == pytest.approx(unweighted, rel=1e-5)


def test_class_weights_work_under_deep_supervision_and_are_checked():
    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)]
    target = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    weighted = DeepSupervisedLoss(nnunet_loss(class_weights=[1.0, 1.0, 5.0]), 3)
    plain = DeepSupervisedLoss(nnunet_loss(), 3)
    assert float(weighted(outputs, target)) != pytest.approx(float(plain(outputs, target)))
    with pytest.raises(ValueError, match="class_weights has 2 entries for 3 classes"):
        nnunet_loss(class_weights=[1.0, 1.0])(outputs[0], target)
    with pytest.raises(ValueError, match="^class_weights apply to label-based datasets; region-based training has no "
                                         "classes$"):
        nnunet_loss(regions=BRATS, class_weights=[1, 1, 1])


# --- parity with nnU-Net's own code -------------------------------------------------------------------------------
@pytest.mark.parametrize("ddp", [False, True])
@pytest.mark.parametrize("case", range(4))
def test_region_loss_and_targets_equal_nnunets(case, ddp, tmp_path):
    """Our loss takes the label map and builds the regions itself; nnU-Net converts to regions in the data pipeline
    and downsamples the region masks for deep supervision. Targets and the deep-supervised loss agree, also inside
    a (1-rank) process group, where a batch Dice adds its sums over the ranks."""
    data = fixture()
    item = data["losses"][case]
    seg, logits, ignore = item["seg"].float(), item["logits"], item["ignore_label"]
    regions = data["regions"]
    for output, theirs in zip(logits, item["targets"]):
        ours = F.interpolate(seg, size=output.shape[2:], mode="nearest-exact")
        assert torch.equal(region_masks(ours, regions).bool(), theirs[:, :len(regions)])
        if ignore is not None:
            assert torch.equal(ours == ignore, theirs[:, -1:])
    loss = DeepSupervisedLoss(nnunet_loss(item["batch_dice"], ignore, regions), len(data["scales"]))
    assert isinstance(loss.loss, NnUNetRegionDiceBCE)
    with process_group_of_one(tmp_path) if ddp else nullcontext():
        assert float(loss(logits, seg)) == pytest.approx(item["loss"], rel=1e-5, abs=1e-6)


def test_region_export_equals_nnunets():
    """Sigmoid, > 0.5, painted in regions_class_order; uncropped probabilities are 0 outside the crop (no channel
    is set to 1 there, unlike labels' background)."""
    export = fixture()["export"]
    logits = export["logits"].numpy()
    order = fixture()["regions_class_order"]
    probabilities = torch.sigmoid(export["logits"]).numpy()
    np.testing.assert_allclose(probabilities, export["probabilities"].numpy(), atol=1e-7)
    np.testing.assert_array_equal(labels_from_probabilities(probabilities, order), export["segmentation"].numpy())
    bbox, shape = export["bbox"], export["original_shape"]
    settings = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    plan = PlanSettings([1.0, 1.0, 1.0], [0, 1, 2], [0, 1, 2], ["ZScoreNormalization"], [False], {}, settings,
                        settings, settings)
    props = {"spacing_transposed": [1.0, 1.0, 1.0], "shape_after_cropping_and_before_resampling": list(logits.shape[1:]),
             "bbox_used_for_cropping": bbox, "shape_before_cropping": shape}
    seg, uncropped = logits_to_original(logits, props, plan, True, order)
    np.testing.assert_allclose(uncropped, export["uncropped"].numpy(), atol=1e-6)
    window = tuple(slice(lo, hi) for lo, hi in bbox)
    np.testing.assert_array_equal(seg[window], export["segmentation"].numpy())
    assert seg.sum() == export["segmentation"].numpy().sum()  # nothing painted outside the crop
