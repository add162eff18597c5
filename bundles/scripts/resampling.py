"""nnU-Net's default resampling (spec 3.9), for preprocessing training data and for resampling logits back.

MONAI's ``Spacingd`` resamples in world space with its own grid conventions; nnU-Net instead resizes the voxel grid
to a target shape with skimage-style half-pixel-centre mapping, in-plane first and out-of-plane separately when the
spacing is anisotropic. Predictions only match nnU-Net's if that is reproduced, so it lives here (numpy/scipy only).

``resize`` below equals ``skimage.transform.resize(order, mode='edge', anti_aliasing=False)`` (clip included): it calls
``scipy.ndimage.zoom`` with the same arguments skimage passes, so the numbers are identical without depending on
scikit-image.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ANISO_THRESHOLD = 3


def compute_new_shape(old_shape, old_spacing, new_spacing) -> list[int]:
    """Shape after resampling from ``old_spacing`` to ``new_spacing``; Python (half-to-even) rounding as nnU-Net."""
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(f"shape {old_shape}, spacings {old_spacing} and {new_spacing} differ in length")
    return [int(round(float(o) / float(n) * int(s))) for s, o, n in zip(old_shape, old_spacing, new_spacing)]


def do_separate_z(spacing, threshold: float = ANISO_THRESHOLD) -> bool:
    """Whether a spacing is anisotropic enough (max/min > 3) to resample the low-res axis on its own."""
    return bool(np.max(spacing) / np.min(spacing) > threshold)


def lowres_axes(spacing) -> list[int]:
    """All axes that attain the maximal spacing (written as nnU-Net's ``max/s == 1`` test)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    return [int(a) for a in np.flatnonzero(np.max(spacing) / spacing == 1)]


def separate_z_axis(current_spacing, new_spacing, force_separate_z=None) -> int | None:
    """The axis to resample separately, or None for a plain 3-D resize.

    Decided from the current spacing first, then from the new one; ``force_separate_z`` overrides the decision (the
    axis then comes from the current spacing). A tie for the largest spacing means no separate axis.
    """
    if force_separate_z is not None:
        axes = lowres_axes(current_spacing) if force_separate_z else None
    elif do_separate_z(current_spacing):
        axes = lowres_axes(current_spacing)
    elif do_separate_z(new_spacing):
        axes = lowres_axes(new_spacing)
    else:
        axes = None
    return axes[0] if axes is not None and len(axes) == 1 else None


def resize(image: np.ndarray, new_shape, order: int, dtype=np.float32) -> np.ndarray:
    """skimage ``resize(order, mode='edge', anti_aliasing=False)`` (clipped to the input range) as ``dtype``.

    Same ``ndimage.zoom`` call as skimage, so the same values; output is cast to ``dtype`` (float64 keeps the exact
    values that the seg one-hot threshold needs).
    """
    new_shape = tuple(int(s) for s in new_shape)
    if image.dtype == np.float16:  # scipy cannot read float16; float32 holds it exactly
        image = image.astype(np.float32)
    factors = [1 / (i / o) for i, o in zip(image.shape, new_shape)]  # exactly skimage's zoom factors
    out = ndimage.zoom(image, factors, output=dtype, order=order, mode="nearest", grid_mode=True)
    if out.shape != new_shape:  # cannot happen for sane shapes; guard against silent misalignment
        raise RuntimeError(f"zoom produced {out.shape}, expected {new_shape}")
    lo = np.min(image)
    lo, hi = (np.nanmin(image), np.nanmax(image)) if np.isnan(lo) else (lo, np.max(image))
    np.clip(out, lo, hi, out=out)
    return out


def resize_segmentation(seg: np.ndarray, new_shape, order: int) -> np.ndarray:
    """Resize a label map as batchgenerators 0.25.5 (nnU-Net 2.8.1's resampler) does. Keeps ``seg.dtype``.

    Order 0 is nearest. Otherwise every label's indicator (-1 included) is resized with ``order`` and each voxel takes
    the label scoring highest; where several labels share the top score, the nearest-neighbour label wins if it is
    one of them (and scores above 0), else the smallest of them. Older batchgenerators releases, and the reference
    spec, threshold each indicator at 0.5 instead (later labels overwrite, unreached voxels stay 0); nnU-Net 2.8.1's
    own preprocessed arrays (tests/test_nnunet_preprocessing.py) follow the argmax.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if seg.shape == new_shape:
        return seg.copy()
    if seg.size == 0:
        return np.zeros(new_shape, dtype=seg.dtype)
    nearest = resize(seg, new_shape, 0, dtype=np.float64)
    if order == 0:
        return nearest.astype(seg.dtype)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(new_shape, labels[0], dtype=seg.dtype)
    best = winner = None
    nearest_score = np.zeros(new_shape)  # the score of the nearest-neighbour label at each voxel
    for index, label in enumerate(labels):
        score = resize((seg == label).astype(np.float32), new_shape, order, dtype=np.float64)
        at_nearest = nearest == label
        nearest_score[at_nearest] = score[at_nearest]
        if best is None:
            best, winner = score, np.zeros(new_shape, dtype=np.intp)
        else:
            winner[score > best] = index  # strict: ties stay with the smaller label
            np.maximum(best, score, out=best)
    out = labels[winner].astype(seg.dtype)
    tied = (nearest_score == best) & (best > 0)
    out[tied] = nearest[tied]
    return out


def _axis_coordinates(old_len: int, new_len: int) -> np.ndarray:
    """Half-pixel-centre source coordinates along one axis, computed with nnU-Net's exact arithmetic."""
    scale = float(old_len) / new_len
    return scale * (np.arange(new_len) + 0.5) - 0.5


def _resample_axis(vol: np.ndarray, axis: int, new_len: int, order: int) -> np.ndarray:
    """``map_coordinates(order, mode='nearest')`` along one axis only (the others are identity).

    Order 0 picks whole slices (the index scipy would choose); order 1 interpolates plane by plane. Both equal
    nnU-Net's full 3-D call without its (3, *shape) float64 coordinate grid. Spline orders >= 2 prefilter the whole
    volume, so they make that full call (rare: nnU-Net's default ``order_z`` is 0).
    """
    coords = _axis_coordinates(vol.shape[axis], new_len)
    if order == 0:
        idx = ndimage.map_coordinates(np.arange(vol.shape[axis], dtype=np.float64), coords[None], order=0,
                                      mode="nearest").astype(np.intp)
        return np.take(vol, idx, axis=axis)
    if order >= 2:
        axes = [coords if a == axis else np.arange(n, dtype=np.float64) for a, n in enumerate(vol.shape)]
        return ndimage.map_coordinates(vol, np.meshgrid(*axes, indexing="ij"), order=order, mode="nearest")
    moved = np.moveaxis(vol, axis, 0)
    out = np.empty((new_len,) + moved.shape[1:], dtype=np.float64)
    grid = np.meshgrid(coords, np.arange(moved.shape[2], dtype=np.float64), indexing="ij")
    for j in range(moved.shape[1]):
        out[:, j] = ndimage.map_coordinates(moved[:, j], grid, order=1, mode="nearest")
    return np.moveaxis(out, 0, axis)


def _resample_separate_z(vol: np.ndarray, new_shape: tuple, axis: int, is_seg: bool, order: int, order_z: int):
    """In-plane resize of every slice along ``axis`` with ``order``, then that axis alone with ``order_z``."""
    plane_shape = tuple(s for a, s in enumerate(new_shape) if a != axis)
    changes_z = vol.shape[axis] != new_shape[axis]
    inter_shape = list(new_shape)
    inter_shape[axis] = vol.shape[axis]
    # float64 in between only where it can matter (interpolating data along z), as nnU-Net keeps it float64
    inter_dtype = vol.dtype if is_seg else (np.float64 if changes_z and order_z > 0 else np.float32)
    if tuple(s for a, s in enumerate(vol.shape) if a != axis) == plane_shape:
        inter = vol.astype(inter_dtype)  # in-plane resize to the same shape is the identity
    else:
        inter = np.empty(inter_shape, dtype=inter_dtype)
        for i in range(vol.shape[axis]):
            index = (slice(None),) * axis + (i,)
            plane = vol[index]
            inter[index] = resize_segmentation(plane, plane_shape, order) if is_seg else resize(plane, plane_shape,
                                                                                                 order, inter_dtype)
    if not changes_z:
        return inter
    if not is_seg or order_z == 0:
        return _resample_axis(inter, axis, new_shape[axis], order_z)
    out = np.zeros(new_shape, dtype=vol.dtype)
    for label in np.unique(inter):
        mask = _resample_axis((inter == label).astype(np.float64), axis, new_shape[axis], order_z)
        out[np.round(mask) > 0.5] = label
    return out


def resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg: bool = False,
                                  order: int = 3, order_z: int = 0, force_separate_z=None):
    """nnU-Net's ``resample_data_or_seg_to_shape``: resample ``data`` (c, x, y, z) to ``new_shape``.

    Returns ``data`` itself when the shape already matches. Data comes back float32; segmentations
    (``is_seg=True``) keep their dtype. See ``separate_z_axis`` for when the low-res axis is handled on its own.
    """
    if hasattr(data, "detach"):  # torch tensor
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (c, x, y, z), got shape {data.shape}")
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != 3:
        raise ValueError(f"new_shape must have 3 entries, got {new_shape}")
    if data.shape[1:] == new_shape:
        return data
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z)
    out = np.empty((data.shape[0],) + new_shape, dtype=data.dtype if is_seg else np.float32)
    for c in range(data.shape[0]):
        if axis is not None:
            out[c] = _resample_separate_z(data[c], new_shape, axis, is_seg, order, order_z)
        elif is_seg:
            out[c] = resize_segmentation(data[c], new_shape, order)
        else:
            out[c] = resize(data[c], new_shape, order)
    return out


