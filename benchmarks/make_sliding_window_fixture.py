"""Generate ``tests/fixtures/nnunet_sliding_window.pt``: nnU-Net 2.8.1's own sliding-window tiles, Gaussian
importance maps and whole sliding-window predictions, made in the venv of ``nnunet_venv.py``.

Three parts, each computed by nnU-Net's code (``nnunetv2.inference``), which is only called, never copied:

- ``steps``: ``compute_steps_for_sliding_window(image_size, tile_size, 0.5)`` for 3-D (isotropic, anisotropic, image
  as large as the tile, a tile step that rounds) and 2-D sizes;
- ``gaussians``: ``compute_gaussian(tile_size, 1/8)`` in float32 for odd, even, anisotropic and 2-D tiles;
- ``predictions``: ``nnUNetPredictor.predict_sliding_window_return_logits`` on CPU for a 3-D anisotropic image with
  mirroring, a 3-D image smaller than the patch along two axes, and a 2-D configuration (per-slice tiles) on a 3-D
  volume with mirroring. The network is a "tile probe": a seeded convolution plus the mean of each window broadcast
  over the window, so its output depends on where every tile lies, not only on the voxels it covers. The tests
  build the same probe, load its weights and run the bundle's ``NnUNetInferer`` on the same input.

nnU-Net accumulates the logits and the weights in float16; the tests allow for that.

Usage::

    python benchmarks/make_sliding_window_fixture.py [--venv DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_venv import fixture_venv_python, write_fixture  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nnunet_sliding_window.pt"

STEPS = [  # (image_size, tile_size), nnU-Net order
    ([40, 40, 40], [16, 16, 16]), ([13, 37, 29], [8, 16, 12]), ([8, 16, 12], [8, 16, 12]),
    ([110, 70, 9], [64, 24, 9]), ([23, 130, 101], [7, 20, 30]), ([37, 29], [16, 12]), ([300, 17], [64, 17]),
]
GAUSSIANS = [[8, 16, 12], [5, 9, 7], [1, 16, 16], [16, 12], [9, 11]]
PREDICTIONS = {  # image (C, z, y, x) shape, patch, mirror axes
    "anisotropic_3d": {"image_shape": [2, 13, 37, 29], "patch_size": [8, 16, 12], "mirror_axes": [0, 1, 2]},
    "smaller_than_patch_3d": {"image_shape": [1, 6, 20, 9], "patch_size": [8, 16, 12], "mirror_axes": []},
    "slices_2d": {"image_shape": [1, 3, 23, 30], "patch_size": [16, 12], "mirror_axes": [0, 1]},
}
OUT_CHANNELS = 2

_SCRIPT = r"""
import json, sys
from types import SimpleNamespace
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

steps_cases, gaussian_cases, prediction_cases, out_channels = json.loads(sys.argv[1])
out = sys.argv[2]


class TileProbe(torch.nn.Module):
    def __init__(self, dims, in_channels, out_channels):
        super().__init__()
        conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
        self.conv = conv(in_channels, out_channels, 3, padding=1)

    def forward(self, x):
        spatial = tuple(range(2, x.ndim))
        return self.conv(x) + x.mean(dim=spatial, keepdim=True).sum(dim=1, keepdim=True)


fixture = {"steps": [], "gaussians": [], "predictions": {}}
for image_size, tile_size in steps_cases:
    fixture["steps"].append({"image_size": image_size, "tile_size": tile_size,
                             "steps": compute_steps_for_sliding_window(image_size, tile_size, 0.5)})
for tile_size in gaussian_cases:
    g = compute_gaussian(tuple(tile_size), sigma_scale=1. / 8, value_scaling_factor=1, dtype=torch.float32,
                         device=torch.device("cpu"))
    fixture["gaussians"].append({"tile_size": tile_size, "gaussian": g.clone()})
for name, case in prediction_cases.items():
    torch.manual_seed(0)
    dims = len(case["patch_size"])
    net = TileProbe(dims, case["image_shape"][0], out_channels)
    grid = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in case["image_shape"][1:]], indexing="ij")
    ramp = sum((0.2 + 0.1 * i) * g for i, g in enumerate(grid))  # windows at other places have other means
    image = torch.randn(*case["image_shape"]) + ramp / 10
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=bool(case["mirror_axes"]),
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.network = net
    predictor.configuration_manager = SimpleNamespace(patch_size=case["patch_size"])
    predictor.label_manager = SimpleNamespace(num_segmentation_heads=out_channels)
    predictor.allowed_mirroring_axes = tuple(case["mirror_axes"])
    logits = predictor.predict_sliding_window_return_logits(image)
    fixture["predictions"][name] = {**case, "state_dict": {k: v.clone() for k, v in net.state_dict().items()},
                                    "image": image, "logits": logits.float().clone(),
                                    "logits_dtype": str(logits.dtype)}
torch.save(fixture, out)
"""


def main(argv=None) -> int:
    write_fixture(fixture_venv_python(__doc__, argv), FIXTURE, _SCRIPT,
                  json.dumps([STEPS, GAUSSIANS, PREDICTIONS, OUT_CHANNELS]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
