"""Inference pieces MONAI lacks: nnU-Net's sliding window (tile positions and Gaussian weights) with mirroring TTA and
slice-by-slice 2-D prediction, behind ``SlidingWindowInferer``'s interface; saving probabilities for ensembling; and
the end-of-training prediction of a fold's validation cases.

TTA and the 2-D handling live in the inferer, not the network, so that ``network_def`` stays the plain network whose
state dict is ``models/model.pt``: MONAI Label, MONAI Deploy and ``ckpt_export`` load it as it is, and every consumer
that calls ``inferer(inputs, network)`` gets nnU-Net's prediction.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import gc
import itertools
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import MapTransform
from torch import nn

from .classification import WindowRecorder, is_multitask
from .networks import MirrorTTA


class SliceWise(nn.Module):
    """Runs a 2-D network on (B, C, 1, H, W) windows, so 2-D configurations predict a volume slice by slice."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x[:, :, 0]).unsqueeze(2)


def tile_starts(image_size, tile_size, overlap: float = 0.5) -> list[list[int]]:
    """Start of every sliding-window tile along each axis, placed as nnU-Net places them.

    Along an axis of length ``n`` (at least the tile's ``t``), the fewest tiles whose spacing is at most
    ``(1 - overlap) * t`` are spread evenly from 0 to ``n - t``, each start rounded half-to-even. MONAI's
    ``dense_patch_slices`` instead steps by ``int((1 - overlap) * t)`` and pushes the last tile back to the edge.
    """
    starts = []
    for n, t in zip(image_size, tile_size):
        n, t = int(n), int(t)
        if n < t:
            raise ValueError(f"image size {list(image_size)} is smaller than the tile {list(tile_size)}: pad it")
        count = int(np.ceil((n - t) / (t * (1 - overlap)))) + 1
        spacing = (n - t) / (count - 1) if count > 1 else 0.0
        starts.append([int(np.round(spacing * i)) for i in range(count)])
    return starts