def resample_logits_torch(logits, new_shape):
    """Fast GPU-friendly alternative for inference: (tri/bi)linear ``interpolate`` with ``align_corners=False``.

    NOT nnU-Net's default: there is no separate-z handling, so on anisotropic data it differs from
    ``resample_data_or_seg_to_shape(order=1)``; without separate z it matches that up to float32 round-off.
    ``logits`` is (c, x, y, z) or (c, x, y); half precision is computed in float32 on the CPU.
    """
    import torch
    import torch.nn.functional as F

    new_shape = tuple(int(s) for s in new_shape)
    if tuple(logits.shape[1:]) == new_shape:
        return logits
    x = logits
    if not x.is_floating_point() or (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)):
        x = x.float()
    if x.ndim == 4 and x.shape[1] == 1 and new_shape[0] == 1:  # 2-D data stored as (c, 1, y, x)
        return F.interpolate(x[:, 0][None], size=new_shape[1:], mode="bilinear", align_corners=False)[0][:, None]
    mode = {3: "bilinear", 4: "trilinear"}.get(x.ndim)
    if mode is None:
        raise ValueError(f"logits must be (c, x, y) or (c, x, y, z), got shape {tuple(x.shape)}")
    return F.interpolate(x[None], size=new_shape, mode=mode, align_corners=False)[0]
