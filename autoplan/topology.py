"""U-Net topology from spacing and patch size, and the planner's memory estimate (spec 3.5 and 3.6 step 3).

Pure Python arithmetic: the planner must not import torch. Float operations follow nnU-Net's order so that
rounding and tie-breaking give the same integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_FEATURE_MAP_EDGE = 4
MAX_NUMPOOL = 999999


@dataclass
class Topology:
    num_pool_per_axis: list[int]
    strides: list[list[int]]  # per stage, stage 0 has stride 1
    kernel_sizes: list[list[int]]  # per stage
    patch_size: list[int]  # padded to a multiple of the divisor
    divisor: list[int]  # 2 ** num_pool_per_axis

    @property
    def n_stages(self) -> int:
        return len(self.strides)


def pad_shape(shape, divisor) -> list[int]:
    """Round each edge up to the next multiple of its divisor (unchanged when already divisible)."""
    return [int(s) if s % d == 0 else int(s + d - s % d) for s, d in zip(shape, divisor)]


def pool_and_conv_props(spacing, patch_size, min_edge: int = MIN_FEATURE_MAP_EDGE,
                        max_numpool: int = MAX_NUMPOOL) -> Topology:
    """Pool an axis while its feature map stays >= 2*min_edge and its spacing is within 2x of the finest valid axis.

    Kernels become 3 on an axis once its spacing is within 2x of the finest axis, so anisotropic data gets 1x3x3
    kernels until pooling has evened the spacing out.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]
    num_pool = [0] * dim
    kernel = [1] * dim
    strides = [[1] * dim]
    kernels = []
    while True:
        valid = [d for d in range(dim) if current_size[d] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current_spacing[d] for d in valid)
        valid = [d for d in valid if current_spacing[d] / finest < 2]
        valid = [d for d in valid if num_pool[d] < max_numpool]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        finest_all = min(current_spacing)
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / finest_all < 2:
                kernel[d] = 3
        stride = [1] * dim
        for d in valid:
            stride[d] = 2
            num_pool[d] += 1
            current_spacing[d] *= 2
            current_size[d] = math.ceil(current_size[d] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)
    divisor = [2**n for n in num_pool]
    return Topology(num_pool, strides, kernels, pad_shape(patch_size, divisor), divisor)


def _stage_sizes(patch_size, strides) -> list[int]:
    """Voxel count of the feature map after each stage's (strided) first convolution."""
    size = list(patch_size)
    counts = []
    for stride in strides:
        size = [s // t for s, t in zip(size, stride)]
        counts.append(math.prod(size))
    return counts


def plain_unet_feature_map_size(patch_size, strides, features, n_conv_encoder, n_conv_decoder,
                                num_classes: int) -> int:
    """Feature-map voxels of nnU-Net's PlainConvUNet without deep supervision (its VRAM proxy)."""
    counts = _stage_sizes(patch_size, strides)
    encoder = sum(n * f * c for n, f, c in zip(n_conv_encoder, features, counts))
    decoder = sum((n + 1) * f * c for n, f, c in zip(n_conv_decoder, features, counts))
    return encoder + decoder + num_classes * counts[0]


def resenc_unet_feature_map_size(patch_size, strides, features, n_blocks_encoder, n_conv_decoder,
                                 num_classes: int) -> int:
    """Feature-map voxels of nnU-Net's ResidualEncoderUNet (BasicBlockD) without deep supervision."""
    counts = _stage_sizes(patch_size, strides)
    stem = features[0] * math.prod(patch_size)
    blocks = sum(2 * b * f * c for b, f, c in zip(n_blocks_encoder, features, counts))
    projections = sum(f * c for f, c in zip(features[1:], counts[1:]))
    decoder = sum((n + 1) * f * c for n, f, c in zip(n_conv_decoder, features, counts))
    return stem + blocks + projections + decoder + num_classes * counts[0]
