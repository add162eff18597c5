"""The bundle's sliding window against nnU-Net 2.8.1's own (tests/fixtures/nnunet_sliding_window.pt, written by
benchmarks/make_sliding_window_fixture.py with nnU-Net's code): tile positions, the Gaussian importance map, and
whole predictions of ``NnUNetInferer`` with a network whose output depends on where each tile lies."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from bundles.scripts.inference import NnUNetInferer, gaussian_importance, tile_starts
from conftest import ROOT

FIXTURE = torch.load(ROOT / "tests" / "fixtures" / "nnunet_sliding_window.pt", weights_only=True)


pytestmark = pytest.mark.usefixtures("single_thread")


class TileProbe(nn.Module):
    """The generator's probe: a convolution plus each window's mean (over space, summed over channels)."""

    def __init__(self, dims, in_channels, out_channels):
        super().__init__()
        self.conv = (nn.Conv3d if dims == 3 else nn.Conv2d)(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).sum(dim=1, keepdim=True)


@pytest.mark.parametrize("case", FIXTURE["steps"], ids=lambda c: f"{c['image_size']}-{c['tile_size']}")
def test_tile_starts_are_nnunets(case):
    assert tile_starts(case["image_size"], case["tile_size"], 0.5) == case["steps"]


def test_tile_starts_hand_computed():
    # 110 voxels, tile 64, step at most 32: ceil(46 / 32) + 1 = 3 tiles, spread over 0..46 -> 0, 23, 46
    assert tile_starts([110], [64]) == [[0, 23, 46]]
    # 37 voxels, tile 16: ceil(21 / 8) + 1 = 4 tiles at 0, 7, 14, 21 (MONAI: 0, 8, 16, 21)
    assert tile_starts([37], [16]) == [[0, 7, 14, 21]]
    assert tile_starts([16, 5], [16, 5]) == [[0], [0]]
    with pytest.raises(ValueError, match="smaller than the tile"):
        tile_starts([15], [16])


@pytest.mark.parametrize("case", FIXTURE["gaussians"], ids=lambda c: str(c["tile_size"]))
def test_gaussian_is_nnunets(case):
    ours = gaussian_importance(case["tile_size"], 0.125)
    np.testing.assert_allclose(ours, case["gaussian"].numpy(), rtol=1e-6, atol=1e-12)
    assert ours.max() == 1.0 and ours.min() > 0


def test_gaussian_peak_is_at_the_lower_middle_voxel():
    """For an even tile the peak is voxel t // 2 (nnU-Net), not the centre (t - 1) / 2 (MONAI)."""
    g = gaussian_importance([8, 6])
    assert np.unravel_index(np.argmax(g), g.shape) == (4, 3)
    assert g[3, 3] < g[4, 3] == 1.0 and g[4, 2] < 1.0


def test_inferer_uses_nnunets_gaussian_for_2d_and_3d():
    torch.testing.assert_close(NnUNetInferer([8, 16, 12]).tile_weights,
                               torch.from_numpy(gaussian_importance([8, 16, 12])))
    two_d = NnUNetInferer([16, 12], two_d=True)
    assert two_d.tile_weights.shape == (1, 16, 12)
    torch.testing.assert_close(two_d.tile_weights[0], torch.from_numpy(gaussian_importance([16, 12])))
    assert torch.equal(NnUNetInferer([4, 4, 4], mode="constant").tile_weights, torch.ones(4, 4, 4))


def _weight_sum(inferer, shape):
    """Sum of the tile weights per voxel of an image of ``shape`` (padded to the tile as the inferer pads)."""
    tile = [int(t) for t in inferer.roi_size]
    padded = [max(s, t) for s, t in zip(shape, tile)]
    total = torch.zeros(padded)
    for s in inferer.tile_slices(padded):
        total[s] += inferer.tile_weights
    return total[tuple(slice((p - s) // 2, (p - s) // 2 + s) for p, s in zip(padded, shape))]


@pytest.mark.parametrize("name", sorted(FIXTURE["predictions"]))
def test_prediction_is_nnunets(name):
    """The same probe network and input through nnU-Net's ``predict_sliding_window_return_logits`` and ours.

    nnU-Net sums the weighted logits and the weights in float16. Where the weights of every covering tile are tiny
    (below 1e-4 of a tile's peak, at the image's edges and corners) its float16 sums lose their precision; there the
    float32 result is the better one and is not compared. Elsewhere the difference is float16 rounding (< 1e-2 for
    logits up to ~5); tiles placed or weighted as MONAI does differ by up to 0.7."""
    case = FIXTURE["predictions"][name]
    dims = len(case["patch_size"])
    net = TileProbe(dims, case["image_shape"][0], case["logits"].shape[0])
    net.load_state_dict(case["state_dict"])
    inferer = NnUNetInferer(case["patch_size"], case["mirror_axes"], two_d=dims == 2)
    with torch.no_grad():
        ours = inferer(case["image"][None], net.eval())[0]
    assert ours.shape == case["logits"].shape
    compared = _weight_sum(inferer, list(case["image"].shape[1:])) >= 1e-4
    assert compared.float().mean() > 0.85
    torch.testing.assert_close(ours[:, compared], case["logits"][:, compared], rtol=2e-3, atol=1e-2)


def test_batched_windows_and_meta_data():
    """sw_batch_size only groups windows; a MetaTensor input gives a MetaTensor with its meta data."""
    case = FIXTURE["predictions"]["anisotropic_3d"]
    net = TileProbe(3, case["image_shape"][0], 2).eval()
    net.load_state_dict(case["state_dict"])
    x = MetaTensor(torch.stack([case["image"], case["image"].flip(1)]), meta={"filename_or_obj": "a.nii.gz"})
    with torch.no_grad():
        one = NnUNetInferer(case["patch_size"])(x, net)
        three = NnUNetInferer(case["patch_size"], sw_batch_size=3)(x, net)
    assert isinstance(three, MetaTensor) and three.meta["filename_or_obj"] == "a.nii.gz"
    torch.testing.assert_close(one.as_tensor(), three.as_tensor(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        second = NnUNetInferer(case["patch_size"])(x[1:].as_tensor(), net)
    torch.testing.assert_close(one.as_tensor()[1:], second, rtol=1e-5, atol=1e-5)
