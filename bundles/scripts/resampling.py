"""nnU-Net's resampling functions (spec 3.9), for preprocessing and for resampling logits back.

MONAI's ``Spacingd`` resamples in world space with its own grid conventions; nnU-Net instead resizes the voxel grid
to a target shape with half-pixel-centre mapping, in-plane first and out-of-plane separately when the spacing is
anisotropic. Predictions only match nnU-Net's if that is reproduced, so it lives here. Two families, chosen by name in
the plans (``resampling_fn_data``/``_seg``/``_probabilities``):

* ``resample_data_or_seg_to_shape`` (the default planners): skimage-style spline resizing. ``resize`` below equals
  ``skimage.transform.resize(order, mode='edge', anti_aliasing=False)`` (clip included): it calls
  ``scipy.ndimage.zoom`` with the same arguments skimage passes, so the numbers are identical without scikit-image.
* ``resample_torch_fornnunet`` (the ``*_torchres`` planners): torch ``interpolate``, (tri/bi)linear, with the
  separate axis (``_sepz``) taken nearest-exact; segmentations through per-label indicators (``resample_torch``).

``resampled_argmax`` is the export's fast path: the argmax of the resampled logits without materialising them at the
original resolution, identical to resampling first and taking the argmax afterwards.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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


def separate_z_axis(current_spacing, new_spacing, force_separate_z=None,
                    threshold: float = ANISO_THRESHOLD) -> int | None:
    """The axis to resample separately, or None for a plain 3-D resize.

    Decided from the current spacing first, then from the new one; ``force_separate_z`` overrides the decision (the
    axis then comes from the current spacing). A tie for the largest spacing means no separate axis.
    """
    if force_separate_z is not None:
        axes = lowres_axes(current_spacing) if force_separate_z else None
    elif do_separate_z(current_spacing, threshold):
        axes = lowres_axes(current_spacing)
    elif do_separate_z(new_spacing, threshold):
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


def _nearest_indices(old_len: int, new_len: int) -> np.ndarray:
    """The source index ``map_coordinates(order=0, mode='nearest')`` picks for every output position."""
    return ndimage.map_coordinates(np.arange(old_len, dtype=np.float64), _axis_coordinates(old_len, new_len)[None],
                                   order=0, mode="nearest").astype(np.intp)


def _in_plane(vol: np.ndarray, axis: int, plane_shape: tuple, is_seg: bool, order: int, dtype) -> np.ndarray:
    """Every slice along ``axis`` resized to ``plane_shape`` (skimage style; labels one-hot), as ``dtype``."""
    if tuple(s for a, s in enumerate(vol.shape) if a != axis) == plane_shape:
        return vol.astype(dtype)  # in-plane resize to the same shape is the identity
    shape = list(plane_shape)
    shape.insert(axis, vol.shape[axis])
    inter = np.empty(shape, dtype=dtype)
    for i in range(vol.shape[axis]):
        index = (slice(None),) * axis + (i,)
        inter[index] = resize_segmentation(vol[index], plane_shape, order) if is_seg else resize(vol[index],
                                                                                                 plane_shape, order,
                                                                                                 dtype)
    return inter


def _resample_separate_z(vol: np.ndarray, new_shape: tuple, axis: int, is_seg: bool, order: int, order_z: int):
    """In-plane resize of every slice along ``axis`` with ``order``, then that axis alone with ``order_z``.

    With ``order_z`` 0 the axis step picks whole slices, so only the slices picked are resized in-plane (the same
    numbers as resizing all of them first).
    """
    plane_shape = tuple(s for a, s in enumerate(new_shape) if a != axis)
    changes_z = vol.shape[axis] != new_shape[axis]
    # float64 in between only where it can matter (interpolating data along z), as nnU-Net keeps it float64
    inter_dtype = vol.dtype if is_seg else (np.float64 if changes_z and order_z > 0 else np.float32)
    if not changes_z:
        return _in_plane(vol, axis, plane_shape, is_seg, order, inter_dtype)
    if order_z == 0:
        idx = _nearest_indices(vol.shape[axis], new_shape[axis])
        needed = np.unique(idx)
        inter = _in_plane(np.take(vol, needed, axis=axis), axis, plane_shape, is_seg, order, inter_dtype)
        return np.take(inter, np.searchsorted(needed, idx), axis=axis)
    inter = _in_plane(vol, axis, plane_shape, is_seg, order, inter_dtype)
    if not is_seg:
        return _resample_axis(inter, axis, new_shape[axis], order_z)
    out = np.zeros(new_shape, dtype=vol.dtype)
    for label in np.unique(inter):
        mask = _resample_axis((inter == label).astype(np.float64), axis, new_shape[axis], order_z)
        out[np.round(mask) > 0.5] = label
    return out


def _check_4d(data, new_shape) -> tuple:
    if data.ndim != 4:
        raise ValueError(f"data must be (c, x, y, z), got shape {tuple(data.shape)}")
    new_shape = tuple(int(s) for s in new_shape)
    if len(new_shape) != 3:
        raise ValueError(f"new_shape must have 3 entries, got {new_shape}")
    return new_shape


def resample_data_or_seg_to_shape(data, new_shape, current_spacing, new_spacing, is_seg: bool = False,
                                  order: int = 3, order_z: int = 0, force_separate_z=None,
                                  separate_z_anisotropy_threshold: float = ANISO_THRESHOLD):
    """nnU-Net's ``resample_data_or_seg_to_shape``: resample ``data`` (c, x, y, z) to ``new_shape``.

    Returns ``data`` itself when the shape already matches. Data comes back float32; segmentations
    (``is_seg=True``) keep their dtype. See ``separate_z_axis`` for when the low-res axis is handled on its own.
    """
    if hasattr(data, "detach"):  # torch tensor
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    new_shape = _check_4d(data, new_shape)
    if data.shape[1:] == new_shape:
        return data
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z, separate_z_anisotropy_threshold)
    out = np.empty((data.shape[0],) + new_shape, dtype=data.dtype if is_seg else np.float32)
    for c in range(data.shape[0]):
        if axis is not None:
            out[c] = _resample_separate_z(data[c], new_shape, axis, is_seg, order, order_z)
        elif is_seg:
            out[c] = resize_segmentation(data[c], new_shape, order)
        else:
            out[c] = resize(data[c], new_shape, order)
    return out


# --- torch interpolate (the *_torchres planners) ----------------------------------------------------------------
SEG_SCALE = 1000.0  # label indicators are interpolated scaled, stored as float16 and accepted above 0.7 of it
SLAB = 16  # slices resampled at a time along the separate axis


def nearest_exact_indices(old_len: int, new_len: int) -> torch.Tensor:
    """The source index torch's ``interpolate(mode='nearest-exact')`` picks along one axis of length ``old_len``."""
    source = torch.arange(old_len, dtype=torch.float32)[None, None]
    return F.interpolate(source, size=int(new_len), mode="nearest-exact")[0, 0].long()


