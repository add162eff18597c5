"""Training losses: nnU-Net's Dice + cross-entropy and its region loss (spec 5.2), the DIAG fork's class weights,
and a deep-supervision wrapper for any loss.

MONAI's ``DiceCELoss`` has no ignore index, so nnU-Net's loss is assembled from MONAI's ``DiceLoss``
(``MaskedDiceLoss`` with an ignore label) and torch's cross-entropy (which has ``ignore_index``). Every loss here takes
the label map as its target; region-based training builds the regions' binary masks from it inside the loss, which
gives the same targets as nnU-Net's conversion in the data pipeline (nearest-exact downsampling for deep supervision
commutes with a voxel-wise conversion). The wrapper takes the per-output loss from the config (``loss_component`` in
``train.json``), so MONAI's ``DiceCELoss`` or another loss can replace nnU-Net's without touching code. Deep
supervision uses MONAI's ``DeepSupervisionLoss``, which resizes the target to each output (nearest-exact), after the
network's output is split into a list.

Under DDP, a batch Dice is nnU-Net's: its intersections and sums are added over the ranks before the Dice is taken,
so every rank's Dice term is that of the global batch (nnU-Net's ``ddp=True`` in its Dice losses). Everything else
is per rank: cross-entropy is the mean over the rank's own voxels, a per-sample Dice the mean over its own samples,
and DDP averages the ranks' gradients with equal weights, as nnU-Net's DDP training does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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


SMOOTH = 1e-5


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class _SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the DDP ranks. Every rank computes the same loss from the sum, so each gets the
    same gradient for it; that gradient is scaled by the number of ranks because DDP divides the parameters'
    gradients by it (nnU-Net's ``AllGatherGrad`` sums the gradient over the ranks, the same thing)."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad * dist.get_world_size()


def global_batch_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
    """1 - soft Dice per channel over the batches of all DDP ranks together (smooth 1e-5 in numerator and
    denominator, as MONAI's ``DiceLoss(batch=True)`` on one process): intersections, target sums and prediction
    sums are added over the ranks first. ``mask`` (B, 1, ...) leaves voxels out."""
    if mask is not None:
        probabilities, target = probabilities * mask, target * mask
    axes = [0] + list(range(2, probabilities.ndim))
    sums = torch.stack([(probabilities * target).sum(axes), target.sum(axes), probabilities.sum(axes)])
    intersection, ground, predicted = _SumOverRanks.apply(sums)
    return 1.0 - (2.0 * intersection + SMOOTH) / (ground + predicted + SMOOTH)


def nnunet_loss(batch_dice: bool = False, ignore_label: int | None = None, regions=None, class_weights=None):
    """nnU-Net's loss for the dataset's kind of labels: Dice + BCE on sigmoid outputs when ``regions`` (a list of
    label lists, one per output channel) is given, else Dice + CE on softmax outputs, class-weighted on request."""
    if regions:
        if class_weights:
            raise ValueError("class_weights apply to label-based datasets; region-based training has no classes")
        return NnUNetRegionDiceBCE(regions, batch_dice, ignore_label)
    return NnUNetDiceCE(batch_dice, ignore_label, class_weights)


class NnUNetDiceCE(nn.Module):
    """nnU-Net's loss on one output: cross-entropy minus soft Dice (softmax, background excluded, smooth 1e-5), both
    weighted 1.0, on a label-map target. nnU-Net's Dice term is -Dice (MONAI's is 1 - Dice): the offset changes no
    gradient, but keeps the logged loss comparable with nnU-Net's (a perfect prediction gives -1).

    With ``ignore_label`` the ignored voxels are masked out of both terms, and cross-entropy is skipped when a batch
    has no annotated voxel.

    ``class_weights`` (one per output class, background first) is the DIAG fork's weighted Dice + CE: the
    cross-entropy is torch's weighted mean (each voxel weighted by its true class's weight, divided by the sum of
    those weights), and the Dice term is the weighted mean of the foreground classes' Dice
    (sum of w_c * Dice_c over sum of w_c; the background weight acts on the cross-entropy only).
    """

    def __init__(self, batch_dice: bool = False, ignore_label: int | None = None, class_weights=None):
        super().__init__()
        self.ignore_label, self.batch_dice = ignore_label, batch_dice
        weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        if weights is not None and (weights.ndim != 1 or (weights < 0).any() or weights[1:].sum() <= 0):
            raise ValueError(f"class_weights must be non-negative, one per class, not all zero: {class_weights}")
        self.register_buffer("class_weights", weights)
        reduction = "mean" if weights is None else "none"
        kwargs = dict(include_background=False, softmax=True, batch=batch_dice, smooth_nr=SMOOTH, smooth_dr=SMOOTH,
                      reduction=reduction)
        self.dice = DiceLoss(**kwargs) if ignore_label is None else MaskedDiceLoss(**kwargs)

    def _dice_term(self, logits, onehot, mask=None) -> torch.Tensor:
        if self.batch_dice and _distributed():
            dice = global_batch_dice_loss(torch.softmax(logits, 1)[:, 1:], onehot[:, 1:], mask)
            dice = dice if self.class_weights is not None else dice.mean()
        else:
            dice = self.dice(logits, onehot) if mask is None else self.dice(logits, onehot, mask)
        if self.class_weights is not None:
            if len(self.class_weights) != logits.shape[1]:
                raise ValueError(f"class_weights has {len(self.class_weights)} entries for {logits.shape[1]} classes")
            foreground = self.class_weights[1:].to(dice)
            per_class = dice.reshape(-1, logits.shape[1] - 1)  # (samples or 1, foreground classes)
            dice = (per_class * foreground).sum(1).mean() / foreground.sum()
        return dice - 1.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        weight = None if self.class_weights is None else self.class_weights.to(logits)
        if self.ignore_label is None:
            onehot = torch.zeros_like(logits).scatter_(1, target, 1.0)
            return self._dice_term(logits, onehot) + F.cross_entropy(logits, target[:, 0], weight=weight)
        mask = target != self.ignore_label
        onehot = torch.zeros_like(logits).scatter_(1, torch.where(mask, target, torch.zeros_like(target)), 1.0)
        dice = self._dice_term(logits, onehot, mask.to(logits.dtype))
        if not mask.any():
            return dice
        return dice + F.cross_entropy(logits, target[:, 0], weight=weight, ignore_index=self.ignore_label)


def region_masks(label_map: torch.Tensor, regions) -> torch.Tensor:
    """(B, 1, ...) label map -> (B, R, ...) float masks, channel r = voxels whose label is in ``regions[r]``."""
    label_map = label_map[:, 0].round().long()
    masks = [torch.isin(label_map, torch.as_tensor(list(region), device=label_map.device)) for region in regions]
    return torch.stack(masks, 1).float()


class NnUNetRegionDiceBCE(nn.Module):
    """nnU-Net's region loss on one output: BCE-with-logits minus soft Dice on the sigmoid (every region, smooth
    1e-5), both weighted 1.0; the target is the label map, turned into one binary mask per region.

    With ``ignore_label`` the ignored voxels are masked out of the Dice, and the BCE is summed over the regions and
    the annotated voxels, then divided by the number of annotated voxels, as nnU-Net's ``DC_and_BCE_loss`` does.
    """

    def __init__(self, regions, batch_dice: bool = False, ignore_label: int | None = None):
        super().__init__()
        self.regions = [[int(v) for v in (r if isinstance(r, (list, tuple)) else [r])] for r in regions]
        self.ignore_label, self.batch_dice = ignore_label, batch_dice
        kwargs = dict(include_background=True, sigmoid=True, batch=batch_dice, smooth_nr=SMOOTH, smooth_dr=SMOOTH)
        self.dice = DiceLoss(**kwargs) if ignore_label is None else MaskedDiceLoss(**kwargs)

    def _dice_term(self, logits, masks, annotated=None) -> torch.Tensor:
        if self.batch_dice and _distributed():
            return global_batch_dice_loss(torch.sigmoid(logits), masks, annotated).mean() - 1.0
        return (self.dice(logits, masks) if annotated is None else self.dice(logits, masks, annotated)) - 1.0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        masks = region_masks(target, self.regions).to(logits.dtype)
        if self.ignore_label is None:
            return self._dice_term(logits, masks) + F.binary_cross_entropy_with_logits(logits, masks)
        annotated = (target.round() != self.ignore_label).to(logits.dtype)
        dice = self._dice_term(logits, masks, annotated)
        bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none") * annotated
        return dice + bce.sum() / torch.clamp(annotated.sum(), min=1e-8)


class DeepSupervisedLoss(nn.Module):
    """``loss`` (any ``(output, label map)`` loss) over the network's deep-supervision outputs, with nnU-Net's
    weights; a network without deep supervision gets ``loss`` itself.

    With a ``classification_loss`` (a multi-task bundle, ``scripts.classification``) the output ends with the class
    logits and the target is ``{"label": label map, "class": classes}``: that loss of the logits is added."""

    def __init__(self, loss: nn.Module, num_outputs: int, classification_loss: nn.Module | None = None):
        super().__init__()
        self.loss = loss
        self.weights = deep_supervision_weights(num_outputs)
        self.deep_supervision = DeepSupervisionLoss(self.loss, weights=self.weights)
        self.classification_loss = classification_loss

    def forward(self, output, target) -> torch.Tensor:
        if self.classification_loss is None:
            return self.segmentation(output, target)
        *segmentation, logits = output
        return self.segmentation(segmentation, target["label"]) + self.classification_loss(logits, target["class"])

    def segmentation(self, output, target: torch.Tensor) -> torch.Tensor:
        outputs = split_deep_supervision(output, target.ndim - 2)
        if len(outputs) == 1:
            return self.loss(outputs[0], target)
        return self.deep_supervision(outputs, target.float())
