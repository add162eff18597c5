"""nnU-Net's spatial augmentation (spec 5.4, row 1): rotation and scaling with independent probabilities, then a
centre crop of the enlarged sampled patch to the plan's patch size.

MONAI's ``RandAffined`` has one probability for all its parameters and scales by ``1 + U(-s, s)``; nnU-Net draws
rotation (p 0.2) and scaling (p 0.2, factor U(0.7, 1.4), > 1 zooms out) independently, and "dummy 2-D" plans rotate
in-plane only. This transform draws the parameters and lets MONAI's ``Affine`` do the resampling; every intensity
augmentation of the pipeline is a MONAI transform in the bundle's train.json.
"""

from __future__ import annotations

import numpy as np
from monai.transforms import Affine, CenterSpatialCrop, MapTransform, Randomizable


class NnUNetSpatiald(Randomizable, MapTransform):
    def __init__(self, keys, patch_size, rotation: float = np.pi / 6, p_rotation: float = 0.2,
                 p_scaling: float = 0.2, scaling=(0.7, 1.4), dummy_2d: bool = False, mode=("bilinear", "nearest")):
        MapTransform.__init__(self, keys)
        self.patch_size = [int(p) for p in patch_size]
        self.rotation = abs(float(rotation))
        self.p_rotation, self.p_scaling = p_rotation, p_scaling
        self.scaling = tuple(scaling)
        self.dummy_2d = dummy_2d
        self.mode = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
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
        for key, mode in zip(self.key_iterator(d), self.mode):
            d[key] = affine(d[key], mode=mode)
        return d