def _label_dtype(labels: torch.Tensor) -> torch.dtype:
    return torch.int8 if int(labels.max()) < 127 else torch.int16


def _resample_labels_torch(seg: torch.Tensor, size: tuple, labels: torch.Tensor, dtype: torch.dtype,
                           memory_efficient: bool) -> torch.Tensor:
    """(Tri/bi)linear resampling of a label stack (n, *spatial) through one indicator per label (ascending).

    Default: a voxel whose scaled float16 indicator exceeds 0.7 of the scale takes that label; the others take the
    label of the largest float16 indicator (the first one on ties). ``memory_efficient``: every indicator above 0.5
    sets its label, later labels winning.
    """
    mode = "trilinear" if seg.ndim == 4 else "bilinear"
    out = torch.zeros((seg.shape[0],) + tuple(size), dtype=dtype)
    if memory_efficient:
        for label in labels:
            out[F.interpolate((seg[None] == label).float(), size=size, mode=mode)[0] > 0.5] = label.item()
        return out
    best = torch.full(out.shape, -float("inf"), dtype=torch.float16)
    best_label = torch.zeros_like(out)
    decided = torch.zeros(out.shape, dtype=torch.bool)
    for label in labels:
        value = F.interpolate((seg[None] == label).float() * SEG_SCALE, size=size, mode=mode)[0].half()
        sure = value > 0.7 * SEG_SCALE
        out[sure] = label.item()
        decided |= sure
        better = value > best
        best[better] = value[better]
        best_label[better] = label.item()
    undecided = ~decided
    out[undecided] = best_label[undecided]
    return out


