"""nnU-Net's connected-component postprocessing (spec 7.3): keep the largest component of a set of labels.

``keep_largest`` is the array operation; ``KeepLargestComponentd`` applies a chosen set of steps to a label map in a
bundle's ``postprocessing`` Compose; ``accept_all_foreground`` / ``accept_label`` are the acceptance rules that
``tools/find_best.py`` uses to choose those steps on cross-validation results. MONAI's
``KeepLargestConnectedComponentd`` keeps a single component when several are equally large and defaults to a
different connectivity, so nnU-Net's rule (full connectivity, ties keep every largest component) is written here
with ``scipy.ndimage``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage


def largest_components(mask: np.ndarray) -> np.ndarray:
    """The largest connected component(s) of a boolean mask, full connectivity (26 in 3-D, 8 in 2-D).

    When several components share the largest size, all of them are kept. An empty mask comes back empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, count = ndimage.label(mask, structure=structure)
    if count == 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes == sizes.max())
    return np.isin(components, keep)


def keep_largest(seg: np.ndarray, labels, background: int = 0) -> np.ndarray:
    """nnU-Net's ``remove_all_but_largest_component_from_segmentation``: voxels of the union of ``labels`` (ints, or
    tuples of ints for regions) that lie outside that union's largest connected component(s) become ``background``.
    Returns a new array; ``seg`` is not modified."""
    seg = np.asarray(seg)
    values = []
    for label in ([labels] if isinstance(labels, (int, np.integer)) else labels):
        values.extend(int(v) for v in (label if isinstance(label, (list, tuple)) else [label]))
    mask = np.isin(seg, values)
    out = seg.copy()
    out[mask & ~largest_components(mask)] = background
    return out


def apply_postprocessing(seg: np.ndarray, keep_largest_foreground: bool = False, foreground_labels=None,
                         keep_largest_labels=()) -> np.ndarray:
    """The steps ``tools/find_best.py`` chooses, in nnU-Net's order: keep the largest component of all foreground
    (``foreground_labels``; all non-zero values when None), then of each label in ``keep_largest_labels`` in turn."""
    seg = np.asarray(seg)
    if keep_largest_foreground:
        if foreground_labels is None:
            foreground_labels = [int(v) for v in np.unique(seg) if v != 0]
        seg = keep_largest(seg, list(foreground_labels))
    for label in keep_largest_labels:
        seg = keep_largest(seg, label if isinstance(label, (list, tuple)) else [label])
    return seg


class KeepLargestComponentd(MapTransform):
    """``apply_postprocessing`` on label maps in a data dict (e.g. ``pred`` after ``AsDiscreted(argmax=True)``).

    Channel-first: each channel of a (C, *spatial) map is processed on its own (a label map has one). Type, device
    and meta data (a ``MetaTensor``'s affine and file name) are kept. With no step enabled it passes data through.
    """

    def __init__(self, keys: KeysCollection, keep_largest_foreground: bool = False, foreground_labels=None,
                 keep_largest_labels=(), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.keep_largest_foreground = bool(keep_largest_foreground)
        self.foreground_labels = None if foreground_labels is None else [int(v) for v in foreground_labels]
        self.keep_largest_labels = [tuple(v) if isinstance(v, (list, tuple)) else int(v)
                                    for v in (keep_largest_labels or ())]

    def __call__(self, data):
        d = dict(data)
        if not self.keep_largest_foreground and not self.keep_largest_labels:
            return d
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            processed = np.stack([apply_postprocessing(channel, self.keep_largest_foreground, self.foreground_labels,
                                                       self.keep_largest_labels) for channel in array])
            if isinstance(value, torch.Tensor):
                out = value.clone()  # keeps MetaTensor meta data
                out.copy_(torch.as_tensor(processed, dtype=value.dtype))
                d[key] = out
            else:
                d[key] = processed.astype(array.dtype, copy=False)
        return d


# --- acceptance rules (spec 7.3) ----------------------------------------------------------------------------------
def _dice(summary: dict, key: str) -> float:
    value = summary["mean"][key]["Dice"] if key != "foreground_mean" else summary["foreground_mean"]["Dice"]
    return float(value)


def _greater(a: float, b: float) -> bool:
    """``a > b`` with NaN never greater (as numpy's comparisons in nnU-Net)."""
    return not (math.isnan(a) or math.isnan(b)) and a > b


def _less(a: float, b: float) -> bool:
    return not (math.isnan(a) or math.isnan(b)) and a < b


def accept_all_foreground(baseline: dict, processed: dict) -> bool:
    """Keep-largest of all foreground is accepted iff the foreground mean Dice strictly increases and no label's mean
    Dice decreases. Both arguments are ``summary.json`` dicts (``evaluation.summarize`` output)."""
    if not _greater(_dice(processed, "foreground_mean"), _dice(baseline, "foreground_mean")):
        return False
    return not any(_less(_dice(processed, key), _dice(baseline, key)) for key in baseline["mean"])


def accept_label(baseline: dict, processed: dict, label) -> bool:
    """Keep-largest of one label (or region) is accepted iff that label's mean Dice strictly increases."""
    key = label if isinstance(label, str) else (str(tuple(label)) if isinstance(label, (list, tuple)) else str(label))
    return _greater(_dice(processed, key), _dice(baseline, key))
