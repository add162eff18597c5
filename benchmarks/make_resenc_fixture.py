"""Generate ``tests/fixtures/nnunet_resenc_unets.pt``: small ResidualEncoderUNets (the network of nnU-Net's ResEnc
M/L/XL presets) built by nnU-Net 2.8.1 itself (``get_network_from_plans``, in the venv of ``nnunet_venv.py``) from
plans-style ``arch_kwargs``, with their weights, an input and the outputs (deep-supervision list in training mode,
one tensor in eval mode).

nnU-Net starts every residual block as the identity (the last norm of each ``BasicBlockD`` is zero), which would hide
a wrongly mapped second convolution; so after nnU-Net's own initialisation every weight is perturbed with seeded
noise. The test suite loads each state dict into the bundle's ``ResidualEncoderUNet`` built from the same plan and
compares every output. nnU-Net is only called; none of its code is copied.

Usage::

    python benchmarks/make_resenc_fixture.py [--venv DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_network_fixture import _COMMON  # noqa: E402
from nnunet_venv import fixture_venv_python, write_fixture  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nnunet_resenc_unets.pt"

CASES = {
    # ResEnc M-like layout (blocks 1, 2, 3, 2; one decoder conv), anisotropic: in-plane kernels and pooling first
    "resenc_m_anisotropic_3d": {"in_channels": 2, "out_channels": 3, "input_shape": [1, 2, 8, 16, 16], "arch_kwargs": {
        "n_stages": 4, "features_per_stage": [2, 4, 4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "n_blocks_per_stage": [1, 2, 3, 2],
        "n_conv_per_stage_decoder": [1, 1, 1], "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        **_COMMON}},
    # ResEnc L-like 2-D layout: more blocks deeper, a 5-stage encoder, two decoder convs at the top
    "resenc_l_2d": {"in_channels": 1, "out_channels": 2, "input_shape": [2, 1, 32, 32], "arch_kwargs": {
        "n_stages": 5, "features_per_stage": [2, 4, 4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * 5, "strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]],
        "n_blocks_per_stage": [1, 3, 4, 2, 2], "n_conv_per_stage_decoder": [1, 1, 1, 2],
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", **_COMMON}},
}

_BUILD = r"""
import json, sys, torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
cases, out = json.loads(sys.argv[1]), sys.argv[2]
fixture = {}
for name, case in cases.items():
    torch.manual_seed(0)
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                 case["arch_kwargs"], ["conv_op", "norm_op", "dropout_op", "nonlin"],
                                 case["in_channels"], case["out_channels"], allow_init=True, deep_supervision=True)
    with torch.no_grad():  # every weight away from its initial value, zero norms of the residual branches included
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(*case["input_shape"])
    with torch.no_grad():
        net.train()
        train_out = [o.clone() for o in net(x)]
        net.eval()
        net.decoder.deep_supervision = False
        eval_out = net(x).clone()
    state = {k: v.clone() for k, v in net.state_dict().items()  # without the aliases nnU-Net keeps twice
             if ".all_modules." not in k and not k.startswith("decoder.encoder.")}
    fixture[name] = {**case, "class": type(net).__name__, "state_dict": state, "input": x,
                     "train_outputs": train_out, "eval_output": eval_out}
torch.save(fixture, out)
"""


def main(argv=None) -> int:
    write_fixture(fixture_venv_python(__doc__, argv), FIXTURE, _BUILD, json.dumps(CASES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