def _resample_planes_torch(planes: torch.Tensor, plane_shape: tuple, is_seg: bool, labels, dtype,
                           memory_efficient: bool) -> torch.Tensor:
    """(n, a, b) planes bilinearly to ``plane_shape``; identity (as float32, or the label dtype) when equal."""
    if tuple(planes.shape[1:]) == tuple(plane_shape):
        return planes.to(dtype) if is_seg else planes.float()
    if is_seg:
        return _resample_labels_torch(planes, plane_shape, labels, dtype, memory_efficient)
    return F.interpolate(planes[None].float(), size=plane_shape, mode="bilinear")[0]


def _torch_separate_axis(x: torch.Tensor, new_shape: tuple, axis: int, is_seg: bool, memory_efficient: bool):
    """Bilinear in-plane, then nearest-exact along ``axis``: only the slices that nearest-exact picks are resized."""
    old_len, new_len = x.shape[axis + 1], new_shape[axis]
    plane_shape = tuple(s for a, s in enumerate(new_shape) if a != axis)
    if is_seg:
        labels = torch.unique(x)
        dtype = _label_dtype(labels)  # what the in-plane step yields (and the axis step keeps)
    else:
        labels, dtype = None, torch.float32
    idx = nearest_exact_indices(old_len, new_len) if old_len != new_len else torch.arange(old_len)
    needed = torch.unique(idx)
    out = torch.empty((x.shape[0],) + tuple(new_shape), dtype=dtype)
    moved_in, moved_out = x.movedim(axis + 1, 1), out.movedim(axis + 1, 1)
    for start in range(0, len(needed), SLAB):
        chunk = needed[start:start + SLAB]
        n = x.shape[0] * len(chunk)
        planes = moved_in[:, chunk].reshape((n,) + tuple(moved_in.shape[2:]))
        done = _resample_planes_torch(planes, plane_shape, is_seg, labels, dtype, memory_efficient)
        done = done.reshape((x.shape[0], len(chunk)) + plane_shape)
        targets = torch.nonzero((idx >= chunk[0]) & (idx <= chunk[-1]))[:, 0]
        moved_out[:, targets] = done[:, torch.searchsorted(chunk, idx[targets])]
    return out


def resample_torch(data, new_shape, current_spacing, new_spacing, is_seg: bool = False, force_separate_z=None,
                   separate_z_anisotropy_threshold: float = ANISO_THRESHOLD,
                   memefficient_seg_resampling: bool = False, mode: str = "linear",
                   aniso_axis_mode: str = "nearest-exact", **_ignored):
    """nnU-Net's ``resample_torch_fornnunet``: ``data`` (c, x, y, z), numpy or torch, to ``new_shape`` with
    torch ``interpolate`` (``align_corners=False``, no antialiasing), on the CPU.

    Without a separate axis (``force_separate_z`` False, or no anisotropy) every channel is resampled trilinearly;
    with one, every slice bilinearly in-plane and then the axis nearest-exact. Data comes back float32, label maps
    (``is_seg``) int8 (int16 for labels >= 127); the input itself when the shape already matches. Numpy in, numpy
    out. ``num_threads`` and ``device`` of nnU-Net's signature are accepted and ignored.
    """
    if mode != "linear" or aniso_axis_mode != "nearest-exact":
        raise ValueError(f"resample_torch supports mode='linear' and aniso_axis_mode='nearest-exact', got "
                         f"{mode!r} and {aniso_axis_mode!r}")
    was_numpy = not isinstance(data, torch.Tensor)
    x = torch.from_numpy(np.asarray(data)) if was_numpy else data.detach().cpu()
    new_shape = _check_4d(x, new_shape)
    if tuple(x.shape[1:]) == new_shape:
        return data
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z, separate_z_anisotropy_threshold)
    with torch.no_grad():
        if axis is not None:
            out = _torch_separate_axis(x, new_shape, axis, is_seg, memefficient_seg_resampling)
        elif is_seg:
            labels = torch.unique(x)
            out = _resample_labels_torch(x, new_shape, labels, _label_dtype(labels), memefficient_seg_resampling)
        else:
            out = torch.empty((x.shape[0],) + new_shape, dtype=torch.float32)
            for c in range(x.shape[0]):  # channel by channel: the same numbers, a fraction of the memory
                out[c] = F.interpolate(x[c][None, None].float(), size=new_shape, mode="trilinear")[0, 0]
    return out.numpy() if was_numpy else out


