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
    assert t.divisor == [8, 8, 8]


def test_anisotropic_axis_is_not_pooled_until_spacing_evens_out():
    t = pool_and_conv_props([3.6, 0.625, 0.625], [20, 320, 256])
    assert t.strides == [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert t.kernel_sizes == [[1, 3, 3], [1, 3, 3]] + [[3, 3, 3]] * 5
    assert t.patch_size == [20, 320, 256]


def test_single_axis_needs_twelve_voxels_to_pool():
    # Only axis 1 is still >= 8 after three poolings of a small patch; 10 < 12 stops the loop.
    t = pool_and_conv_props([1.0, 1.0], [8, 80])
    assert t.strides[-1] == [1, 2]
    assert all(s[0] == 1 for s in t.strides[2:])
    assert t.n_stages == len(t.kernel_sizes)


def test_feature_map_estimates_match_spec_worked_examples():
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    features = [32, 64, 128, 256]
    plain = plain_unet_feature_map_size([40, 56, 40], strides, features, [2] * 4, [2] * 3, num_classes=3)
    assert plain == 19_174_400
    resenc = resenc_unet_feature_map_size([40, 56, 40], strides, features, [1, 3, 4, 6], [1] * 3, num_classes=3)
    assert resenc == 23_609_600
