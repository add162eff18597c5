"""nnU-Net's preprocessing (spec 4) and its inverse for predictions, as MONAI map transforms.

MONAI loads images as (C, x, y, z) with an affine; nnU-Net works in (C, z, y, x) with spacing (sz, sy, sx). The
forward path converts, transposes, crops to non-zero, normalizes and resamples to the plan's spacing; the inverse path
resamples logits back, takes the argmax, pastes into the uncropped volume and returns a label map with the input's
exact shape and geometry. MONAI has no separate-z resampling, no hole-filled crop and no dataset-level CT
normalization, which is why this module exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform

from .cropping import crop_to_nonzero
from .resampling import compute_new_shape, resample, resampled_argmax, resampling_kwargs

EPS = 1e-8


@dataclass
class PlanSettings:
    """The parts of one configuration of plans.json that pre- and postprocessing need."""

    spacing: list  # target spacing, transposed (2 entries for 2d)
    transpose_forward: list
    transpose_backward: list
    normalization_schemes: list
    use_mask_for_norm: list
    intensity_properties: dict
    data_kwargs: dict
    seg_kwargs: dict
    probabilities_kwargs: dict
    # the plans' resampling functions by name (bundles/scripts/resampling.py, RESAMPLING_FUNCTIONS)
    data_fn: str = "resample_data_or_seg_to_shape"
    seg_fn: str = "resample_data_or_seg_to_shape"
    probabilities_fn: str = "resample_data_or_seg_to_shape"

    @classmethod
    def from_plans(cls, plans: dict, configuration: str) -> "PlanSettings":
        config = resolve_configuration(plans, configuration)
        default = "resample_data_or_seg_to_shape"
        functions = {k: config.get(f"resampling_fn_{k}", default) for k in ("data", "seg", "probabilities")}
        return cls(
            spacing=list(config["spacing"]),
            transpose_forward=list(plans["transpose_forward"]),
            transpose_backward=list(plans["transpose_backward"]),
            normalization_schemes=list(config["normalization_schemes"]),
            use_mask_for_norm=list(config["use_mask_for_norm"]),
            intensity_properties=plans["foreground_intensity_properties_per_channel"],
            data_kwargs=resampling_kwargs(functions["data"], config["resampling_fn_data_kwargs"]),
            seg_kwargs=resampling_kwargs(functions["seg"], config["resampling_fn_seg_kwargs"]),
            probabilities_kwargs=resampling_kwargs(functions["probabilities"],
                                                   config["resampling_fn_probabilities_kwargs"]),
            data_fn=functions["data"], seg_fn=functions["seg"], probabilities_fn=functions["probabilities"],
        )

    @property
    def is_2d(self) -> bool:
        return len(self.spacing) == 2


def resolve_configuration(plans: dict, name: str) -> dict:
    """A configuration with ``inherits_from`` resolved (child keys win), as nnU-Net's PlansManager does."""
    configs = plans["configurations"]
    if name not in configs:
        raise KeyError(f"configuration '{name}' is not in the plans (has {', '.join(configs)})")
    config, seen = dict(configs[name]), {name}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen:
            raise ValueError(f"plans: circular inherits_from at '{parent}'")
        seen.add(parent)
        config = {**configs[parent], **config}
    return config


# --- axis conventions ------------------------------------------------------------------------------------------
def spacing_from_meta(image) -> list[float]:
    """Voxel spacing in MONAI (x, y, z) order: NIfTI pixdim when present (as ITK reads it), else affine norms."""
    meta = getattr(image, "meta", {}) or {}
    spatial = image.ndim - 1
    pixdim = meta.get("pixdim")
    if pixdim is not None and len(pixdim) > spatial and all(float(p) > 0 for p in np.asarray(pixdim)[1:spatial + 1]):
        return [float(p) for p in np.asarray(pixdim)[1:spatial + 1]]
    affine = np.asarray(getattr(image, "affine", np.eye(spatial + 1)), dtype=np.float64)
    return [float(np.linalg.norm(affine[:spatial, i])) for i in range(spatial)]