# --- by name, as the plans give them ------------------------------------------------------------------------------
RESAMPLING_FUNCTIONS = {"resample_data_or_seg_to_shape": resample_data_or_seg_to_shape,
                        "resample_torch_fornnunet": resample_torch}
_KWARGS = {"resample_data_or_seg_to_shape": ("is_seg", "order", "order_z", "force_separate_z",
                                             "separate_z_anisotropy_threshold"),
           "resample_torch_fornnunet": ("is_seg", "force_separate_z", "separate_z_anisotropy_threshold",
                                        "memefficient_seg_resampling", "mode", "aniso_axis_mode")}


def resampling_kwargs(function: str, kwargs: dict) -> dict:
    """The keyword arguments of a plans entry that ``function`` uses (nnU-Net's ``num_threads``/``device`` go)."""
    if function not in RESAMPLING_FUNCTIONS:
        raise ValueError(f"unsupported resampling function '{function}' (supported: "
                         f"{', '.join(RESAMPLING_FUNCTIONS)})")
    return {k: v for k, v in kwargs.items() if k in _KWARGS[function]}


def resample(function: str, data, new_shape, current_spacing, new_spacing, **kwargs):
    """Resample with the function the plans name (``resampling_fn_data`` etc.) and its keyword arguments."""
    kwargs = resampling_kwargs(function, kwargs)
    return RESAMPLING_FUNCTIONS[function](data, new_shape, current_spacing, new_spacing, **kwargs)


# --- export: argmax of the resampled logits -------------------------------------------------------------------
def _resize_planes_linear(planes: np.ndarray, plane_shape: tuple) -> np.ndarray:
    """``resize(plane, plane_shape, order=1)`` of every (a, b) plane of ``planes`` (n, a, b), computed by torch's
    bilinear ``interpolate`` in float64: the same mapping (half-pixel centres, edge clamping) and, rounded to
    float32, the same numbers as scipy's order-1 zoom, several times faster. Clipped to each plane's range."""
    x = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float64))
    out = F.interpolate(x[None], size=tuple(plane_shape), mode="bilinear")[0].float()
    lo = torch.from_numpy(planes.reshape(len(planes), -1).min(1)).float()[:, None, None]
    hi = torch.from_numpy(planes.reshape(len(planes), -1).max(1)).float()[:, None, None]
    return torch.minimum(torch.maximum(out, lo), hi).numpy()


def _redo_close_planes(values: torch.Tensor, top: torch.Tensor, label: torch.Tensor, planes: np.ndarray,
                       plane_shape: tuple) -> torch.Tensor:
    """Makes the argmax of ``_resize_planes_linear``'s (C, k, a, b) ``values`` exactly scipy's: they can differ
    from scipy's float32 numbers by one unit in the last place, which only matters where two channels come within two
    units of each other at the maximum; such planes (rare) are resized again with scipy. Returns the labels (k, a, b).
    """
    if values.shape[0] < 2:
        return label
    magnitude = top.abs()
    tolerance = 2 * (torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude)  # two units in last place
    close = (values >= top - tolerance).sum(0) >= 2
    for k in torch.nonzero(close.flatten(1).any(1))[:, 0].tolist():
        redone = np.stack([resize(p, plane_shape, 1) for p in planes[:, k]])
        label[k] = torch.from_numpy(np.argmax(redone, 0))
    return label


def _argmax_dtype(channels: int):
    return np.uint8 if channels < 255 else np.uint16


