"""nnU-Net's online validation metric: pseudo-Dice with an exponential moving average (spec 5.5).

TP/FP/FN are summed over all validation batches of an epoch (not averaged per case), per foreground class, on the
argmax of the highest-resolution output (per region on its sigmoid > 0.5, for region-based training); ignore-label
voxels are masked. The reported value is the EMA over epochs
(0.9 old + 0.1 new), which selects ``model_best.pt``. MONAI's DiceMetric averages per sample, hence this metric.
"""

from __future__ import annotations

import math

import torch
from ignite.metrics import Metric
from monai.handlers import from_engine


def segmentation_output(output):
    """``(prediction, label map)`` of an engine's output; of a multi-task network's (the prediction ends with the
    class logits, the label is ``{"label": label map, "class": classes}``) the segmentation's."""
    pred, label = from_engine(["pred", "label"])(output)
    if isinstance(label, dict):
        pred, label = pred[0], label["label"]
    return pred, label


class PseudoDice(Metric):
    def __init__(self, num_classes: int, ignore_label: int | None = None, ema_momentum: float = 0.9,
                 output_transform=segmentation_output, device="cpu", regions=None):
        self.num_classes = num_classes
        self.regions = regions
        self.ignore_label = ignore_label
        self.momentum = ema_momentum
        self.ema = None
        self.last_per_class: list[float] = []
        self.last_mean = float("nan")
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self.counts = None  # (foreground class, [TP, FP, FN]) on the prediction's device until compute()

    def update(self, output):
        pred, label = output
        pred = torch.stack(list(pred)) if isinstance(pred, (list, tuple)) else pred
        label = torch.stack(list(label)) if isinstance(label, (list, tuple)) else label
        label = label.detach()[:, 0].round().long()
        valid = label != self.ignore_label if self.ignore_label is not None else torch.ones_like(label, dtype=torch.bool)
        if self.regions:  # one sigmoid output per region (logit > 0 is sigmoid > 0.5)
            predicted = [pred[:, r] > 0 for r in range(len(self.regions))]
            truth = [torch.isin(label, torch.as_tensor(list(r), device=label.device)) for r in self.regions]
        else:
            pred = pred.detach().argmax(1)
            predicted = [pred == c for c in range(1, self.num_classes)]
            truth = [label == c for c in range(1, self.num_classes)]
        rows = []
        for p, t in zip(predicted, truth):
            p, t = p & valid, t & valid
            rows.append(torch.stack([(p & t).sum(), (p & ~t).sum(), (~p & t).sum()]))
        counts = torch.stack(rows)  # summed without reading back to the host, which would wait for the GPU per batch
        self.counts = counts if self.counts is None else self.counts + counts

    def compute(self) -> float:
        channels = len(self.regions) if self.regions else self.num_classes - 1
        counts = torch.zeros(channels, 3) if self.counts is None else self.counts.double().cpu()
        per_class = [float(2 * tp / (2 * tp + fp + fn)) if 2 * tp + fp + fn > 0 else float("nan")
                     for tp, fp, fn in counts.tolist()]
        valid = [v for v in per_class if not math.isnan(v)]
        self.last_per_class = per_class
        self.last_mean = sum(valid) / len(valid) if valid else float("nan")
        if not math.isnan(self.last_mean):
            self.ema = self.last_mean if self.ema is None else self.momentum * self.ema + (1 - self.momentum) * self.last_mean
        return self.ema if self.ema is not None else float("nan")
