"""nnU-Net's spatial augmentation (spec 5.4, row 1): rotation and scaling with independent probabilities, then a
centre crop of the enlarged sampled patch to the plan's patch size.

MONAI's ``RandAffined`` has one probability for all its parameters and scales by ``1 + U(-s, s)``; nnU-Net draws
rotation (p 0.2) and scaling (p 0.2, factor U(0.7, 1.4), > 1 zooms out) independently, and "dummy 2-D" plans rotate
in-plane only. This transform draws the parameters and lets MONAI's ``Affine`` do the resampling; every intensity
augmentation of the pipeline is a MONAI transform in the bundle's train.json. Label maps (mode ``"labels"``) are
resampled as nnU-Net does: each label's indicator linearly, the strongest label wins per voxel (nearest-neighbour
would make thin structures ragged). ``RandPerChanneld`` gives MONAI's blur and low-resolution simulation nnU-Net's
per-channel probability, and ``InPlane`` lets a 2-D transform act on every slice (dummy 2-D low-resolution simulation
leaves the first axis alone, as nnU-Net's ``ignore_axes``). ``CascadeMorphologyd`` perturbs a cascade's previous-stage
channels as nnU-Net does, so the full-resolution stage does not learn to trust the low-resolution prediction blindly.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Affine, CenterSpatialCrop, MapTransform, Randomizable
from scipy import ndimage


def resample_labels(affine: Affine, label) -> torch.Tensor:
    """``affine`` applied to a label map through its one-hot form: every label's indicator interpolated linearly
    (one resampling of all indicators together), then the label with the largest value per voxel; ties, such as
    outside the image where all are 0, go to the lowest label."""
    label = torch.as_tensor(label)
    lowest = int(label.min())
    values = torch.arange(lowest, int(label.max()) + 1)  # labels are small integers; an absent one never wins
    onehot = (label[0] == values.view(-1, *[1] * (label.ndim - 1)).to(label.dtype)).to(torch.float32)
    resampled = affine(onehot, mode="bilinear")
    indicators = torch.as_tensor(resampled).as_subclass(torch.Tensor)
    best, winner = indicators[0], torch.zeros(indicators.shape[1:], dtype=label.dtype)
    for i in range(1, len(values)):  # an elementwise running maximum: much faster than argmax over dim 0
        better = indicators[i] > best
        winner[better] = i
        best = torch.maximum(best, indicators[i])
    out = resampled[:1]  # keeps the type and metadata of a resampled tensor
    out[0] = winner + lowest
    return out.to(label.dtype)


class NnUNetSpatiald(Randomizable, MapTransform):
    def __init__(self, keys, patch_size, rotation: float = np.pi / 6, p_rotation: float = 0.2,
                 p_scaling: float = 0.2, scaling=(0.7, 1.4), dummy_2d: bool = False, mode=("bilinear", "labels"),
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.patch_size = [int(p) for p in patch_size]
        self.rotation = abs(float(rotation))
        self.p_rotation, self.p_scaling = p_rotation, p_scaling
        self.scaling = tuple(scaling)
        self.dummy_2d = dummy_2d
        modes = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
        if len(modes) != len(self.keys):
            raise ValueError(f"NnUNetSpatiald: {len(self.keys)} keys {self.keys} but {len(modes)} modes {modes}")
        self.mode = dict(zip(self.keys, modes))
        self.angles: list[float] = []
        self.scale: float | None = None

    def randomize(self, data=None) -> None:
        dims = len(self.patch_size)
        rotations = 1 if dims == 2 or self.dummy_2d else 3
        self.angles = [0.0] * (1 if dims == 2 else 3)
        if self.R.uniform() < self.p_rotation:
            self.angles[:rotations] = list(self.R.uniform(-self.rotation, self.rotation, rotations))
        self.scale = self.R.uniform(*self.scaling) if self.R.uniform() < self.p_scaling else None

    def __call__(self, data):
        self.randomize()
        d = dict(data)
        if not any(self.angles) and self.scale is None:
            crop = CenterSpatialCrop(self.patch_size)
            for key in self.key_iterator(d):
                d[key] = crop(d[key])
            return d
        scale = 1.0 if self.scale is None else self.scale
        scales = [1.0] + [scale] * (len(self.patch_size) - 1) if self.dummy_2d else [scale] * len(self.patch_size)
        affine = Affine(rotate_params=self.angles, scale_params=scales, spatial_size=self.patch_size,
                        padding_mode="zeros", image_only=True)
        for key in self.key_iterator(d):
            mode = self.mode[key]
            d[key] = resample_labels(affine, d[key]) if mode == "labels" else affine(d[key], mode=mode)
        return d


class _WrapsTransform(Randomizable):
    """A transform around another random ``self.transform``, which is seeded from this one's stream (so that the
    DataLoader's per-worker seeding reaches it)."""

    transform: object

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(self.R.randint(2**31)))
        return self


