"""Inference pieces MONAI lacks: mirroring TTA and slice-by-slice 2-D prediction inside a ``SlidingWindowInferer``,
saving probabilities for ensembling, and the end-of-training prediction of a fold's validation cases.

TTA and the 2-D handling live in the inferer, not the network, so that ``network_def`` stays the plain network whose
state dict is ``models/model.pt``: MONAI Label, MONAI Deploy and ``ckpt_export`` load it as it is, and every consumer
that calls ``inferer(inputs, network)`` gets nnU-Net's prediction.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import MapTransform
from torch import nn

from .networks import MirrorTTA


class SliceWise(nn.Module):
    """Runs a 2-D network on (B, C, 1, H, W) windows, so 2-D configurations predict a volume slice by slice."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x[:, :, 0]).unsqueeze(2)


TTA_BATCH_BUDGET = 2 * 2**30  # bytes of activations a batched TTA pass may take on a CPU


def tta_batch_size(network, roi_size, passes: int, device, budget: int = TTA_BATCH_BUDGET) -> int:
    """How many mirrored passes run as one batch: on a CPU as many as an estimate of their activations allows
    (window voxels x the first convolution's channels x 4 bytes x 8 live tensors per pass); elsewhere 1."""
    if getattr(device, "type", device) != "cpu" or not isinstance(network, nn.Module):
        return 1
    convs = [m for m in network.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    features = convs[0].out_channels if convs else 32
    per_pass = int(np.prod(roi_size)) * features * 4 * 8
    return int(max(1, min(passes, budget // max(per_pass, 1))))


class NnUNetInferer(SlidingWindowInferer):
    """``SlidingWindowInferer`` (overlap 0.5, Gaussian sigma 1/8 by default) plus nnU-Net's mirroring TTA.

    ``mirror_axes`` are spatial axes of the patch ((0, 1, 2) for 3-D, (0, 1) for 2-D; ``()`` disables TTA). With
    ``two_d`` the window is one slice thick and the network sees 2-D slices. ``tta_batch``: mirrored passes per
    forward; 0 (default) lets ``tta_batch_size`` choose (batched on CPUs, where it is about twice as fast).
    """

    def __init__(self, roi_size, mirror_axes=(), two_d: bool = False, overlap: float = 0.5, mode: str = "gaussian",
                 sigma_scale: float = 0.125, sw_batch_size: int = 1, tta_batch: int = 0, **kwargs):
        self.two_d = two_d
        self.mirror_axes = tuple(int(a) + (1 if two_d else 0) for a in mirror_axes)
        self.tta_batch = int(tta_batch)
        roi = [1, *roi_size] if two_d else list(roi_size)
        super().__init__(roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode,
                         sigma_scale=sigma_scale, **kwargs)

    def __call__(self, inputs, network, *args, **kwargs):
        passes = 2 ** len(self.mirror_axes)
        batch = self.tta_batch or tta_batch_size(network, self.roi_size, passes, inputs.device)
        network = SliceWise(network) if self.two_d else network
        if self.mirror_axes:
            network = MirrorTTA(network, self.mirror_axes, batch=batch)
        return super().__call__(inputs, network, *args, **kwargs)


class SaveProbabilitiesd(MapTransform):
    """Writes ``CASE.npz`` with ``probabilities`` (C, z, y, x), the layout of nnU-Net's ``--save_probabilities``."""

    def __init__(self, keys, output_dir, name_key: str = "image", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.name_key = name_key

    def __call__(self, data):
        from .data import case_name

        d = dict(data)
        for key in self.key_iterator(d):
            case = case_name(getattr(d[self.name_key], "meta", {}))["subject"]
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.output_dir / f".{case}.{os.getpid()}.npz"
            np.savez_compressed(tmp, probabilities=np.asarray(d[key], dtype=np.float32))
            os.replace(tmp, self.output_dir / f"{case}.npz")
        return d


def predict_validation(bundle_root, datalist: list, output_dir, device=None, save_probabilities: bool = False,
                       network_def=None) -> dict | None:
    """Predict a run's validation data with ``configs/inference.json`` and evaluate it (``summary.json``).

    ``datalist`` is what the run validated on (``validate#dataset#data``: the fold's cases, or the list MONAI Label
    hands over), items with ``image`` (one file or a list of channel files), ``label`` and, for a cascade, ``prev``.
    ``network_def`` is the training config's network, so that a network replaced in training (an extra config file)
    is the one predicting; ``models/model.pt`` is loaded into it. Without validation data it logs that and returns
    None.
    """
    from monai.bundle import ConfigWorkflow

    from .data import case_of
    from .evaluation import evaluate_files

    if not datalist:
        logging.getLogger(__name__).info("no validation data: the final validation is skipped")
        return None
    bundle_root = Path(bundle_root)
    config = json.loads((bundle_root / "configs" / "inference.json").read_text())
    items = [{k: v for k, v in item.items() if k in ("image", "prev")} for item in datalist]
    overrides = {"bundle_root": str(bundle_root), "output_dir": str(output_dir), "datalist": items,
                 "save_probabilities": save_probabilities}
    if device is not None:
        overrides["device"] = device
    if network_def is not None:
        overrides["network_def"] = network_def
    workflow = ConfigWorkflow(config_file=str(bundle_root / "configs" / "inference.json"),
                              meta_file=str(bundle_root / "configs" / "metadata.json"), logging_file=False,
                              workflow_type="infer", **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    pairs = [(str(item["label"]), os.path.join(str(output_dir), case_of(item) + config["file_ending"]))
             for item in datalist]
    labels = config["labels"]
    summary = evaluate_files(pairs, labels, ignore_label=labels.get("ignore"),
                             output_file=str(Path(output_dir) / "summary.json"))
    record_eval_metrics(bundle_root / "configs" / "metadata.json", summary, labels)
    return summary


def record_eval_metrics(metadata_file, summary: dict, labels: dict) -> dict:
    """Writes ``eval_metrics`` into metadata.json from a validation ``summary.json`` (the Dice of the weights the
    bundle ships, which the model zoo asks for), atomically; returns the metrics."""
    names = {str(v): k for k, v in labels.items() if not isinstance(v, list)}
    metrics = {"mean_dice": summary["foreground_mean"]["Dice"], "validation_cases": len(summary["metric_per_case"])}
    metrics.update({f"dice_{names.get(label, label)}": values["Dice"] for label, values in summary["mean"].items()})
    meta = json.loads(Path(metadata_file).read_text())
    meta["eval_metrics"] = metrics
    tmp = Path(metadata_file).with_name(f".metadata.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=4))
    os.replace(tmp, metadata_file)
    return metrics
