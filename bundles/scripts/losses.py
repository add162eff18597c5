"""Training losses: nnU-Net's Dice + cross-entropy (spec 5.2) and a deep-supervision wrapper for any loss.

MONAI's ``DiceCELoss`` has no ignore index, so nnU-Net's loss is assembled from MONAI's ``DiceLoss``
(``MaskedDiceLoss`` with an ignore label) and torch's cross-entropy (which has ``ignore_index``). The wrapper takes
the per-output loss from the config (``loss_component`` in ``train.json``), so MONAI's ``DiceCELoss`` or a weighted
or region loss can replace nnU-Net's without touching code. Deep supervision uses MONAI's ``DeepSupervisionLoss``,
which resizes the target to each output (nearest-exact), after the network's output is split into a list.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceLoss, MaskedDiceLoss
from torch import nn

from .networks import split_deep_supervision


def deep_supervision_weights(num_outputs: int) -> list[float]:
    """1/2^i per output (highest resolution first), the lowest one set to 0, normalised to sum 1."""
    weights = [1 / 2**i for i in range(num_outputs)]
    if num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class NnUNetDiceCE(nn.Module):
    """nnU-Net's loss on one output: cross-entropy minus soft Dice (softmax, background excluded, smooth 1e-5), both
    weighted 1.0, on a label-map target. nnU-Net's Dice term is -Dice (MONAI's is 1 - Dice): the offset changes no
    gradient, but keeps the logged loss comparable with nnU-Net's (a perfect prediction gives -1).

    With ``ignore_label`` the ignored voxels are masked out of both terms, and cross-entropy is skipped when a batch
    has no annotated voxel.
    """

    def __init__(self, batch_dice: bool = False, ignore_label: int | None = None):
        super().__init__()
        self.ignore_label = ignore_label
        kwargs = dict(include_background=False, softmax=True, batch=batch_dice, smooth_nr=1e-5, smooth_dr=1e-5)
        self.dice = DiceLoss(**kwargs) if ignore_label is None else MaskedDiceLoss(**kwargs)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        if self.ignore_label is None:
            onehot = torch.zeros_like(logits).scatter_(1, target, 1.0)
            return self.dice(logits, onehot) - 1.0 + F.cross_entropy(logits, target[:, 0])
        mask = target != self.ignore_label
        onehot = torch.zeros_like(logits).scatter_(1, torch.where(mask, target, torch.zeros_like(target)), 1.0)
        dice = self.dice(logits, onehot, mask.to(logits.dtype)) - 1.0
        if not mask.any():
            return dice
        return dice + F.cross_entropy(logits, target[:, 0], ignore_index=self.ignore_label)


class DeepSupervisedLoss(nn.Module):
    """``loss`` (any ``(output, label map)`` loss) over the network's deep-supervision outputs, with nnU-Net's
    weights; a network without deep supervision gets ``loss`` itself."""

    def __init__(self, loss: nn.Module, num_outputs: int):
        super().__init__()
        self.loss = loss
        self.weights = deep_supervision_weights(num_outputs)
        self.deep_supervision = DeepSupervisionLoss(self.loss, weights=self.weights)

    def forward(self, output, target: torch.Tensor) -> torch.Tensor:
        outputs = split_deep_supervision(output, target.ndim - 2)
        if len(outputs) == 1:
            return self.loss(outputs[0], target)
        return self.deep_supervision(outputs, target.float())