class RandPerChanneld(_WrapsTransform, MapTransform):
    """With probability ``prob``, apply the array ``transform`` to each channel on its own with probability
    ``p_per_channel`` (each channel draws its own parameters), as nnU-Net's blur and low-resolution simulation do;
    MONAI's transforms treat all channels alike. ``transform`` should be a random transform with ``prob=1``."""

    def __init__(self, keys, transform, prob: float, p_per_channel: float = 0.5):
        MapTransform.__init__(self, keys)
        self.transform, self.prob, self.p_per_channel = transform, prob, p_per_channel

    def randomize(self, data=None) -> None:
        self._do = self.R.uniform() < self.prob

    def __call__(self, data):
        self.randomize()
        d = dict(data)
        if not self._do:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            channels = [self.transform(image[c:c + 1]) if self.R.uniform() < self.p_per_channel else image[c:c + 1]
                        for c in range(image.shape[0])]
            d[key] = torch.cat([torch.as_tensor(c, dtype=image.dtype) for c in channels])
        return d


class InPlane(_WrapsTransform):
    """A 2-D array transform applied to a one-channel 3-D image ``(1, Z, Y, X)`` with its Z slices as channels: it acts
    in-plane only and every slice gets the same random parameters (nnU-Net's dummy-2D ``ignore_axes=(0,)``)."""

    def __init__(self, transform):
        self.transform = transform

    def randomize(self, data=None) -> None:
        pass  # the wrapped transform draws its own parameters

    def __call__(self, image):
        return self.transform(image[0])[None]


class CascadeMorphologyd(Randomizable, MapTransform):
    """nnU-Net's augmentation of a cascade's previous-stage one-hot channels (the last ``num_channels`` of the image):
    with ``p_binary``, each channel (random order, ``p_per_label``) gets a random binary dilation, erosion, opening or
    closing with a ball of radius U(1, 8), and voxels it adds leave the other channels; with ``p_remove``, each channel
    (``p_per_label``) loses one random connected component covering at most ``max_fraction`` of the patch."""

    OPERATIONS = ("dilation", "erosion", "opening", "closing")

    def __init__(self, keys, num_channels: int, p_binary: float = 0.4, p_remove: float = 0.2,
                 p_per_label: float = 0.5, strel_size=(1.0, 8.0), max_fraction: float = 0.15):
        MapTransform.__init__(self, keys)
        self.num_channels, self.p_binary, self.p_remove = int(num_channels), p_binary, p_remove
        self.p_per_label, self.strel_size, self.max_fraction = p_per_label, tuple(strel_size), max_fraction

    def randomize(self, data=None) -> None:
        pass  # draws happen per channel in __call__

    @staticmethod
    def operate(mask: np.ndarray, operation: str, radius: float) -> np.ndarray:
        """Binary morphology with a Euclidean ball of ``radius`` (distance transforms: cost independent of it)."""
        def dilate(m):
            return ndimage.distance_transform_edt(~m) <= radius if m.any() and not m.all() else m.copy()

        def erode(m):
            return ~dilate(~m)

        first, second = {"dilation": (dilate, None), "erosion": (erode, None), "opening": (erode, dilate),
                         "closing": (dilate, erode)}[operation]
        out = first(mask)
        return second(out) if second is not None else out

    def remove_component(self, mask: np.ndarray) -> np.ndarray:
        components, n = ndimage.label(mask)
        if n == 0:
            return mask
        sizes = np.bincount(components.ravel())[1:]
        small = np.flatnonzero(sizes <= self.max_fraction * mask.size) + 1
        if len(small) == 0:
            return mask
        return mask & (components != small[self.R.randint(len(small))])

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            first = image.shape[0] - self.num_channels
            masks = [image[c].as_subclass(torch.Tensor).numpy() > 0.5 for c in range(first, image.shape[0])]
            touched = False
            if self.R.uniform() < self.p_binary:
                for i in self.R.permutation(len(masks)):
                    if self.R.uniform() < self.p_per_label and masks[i].any():
                        operation = self.OPERATIONS[self.R.randint(4)]
                        new = self.operate(masks[i], operation, self.R.uniform(*self.strel_size))
                        added = new & ~masks[i]
                        masks = [m & ~added if j != i else new for j, m in enumerate(masks)]
                        touched = True
            if self.R.uniform() < self.p_remove:
                for i in range(len(masks)):
                    if self.R.uniform() < self.p_per_label:
                        masks[i] = self.remove_component(masks[i])
                        touched = True
            if touched:
                image = image.clone()
                image[first:] = torch.from_numpy(np.stack(masks)).to(image.dtype)
                d[key] = image
        return d
