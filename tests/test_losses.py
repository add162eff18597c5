"""nnU-Net's training loss (spec 5.2) against a numpy transcription of its formula, and deep supervision."""

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from bundles.scripts.losses import (DeepSupervisedLoss, NnUNetDiceCE, NnUNetRegionDiceBCE, _SumOverRanks,
                                    deep_supervision_weights, nnunet_loss)
from conftest import process_group_of_one


def numpy_dice_ce(logits, target, batch_dice, ignore_label=None):
    """CE (mean over annotated voxels) - soft Dice (softmax, foreground classes, smooth 1e-5 in numerator and
    denominator; per sample and class, or per class over the batch), ignored voxels dropped from both terms."""
    logits, target = logits.double().numpy(), target.numpy()[:, 0]
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    annotated = np.ones(target.shape, bool) if ignore_label is None else target != ignore_label
    onehot = np.stack([(target == c) & annotated for c in range(logits.shape[1])], 1)
    weighted = probabilities * annotated[:, None]
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    intersection = (weighted * onehot).sum(axes)
    dice = (2 * intersection + 1e-5) / (onehot.sum(axes) + weighted.sum(axes) + 1e-5)
    dice = dice[..., 1:]
    picked = np.take_along_axis(probabilities, np.where(annotated, target, 0)[:, None], 1)[:, 0]
    cross_entropy = -np.log(picked[annotated]).mean() if annotated.any() else 0.0
    return cross_entropy - dice.mean()


@pytest.mark.parametrize("ddp", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_dice_ce_equals_the_formula(batch_dice, ignore_label, ddp, tmp_path):
    """Also inside a process group (``ddp``), where a batch Dice adds its sums over the ranks: on 1 rank the same."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 6, 4) * 3
    target = torch.randint(0, 3, (2, 1, 5, 6, 4))
    target[0, 0, 0, 0, 0] = 2  # every class in sample 0 before some voxels are ignored
    if ignore_label is not None:
        target[:, :, :2] = ignore_label
    with process_group_of_one(tmp_path) if ddp else nullcontext():
        got = float(NnUNetDiceCE(batch_dice, ignore_label)(logits, target))
    assert got == pytest.approx(numpy_dice_ce(logits, target, batch_dice, ignore_label), rel=1e-5, abs=1e-6)


def test_sums_over_ranks_scale_the_gradient_for_ddps_averaging(monkeypatch):
    """Forward: the sum over the ranks (a stand-in all-reduce adds another rank's 10); backward: every rank computes
    the same loss from the sum and DDP divides gradients by the number of ranks, so each rank's is multiplied by it."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.add_(10.0))
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    total = _SumOverRanks.apply(x)
    assert total.tolist() == [11.0, 12.0] and x.tolist() == [1.0, 2.0]
    (total * torch.tensor([3.0, 4.0])).sum().backward()
    assert x.grad.tolist() == [6.0, 8.0]


def test_a_batch_without_annotation_gives_the_dice_term_only():
    """Cross-entropy is skipped when every voxel is ignored; the Dice term is then -(1e-5 / 1e-5) = -1 per class."""
    target = torch.full((1, 1, 3, 3, 3), 4)
    assert float(NnUNetDiceCE(ignore_label=4)(torch.randn(1, 3, 3, 3, 3), target)) == pytest.approx(-1.0)


def test_loss_ignores_the_ignore_label():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, 6)
    target = torch.randint(0, 3, (2, 1, 6, 6, 6))
    target[:, :, :3] = 3  # ignored
    loss = NnUNetDiceCE(batch_dice=False, ignore_label=3)
    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 6, 6) * 10
    assert torch.isclose(loss(logits, target), loss(changed, target))


def test_loss_follows_nnunets_sign_convention():
    """CE - Dice as nnU-Net logs it: about -1 for a perfect prediction, about 0 + CE for a hopeless one."""
    target = torch.randint(0, 3, (2, 1, 6, 6, 6))
    perfect = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    assert float(NnUNetDiceCE()(perfect, target)) == pytest.approx(-1.0, abs=1e-4)
    wrong = torch.roll(perfect, 1, dims=1)  # every voxel confidently one class off
    assert float(NnUNetDiceCE()(wrong, target)) == pytest.approx(50.0, abs=1e-3)