def to_nnunet_order(array: np.ndarray, spacing_xyz) -> tuple[np.ndarray, list[float]]:
    """(C, x, y[, z]) -> (C, z, y, x) and spacing (sz, sy, sx); 2-D images become (C, 1, y, x) with z spacing 999x."""
    spatial = array.ndim - 1
    array = np.transpose(array, (0,) + tuple(range(spatial, 0, -1)))
    spacing = [abs(float(s)) for s in spacing_xyz][::-1]
    if spatial == 2:
        array = array[:, None]
        spacing = [999.0 * max(spacing)] + spacing
    return np.ascontiguousarray(array), spacing


def from_nnunet_order(array: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Inverse of ``to_nnunet_order`` for a (C, z, y, x) array."""
    if spatial_dims == 2:
        array = array[:, 0]
    return np.ascontiguousarray(np.transpose(array, (0,) + tuple(range(array.ndim - 1, 0, -1))))


# --- forward ---------------------------------------------------------------------------------------------------
def normalize(data: np.ndarray, seg: np.ndarray, plan: PlanSettings) -> np.ndarray:
    """Per-channel normalization by scheme (spec 3.8); z-score within the mask where the plan says so."""
    out = np.empty_like(data, dtype=np.float32)
    for c, scheme in enumerate(plan.normalization_schemes):
        x = data[c].astype(np.float32, copy=False)
        o = out[c]  # written in place: float32 operations in the same order, without volume-sized temporaries
        if scheme == "CTNormalization":
            props = plan.intensity_properties[str(c)]
            np.clip(x, props["percentile_00_5"], props["percentile_99_5"], out=o)
            o -= props["mean"]
            o /= max(props["std"], EPS)
        elif scheme == "ZScoreNormalization":
            if plan.use_mask_for_norm[c]:
                mask = seg[0] >= 0
                values = x[mask]
                mean, std = (values.mean(), values.std()) if values.size else (0.0, 1.0)
                o[...] = np.where(mask, (x - mean) / max(std, EPS), 0.0)
            else:
                np.subtract(x, x.mean(), out=o)
                o /= max(x.std(), EPS)
        elif scheme == "RescaleTo01Normalization":
            np.subtract(x, x.min(), out=o)
            o /= max(x.max() - x.min(), EPS)
        elif scheme == "RGBTo01Normalization":
            np.divide(x, 255.0, out=o)
        elif scheme == "NoNormalization":
            o[...] = x
        else:
            raise ValueError(f"unknown normalization scheme '{scheme}'")
    return out


def target_spacing(plan: PlanSettings, spacing_transposed) -> list[float]:
    """The plan's spacing; 2-D configurations keep each case's own slice spacing."""
    return [spacing_transposed[0]] + list(plan.spacing) if plan.is_2d else list(plan.spacing)


def preprocess_case(data: np.ndarray, spacing: list, plan: PlanSettings, seg: np.ndarray | None = None):
    """nnU-Net's DefaultPreprocessor on one case in nnU-Net order. Returns (data, seg, properties)."""
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():  # a copy only when there is something to replace
        data = np.nan_to_num(data)
    has_seg = seg is not None
    forward = [0] + [a + 1 for a in plan.transpose_forward]
    data = data.transpose(forward)
    seg = seg.transpose(forward) if seg is not None else None
    spacing_t = [spacing[a] for a in plan.transpose_forward]
    shape_before = list(data.shape[1:])
    data, seg, bbox = crop_to_nonzero(data, seg)
    shape_cropped = list(data.shape[1:])
    target = target_spacing(plan, spacing_t)
    new_shape = compute_new_shape(shape_cropped, spacing_t, target)
    data = normalize(data, seg, plan)
    data = resample(plan.data_fn, data, new_shape, spacing_t, target, **plan.data_kwargs)
    seg = resample(plan.seg_fn, seg, new_shape, spacing_t, target, **plan.seg_kwargs) if has_seg else None
    properties = {"shape_before_cropping": shape_before, "bbox_used_for_cropping": bbox,
                  "shape_after_cropping_and_before_resampling": shape_cropped, "spacing_transposed": spacing_t,
                  "shape_after_resampling": [int(s) for s in new_shape]}
    return data.astype(np.float32, copy=False), seg, properties


def preprocess_previous_stage(previous: np.ndarray, properties: dict, plan: PlanSettings) -> np.ndarray:
    """A previous stage's label map (1, z, y, x), in nnU-Net order and the original geometry, brought onto the
    preprocessed grid of its case the way nnU-Net's cascade does: same transpose and crop, resampled as a seg."""
    forward = [0] + [a + 1 for a in plan.transpose_forward]
    previous = np.rint(previous).astype(np.int16).transpose(forward)
    window = (slice(None),) + tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
    previous = previous[window]
    target = target_spacing(plan, properties["spacing_transposed"])
    return resample(plan.seg_fn, previous, properties["shape_after_resampling"], properties["spacing_transposed"],
                    target, **plan.seg_kwargs)


def one_hot(seg: np.ndarray, labels) -> np.ndarray:
    """Foreground labels of a (1, ...) label map as float32 channels (the cascade's extra inputs)."""
    return np.stack([(seg[0] == label) for label in labels]).astype(np.float32)


# --- inverse ---------------------------------------------------------------------------------------------------
def paint_regions(probabilities: np.ndarray, regions_class_order) -> np.ndarray:
    """nnU-Net's label map from region outputs: each region's probability > 0.5 painted with its
    ``regions_class_order`` value, in that order (a later region overwrites an earlier one)."""
    seg = np.zeros(probabilities.shape[1:], np.uint8 if max(regions_class_order) < 255 else np.uint16)
    for channel, value in enumerate(regions_class_order):
        seg[probabilities[channel] > 0.5] = value
    return seg


def labels_from_probabilities(probabilities: np.ndarray, regions_class_order=None) -> np.ndarray:
    """Label map of (C, ...) probabilities: argmax, or nnU-Net's region painting when ``regions_class_order``."""
    if regions_class_order:
        return paint_regions(probabilities, regions_class_order)
    return np.argmax(probabilities, 0).astype(np.uint8 if probabilities.shape[0] < 255 else np.uint16)


def logits_to_original(logits: np.ndarray, properties: dict, plan: PlanSettings,
                       return_probabilities: bool = False, regions_class_order=None):
    """Resample logits back, argmax (or, with ``regions_class_order``, region painting of the sigmoid), uncrop and
    transpose back (spec 6 step 6). Label map in nnU-Net order; probabilities are softmax or per-region sigmoid.

    Labels without probabilities take the argmax on the way (``resampled_argmax``: the same labels, without the
    resampled logits at full size); with probabilities, or regions, the logits are resampled whole.
    """
    spacing_t = properties["spacing_transposed"]
    shape_cropped = properties["shape_after_cropping_and_before_resampling"]
    current = target_spacing(plan, spacing_t)
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().numpy()
    logits = logits.astype(np.float32, copy=False)
    probabilities = None
    if return_probabilities or regions_class_order:
        logits = resample(plan.probabilities_fn, logits, shape_cropped, current, spacing_t,
                          **plan.probabilities_kwargs)
        if regions_class_order:
            probabilities = torch.sigmoid(torch.from_numpy(logits)).numpy()
            labels = paint_regions(probabilities, regions_class_order)
        else:
            labels = np.argmax(logits, 0).astype(np.uint8 if logits.shape[0] < 255 else np.uint16)
    else:
        labels = resampled_argmax(logits, shape_cropped, current, spacing_t, plan.probabilities_fn,
                                  **plan.probabilities_kwargs)
    window = tuple(slice(lo, hi) for lo, hi in properties["bbox_used_for_cropping"])
    full = np.zeros(properties["shape_before_cropping"], labels.dtype)
    full[window] = labels
    del labels
    backward = plan.transpose_backward
    full = full.transpose(backward)
    if not return_probabilities:
        return full, None
    if probabilities is None:
        probabilities = torch.softmax(torch.from_numpy(logits), 0).numpy()
    full_probabilities = np.zeros([logits.shape[0]] + properties["shape_before_cropping"], np.float32)
    if not regions_class_order:  # outside the crop: background for labels, no region
        full_probabilities[0] = 1.0
    full_probabilities[(slice(None),) + window] = probabilities
    return full, full_probabilities.transpose([0] + [a + 1 for a in backward])


# --- MONAI transforms ------------------------------------------------------------------------------------------
def channel_first(image):
    """``image`` with a channel dimension: loaders that hand over a channel-less image (MONAI Deploy's DICOM and
    NIfTI paths give (x, y, z)) are recognised by having as many dims as the ``spatial_shape`` in their meta data.
    Images without that meta data are taken to have their channel first already."""
    meta = getattr(image, "meta", None) or {}
    spatial_shape = meta.get("spatial_shape")
    if spatial_shape is not None and image.ndim == len(np.asarray(spatial_shape).reshape(-1)):
        return image[None]
    return image


class ChannelFirstd(MapTransform):
    """Adds the channel dimension a loader left out (see ``channel_first``); images with one pass unchanged. It runs
    right after ``LoadImaged``, which consumers such as MONAI Deploy drop in favour of their own loaders."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = channel_first(d[key])
        return d


class NnUNetPreprocessd(MapTransform):
    """Turns a loaded (C, x, y, z) image into the network's preprocessed (C, z', y', x') input.

    What is needed to invert it is kept as a JSON string under ``<key>_nnunet`` (strings survive MONAI's batch
    collation unchanged); the image keeps the original meta data (affine, file name) for ``NnUNetRestored``.
    """

    def __init__(self, keys: KeysCollection, plans: dict, configuration: str, previous_key: str | None = None,
                 foreground_labels=(), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.plan = PlanSettings.from_plans(plans, configuration)
        self.previous_key = previous_key  # cascade: the previous stage's prediction (loaded or a file) as channels
        self.foreground_labels = list(foreground_labels)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            nn_array, spacing = to_nnunet_order(array, spacing_from_meta(image))
            pre, _, props = preprocess_case(nn_array, spacing, self.plan)
            if self.previous_key is not None:
                previous = d.pop(self.previous_key)
                if isinstance(previous, (str, os.PathLike)):  # a file: loaded here, so LoadImaged loads only the image
                    previous = LoadImage(image_only=True, ensure_channel_first=True)(previous)
                previous, _ = to_nnunet_order(np.asarray(previous), spacing[::-1])
                previous = preprocess_previous_stage(previous, props, self.plan)
                pre = np.concatenate([pre, one_hot(previous, self.foreground_labels)])
            props["spatial_dims"] = array.ndim - 1
            d[f"{key}_nnunet"] = json.dumps(props)
            meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
            d[key] = MetaTensor(torch.from_numpy(pre), meta=meta) if meta else torch.from_numpy(pre)
        return d


class NnUNetRestored(MapTransform):
    """Turns network logits (C, z', y', x') into a uint8 label map with the original image's shape and geometry.

    With ``probabilities_key`` the softmax probabilities in nnU-Net's (C, z, y, x) layout are stored there too.
    Region-based bundles pass ``regions_class_order``: one sigmoid output per region, painted into the label map in
    that order, as nnU-Net exports regions; their probabilities are the regions' sigmoids.
    """

    def __init__(self, keys: KeysCollection, plans: dict, configuration: str, image_key: str = "image",
                 probabilities_key: str | None = None, allow_missing_keys: bool = False, regions_class_order=None):
        super().__init__(keys, allow_missing_keys)
        self.plan = PlanSettings.from_plans(plans, configuration)
        self.image_key = image_key
        self.probabilities_key = probabilities_key
        self.regions_class_order = list(regions_class_order) if regions_class_order else None

    def __call__(self, data):
        d = dict(data)
        props = d[f"{self.image_key}_nnunet"]
        props = json.loads(props if isinstance(props, str) else props[0])
        image = d.get(self.image_key)
        meta = dict(image.meta) if isinstance(image, MetaTensor) else {}
        for key in self.key_iterator(d):
            logits = d[key]
            logits = logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else logits
            labels, probabilities = logits_to_original(logits, props, self.plan, self.probabilities_key is not None,
                                                       self.regions_class_order)
            labels = from_nnunet_order(labels[None], props["spatial_dims"])
            d[key] = MetaTensor(torch.from_numpy(labels), meta=meta) if meta else torch.from_numpy(labels)
            if probabilities is not None:
                d[self.probabilities_key] = probabilities
        return d
