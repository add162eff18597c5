"""Crop to the non-zero region, as nnU-Net does before fingerprinting and preprocessing (spec 2.1).

MONAI's ``CropForegroundd`` has no hole filling and does not mark the outside with -1, so this small numpy helper
is shared by the planner's fingerprint and by the bundles' preprocessing; both must crop identically.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Voxels that are non-zero in any channel, holes filled. ``data`` is (c, *spatial)."""
    return binary_fill_holes(np.any(data != 0, axis=0))


def bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """Tight half-open bounding box of a boolean mask; the whole array when the mask is empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return box


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None = None):
    """Crop ``data`` (c, *spatial) and ``seg`` (1, *spatial) to the filled non-zero mask.

    Returns ``(data, seg, bbox)``. In the cropped seg, background voxels outside the mask become -1; without a seg,
    one is made (0 inside the mask, -1 outside), as nnU-Net does.
    """
    mask = nonzero_mask(data)
    bbox = bounding_box(mask)
    window = tuple(slice(lo, hi) for lo, hi in bbox)
    data = data[(slice(None),) + window]
    mask = mask[window]
    if seg is None:
        seg = (mask.astype(np.int8) - np.int8(1))[None]  # 0 inside, -1 outside (no int64 temporary)
    else:
        seg = seg[(slice(None),) + window].copy()
        if seg.dtype.kind == "u":
            seg = seg.astype(np.int16)
        seg[(seg == 0) & ~mask[None]] = -1
    return data, seg, bbox
