"""Multi-task bundles: segmentation plus one class per case (a lesion subtype), trained and predicted together.

Every bundle template holds the wiring, switched off by ``classification_head: null``: the network factory
(``scripts.networks.network_from_plan``) builds ``multitask_from_plan``'s network when a head is set, and the
classification pieces here (``ClassificationLoss``, ``MultiTaskPrepareBatch``, ``ClassificationMetric``) are
components disabled without a head; ``DeepSupervisedLoss``, ``TrainingProgress``, ``NnUNetInferer`` and
``EnsembleInferer`` take them, or a multi-task network, when there are; ``ClassificationOutputd`` does nothing
when the inferer has no class probabilities.

The network (``multitask_from_plan``) is the plan's segmentation network (DynUNet, PlainConvUNet or ResEnc U-Net,
state-dict keys unchanged) plus ``classification.*``: a head on the encoder's features.

* ``simple``: the deepest encoder stage's features, average- and max-pooled, into a small MLP.
* ``roi``: the deepest features scaled by the lesion mask (resized to that stage's grid and Gaussian-smoothed)
  before pooling: a mask-weighted average and a max. The mask is the reference lesion in training and the
  network's own predicted lesion probability otherwise.
* ``attention``: a small classification encoder on the image that, at every depth, receives the segmentation
  encoder's features through an attention gate (a per-voxel sigmoid gate computed from both streams), then the
  ``roi`` scaling and pooling on its deepest features.

The lesion is the union of ``lesion_labels`` (default: every foreground label). ``forward(x)`` is exactly the
segmentation network's (what the model zoo's checks, TorchScript, ONNX, MONAI Label and MONAI Deploy call);
``forward(x, lesion, with_class=True)`` returns the segmentation output(s) followed by the class logits (B, K) as
one list, which training (``MultiTaskPrepareBatch`` passes the keyword arguments) and inference use.

Inference (``scripts.inference.NnUNetInferer``) runs the usual sliding window with mirroring TTA. Each window pass
(every window, every mirrored copy) also gives class probabilities (softmax of its logits) and a weight, the
predicted lesion mass of that pass (the sum over its voxels of the lesion probability) plus ``EMPTY_WEIGHT``
(``WindowRecorder``); the case's probabilities are the weighted mean (``aggregate_class_probabilities``), so windows
that see the lesion decide, and a case without any predicted lesion gets the plain mean. ``ClassificationOutputd``
(the postprocessing's ``classification_output``) writes the case's row to ``classification.csv`` in ``output_dir``:
``case,class,p_0,...,p_{K-1}``.
"""

import csv
import io
import math
import os
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from ignite.metrics import Metric
from monai.networks.nets import DynUNet
from monai.transforms import MapTransform
from torch import nn

from .networks import (ConvNormAct, NativeResolutionDynUNet, PlainConvUNet, ResidualEncoderUNet, _per_axis,
                       network_from_plan)

HEADS = ("simple", "roi", "attention")
EMPTY_WEIGHT = 1e-3  # voxels of lesion mass every window pass has, so that lesion-free cases average evenly
CSV_NAME = "classification.csv"


# --- the head --------------------------------------------------------------------------------------------------
def gaussian_kernel(sigma: float, spatial_dims: int) -> torch.Tensor:
    """A normalised (1, 1, k, ...) Gaussian of ``sigma`` voxels, k = 2 * ceil(2 sigma) + 1 (k = 1 for sigma 0)."""
    radius = int(math.ceil(2 * sigma)) if sigma > 0 else 0
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2) if sigma > 0 else torch.ones(1)
    kernel = g
    for _ in range(spatial_dims - 1):
        kernel = kernel[..., None] * g
    return (kernel / kernel.sum())[None, None]