def resampled_argmax(logits: np.ndarray, new_shape, current_spacing, new_spacing,
                     function: str = "resample_data_or_seg_to_shape", **kwargs) -> np.ndarray:
    """``argmax(resample(function, logits, ...), 0)`` (first maximum on ties) as uint8 (uint16 from 255 channels),
    without the resampled logits at full size.

    When the separate axis is taken nearest (``order_z`` 0, and always for torch), the argmax commutes with picking
    slices: the picked slices are resized in-plane a slab at a time, reduced to labels, and the label planes are
    then placed. Otherwise channels are resampled one at a time into a running maximum.
    """
    logits = np.asarray(logits)
    new_shape = _check_4d(logits, new_shape)
    dtype = _argmax_dtype(logits.shape[0])
    if logits.shape[1:] == new_shape:
        return np.argmax(logits, 0).astype(dtype)
    kwargs = {**resampling_kwargs(function, kwargs), "is_seg": False}
    threshold = kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD)
    axis = separate_z_axis(current_spacing, new_spacing, kwargs.get("force_separate_z"), threshold)
    is_torch = function == "resample_torch_fornnunet"
    if axis is None or (not is_torch and kwargs.get("order_z", 0) != 0):
        return _running_argmax(logits, new_shape, current_spacing, new_spacing, function, kwargs, dtype)
    old_len, new_len = logits.shape[axis + 1], new_shape[axis]
    if old_len == new_len:
        idx = np.arange(old_len)
    else:
        idx = nearest_exact_indices(old_len, new_len).numpy() if is_torch else _nearest_indices(old_len, new_len)
    needed = np.unique(idx)
    plane_shape = tuple(s for a, s in enumerate(new_shape) if a != axis)
    moved = np.moveaxis(logits, axis + 1, 1)
    labels = np.empty((len(needed),) + plane_shape, dtype)
    order = kwargs.get("order", 3)
    for start in range(0, len(needed), SLAB):
        chunk = needed[start:start + SLAB]
        planes = moved[:, chunk].astype(np.float32, copy=False)
        flat = planes.reshape((-1,) + planes.shape[2:])
        if planes.shape[2:] == plane_shape:
            done = flat
        elif is_torch:
            done = F.interpolate(torch.from_numpy(np.ascontiguousarray(flat))[None], size=plane_shape,
                                 mode="bilinear")[0].numpy()
        elif order == 1:
            done = _resize_planes_linear(flat, plane_shape)
        else:
            done = np.stack([resize(p, plane_shape, order) for p in flat])
        values = torch.from_numpy(np.ascontiguousarray(done).reshape(planes.shape[:2] + plane_shape))
        top, label = torch.max(values, 0)  # the first maximum on ties, as numpy's argmax
        if order == 1 and not is_torch and planes.shape[2:] != plane_shape:
            label = _redo_close_planes(values, top, label, planes, plane_shape)
        labels[start:start + len(chunk)] = label.numpy()
    out = np.take(labels, np.searchsorted(needed, idx), axis=0)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _running_argmax(logits, new_shape, current_spacing, new_spacing, function, kwargs, dtype) -> np.ndarray:
    """Channel by channel into a running maximum; a later channel wins only when strictly larger (first maximum)."""
    best = out = None
    for c in range(logits.shape[0]):
        value = torch.as_tensor(resample(function, logits[c:c + 1], new_shape, current_spacing, new_spacing,
                                         **kwargs)[0]).float()
        if best is None:
            best, out = value, torch.zeros(new_shape, dtype=torch.uint8 if dtype == np.uint8 else torch.int32)
            continue
        better = value > best
        out.masked_fill_(better, c)
        torch.maximum(best, value, out=best)
    return out.numpy().astype(dtype, copy=False)


def resample_logits_torch(logits, new_shape):
    """Fast GPU-friendly alternative for inference: (tri/bi)linear ``interpolate`` with ``align_corners=False``.

    NOT nnU-Net's default: there is no separate-z handling, so on anisotropic data it differs from
    ``resample_data_or_seg_to_shape(order=1)``; without separate z it matches that up to float32 round-off.
    ``logits`` is (c, x, y, z) or (c, x, y); half precision is computed in float32 on the CPU.
    """
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
