"""Generate ``tests/fixtures/nnunet_plain_unets.pt``: small PlainConvUNets built by nnU-Net 2.8.1 itself
(``get_network_from_plans``, in the venv of ``nnunet_venv.py``) from plans-style ``arch_kwargs``, with their seeded
weights, an input and the outputs (deep-supervision list in training mode, one tensor in eval mode).

The test suite loads each state dict into the bundle's own network for the same ``arch_kwargs`` and compares outputs,
so exactness is checked against nnU-Net without nnU-Net being a dependency. nnU-Net is only called; none of its code
is copied. The networks are tiny (a few thousand weights) so the fixture stays small.

Usage::

    python benchmarks/make_network_fixture.py [--venv DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_venv import ensure_nnunet_venv  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nnunet_plain_unets.pt"

_NORM = {"eps": 1e-05, "affine": True}
_COMMON = {"conv_bias": True, "norm_op_kwargs": _NORM, "dropout_op": None, "dropout_op_kwargs": None,
           "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
CASES = {
    # an anisotropic 3-D plan: in-plane kernels first, z pooled late (where MONAI's DynUNet picks other kernels)
    "anisotropic_3d": {"in_channels": 2, "out_channels": 3, "input_shape": [1, 2, 8, 16, 16], "arch_kwargs": {
        "n_stages": 4, "features_per_stage": [2, 4, 8, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2, 2], "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        **_COMMON}},
    # a 2-D plan with conv counts other than 2 (DynUNet has exactly 2 per stage)
    "uneven_convs_2d": {"in_channels": 1, "out_channels": 2, "input_shape": [2, 1, 16, 16], "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [2, 4, 4], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3], [3, 3], [3, 3]], "strides": [[1, 1], [2, 2], [2, 2]],
        "n_conv_per_stage": [1, 2, 3], "n_conv_per_stage_decoder": [2, 1],
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", **_COMMON}},
}

_BUILD = r"""
import json, sys, torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
cases, out = json.loads(sys.argv[1]), sys.argv[2]
fixture = {}
for name, case in cases.items():
    torch.manual_seed(0)
    kw = case["arch_kwargs"]
    net = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", kw,
                                 ["conv_op", "norm_op", "dropout_op", "nonlin"], case["in_channels"],
                                 case["out_channels"], allow_init=True, deep_supervision=True)
    x = torch.randn(*case["input_shape"])
    with torch.no_grad():
        net.train()
        train_out = [o.clone() for o in net(x)]
        net.eval()
        net.decoder.deep_supervision = False
        eval_out = net(x).clone()
    state = {k: v for k, v in net.state_dict().items()  # without the aliases nnU-Net's modules keep twice
             if ".all_modules." not in k and not k.startswith("decoder.encoder.")}
    fixture[name] = {**case, "class": type(net).__name__, "state_dict": state, "input": x,
                     "train_outputs": train_out, "eval_output": eval_out}
torch.save(fixture, out)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    args = ap.parse_args(argv)
    python = ensure_nnunet_venv(args.venv)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    tmp = FIXTURE.with_name(f".{FIXTURE.name}.tmp")
    subprocess.run([str(python), "-c", _BUILD, json.dumps(CASES), str(tmp)], check=True)
    tmp.replace(FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