class ClassificationHead(nn.Module):
    """Class logits (B, K) from the image, the segmentation encoder's stage outputs and a lesion mask (B, 1, ...)."""

    def __init__(self, kind: str, spatial_dims: int, in_channels: int, features_per_stage, strides, kernel_sizes,
                 num_classes: int, sigma: float = 1.0):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"classification head must be one of {', '.join(HEADS)}, got {kind!r}")
        if num_classes < 2:
            raise ValueError(f"a classification needs at least 2 classes, got {num_classes}")
        self.kind = kind
        self.spatial_dims = spatial_dims
        self.use_mask = kind != "simple"
        features = [int(f) for f in features_per_stage]
        self.register_buffer("kernel", gaussian_kernel(float(sigma), spatial_dims), persistent=False)
        self.padding = (self.kernel.shape[-1] - 1) // 2
        widths = [max(8, f // 4) for f in features]
        self.stages = nn.ModuleList()
        self.gates_x = nn.ModuleList()
        self.gates_g = nn.ModuleList()
        self.gates_psi = nn.ModuleList()
        self.projections = nn.ModuleList()
        if kind == "attention":
            previous = in_channels
            conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
            for f, w, stride, kernel in zip(features, widths, strides, kernel_sizes):
                self.stages.append(ConvNormAct(spatial_dims, previous, w, kernel, _per_axis(stride, spatial_dims)))
                self.gates_x.append(conv(f, w, 1))
                self.gates_g.append(conv(w, w, 1))
                self.gates_psi.append(conv(w, 1, 1))
                self.projections.append(conv(f, w, 1))
                previous = w
            pooled = 2 * widths[-1]
        else:
            pooled = 2 * features[-1]
        hidden = max(32, min(256, pooled))
        self.classifier = nn.Sequential(nn.Linear(pooled, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, num_classes))

    def smooth(self, mask: torch.Tensor, shape: List[int]) -> torch.Tensor:
        """The mask averaged onto a stage's grid, then Gaussian-smoothed."""
        if self.spatial_dims == 3:
            mask = F.adaptive_avg_pool3d(mask, shape)
            return F.conv3d(mask, self.kernel.to(mask.dtype), padding=self.padding)
        mask = F.adaptive_avg_pool2d(mask, shape)
        return F.conv2d(mask, self.kernel.to(mask.dtype), padding=self.padding)

    def pool(self, features: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        flat = features.flatten(2)
        if mask is None:
            return torch.cat([flat.mean(2), flat.amax(2)], 1)
        weights = self.smooth(mask.to(features.dtype), list(features.shape[2:])).flatten(2)
        scaled = flat * weights
        average = scaled.sum(2) / (weights.sum(2) + 1e-6)
        return torch.cat([average, scaled.amax(2)], 1)

    def forward(self, image: torch.Tensor, features: List[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "attention":
            x = image
            i = 0
            for stage, gx, gg, psi, projection in zip(self.stages, self.gates_x, self.gates_g, self.gates_psi,
                                                      self.projections):
                x = stage(x)
                seg = features[i]
                if seg.shape[2:] != x.shape[2:]:  # odd sizes: the two encoders may round differently
                    seg = F.interpolate(seg, size=x.shape[2:])
                gate = torch.sigmoid(psi(F.leaky_relu(gx(seg) + gg(x), 0.01)))
                x = x + projection(gate * seg)
                i += 1
            return self.classifier(self.pool(x, mask))
        deepest = features[len(features) - 1]
        return self.classifier(self.pool(deepest, mask if self.use_mask else None))


# --- the multi-task networks -----------------------------------------------------------------------------------
class _MultiTask:
    """``forward`` of every multi-task network; the subclasses say how to encode and decode."""

    lesion_channels: List[int]

    def forward(self, x: torch.Tensor, lesion: Optional[torch.Tensor] = None,
                with_class: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        ds = self.training and self.deep_supervision
        features = self._encode(x)
        outputs = self._decode(features, ds)
        if not with_class:
            if ds:
                return outputs
            return outputs[0]
        if lesion is None:
            probabilities = torch.softmax(outputs[0].detach().float(), 1)
            channels = torch.tensor(self.lesion_channels, dtype=torch.long, device=x.device)
            mask = torch.index_select(probabilities, 1, channels).sum(1, keepdim=True)
        else:
            mask = lesion.float()
        logits = self.classification(x, features, mask)
        if ds:
            return outputs + [logits]
        return [outputs[0], logits]


class _EncoderDecoderMultiTask(_MultiTask):
    def _encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.encoder(x)

    def _decode(self, features: List[torch.Tensor], ds: bool) -> List[torch.Tensor]:
        return self.decoder(features, ds)


class MultiTaskPlainConvUNet(_EncoderDecoderMultiTask, PlainConvUNet):
    pass


class MultiTaskResidualEncoderUNet(_EncoderDecoderMultiTask, ResidualEncoderUNet):
    pass


class MultiTaskDynUNet(_MultiTask, NativeResolutionDynUNet):
    """``NativeResolutionDynUNet`` whose walk is split at the bottleneck, so the head sees every stage."""

    def _encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        skips: List[torch.Tensor] = [self.input_block(x)]
        for down in self.downsamples:
            skips.append(down(skips[-1]))
        skips.append(self.bottleneck(skips[-1]))
        return skips

    def _decode(self, features: List[torch.Tensor], ds: bool) -> List[torch.Tensor]:
        n = len(features) - 1  # the last one is the bottleneck's output
        x = features[n]
        decoded: List[torch.Tensor] = []
        for up in self.upsamples:
            x = up(x, features[n - 1 - len(decoded)])
            decoded.append(x)
        out = self.output_block(x)
        if not ds:
            return [out]
        outputs: List[torch.Tensor] = [out]
        for head in self.deep_supervision_heads:
            outputs.append(head(decoded[len(decoded) - 1 - len(outputs)]))
        return outputs


MULTITASK_CLASSES = {NativeResolutionDynUNet: MultiTaskDynUNet, PlainConvUNet: MultiTaskPlainConvUNet,
                     ResidualEncoderUNet: MultiTaskResidualEncoderUNet}


def _stage_settings(network: nn.Module, arch_kwargs: dict):
    """(stage widths, strides, kernel sizes) of the network's encoder, deepest last, as ``_encode`` returns them."""
    if isinstance(network, DynUNet):
        return list(network.filters), list(network.strides), list(network.kernel_size)
    return list(arch_kwargs["features_per_stage"]), list(arch_kwargs["strides"]), list(arch_kwargs["kernel_sizes"])


def multitask_from_plan(plan_configuration: dict, in_channels: int, out_channels: int, deep_supervision: bool = True,
                        head: str = "roi", num_classification_classes: int = 2, lesion_labels=(1,),
                        sigma: float = 1.0) -> nn.Module:
    """The plan's segmentation network (``scripts.networks.network_from_plan``) with a classification head.

    The segmentation part keeps its class's modules and state-dict keys (an nnU-Net or segmentation-only checkpoint
    loads with ``strict=False``, leaving ``classification.*`` initialised); ``lesion_labels`` are the label values
    (= output channels) whose union is the lesion.
    """
    network = network_from_plan(plan_configuration, in_channels, out_channels, deep_supervision)
    arch = plan_configuration.get("architecture", plan_configuration)["arch_kwargs"]
    widths, strides, kernels = _stage_settings(network, arch)
    spatial_dims = len(_per_axis_list(kernels[0]))
    channels = [int(v) for v in lesion_labels]
    if not channels or any(c < 1 or c >= out_channels for c in channels):
        raise ValueError(f"lesion_labels {channels} must be foreground labels 1..{out_channels - 1}")
    network.__class__ = MULTITASK_CLASSES[type(network)]
    network.lesion_channels = channels
    network.classification = ClassificationHead(head, spatial_dims, in_channels, widths, strides, kernels,
                                                int(num_classification_classes), float(sigma))
    return network


def _per_axis_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def is_multitask(network) -> bool:
    """Whether ``network`` (possibly wrapped by DDP, DataParallel or torch.compile) has a classification head."""
    for attribute in ("module", "_orig_mod"):
        network = getattr(network, attribute, network)
    return isinstance(network, _MultiTask)


# --- training --------------------------------------------------------------------------------------------------
class MultiTaskPrepareBatch:
    """The engines' ``prepare_batch``: image, targets ``{"label": label map, "class": (B,) class or -1}`` and the
    network's keyword arguments (``with_class``; in training, ``lesion`` = the reference lesion mask).

    The class of a case comes from ``case_classes`` (the bundle's id of that name) by the batch's ``case`` entries;
    a case without a class (e.g. one MONAI Label hands over) gets -1, which the loss and the metric ignore.
    """

    def __init__(self, case_classes: dict, lesion_labels, reference_mask: bool = True):
        self.case_classes = {str(k): int(v) for k, v in (case_classes or {}).items()}
        self.lesion_labels = [int(v) for v in lesion_labels]
        self.reference_mask = reference_mask

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata["label"].to(device=device, non_blocking=non_blocking, **kwargs)
        cases = batchdata.get("case")
        cases = [cases] if isinstance(cases, str) else list(cases or [None] * image.shape[0])
        classes = torch.tensor([self.case_classes.get(str(c), -1) for c in cases], dtype=torch.long, device=device)
        network_kwargs = {"with_class": True}
        if self.reference_mask:
            network_kwargs["lesion"] = lesion_mask(label, self.lesion_labels)
        return image, {"label": label, "class": classes}, (), network_kwargs


def lesion_mask(label: torch.Tensor, lesion_labels) -> torch.Tensor:
    """(B, 1, ...) float mask of the voxels whose label is one of ``lesion_labels``."""
    values = torch.round(label)
    mask = torch.zeros_like(label, dtype=torch.float32)
    for value in lesion_labels:
        mask = mask + (values == value).float()
    return mask


def split_output(output):
    """(segmentation output(s), class logits) of a ``with_class`` forward: a list ending with the logits."""
    outputs = list(output)
    logits = outputs.pop()
    return (outputs if len(outputs) > 1 else outputs[0]), logits


class ClassificationLoss(nn.Module):
    """``weight`` x cross-entropy of the class logits (optionally class-weighted by ``class_weights``; cases of class
    -1 are left out): the ``classification_loss`` that ``scripts.losses.DeepSupervisedLoss`` adds."""

    def __init__(self, weight: float = 1.0, class_weights=None):
        super().__init__()
        self.weight = float(weight)
        self.class_weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)

    def forward(self, logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        known = classes >= 0
        if self.weight == 0 or not bool(known.any()):
            return 0.0 * logits.sum()  # every parameter stays in the graph (DDP)
        weights = None if self.class_weights is None else self.class_weights.to(logits.device)
        return self.weight * F.cross_entropy(logits.float(), classes, weight=weights, ignore_index=-1)


def classification_scores(confusion: np.ndarray) -> dict:
    """Accuracy, per-class F1 and macro-F1 of a confusion matrix (rows = reference, columns = prediction) over
    every class, F1 = 0 for a class never referenced nor predicted (scikit-learn's ``zero_division=0``)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion).astype(float)
    predicted, referenced = confusion.sum(0), confusion.sum(1)
    denominator = predicted + referenced
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    total = confusion.sum()
    return {"accuracy": float(tp.sum() / total) if total else float("nan"),
            "macro_f1": float(f1.mean()) if len(f1) else float("nan"), "f1_per_class": [float(v) for v in f1],
            "confusion_matrix": confusion.tolist(), "num_cases": int(total)}


def confusion_matrix(reference, predicted, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for r, p in zip(reference, predicted):
        matrix[int(r), int(p)] += 1
    return matrix


class ClassificationMetric(Metric):
    """Validation accuracy and macro-F1 of the class logits over an epoch's patches that hold the reference lesion
    (a patch without it carries no information on the subtype); ``compute`` returns the macro-F1."""

    required_output_keys = ("pred", "label")

    def __init__(self, num_classes: int, lesion_labels=(1,), output_transform=lambda output: output, device="cpu"):
        self.num_classes = int(num_classes)
        self.lesion_labels = [int(v) for v in lesion_labels]
        self.last_accuracy = float("nan")
        self.last_f1 = float("nan")
        super().__init__(output_transform=output_transform, device=device)

    def reset(self):
        self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

    def update(self, output):
        pred, target = output
        if not isinstance(target, dict) or not isinstance(pred, (list, tuple)):
            return
        logits, classes = pred[-1].detach(), target["class"]
        present = lesion_mask(target["label"], self.lesion_labels).flatten(1).amax(1) > 0
        use = (classes >= 0) & present.to(classes.device)
        if bool(use.any()):
            predicted = logits.argmax(1).to(classes.device)
            self.confusion += confusion_matrix(classes[use].tolist(), predicted[use].tolist(), self.num_classes)

    def compute(self) -> float:
        if self.confusion.sum() == 0:
            self.last_accuracy = self.last_f1 = float("nan")
        else:
            scores = classification_scores(self.confusion)
            self.last_accuracy, self.last_f1 = scores["accuracy"], scores["macro_f1"]
        return self.last_f1


# --- inference -------------------------------------------------------------------------------------------------
def aggregate_class_probabilities(probabilities: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The case's class probabilities (K,) from every window pass's probabilities (N, K) and weights (N,): the
    weighted mean (weights = predicted lesion mass + ``EMPTY_WEIGHT``), renormalised to sum to 1."""
    probabilities, weights = probabilities.double(), weights.double()
    mean = (probabilities * weights[:, None]).sum(0) / weights.sum()
    return mean / mean.sum()  # float32 softmax rows sum to 1 only within ~1e-7


class WindowRecorder(nn.Module):
    """Runs a multi-task network on one batch of windows: returns the segmentation logits (what the sliding window
    stitches) and records each window's class probabilities and weight."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        inner = network
        for attribute in ("module", "_orig_mod"):
            inner = getattr(inner, attribute, inner)
        self.lesion_channels = list(getattr(inner, "lesion_channels", []))
        self.probabilities: List[torch.Tensor] = []
        self.weights: List[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segmentation, logits = split_output(self.network(x, None, True))
        probabilities = torch.softmax(segmentation.float(), 1)[:, self.lesion_channels].sum(1)
        self.weights.append(probabilities.flatten(1).sum(1).detach().cpu() + EMPTY_WEIGHT)
        self.probabilities.append(torch.softmax(logits.float(), 1).detach().cpu())
        return segmentation

    def case_probabilities(self) -> torch.Tensor:
        return aggregate_class_probabilities(torch.cat(self.probabilities), torch.cat(self.weights))


# --- classification.csv ----------------------------------------------------------------------------------------
def csv_header(num_classes: int) -> list:
    return ["case", "class"] + [f"p_{k}" for k in range(num_classes)]


def read_classification_csv(path) -> dict:
    """``{case: (class, [p_0, ...])}`` from a ``classification.csv``; ValueError naming the file when malformed."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["case", "class"] or any(not c.startswith("p_") for c in rows[0][2:]):
        raise ValueError(f"{path}: not a classification.csv (header case,class,p_0,...)")
    num = len(rows[0]) - 2
    result = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != num + 2:
            raise ValueError(f"{path}: line {line} has {len(row)} fields, expected {num + 2}")
        try:
            result[row[0]] = (int(row[1]), [float(v) for v in row[2:]])
        except ValueError:
            raise ValueError(f"{path}: line {line} is not case,class,probabilities") from None
    return result


def write_classification_csv(path, rows: dict) -> Path:
    """Writes ``{case: probabilities}`` (class = argmax) as ``classification.csv``, sorted by case, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    num = len(next(iter(rows.values()))) if rows else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(num))
    for case in sorted(rows):
        p = np.asarray(rows[case], dtype=np.float64)
        writer.writerow([case, int(np.argmax(p))] + [f"{v:.8f}" for v in p])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)
    return path


def update_classification_csv(path, case: str, probabilities) -> Path:
    """Adds (or replaces) one case's row of ``classification.csv``."""
    path = Path(path)
    rows = {c: p for c, (_, p) in read_classification_csv(path).items()} if path.is_file() else {}
    if rows and len(next(iter(rows.values()))) != len(probabilities):
        rows = {}  # a file of another class count: start anew
    rows[case] = [float(v) for v in probabilities]
    return write_classification_csv(path, rows)


def average_classification_files(files, cases=None) -> dict:
    """``{case: mean probabilities}`` over several ``classification.csv`` files (the cases common to all, or
    ``cases``, each of which must be in every file)."""
    tables = [(Path(f), read_classification_csv(f)) for f in files]
    common = set.intersection(*(set(t) for _, t in tables)) if tables else set()
    wanted = sorted(common) if cases is None else list(cases)
    result = {}
    for case in wanted:
        rows = []
        for path, table in tables:
            if case not in table:
                raise ValueError(f"{path}: no row for case {case}")
            rows.append(table[case][1])
        result[case] = np.mean(np.asarray(rows, dtype=np.float64), axis=0).tolist()
    return result


class ClassificationOutputd(MapTransform):
    """First step of every bundle's ``postprocessing`` (the ``classification_output`` id): takes the case's class
    probabilities from the ``inferer``, puts them in the data (``class_probabilities``, ``class``) and writes the
    case's row to ``output_dir/classification.csv``; does nothing when the inferer has none (a segmentation-only
    bundle). A MapTransform on ``pred`` (which it leaves as it is), like the steps after it, for consumers that look
    at the first step."""

    def __init__(self, inferer, output_dir, names=(), name_key: str = "image", write: bool = True, keys="pred"):
        super().__init__(keys, allow_missing_keys=True)
        self.inferer = inferer
        self.output_dir = Path(str(output_dir))
        self.names = list(names)
        self.name_key = name_key
        self.write = write

    def __call__(self, data):
        from .data import case_name

        d = dict(data)
        probabilities = self.inferer.pop_classification() if hasattr(self.inferer, "pop_classification") else None
        if probabilities is None:
            return d
        probabilities = np.asarray(probabilities, dtype=np.float64)
        d["class_probabilities"] = probabilities
        d["class"] = int(np.argmax(probabilities))
        if self.write:
            case = case_name(getattr(d.get(self.name_key), "meta", {}))["subject"]
            update_classification_csv(self.output_dir / CSV_NAME, case, probabilities)
        return d


# --- evaluation ------------------------------------------------------------------------------------------------
def evaluate_classification(cases, csv_path, classification: dict) -> dict:
    """summary.json's ``classification`` for the evaluated ``cases``: the rows of ``csv_path``
    (``classification.csv``) against dataset.json's ``classification`` block (``names``, ``cases``).

    ``macro_f1`` is the mean F1 over every declared class (scikit-learn's ``f1_score(average="macro",
    labels=<all declared classes>, zero_division=0)``); ``confusion_matrix`` has the reference classes as rows.
    A case missing from the CSV, or without a reference class, is a ValueError naming it.
    """
    names = classification["names"]
    num_classes = len(names)
    table = read_classification_csv(csv_path)
    missing = [c for c in cases if c not in table]
    if missing:
        raise ValueError(f"{csv_path}: no row for case(s) {', '.join(missing)}")
    unknown = [c for c in cases if c not in classification["cases"]]
    if unknown:
        raise ValueError(f"dataset.json: classification 'cases' has no class for case(s) {', '.join(unknown)}")
    wrong = [c for c in cases if not 0 <= table[c][0] < num_classes]
    if wrong:
        raise ValueError(f"{csv_path}: case(s) {', '.join(wrong)} have a class outside 0..{num_classes - 1}")
    reference = [int(classification["cases"][c]) for c in cases]
    predicted = [table[c][0] for c in cases]
    scores = classification_scores(confusion_matrix(reference, predicted, num_classes))
    return {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"],
            "f1_per_class": {str(k): v for k, v in enumerate(scores["f1_per_class"])},
            "confusion_matrix": scores["confusion_matrix"], "num_cases": scores["num_cases"],
            "class_names": {str(k): names[str(k)] for k in range(num_classes)},
            "per_case": {c: {"reference": r, "predicted": p} for c, r, p in zip(cases, reference, predicted)}}


def add_to_validation(bundle_root, output_dir, summary: dict) -> dict:
    """After a bundle's final validation: adds ``classification`` to ``output_dir/summary.json`` and the
    classification scores to metadata.json's ``eval_metrics`` when the bundle's dataset has classes and the
    validation wrote ``classification.csv``. Returns the summary."""
    import json

    from .evaluation import save_summary

    bundle_root, output_dir = Path(str(bundle_root)), Path(str(output_dir))
    spec_file, csv_path = bundle_root / "configs" / "dataset.json", output_dir / CSV_NAME
    if not spec_file.is_file() or not csv_path.is_file():
        return summary
    classification = json.loads(spec_file.read_text()).get("classification")
    if not classification:
        return summary
    ending = json.loads((bundle_root / "configs" / "inference.json").read_text()).get("file_ending", ".nii.gz")
    cases = [os.path.basename(c["prediction_file"])[: -len(ending)] for c in summary["metric_per_case"]]
    summary = {**summary, "classification": evaluate_classification(cases, csv_path, classification)}
    save_summary(summary, output_dir / "summary.json")
    meta_file = bundle_root / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta.setdefault("eval_metrics", {}).update(classification_macro_f1=summary["classification"]["macro_f1"],
                                               classification_accuracy=summary["classification"]["accuracy"])
    tmp = meta_file.with_name(f".metadata.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=4))
    os.replace(tmp, meta_file)
    return summary
