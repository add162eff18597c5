"""nnU-Net's resampling functions as shipped in bundles (spec 3.9): the default and the torch one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from bundles.scripts.resampling import (
    compute_new_shape,
    resample,
    resample_data_or_seg_to_shape,
    resample_logits_torch,
    resample_torch,
    resampled_argmax,
    resize,
    resize_segmentation,
    separate_z_axis,
)

ISO = (1.0, 1.0, 1.0)


def line(values, dtype=np.float32):
    """A (1, 1, 1, n) array: one channel, resampled along the last axis only."""
    return np.asarray(values, dtype=dtype).reshape(1, 1, 1, -1)


def plain(data, new_shape, **kw):
    return resample_data_or_seg_to_shape(data, new_shape, ISO, ISO, force_separate_z=False, **kw)


# --- shapes and the separate-z decision -------------------------------------------------------------------------


def test_compute_new_shape_uses_bankers_rounding():
    assert compute_new_shape((10, 20, 30), (1, 1, 1), (2, 2, 2)) == [5, 10, 15]
    assert compute_new_shape((5, 7, 9), (1, 1, 1), (2, 2, 2)) == [2, 4, 4]  # 2.5 -> 2, 3.5 -> 4, 4.5 -> 4
    assert compute_new_shape((36, 50, 35), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == [36, 50, 35]
    shape = compute_new_shape(np.array([12, 80, 80]), np.array([3.6, 0.6, 0.6]), [1.8, 0.75, 0.75])
    assert shape == [24, 64, 64] and all(type(s) is int for s in shape)


@pytest.mark.parametrize("current, new, force, axis", [
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None, None),      # isotropic
    ((3.6, 0.6, 0.6), (1.0, 1.0, 1.0), None, 0),         # anisotropic now
    ((0.6, 0.6, 3.6), (0.6, 0.6, 3.6), None, 2),
    ((1.0, 1.0, 1.0), (1.0, 3.5, 1.0), None, 1),         # anisotropic target only
    ((3.0, 1.0, 1.0), (3.0, 1.0, 1.0), None, None),      # ratio exactly 3 is not > 3
    ((3.6, 3.6, 0.6), (1.0, 1.0, 1.0), None, None),      # tie for the largest spacing
    ((0.24, 1.25, 1.25), (1.0, 1.0, 1.0), None, None),   # the tie case nnU-Net comments on
    ((999.0, 0.7, 0.7), (999.0, 0.5, 0.5), None, 0),     # 2-D data
    ((5.0, 1.0, 1.0), (5.0, 1.0, 1.0), False, None),
    ((1.0, 1.0, 2.0), (1.0, 1.0, 1.0), True, 2),         # forced: axis from the current spacing
])
def test_separate_z_decision(current, new, force, axis):
    assert separate_z_axis(current, new, force) == axis


# --- plain (non-separate) resize ---------------------------------------------------------------------------------


def test_identity_returns_input_unchanged():
    data = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float64)
    assert resample_data_or_seg_to_shape(data, (3, 4, 5), (3.6, 1, 1), ISO) is data


def test_order0_nearest_with_half_pixel_centres():
    out = plain(line([0, 1, 2, 3]), (1, 1, 8), order=0)
    np.testing.assert_array_equal(out.ravel(), [0, 0, 1, 1, 2, 2, 3, 3])
    out = plain(line([0, 1, 2, 3, 4, 5]), (1, 1, 3), order=0)  # source coords 0.5, 2.5, 4.5 round half up
    np.testing.assert_array_equal(out.ravel(), [1, 3, 5])


def test_order1_linear_with_edge_clamping():
    # up: source coords -0.25, 0.25, 0.75, 1.25 -> clamped at the edges
    np.testing.assert_allclose(plain(line([0, 4]), (1, 1, 4), order=1).ravel(), [0, 1, 3, 4])
    # down: source coords 0.5, 2.5 (no anti-aliasing)
    np.testing.assert_allclose(plain(line([0, 1, 2, 3]), (1, 1, 2), order=1).ravel(), [0.5, 2.5])


def test_order3_is_clipped_to_input_range():
    step = line([0, 0, 0, 1, 1, 1])
    raw = ndimage.zoom(step[0, 0, 0], 3, order=3, mode="nearest", grid_mode=True)
    assert raw.min() < 0 and raw.max() > 1  # the cubic spline overshoots ...
    out = plain(step, (1, 1, 18), order=3)
    assert out.min() == 0 and out.max() == 1  # ... and the result is clipped like skimage's clip=True
    np.testing.assert_allclose(plain(np.full((1, 4, 5, 6), 7.0), (5, 3, 9), order=3), 7.0, rtol=1e-6)


def test_dtypes():
    data = np.arange(2 * 4 * 4 * 4, dtype=np.float64).reshape(2, 4, 4, 4)
    assert plain(data, (2, 5, 3)).dtype == np.float32
    assert plain(data.astype(np.int16), (2, 5, 3)).dtype == np.float32
    for dtype in (np.int8, np.int16, np.uint8, np.int32):
        seg = (np.arange(64).reshape(1, 4, 4, 4) % 3).astype(dtype)
        for order in (0, 1):
            assert plain(seg, (6, 3, 5), is_seg=True, order=order).dtype == dtype


# --- separate z --------------------------------------------------------------------------------------------------


def test_separate_z_resizes_in_plane_then_nearest_along_z():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, 3, 6, 5)).astype(np.float32)
    out = resample_data_or_seg_to_shape(data, (6, 9, 7), (3.6, 0.6, 0.6), (1.8, 0.4, 0.4))
    assert out.shape == (2, 6, 9, 7) and out.dtype == np.float32
    for c in range(2):
        for z, src in enumerate([0, 0, 1, 1, 2, 2]):  # z coords -0.25, 0.25, 0.75, ... -> nearest
            np.testing.assert_array_equal(out[c, z], resize(data[c, src], (9, 7), 3))
    # the plain 3-D resize gives something else
    assert not np.allclose(out, plain(data, (6, 9, 7)))


def test_separate_z_without_z_change_is_per_slice():
    data = np.random.default_rng(2).normal(size=(1, 4, 6, 6)).astype(np.float32)
    out = resample_data_or_seg_to_shape(data, (4, 3, 8), (4.0, 1.0, 1.0), (4.0, 1.0, 1.0), order=3)
    for z in range(4):
        np.testing.assert_array_equal(out[0, z], resize(data[0, z], (3, 8), 3))


def test_separate_z_order_z_linear():
    data = line([0, 2, 4]).reshape(1, 3, 1, 1)
    out = resample_data_or_seg_to_shape(data, (6, 1, 1), (3.6, 0.6, 0.6), ISO, order_z=1)
    np.testing.assert_allclose(out.ravel(), [0, 0.5, 1.5, 2.5, 3.5, 4])


def test_2d_data_keeps_its_single_slice():
    data = np.random.default_rng(3).normal(size=(1, 1, 10, 8)).astype(np.float32)
    out = resample_data_or_seg_to_shape(data, (1, 14, 5), (999.0, 0.7, 0.7), (999.0, 0.5, 1.1))
    np.testing.assert_array_equal(out[0, 0], resize(data[0, 0], (14, 5), 3))


# --- segmentations -----------------------------------------------------------------------------------------------


def test_seg_one_hot_keeps_minus_one_and_thin_structures():
    seg = np.zeros((1, 1, 8, 8), dtype=np.int8)
    seg[..., :2] = -1        # outside the non-zero mask
    seg[0, 0, 3, 2:] = 2     # a one-voxel-thick line
    seg[0, 0, 6:, 5:] = 1
    out = resample_data_or_seg_to_shape(seg, (1, 16, 16), (999.0, 1, 1), (999.0, 0.5, 0.5), is_seg=True, order=1)
    assert out.dtype == np.int8
    assert set(np.unique(out)) == {-1, 0, 1, 2}
    np.testing.assert_array_equal(out[0, 0, :, :4], -1)
    rows = np.flatnonzero((out[0, 0] == 2).any(axis=1))
    np.testing.assert_array_equal(rows, [6, 7])  # rows 6, 7 sample source 2.75 / 3.25 -> mask 0.75


def test_seg_top_score_wins_and_ties_go_to_the_nearest_label():
    """batchgenerators 0.25.5's rule (nnU-Net 2.8.1): the label whose resized indicator scores highest; a tie goes to
    the nearest-neighbour label (scipy's order 0 takes source 1 at coordinate 0.5)."""
    # source coord 0.5 at the middle voxel: both masks 0.5, the nearest source voxel is 1
    np.testing.assert_array_equal(plain(line([1, 2], dtype=np.int16), (1, 1, 3), is_seg=True, order=1).ravel(),
                                  [1, 2, 2])  # nearest is 2, not the smaller label
    np.testing.assert_array_equal(plain(line([2, 1], dtype=np.int16), (1, 1, 3), is_seg=True, order=1).ravel(),
                                  [2, 1, 1])  # nearest is 1, not the later label
    seg = np.array([[1, 2], [3, 4]], dtype=np.int16).reshape(1, 1, 2, 2)
    out = plain(seg, (1, 3, 3), is_seg=True, order=1)  # the centre samples all four masks at 0.25: nearest (4)
    np.testing.assert_array_equal(out[0, 0], [[1, 2, 2], [3, 4, 4], [3, 4, 4]])
    # 0 0 2 -> 5 voxels: coords -0.2, 0.4, 1.0, 1.6, 2.2; label 2 scores 0, 0, 0, .6, 1: the larger score wins
    np.testing.assert_array_equal(plain(line([0, 0, 2], dtype=np.int8), (1, 1, 5), is_seg=True, order=1).ravel(),
                                  [0, 0, 0, 2, 2])


def test_seg_order0_is_nearest():
    seg = line([-1, 0, 3, 5], dtype=np.int8)
    np.testing.assert_array_equal(plain(seg, (1, 1, 8), is_seg=True, order=0).ravel(), [-1, -1, 0, 0, 3, 3, 5, 5])
    np.testing.assert_array_equal(resize_segmentation(seg[0], (1, 1, 8), 0).ravel(), [-1, -1, 0, 0, 3, 3, 5, 5])


def test_seg_separate_z_out_of_plane_is_nearest_on_labels():
    seg = np.zeros((1, 2, 4, 4), dtype=np.int16)
    seg[0, 1] = 3
    seg[0, 0, 1:3, 1:3] = -1
    out = resample_data_or_seg_to_shape(seg, (5, 4, 4), (3.6, 0.6, 0.6), ISO, is_seg=True, order=1)
    # z coords 0.4*(i+0.5)-0.5 = -0.3, 0.1, 0.5, 0.9, 1.3 -> 0, 0, 1 (half up), 1, 1
    for z, src in enumerate([0, 0, 1, 1, 1]):
        np.testing.assert_array_equal(out[0, z], seg[0, src])


def test_seg_separate_z_linear_order_z_uses_rounded_one_hot():
    seg = np.array([0, 2], dtype=np.int8).reshape(1, 2, 1, 1)
    out = resample_data_or_seg_to_shape(seg, (4, 1, 1), (3.6, 0.6, 0.6), ISO, is_seg=True, order=1, order_z=1)
    np.testing.assert_array_equal(out.ravel(), [0, 0, 2, 2])  # interpolated masks 1, .75, .25, 0 / 0, .25, .75, 1


# --- equivalence with a literal reading of the spec on top of scikit-image ---------------------------------------


def _reference(data, new_shape, current_spacing, new_spacing, is_seg, order, order_z, force=None):
    """Spec 3.9 written out literally with skimage's resize and a full 3-D map_coordinates (test-only); label maps
    resized by batchgenerators 0.25.5's rule (top score, ties to the nearest label), not the spec's threshold."""
    from skimage.transform import resize as sk_resize

    def sk_data(x, shape, o):
        return sk_resize(x, shape, o, mode="edge", anti_aliasing=False)

    def sk_seg(x, shape, o):
        if o == 0:
            return sk_resize(x.astype(float), shape, o, mode="edge", clip=True, anti_aliasing=False).astype(x.dtype)
        # every label's resized indicator; the top score wins (argmax: the smallest label among ties), unless the
        # nearest-neighbour label shares the (positive) top score
        labels = np.unique(x)
        nearest = sk_resize(x.astype(float), shape, 0, mode="edge", clip=True, anti_aliasing=False)
        scores = np.stack([sk_resize((x == c).astype(float), shape, o, mode="edge", clip=True, anti_aliasing=False)
                           for c in labels])
        top = scores.max(axis=0)
        nearest_on_top = np.any([(scores[i] == top) & (nearest == c) for i, c in enumerate(labels)], axis=0)
        return np.where(nearest_on_top & (top > 0), nearest, labels[np.argmax(scores, axis=0)]).astype(x.dtype)

    fn = sk_seg if is_seg else sk_data
    axis = separate_z_axis(current_spacing, new_spacing, force)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    data = data.astype(float)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = fn(data[c], new_shape, order)
            continue
        tmp = list(new_shape)
        tmp[axis] = data.shape[axis + 1]
        here = np.zeros(tmp)
        plane = [s for a, s in enumerate(new_shape) if a != axis]
        for i in range(data.shape[axis + 1]):
            idx = (slice(None),) * axis + (i,)
            here[idx] = fn(data[c][idx], plane, order)
        if here.shape[axis] == new_shape[axis]:
            out[c] = here
            continue
        grid = np.mgrid[tuple(slice(0, s) for s in new_shape)]
        coords = np.array([float(o) / n * (g + 0.5) - 0.5 for g, o, n in zip(grid, here.shape, new_shape)])
        if not is_seg or order_z == 0:
            out[c] = ndimage.map_coordinates(here, coords, order=order_z, mode="nearest")
        else:
            for cl in np.unique(here):
                m = ndimage.map_coordinates((here == cl).astype(float), coords, order=order_z, mode="nearest")
                out[c][np.round(m) > 0.5] = cl
    return out


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("shape, new_shape", [((7, 9, 5), (12, 4, 5)), ((1, 9, 8), (1, 4, 13)), ((6, 6, 6), (6, 6, 6))])
def test_resize_equals_skimage(order, shape, new_shape):
    skt = pytest.importorskip("skimage.transform")
    img = np.random.default_rng(order).normal(size=shape).astype(np.float32)
    expected = skt.resize(img.astype(np.float64), new_shape, order, mode="edge", anti_aliasing=False)
    np.testing.assert_array_equal(resize(img, new_shape, order), expected.astype(np.float32))


@pytest.mark.parametrize("current, new, new_shape, order, order_z", [
    ((1.0, 1.0, 1.0), (0.7, 1.3, 0.9), (9, 5, 7), 3, 0),    # plain 3-D
    ((3.6, 0.6, 0.6), (1.8, 0.9, 0.5), (8, 4, 7), 3, 0),    # separate z, axis 0
    ((0.8, 0.8, 4.0), (1.0, 1.0, 1.7), (5, 4, 9), 1, 0),    # separate z, axis 2
    ((3.6, 0.6, 0.6), (5.0, 0.9, 0.5), (3, 4, 7), 1, 1),    # separate z, linear along z
    ((0.6, 3.6, 0.6), (0.5, 1.5, 0.9), (7, 14, 4), 1, 3),   # separate z, cubic along z (full 3-D call)
    ((999.0, 0.7, 0.7), (999.0, 0.5, 1.1), (1, 8, 4), 3, 0),  # 2-D
])
def test_pipeline_equals_reference(current, new, new_shape, order, order_z):
    pytest.importorskip("skimage")
    rng = np.random.default_rng(4)
    shape = (1, 6, 6) if current[0] == 999.0 else (4, 6, 6)
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    seg = rng.integers(-1, 4, size=(1, *shape)).astype(np.int8)
    seg[0, :, :2] = -1
    got = resample_data_or_seg_to_shape(data, new_shape, current, new, order=order, order_z=order_z)
    np.testing.assert_array_equal(got, _reference(data, new_shape, current, new, False, order, order_z))
    for seg_order in (0, 1):
        got = resample_data_or_seg_to_shape(seg, new_shape, current, new, is_seg=True, order=seg_order,
                                            order_z=order_z)
        np.testing.assert_array_equal(got, _reference(seg, new_shape, current, new, True, seg_order, order_z))


# --- torch fast path ---------------------------------------------------------------------------------------------


def test_torch_logits_match_order1_without_separate_z():
    logits = np.random.default_rng(5).normal(size=(3, 5, 7, 6)).astype(np.float32)
    got = resample_logits_torch(torch.from_numpy(logits), (8, 4, 9))
    assert isinstance(got, torch.Tensor) and tuple(got.shape) == (3, 8, 4, 9)
    np.testing.assert_allclose(got.numpy(), plain(logits, (8, 4, 9), order=1), atol=1e-5)
    two_d = torch.from_numpy(logits[:, :1])
    got = resample_logits_torch(two_d.half(), (1, 10, 3))
    assert tuple(got.shape) == (3, 1, 10, 3)
    np.testing.assert_allclose(got.numpy(), plain(logits[:, :1].astype(np.float16), (1, 10, 3), order=1), atol=1e-5)
    same = torch.zeros(2, 3, 4, 5)
    assert resample_logits_torch(same, (3, 4, 5)) is same


# --- nnU-Net's torch resampling (the *_torchres planners) --------------------------------------------------------
TORCH_FIXTURE = Path(__file__).parent / "fixtures" / "nnunet_torch_resampling.npz"  # make_torch_resampling_fixture


def _torch_cases():
    with np.load(TORCH_FIXTURE) as f:
        cases = json.loads(str(f["cases"]))
        arrays = {k: f[k] for k in f.files if k != "cases"}
    return [pytest.param(c, arrays[c[0] + "/in"], arrays[c[0] + "/out"], id=c[0]) for c in cases]


@pytest.mark.parametrize("case,data,expected", _torch_cases())
def test_resample_torch_equals_nnunets_function(case, data, expected):
    name, kind, _, new_shape, current, new, kwargs = case
    is_seg = kind.startswith("seg")
    got = resample_torch(data, new_shape, current, new, is_seg=is_seg, **kwargs)
    assert isinstance(got, np.ndarray) and got.dtype == expected.dtype and got.shape == expected.shape
    got_torch = resample("resample_torch_fornnunet", torch.from_numpy(data), new_shape, current, new,
                         is_seg=is_seg, num_threads=4, **kwargs)  # nnU-Net's extra arguments are accepted
    np.testing.assert_array_equal(got_torch.numpy(), got)
    if is_seg:
        np.testing.assert_array_equal(got, expected)
        return
    # torch's CPU kernels round the last float32 bit differently with the batch they are handed (slabs here, the
    # whole stack in nnU-Net): equal up to rounding at the input's magnitude
    scale = float(np.abs(data.astype(np.float32)).max())
    np.testing.assert_allclose(got, expected, rtol=0, atol=2 * np.spacing(np.float32(scale)))
    if data.shape[0] < 2:
        return
    # the export's fast argmax: nnU-Net's labels from the logits it is handed, wherever no two channels are that close
    labels = resampled_argmax(data.astype(np.float32), new_shape, current, new, "resample_torch_fornnunet", **kwargs)
    top = np.sort(expected, axis=0)[-2:]
    clear = (top[1] - top[0]) > 4 * np.spacing(np.abs(top[1]))
    np.testing.assert_array_equal(labels[clear], np.argmax(expected, 0)[clear])
    assert clear.mean() > 0.99


def test_resample_torch_same_shape_returns_input():
    data = np.zeros((1, 3, 4, 5), np.float32)
    assert resample_torch(data, (3, 4, 5), ISO, ISO) is data


def test_resampled_argmax_equals_argmax_of_default_resampling():
    """Fused argmax of the default export (order 1, nearest along a separate axis, running maximum otherwise) equals
    resampling then argmax; near-ties (quantised logits) included."""
    rng = np.random.default_rng(7)
    settings = [((3.0, 1.0, 1.0), (3.5, 0.7, 0.7), {}), ((1.0, 1.0, 1.0), (1.3, 0.8, 0.9), {}),
                ((3.0, 1.0, 1.0), (2.0, 0.7, 0.7), {"order_z": 1}), ((0.7, 0.7, 3.0), (1.0, 0.5, 2.5), {})]
    for current, new, extra in settings:
        for quantised in (False, True):
            logits = rng.normal(size=(3, 7, 19, 16)).astype(np.float32)
            logits = np.round(logits * 4) / 4 if quantised else logits
            new_shape = compute_new_shape(logits.shape[1:], current, new)
            kwargs = {"order": 1, "order_z": 0, "force_separate_z": None, **extra}
            expected = np.argmax(resample_data_or_seg_to_shape(logits, new_shape, current, new, **kwargs), 0)
            got = resampled_argmax(logits, new_shape, current, new, **kwargs)
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, expected)


def test_unknown_resampling_function_is_refused():
    with pytest.raises(ValueError, match="unsupported resampling function"):
        resample("no_such_fn", np.zeros((1, 2, 2, 2)), (3, 3, 3), ISO, ISO)