@pytest.mark.parametrize("n, expected", [(1, [1.0]), (2, [1.0, 0.0]), (3, [2 / 3, 1 / 3, 0.0]),
                                         (5, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])])
def test_deep_supervision_weights(n, expected):
    """1/2^i, the lowest resolution weighted 0, normalised to sum 1."""
    assert deep_supervision_weights(n) == pytest.approx(expected)


def test_deep_supervised_loss_is_the_weighted_sum_over_downsampled_targets():
    """Each output is compared with the target at its resolution: nearest-exact picks voxel 2i + 1 for a half-size
    output (the centre of i's footprint); the lowest resolution has weight 0."""
    torch.manual_seed(1)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    outputs = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    component = NnUNetDiceCE()
    expected = (4 / 6 * component(outputs[0], target) + 2 / 6 * component(outputs[1], target[..., 1::2, 1::2, 1::2]))
    loss = DeepSupervisedLoss(component, 3)
    torch.testing.assert_close(loss(outputs, target), expected)
    torch.testing.assert_close(loss(torch.stack(outputs[:1] * 3, 1), target), component(outputs[0], target))
    single = DeepSupervisedLoss(component, 1)
    torch.testing.assert_close(single(outputs[0], target), component(outputs[0], target))


def test_defaults_are_per_sample_dice_and_batch_dice_is_passed_on():
    """nnU-Net's defaults: a Dice per sample; ``batch_dice`` reaches the loss it builds (a batch of 2 tells)."""
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 4, 5, 3) * 3
    target = torch.randint(0, 3, (2, 1, 4, 5, 3))
    for loss, batch_dice in ((nnunet_loss(), False), (NnUNetDiceCE(), False), (nnunet_loss(True), True)):
        assert float(loss(logits, target)) == pytest.approx(numpy_dice_ce(logits, target, batch_dice), rel=1e-5)
    regions = [[1, 2], [2]]
    per_sample, batch = NnUNetRegionDiceBCE(regions, False), NnUNetRegionDiceBCE(regions, True)
    default = float(NnUNetRegionDiceBCE(regions)(logits[:, :2], target))
    assert default == float(per_sample(logits[:, :2], target)) != float(batch(logits[:, :2], target))


def test_without_an_ignore_label_no_warning_is_raised():
    """MONAI's masked Dice warns on every call without a mask: the losses use it only with an ignore label."""
    import warnings

    logits, target = torch.randn(2, 3, 4, 4, 4), torch.randint(0, 3, (2, 1, 4, 4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NnUNetDiceCE()(logits, target)
        NnUNetRegionDiceBCE([[1, 2], [2]])(logits[:, :2], target)


@pytest.mark.parametrize("weights", [[1, -1, 2], [[1, 2], [3, 4]], [1, 0, 0], [5]])
def test_class_weights_must_be_non_negative_one_per_class_with_some_foreground(weights):
    with pytest.raises(ValueError, match=r"^class_weights must be non-negative, one per class, not all zero: "):
        NnUNetDiceCE(class_weights=weights)


def test_class_weights_may_be_zero_or_fractional_and_weigh_each_sample_alike():
    """A zero background weight and weights below 1 are fine; the weighted Dice is a mean over samples, so a batch
    of one sample twice has the loss of that sample."""
    torch.manual_seed(4)
    logits, target = torch.randn(1, 3, 4, 4, 4), torch.randint(0, 3, (1, 1, 4, 4, 4))
    for weights in ([0, 1, 2], [0.5, 0.25, 2]):
        loss = NnUNetDiceCE(class_weights=weights)
        twice = loss(torch.cat([logits, logits]), torch.cat([target, target]))
        assert float(twice) == pytest.approx(float(loss(logits, target)), rel=1e-6)


def test_a_region_of_one_label_may_be_given_as_an_int():
    torch.manual_seed(5)
    logits, target = torch.randn(2, 2, 4, 4, 4), torch.randint(0, 4, (2, 1, 4, 4, 4))
    assert float(NnUNetRegionDiceBCE([[1, 2], 3])(logits, target)) == float(
        NnUNetRegionDiceBCE([[1, 2], [3]])(logits, target))
