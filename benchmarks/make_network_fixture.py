"""Generate ``tests/fixtures/nnunet_plain_unets.pt``: small PlainConvUNets built by nnU-Net 2.8.1 itself
(``get_network_from_plans``, in the venv of ``nnunet_venv.py``) from plans-style ``arch_kwargs``, with their seeded
weights, an input and the outputs (deep-supervision list in training mode, one tensor in eval mode).

For the 3-D case it also records a few training steps taken with nnU-Net's own pieces: ``DC_and_CE_loss`` (soft Dice
without background, smooth 1e-5, plus cross-entropy) inside ``DeepSupervisionWrapper`` with the trainer's weights
(1/2^i, the lowest resolution 0, normalised), targets downsampled for each output as its
``DownsampleSegForDSTransform`` does, SGD with the trainer's settings and gradient clipping at 12: the batches, the
loss of every step and the weights after the last one. The tests take the same steps with the bundle's loss,
optimizer settings and clipping hook.

The test suite loads each state dict into the bundle's own network for the same ``arch_kwargs`` and compares outputs,
so exactness is checked against nnU-Net without nnU-Net being a dependency. nnU-Net is only called; none of its code
is copied. The networks are tiny (a few thousand weights) so the fixture stays small.

Usage::

    python benchmarks/make_network_fixture.py [--venv DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_venv import fixture_venv_python, write_fixture  # noqa: E402

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
    if name == "anisotropic_3d":
        fixture[name]["training"] = train_steps(net, case)
torch.save(fixture, out)
"""

_TRAIN = r"""
import numpy as np
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss


def train_steps(net, case, steps=4):
    torch.manual_seed(1)
    net.train()
    net.decoder.deep_supervision = True
    shape = case["input_shape"]
    batches = []
    for _ in range(steps):
        label = torch.zeros(shape[0], 1, *shape[2:])
        label[..., 2:6, 3:12, 4:11] = 1
        label[..., 3:5, 6:9, 6:9] = 2
        batches.append({"image": torch.randn(*shape) + label, "label": torch.roll(label, int(torch.randint(-2, 3, ())), -1)})
    weights = np.array([1 / 2 ** i for i in range(len(net.decoder.seg_layers))])
    weights[-1] = 0
    loss_fn = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                                                    {}, weight_ce=1, weight_dice=1, ignore_label=None,
                                                    dice_class=MemoryEfficientSoftDiceLoss), weights / weights.sum())
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        output = net(batch["image"])
        targets = [torch.nn.functional.interpolate(batch["label"], size=o.shape[2:], mode="nearest-exact")
                   for o in output]
        loss = loss_fn(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()
        losses.append(loss.item())
    after = {k: v.clone() for k, v in net.state_dict().items()
             if ".all_modules." not in k and not k.startswith("decoder.encoder.")}
    net.load_state_dict(state)
    return {"batches": batches, "losses": losses, "state_dict_after": after}
"""


def main(argv=None) -> int:
    python = fixture_venv_python(__doc__, argv)
    write_fixture(python, FIXTURE, _BUILD.replace("fixture = {}", _TRAIN + "\nfixture = {}"), json.dumps(CASES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