def gaussian_importance(tile_size, sigma_scale: float = 0.125) -> np.ndarray:
    """nnU-Net's tile weights (float32, peak 1): a unit impulse at voxel ``t // 2`` of each axis smoothed by scipy's
    Gaussian filter (sigma ``sigma_scale * t``, zero outside the tile), divided by its maximum; exact zeros take the
    smallest positive weight. MONAI's map is centred at ``(t - 1) / 2`` instead and floored at 1e-3."""
    from scipy import ndimage

    impulse = np.zeros([int(t) for t in tile_size])
    impulse[tuple(int(t) // 2 for t in tile_size)] = 1.0
    weights = ndimage.gaussian_filter(impulse, [int(t) * sigma_scale for t in tile_size], order=0, mode="constant",
                                      cval=0.0)
    weights = (weights / weights.max()).astype(np.float32)
    if np.any(weights == 0):
        weights[weights == 0] = weights[weights > 0].min()
    return weights


_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_tuned_libc = None  # the C library whose malloc keep_freed_memory has set; None until then


def keep_freed_memory() -> bool:
    """Lets glibc's malloc keep freed blocks of up to 64 MiB (and 128 MiB of free memory at the heap's top) for
    reuse, once per process; True when it is set. A CPU sliding window allocates and frees the same activation
    buffers in every pass. By default glibc hands blocks above an adaptive threshold (32 MiB at most) back to the
    kernel and faults them in again on the next pass, which cost 6-9 % of a TTA call of Hippocampus' 3d_fullres
    network and 10-15 % of the CPU benchmark's sliding window (docs/benchmarks.md); blocks above 64 MiB, as in
    networks with 32 features on 128**3 windows, are still handed back. Off glibc, or when the user set malloc's
    thresholds in the environment, it does nothing."""
    global _tuned_libc
    if _tuned_libc is None and not any(k in os.environ for k in _MALLOC_ENV):
        try:
            glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (ValueError, OSError, AttributeError):
            glibc = ""
        if glibc.startswith("glibc"):
            libc = ctypes.CDLL(None)
            m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
            if libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 128 << 20):
                _tuned_libc = libc
    return _tuned_libc is not None


def release_freed_memory() -> None:
    """Hands the free memory that ``keep_freed_memory`` kept back to the kernel (glibc's ``malloc_trim``), so that
    the steps after a sliding window do not carry its buffers."""
    if _tuned_libc is not None:
        _tuned_libc.malloc_trim(0)


def skip_collection_at_exit() -> None:
    """At interpreter exit, skips the final garbage collection over every object alive now (the OS frees the memory
    anyway): with torch and MONAI loaded that collection takes about a second. Called from an inference config's
    ``finalize``; it changes nothing before the process exits."""
    atexit.unregister(gc.freeze)  # once, however often a process finalizes
    atexit.register(gc.freeze)


class NnUNetInferer(SlidingWindowInferer):
    """Sliding-window prediction as nnU-Net's predictor makes it, plus its mirroring TTA.

    Tiles are placed by ``tile_starts`` and weighted by ``gaussian_importance`` (``mode="gaussian"``, the default) or
    equally (``"constant"``); inputs smaller than the tile are padded symmetrically (``cval``, default 0) and the
    padding is cut off again. It keeps ``SlidingWindowInferer``'s interface (``inferer(inputs, network)``, the
    ``roi_size``, ``sw_batch_size``, ``sw_device`` and ``device`` settings) but not its tiling, which places tiles
    and weights them differently; buffered stitching and ``with_coord`` are not offered. Weights and sums are float32
    (nnU-Net accumulates in float16).

    ``mirror_axes`` are spatial axes of the patch ((0, 1, 2) for 3-D, (0, 1) for 2-D; ``()`` disables TTA). With
    ``two_d`` the window is one slice thick and the network sees 2-D slices, each slice predicted once.

    A multi-task network (``scripts.classification``) is run one image at a time and also gives the image's class
    probabilities, aggregated over every window pass; they wait in ``class_outputs`` for ``pop_classification``
    (``scripts.classification.ClassificationOutputd`` in the postprocessing). A segmentation network leaves it empty.
    """

    def __init__(self, roi_size, mirror_axes=(), two_d: bool = False, overlap: float = 0.5, mode: str = "gaussian",
                 sigma_scale: float = 0.125, sw_batch_size: int = 1, **kwargs):
        if kwargs.get("buffer_steps") or kwargs.get("with_coord"):
            raise ValueError("NnUNetInferer offers neither buffer_steps nor with_coord")
        if not 0 <= float(overlap) < 1:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.two_d = two_d
        self.mirror_axes = tuple(int(a) + (1 if two_d else 0) for a in mirror_axes)
        roi = [1, *roi_size] if two_d else list(roi_size)
        super().__init__(roi_size=roi, sw_batch_size=sw_batch_size, overlap=overlap, mode=mode,
                         sigma_scale=sigma_scale, **kwargs)
        tile = [int(t) for t in roi]
        if self.mode == "gaussian":
            weights = gaussian_importance(tile[1:] if two_d else tile, float(sigma_scale))
            self.tile_weights = torch.from_numpy(weights.reshape(tile))
        else:
            self.tile_weights = torch.ones(tile)
        self.class_outputs = collections.deque(maxlen=4096)

    def tile_slices(self, image_size) -> list[tuple]:
        """The spatial slices of every tile over an image at least as large as the tile, in nnU-Net's order."""
        tile = [int(t) for t in self.roi_size]
        if self.two_d:  # every slice once; in-plane as nnU-Net's 2-D predictor
            starts = [list(range(int(image_size[0])))] + tile_starts(image_size[1:], tile[1:], float(self.overlap))
        else:
            starts = tile_starts(image_size, tile, float(self.overlap))
        return [tuple(slice(s, s + t) for s, t in zip(corner, tile)) for corner in itertools.product(*starts)]

    def __call__(self, inputs, network, *args, **kwargs):
        if not is_multitask(network):
            return self.segment(inputs, network, *args, **kwargs)
        outputs = []
        for b in range(inputs.shape[0]):  # one image at a time, so that every window belongs to one case
            recorder = WindowRecorder(network)
            outputs.append(self.segment(inputs[b:b + 1], recorder, *args, **kwargs))
            self.class_outputs.append(recorder.case_probabilities().numpy())
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def pop_classification(self):
        """The class probabilities (K,) of the oldest image not yet popped; None when there is none."""
        return self.class_outputs.popleft() if self.class_outputs else None

    def segment(self, inputs, network, *args, **kwargs):
        """The stitched segmentation logits of ``network``'s windows."""
        network = SliceWise(network) if self.two_d else network
        if self.mirror_axes:
            network = MirrorTTA(network, self.mirror_axes)
        device = torch.device(kwargs.pop("device", None) or self.device or inputs.device)
        sw_device = torch.device(self.sw_device or inputs.device)
        if sw_device.type == "cpu":
            keep_freed_memory()
        meta = inputs if isinstance(inputs, MetaTensor) else None
        x = inputs.as_tensor() if meta is not None else torch.as_tensor(inputs)
        tile = [int(t) for t in self.roi_size]
        if x.ndim != len(tile) + 2:
            raise ValueError(f"inputs of shape {tuple(x.shape)} do not fit the {len(tile)}-D window {tile}")
        original = list(x.shape[2:])
        pad = [max(t - s, 0) for s, t in zip(original, tile)]
        if any(pad):  # symmetric, the extra voxel above (torch.nn.functional.pad lists the last axis first)
            widths = [w for p in reversed(pad) for w in (p // 2, p - p // 2)]
            x = torch.nn.functional.pad(x, widths, mode=str(self.padding_mode), value=float(self.cval))
        weights = self.tile_weights.to(device=sw_device, dtype=x.dtype)
        slices = self.tile_slices(x.shape[2:])
        total = count = None
        for b in range(x.shape[0]):
            for first in range(0, len(slices), int(self.sw_batch_size)):
                batch = slices[first:first + int(self.sw_batch_size)]
                windows = torch.cat([x[(slice(b, b + 1), slice(None), *s)] for s in batch]).to(sw_device)
                out = network(windows, *args, **kwargs)
                if not isinstance(out, torch.Tensor) or list(out.shape[2:]) != tile:
                    raise TypeError("the network must return one logits tensor with the window's spatial shape")
                out = (out * weights).to(device)
                if total is None:
                    total = torch.zeros((x.shape[0], out.shape[1], *x.shape[2:]), dtype=out.dtype, device=device)
                    count = torch.zeros(x.shape[2:], dtype=out.dtype, device=device)
                for window, s in zip(out, batch):
                    total[(b, slice(None), *s)] += window
                    if b == 0:
                        count[s] += weights.to(device)
        total /= count
        if sw_device.type == "cpu":
            release_freed_memory()
        if any(pad):
            total = total[(slice(None), slice(None), *[slice(p // 2, p // 2 + s) for p, s in zip(pad, original)])]
        if meta is not None:
            total = MetaTensor(total).copy_meta_from(meta, copy_attr=False)
        return total


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
    from .classification import add_to_validation

    return add_to_validation(bundle_root, output_dir, summary)  # a multi-task bundle's classification scores


def record_eval_metrics(metadata_file, summary: dict, labels: dict) -> dict:
    """Writes ``eval_metrics`` into metadata.json from a validation ``summary.json`` (the Dice of the weights the
    bundle ships, which the model zoo asks for), atomically; returns the metrics."""
    from .evaluation import key_to_str

    names = {key_to_str(v): k for k, v in labels.items() if k != "ignore"}
    metrics = {"mean_dice": summary["foreground_mean"]["Dice"], "validation_cases": len(summary["metric_per_case"])}
    metrics.update({f"dice_{names.get(label, label)}": values["Dice"] for label, values in summary["mean"].items()})
    meta = json.loads(Path(metadata_file).read_text())
    meta["eval_metrics"] = metrics
    tmp = Path(metadata_file).with_name(f".metadata.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=4))
    os.replace(tmp, metadata_file)
    return metrics
