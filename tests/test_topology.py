"""Topology rules (spec 3.5) and the memory estimate (spec 3.6 step 3)."""

from autoplan.topology import (pad_shape, plain_unet_feature_map_size, pool_and_conv_props,
                               resenc_unet_feature_map_size)


def test_pad_shape_rounds_up_only_when_needed():
    assert pad_shape([40, 56, 40], [8, 8, 8]) == [40, 56, 40]
    assert pad_shape([36, 50, 35], [8, 8, 8]) == [40, 56, 40]
    assert pad_shape([35.5, 7], [1, 4]) == [36, 8]


def test_isotropic_hippocampus_topology():
    t = pool_and_conv_props([1.0, 1.0, 1.0], [36, 50, 35])
    assert t.patch_size == [40, 56, 40]
    assert t.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert t.kernel_sizes == [[3, 3, 3]] * 4
    assert t.num_pool_per_axis == [3, 3, 3] and t.divisor == [8, 8, 8]


def test_anisotropic_axis_is_not_pooled_until_spacing_evens_out():
    t = pool_and_conv_props([3.6, 0.625, 0.625], [20, 320, 256])
    assert t.strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert t.kernel_sizes == [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5
    assert t.patch_size == [20, 320, 256]
    assert t.num_pool_per_axis == [2, 6, 6] and t.divisor == [4, 64, 64]


def test_single_axis_needs_twelve_voxels_to_pool():
    """A lone poolable axis is pooled only while it has >= 3 x 4 voxels: 80 -> 40 -> 20 -> 10, and 10 stops it."""
    t = pool_and_conv_props([1.0, 1.0], [8, 80])
    assert t.num_pool_per_axis == [1, 3]
    assert t.strides == [[1, 1], [2, 2], [1, 2], [1, 2]]
    assert t.kernel_sizes == [[3, 3]] * 4
    assert t.divisor == [2, 8] and t.patch_size == [8, 80] and t.n_stages == 4


def test_odd_edges_round_up_when_pooled():
    """15 voxels pool to ceil(7.5) = 8, which is still >= 8 and pools again; the patch pads to the divisor 4."""
    t = pool_and_conv_props([1.0, 1.0], [15, 15])
    assert t.num_pool_per_axis == [2, 2]
    assert t.strides == [[1, 1], [2, 2], [2, 2]]
    assert t.divisor == [4, 4] and t.patch_size == [16, 16]


def test_spacing_exactly_twice_the_finest_is_not_pooled_yet():
    """A ratio of 2 is not < 2: the coarse axis waits one stage (kernel 1) and then pools with the others."""
    t = pool_and_conv_props([2.0, 1.0, 1.0], [64, 64, 64])
    assert t.num_pool_per_axis == [3, 4, 4]
    assert t.strides == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert t.kernel_sizes == [[1, 3, 3]] + [[3, 3, 3]] * 4
    assert t.divisor == [8, 16, 16] and t.patch_size == [64, 64, 64]


def test_max_numpool_caps_the_poolings_per_axis():
    t = pool_and_conv_props([1.0, 1.0, 1.0], [64, 64, 64], max_numpool=2)
    assert t.num_pool_per_axis == [2, 2, 2] and t.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2]]
    assert t.kernel_sizes == [[3, 3, 3]] * 3 and t.divisor == [4, 4, 4]


def test_feature_map_estimates_match_spec_worked_examples():
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    features = [32, 64, 128, 256]
    plain = plain_unet_feature_map_size([40, 56, 40], strides, features, [2] * 4, [2] * 3, num_classes=3)
    assert plain == 19_174_400
    resenc = resenc_unet_feature_map_size([40, 56, 40], strides, features, [1, 3, 4, 6], [1] * 3, num_classes=3)
    assert resenc == 23_609_600
