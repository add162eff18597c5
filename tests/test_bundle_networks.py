"""bundles/scripts/networks.py: ResEnc U-Net layout and init, DynUNet from plans, deep-supervision outputs, mirror TTA.

Parameter counts are checked against a closed form of nnU-Net's architectures, which reproduces the counts of
dynamic_network_architectures 0.4.4 (measured once by instantiating it; it is not a dependency) and the figures in
monai_bundle_notes.md 5.6.
"""

import itertools
import json
import math
import warnings

import pytest
import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import DynUNet
from torch import nn

from bundles.scripts.networks import (BasicBlockD, MirrorTTA, PlainConvUNet, ResidualEncoderUNet, dynunet_from_plan,
                                      dynunet_is_exact, load_initial_weights, network_from_plan, nnunet_state_dict,
                                      plain_from_plan, split_deep_supervision)
from conftest import HIPPOCAMPUS_PLANS, ROOT

# torch 2.13 deprecates TorchScript, which bundles still need; torch's own shape checks warn while tracing
pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings(r"ignore::torch.jit.TracerWarning:torch\.nn\..*"),
              pytest.mark.usefixtures("single_thread")]

requires_plans = pytest.mark.skipif(not HIPPOCAMPUS_PLANS.is_dir(),
                                    reason="../shared/reference/nnunet_plans (nnU-Net's Hippocampus plans) is absent")




TINY = dict(features_per_stage=[4, 8, 16], kernel_sizes=[3, 3, 3], n_blocks_per_stage=[1, 2, 2],
            n_conv_per_stage_decoder=[1, 1])


def tiny_resenc(dims=3, **kw):
    torch.manual_seed(0)
    strides = [[1] * dims] + [[2] * dims] * 2
    return ResidualEncoderUNet(dims, 1, 3, strides=strides, **TINY, **kw)


def tiny_dynunet(dims=3, deep_supervision=True):
    torch.manual_seed(0)
    arch = {"kernel_sizes": [[3] * dims] * 3, "strides": [[1] * dims] + [[2] * dims] * 2,
            "features_per_stage": [4, 8, 16], "n_conv_per_stage": [2] * 3, "n_conv_per_stage_decoder": [2] * 2}
    return dynunet_from_plan(arch, 1, 3, deep_supervision)


def load_plans(name):
    return json.loads((HIPPOCAMPUS_PLANS / f"{name}.json").read_text())


# closed-form parameter counts of nnU-Net's networks (conv_bias True, affine InstanceNorm) ----------------------------

def _unit(a, b, kernel, bias=True):
    """conv (a -> b) + affine norm."""
    return a * b * math.prod(kernel) + (b if bias else 0) + 2 * b


def _decoder(f, kernels, strides, n_dec, classes, dynunet_kernels=False):
    """nnU-Net's decoder stage at skip level t convolves with kernels[t]; DynUNet's with kernels[t + 1]."""
    total = 0
    for t in range(len(f) - 2, -1, -1):  # skip stage, from the bottom
        n = n_dec[len(f) - 2 - t]
        k = kernels[t + 1] if dynunet_kernels else kernels[t]
        total += f[t + 1] * f[t] * math.prod(strides[t + 1]) + f[t]  # transposed conv with bias
        total += _unit(2 * f[t], f[t], k) + (n - 1) * _unit(f[t], f[t], k)
        total += f[t] * classes + classes  # 1x1 head
    return total


def resenc_params(in_ch, classes, f, kernels, strides, blocks, n_dec):
    total = _unit(in_ch, f[0], kernels[0])  # stem
    prev = f[0]
    for c, k, n in zip(f, kernels, blocks):
        for _ in range(n):
            total += _unit(prev, c, k) + _unit(c, c, k)
            if prev != c:
                total += _unit(prev, c, [1], bias=False)  # 1x1 projection, no bias
            prev = c
    return total + _decoder(f, kernels, strides, n_dec, classes)


def plain_params(in_ch, classes, f, kernels, strides, n_enc, n_dec, dynunet=False):
    """PlainConvUNet; with ``dynunet``, MONAI's DynUNet from the same plan (no conv-unit biases, shifted kernels)."""
    total, prev = 0, in_ch
    for c, k, n in zip(f, kernels, n_enc):
        total += _unit(prev, c, k, bias=not dynunet) + (n - 1) * _unit(c, c, k, bias=not dynunet)
        prev = c
    if dynunet:  # the decoder's conv units lose their biases too
        total -= sum(n * c for n, c in zip(n_dec[::-1], f[:-1]))
    return total + _decoder(f, kernels, strides, n_dec, classes, dynunet_kernels=dynunet)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_closed_form_matches_published_counts():
    f, k, s = [32, 64, 128, 256, 320, 320], [[3, 3, 3]] * 6, [[1, 1, 1]] + [[2, 2, 2]] * 5
    # monai_bundle_notes.md 5.6 (1 input channel, 3 classes)
    assert plain_params(1, 3, f, k, s, [2] * 6, [2] * 5) == 31_196_399
    assert resenc_params(1, 3, f, k, s, [1, 3, 4, 6, 6, 6], [1] * 5) == 102_350_575


# ResidualEncoderUNet -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [3, 2])
def test_resenc_outputs_train_and_eval(dims):
    net = tiny_resenc(dims)
    x = torch.randn(2, 1, *[16] * dims)
    out = net.train()(x)
    assert isinstance(out, list) and len(out) == 2  # n_stages - 1, highest resolution first
    assert [tuple(o.shape) for o in out] == [(2, 3, *[16] * dims), (2, 3, *[8] * dims)]
    with torch.no_grad():
        assert tuple(net.eval()(x).shape) == (2, 3, *[16] * dims)
    net.deep_supervision = False
    assert tuple(net.train()(x).shape) == (2, 3, *[16] * dims)


def test_resenc_eval_output_is_the_full_resolution_head():
    """No running statistics or dropout: eval mode returns exactly the first deep-supervision output."""
    net = tiny_resenc()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        full = net.train()(x)[0]
        assert torch.equal(net.eval()(x), full)


def test_resenc_anisotropic_odd_sizes():
    """1x3x3 kernels and in-plane-only strides; the ceil-mode pool keeps odd sizes aligned with the strided convs."""
    net = ResidualEncoderUNet(3, 2, 4, [4, 8, 16], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                              [1, 2, 2], 1)
    out = net.train()(torch.randn(1, 2, 8, 16, 12))
    assert [tuple(o.shape[2:]) for o in out] == [(8, 16, 12), (8, 8, 6)]
    block = net.encoder.stages[1].blocks[0]
    y = block(torch.randn(1, 4, 5, 7, 9))  # odd sizes: skip and residual path must agree
    assert tuple(y.shape) == (1, 8, 5, 4, 5)


def test_resenc_init_like_nnunet():
    net = tiny_resenc()
    blocks = [m for m in net.modules() if isinstance(m, BasicBlockD)]
    assert len(blocks) == sum(TINY["n_blocks_per_stage"])
    zeroed = {id(b.conv2.norm) for b in blocks}
    for b in blocks:
        assert torch.count_nonzero(b.conv2.norm.weight) == 0 and torch.count_nonzero(b.conv2.norm.bias) == 0
    for m in net.modules():
        if isinstance(m, nn.InstanceNorm3d) and id(m) not in zeroed:
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            assert m.bias is None or torch.count_nonzero(m.bias) == 0
            assert m.weight.std() > 0
    # with the residual branch zeroed, a block reduces to nonlin(skip(x))
    b = net.encoder.stages[0].blocks[0]
    x = torch.randn(1, 4, 8, 8, 8)
    assert torch.allclose(b(x), nn.functional.leaky_relu(x, 0.01))


def test_resenc_kaiming_scale():
    """kaiming_normal_(a=0.01), fan_in: std = sqrt(2 / (1 + a^2) / fan_in)."""
    torch.manual_seed(0)
    net = ResidualEncoderUNet(3, 1, 2, [32, 64], [3, 3], [1, 2], [1, 1], 1)
    w = net.encoder.stages[1].blocks[0].conv2.conv.weight  # fan_in 64 * 27
    assert w.std().item() == pytest.approx(math.sqrt(2 / (1 + 1e-4) / (64 * 27)), rel=0.05)


@requires_plans
@pytest.mark.parametrize("config", ["3d_fullres", "2d"])
def test_resenc_layout_and_params_hippocampus_m(config):
    configuration = load_plans("nnUNetResEncUNetMPlans")["configurations"][config]
    kw = configuration["architecture"]["arch_kwargs"]
    net = network_from_plan(configuration, 1, 3)
    assert isinstance(net, ResidualEncoderUNet)
    dims = len(kw["kernel_sizes"][0])
    conv, convt, norm, pool = ({3: nn.Conv3d, 2: nn.Conv2d}[dims], {3: nn.ConvTranspose3d, 2: nn.ConvTranspose2d}[dims],
                               {3: nn.InstanceNorm3d, 2: nn.InstanceNorm2d}[dims],
                               {3: nn.AvgPool3d, 2: nn.AvgPool2d}[dims])
    count = lambda t: sum(isinstance(m, t) for m in net.modules())  # noqa: E731
    blocks = sum(kw["n_blocks_per_stage"])  # 1 + 3 + 4 + 6 = 14
    projections = 3  # 32->64, 64->128, 128->256 (each downsampling stage changes width here)
    decoder_convs = sum(kw["n_conv_per_stage_decoder"])
    assert count(BasicBlockD) == 14
    assert count(pool) == 3
    assert count(convt) == 3
    assert count(conv) == 1 + 2 * blocks + projections + decoder_convs + 3  # stem, blocks, 1x1 skips, decoder, heads
    assert count(norm) == 1 + 2 * blocks + projections + decoder_convs
    assert count(nn.LeakyReLU) == 1 + 2 * blocks + decoder_convs
    assert [m.bias is None for m in net.modules() if isinstance(m, conv) and m.kernel_size == (1,) * dims
            and m.out_channels != 3] == [True] * projections  # projections have no bias, heads do
    expected = {"3d_fullres": 25_895_593, "2d": 8_728_681}[config]  # dynamic_network_architectures 0.4.4
    assert n_params(net) == expected == resenc_params(1, 3, kw["features_per_stage"], kw["kernel_sizes"], kw["strides"],
                                                      kw["n_blocks_per_stage"], kw["n_conv_per_stage_decoder"])


def test_resenc_pool_only_skip_when_width_is_capped():
    """A strided block that keeps its width (320 -> 320) has an AvgPool-only skip, as in nnU-Net."""
    net = ResidualEncoderUNet(2, 1, 2, [8, 16, 16], [3, 3, 3], [1, 2, 2], [1, 1, 1], 1)
    skips = [len(s.blocks[0].skip) for s in net.encoder.stages]
    assert skips == [0, 2, 1]
    assert isinstance(net.encoder.stages[2].blocks[0].skip[0], nn.AvgPool2d)
    assert n_params(net) == resenc_params(1, 2, [8, 16, 16], [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]], [1, 1, 1], [1, 1])


# DynUNet -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [3, 2])
def test_dynunet_outputs_train_and_eval(dims):
    net = tiny_dynunet(dims)
    assert isinstance(net, DynUNet)
    x = torch.randn(2, 1, *[16] * dims)
    out = net.train()(x)
    # n_stages - 1 outputs at their own resolutions, highest first (nnU-Net's deep supervision)
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == [(2, 3, *[16] * dims), (2, 3, *[8] * dims)]
    with torch.no_grad():
        assert tuple(net.eval()(x).shape) == (2, 3, *[16] * dims)
    assert tuple(tiny_dynunet(dims, deep_supervision=False).train()(x).shape) == (2, 3, *[16] * dims)


def test_dynunet_heads_are_monais_heads_before_upsampling():
    """Same weights in MONAI's DynUNet: its stacked output is ours with each head upsampled (nearest)."""
    ours = tiny_dynunet().train()
    monai_net = DynUNet(3, 1, 3, kernel_size=[[3] * 3] * 3, strides=[[1] * 3] + [[2] * 3] * 2,
                        upsample_kernel_size=[[2] * 3] * 2, filters=[4, 8, 16],
                        norm_name=("INSTANCE", {"affine": True}),
                        act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}), deep_supervision=True,
                        deep_supr_num=1, trans_bias=True).train()
    monai_net.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        native, stacked = ours(x), monai_net(x)
    torch.testing.assert_close(native[0], stacked[:, 0])
    torch.testing.assert_close(nn.functional.interpolate(native[1], size=(16, 16, 16)), stacked[:, 1])


def test_dynunet_from_plan_matches_nnunet_topology():
    f, k = [4, 8, 16, 32, 32], [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
    s = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    net = dynunet_from_plan({"kernel_sizes": k, "strides": s, "features_per_stage": f, "conv_bias": True}, 2, 3)
    assert net.deep_supr_num == 3  # 1 + 3 outputs = n_stages - 1, as nnU-Net
    outs = net.train()(torch.randn(1, 2, 8, 32, 32))
    assert [tuple(o.shape[2:]) for o in outs] == [(8, 32, 32), (8, 16, 16), (4, 8, 8), (2, 4, 4)]
    # DynUNet's conv units have no bias, and its decoder stage at level t uses kernel_sizes[t + 1] (nnU-Net:
    # kernel_sizes[t]), which differs here at level 1 (3x3x3 instead of 1x3x3)
    assert n_params(net) == plain_params(2, 3, f, k, s, [2] * 5, [2] * 4, dynunet=True)
    assert n_params(net) - plain_params(2, 3, f, k, s, [2] * 5, [2] * 4) == 3456 - 304  # kernels +3456, biases -304
    assert tuple(net.upsamples[2].conv_block.conv1.conv.kernel_size) == (3, 3, 3)
    for m in net.modules():
        if isinstance(m, nn.ConvTranspose3d):
            assert m.bias is not None and tuple(m.kernel_size) == tuple(m.stride)


def test_dynunet_from_plan_rejects_what_it_cannot_express():
    arch = {"kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "features_per_stage": [4, 8, 16]}
    with pytest.raises(ValueError, match="2 convs"):
        dynunet_from_plan({**arch, "n_conv_per_stage": [3, 3, 3]}, 1, 2)
    with pytest.raises(ValueError, match="at least 3 stages"):
        dynunet_from_plan({"kernel_sizes": [[3, 3]] * 2, "strides": [[1, 1], [2, 2]], "features_per_stage": [4, 8]},
                          1, 2)
    with pytest.raises(ValueError, match="dropout"):
        dynunet_from_plan({**arch, "dropout_op": "torch.nn.Dropout3d"}, 1, 2)
    with pytest.raises(ValueError, match="unsupported network_class_name"):
        network_from_plan({"architecture": {"network_class_name": "x.ResidualUNet", "arch_kwargs": arch}}, 1, 2)


PLAIN_FIXTURE = ROOT / "tests" / "fixtures" / "nnunet_plain_unets.pt"


@pytest.mark.parametrize("case", ["anisotropic_3d", "uneven_convs_2d"])
def test_plain_unet_reproduces_nnunets_own_network(case):
    """nnU-Net 2.8.1 built these PlainConvUNets from plans (benchmarks/make_network_fixture.py); the plan builds ours,
    nnU-Net's weights load strictly, and every output matches. DynUNet cannot express either plan."""
    fixture = torch.load(PLAIN_FIXTURE, weights_only=True)[case]
    plan = {"architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                             "arch_kwargs": fixture["arch_kwargs"]}}
    assert not dynunet_is_exact(fixture["arch_kwargs"])
    net = network_from_plan(plan, fixture["in_channels"], fixture["out_channels"])
    assert isinstance(net, PlainConvUNet)
    net.load_state_dict(nnunet_state_dict(fixture["state_dict"]), strict=True)
    with torch.no_grad():
        outs = net.train()(fixture["input"])
        assert len(outs) == len(fixture["train_outputs"])
        for ours, theirs in zip(outs, fixture["train_outputs"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.eval()(fixture["input"]), fixture["eval_output"], rtol=1e-5, atol=1e-5)


RESENC_FIXTURE = ROOT / "tests" / "fixtures" / "nnunet_resenc_unets.pt"


@pytest.mark.parametrize("case", ["resenc_m_anisotropic_3d", "resenc_l_2d"])
def test_resenc_unet_reproduces_nnunets_own_network(case):
    """nnU-Net 2.8.1 built these ResidualEncoderUNets from ResEnc-style plans, with every weight (the residual
    branches' zero-initialised norms included) perturbed (benchmarks/make_resenc_fixture.py); the plan builds ours,
    nnU-Net's weights load strictly, and every deep-supervision output and the eval output match."""
    from bundles.scripts.networks import ResidualEncoderUNet

    fixture = torch.load(RESENC_FIXTURE, weights_only=True)[case]
    assert fixture["class"] == "ResidualEncoderUNet"
    plan = {"architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet."
                             "ResidualEncoderUNet", "arch_kwargs": fixture["arch_kwargs"]}}
    net = network_from_plan(plan, fixture["in_channels"], fixture["out_channels"])
    assert isinstance(net, ResidualEncoderUNet)
    state = nnunet_state_dict(fixture["state_dict"])
    assert not any(torch.all(v == 0) for k, v in state.items() if k.endswith("norm.weight"))
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        outs = net.train()(fixture["input"])
        assert len(outs) == len(fixture["train_outputs"]) == fixture["arch_kwargs"]["n_stages"] - 1
        for ours, theirs in zip(outs, fixture["train_outputs"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.eval()(fixture["input"]), fixture["eval_output"], rtol=1e-5, atol=1e-5)


def test_training_steps_reproduce_nnunets_own():
    """Four SGD steps from nnU-Net's weights on the same batches: nnU-Net's loss, optimizer and clipping
    (benchmarks/make_network_fixture.py) against the bundle's loss, the optimizer settings of train.json and its
    gradient-clipping hook. Every step's loss and the final weights agree."""
    from bundles.scripts.handlers import clip_gradients_hook
    from bundles.scripts.losses import DeepSupervisedLoss, NnUNetDiceCE, nnunet_loss

    fixture = torch.load(PLAIN_FIXTURE, weights_only=True)["anisotropic_3d"]
    template = json.loads((ROOT / "bundles" / "templates" / "train.json").read_text())

    def value(v):  # the optimizer's settings are top-level ids of train.json
        return template[v[1:]] if isinstance(v, str) and v.startswith("@") else v

    settings = {k: value(v) for k, v in template["optimizer"].items() if k not in ("_target_", "params", "lr")}
    assert settings == {"momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}
    assert template["optimizer"]["_target_"] == "torch.optim.SGD"
    assert template["loss"]["_target_"] == "scripts.losses.DeepSupervisedLoss"
    assert template["loss_component"]["_target_"] == "scripts.losses.nnunet_loss"
    component = nnunet_loss(template["batch_dice"], template["ignore_label"], template["regions"],
                            template["class_weights"])
    assert isinstance(component, NnUNetDiceCE)  # labels, no ignore label, no class weights: nnU-Net's Dice + CE
    arch = fixture["arch_kwargs"]
    net = PlainConvUNet(3, fixture["in_channels"], fixture["out_channels"], arch["features_per_stage"],
                        arch["kernel_sizes"], arch["strides"], 2, 2)
    net.load_state_dict(nnunet_state_dict(fixture["state_dict"]), strict=True)
    loss_fn = DeepSupervisedLoss(component, num_outputs=len(fixture["train_outputs"]))
    optimizer = torch.optim.SGD(net.parameters(), lr=template["learning_rate"], **settings)
    optimizer.register_step_pre_hook(clip_gradients_hook(net, template["grad_clip_norm"]))
    net.train()
    losses = []
    for batch in fixture["training"]["batches"]:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch["image"]), batch["label"])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses == pytest.approx(fixture["training"]["losses"], rel=1e-5)
    after = nnunet_state_dict(fixture["training"]["state_dict_after"])
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, after[key], rtol=1e-4, atol=1e-6)


ISOTROPIC = {"kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
             "features_per_stage": [4, 8, 16, 16], "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3,
             "conv_bias": True}


def test_initial_weights_from_an_nnunet_checkpoint_into_dynunet(tmp_path):
    """nnU-Net's PlainConvUNet (ours reproduces it, see above) saved as nnU-Net saves it, compiled: its weights
    renamed into the DynUNet of the same plan give the same outputs, every head included."""
    torch.manual_seed(1)
    plain = plain_from_plan(ISOTROPIC, 2, 3)
    weights = {f"_orig_mod.{k}": v for k, v in plain.state_dict().items()}
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer"}, tmp_path / "checkpoint_final.pth")
    torch.manual_seed(2)
    dyn = dynunet_from_plan(ISOTROPIC, 2, 3)
    assert load_initial_weights(dyn, tmp_path / "checkpoint_final.pth") == []
    x = torch.randn(2, 2, 16, 16, 16)
    with torch.no_grad():
        for ours, theirs in zip(dyn.train()(x), plain.train()(x)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dyn.eval()(x), plain.eval()(x), rtol=1e-4, atol=1e-5)


def test_initial_weights_keep_heads_of_another_label_count(tmp_path):
    """Fine-tuning onto other labels (nnU-Net's -pretrained_weights): every weight but the heads is loaded, the heads
    keep their initialisation. A bundle's own model.pt (DynUNet, skip-layer aliases included) loads too."""
    torch.manual_seed(1)
    source = dynunet_from_plan(ISOTROPIC, 1, 3)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(2)
    target = dynunet_from_plan(ISOTROPIC, 1, 5)
    heads_before = {k: v.clone() for k, v in target.state_dict().items() if "head" in k or "output_block" in k}
    skipped = load_initial_weights(target, tmp_path / "model.pt")
    assert sorted(skipped) == sorted(k for k in heads_before if not k.startswith("skip_layers"))
    for key, value in target.state_dict().items():
        expected = heads_before[key] if key in heads_before else source.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_initial_weights_refuse_another_network(tmp_path):
    torch.save(plain_from_plan(ISOTROPIC, 1, 3).state_dict(), tmp_path / "plain.pt")
    wider = dict(ISOTROPIC, features_per_stage=[4, 8, 16, 32])
    with pytest.raises(ValueError, match=r"plain\.pt: encoder\.stages\.3\.0\.convs\.0\.conv\.weight has shape"):
        load_initial_weights(plain_from_plan(wider, 1, 3), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain\.pt: weights of another network"):
        load_initial_weights(tiny_resenc(), tmp_path / "plain.pt")
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: not a state dict"):
        load_initial_weights(tiny_resenc(), tmp_path / "other.pt")


def test_plain_unet_init_and_scripting():
    torch.manual_seed(0)
    net = PlainConvUNet(3, 1, 2, [4, 8, 16], [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], 2, 2)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert all(m.bias is not None and not m.bias.any() for m in convs)  # nnU-Net: conv_bias, He init, zero biases
    assert tuple(net.decoder.stages[1].convs[0].conv.kernel_size) == (1, 3, 3)  # the skip stage's kernel
    x = torch.randn(1, 1, 4, 8, 8)
    scripted = torch.jit.script(net.eval())
    torch.testing.assert_close(scripted(x), net(x))


def test_dynunet_only_where_it_is_exact():
    iso = {"kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
           "features_per_stage": [4, 8, 16, 16], "n_conv_per_stage": [2] * 4, "n_conv_per_stage_decoder": [2] * 3,
           "conv_bias": True}
    plan = lambda kw: {"network_class_name": "PlainConvUNet", "arch_kwargs": kw}  # noqa: E731
    assert dynunet_is_exact(iso) and isinstance(network_from_plan(plan(iso), 1, 2), DynUNet)
    for change in ({"kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 3}, {"n_conv_per_stage": [2, 2, 3, 2]},
                   {"n_conv_per_stage_decoder": [1, 1, 1]}):
        assert not dynunet_is_exact({**iso, **change})
        assert isinstance(network_from_plan(plan({**iso, **change}), 1, 2), PlainConvUNet)
    two_stages = {**iso, "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]],
                  "features_per_stage": [4, 8], "n_conv_per_stage": [2, 2], "n_conv_per_stage_decoder": [2]}
    assert isinstance(network_from_plan(plan(two_stages), 1, 2), PlainConvUNet)


@requires_plans
@pytest.mark.parametrize("plans,config,cls", [("nnUNetPlans", "3d_fullres", DynUNet), ("nnUNetPlans", "2d", DynUNet),
                                              ("nnUNetResEncUNetMPlans", "3d_fullres", ResidualEncoderUNet),
                                              ("nnUNetResEncUNetLPlans", "2d", ResidualEncoderUNet)])
def test_network_from_hippocampus_plans(plans, config, cls):
    configuration = load_plans(plans)["configurations"][config]
    kw = configuration["architecture"]["arch_kwargs"]
    net = network_from_plan(configuration, 1, 3)
    assert isinstance(net, cls)
    dims = len(kw["kernel_sizes"][0])
    x = torch.randn(1, 1, *[16] * dims)  # divisible by the 2**3 of the 3 pooling steps
    with torch.no_grad():
        outs = split_deep_supervision(net.train()(x), dims)
        assert len(outs) == kw["n_stages"] - 1
        assert tuple(net.eval()(x).shape) == (1, 3, *[16] * dims)
    if cls is DynUNet:
        args = (1, 3, kw["features_per_stage"], kw["kernel_sizes"], kw["strides"], kw["n_conv_per_stage"],
                kw["n_conv_per_stage_decoder"])
        # isotropic kernels: DynUNet differs from PlainConvUNet only by the conv units' biases
        assert n_params(net) == plain_params(*args, dynunet=True) == plain_params(*args) - 2 * sum(
            kw["features_per_stage"]) - 2 * sum(kw["features_per_stage"][:-1])


# split_deep_supervision ----------------------------------------------------------------------------------------------

def test_split_deep_supervision_both_networks():
    x = torch.randn(1, 1, 16, 16, 16)
    res = split_deep_supervision(tiny_resenc().train()(x), 3)
    assert [tuple(o.shape) for o in res] == [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]
    dyn = split_deep_supervision(tiny_dynunet().train()(x), 3)
    assert [tuple(o.shape) for o in dyn] == [(1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]
    stacked = torch.randn(1, 2, 3, 16, 16, 16)  # MONAI DynUNet's own form: heads upsampled and stacked on dim 1
    split = split_deep_supervision(stacked, 3)
    assert len(split) == 2 and torch.equal(split[1], stacked[:, 1])
    plain = torch.randn(1, 3, 16, 16, 16)
    assert split_deep_supervision(plain, 3)[0] is plain
    # a 2-D stacked DS tensor and a plain 3-D output are both 5-D: spatial_dims tells them apart
    assert len(split_deep_supervision(torch.randn(1, 2, 3, 16, 16), 2)) == 2
    with pytest.raises(ValueError):
        split_deep_supervision(torch.randn(1, 3, 16, 16), 3)


# MirrorTTA -----------------------------------------------------------------------------------------------------------

class Counting(nn.Module):
    """A small flip-sensitive conv net that counts its calls."""

    def __init__(self, dims):
        super().__init__()
        torch.manual_seed(1)
        self.conv = {3: nn.Conv3d, 2: nn.Conv2d}[dims](1, 2, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x) + x.cumsum(-1)


@pytest.mark.parametrize("dims,axes", [(3, (0, 1, 2)), (2, (0, 1)), (3, (1, 2)), (3, ())])
def test_mirror_tta_is_manual_flip_average(dims, axes):
    net = Counting(dims)
    x = torch.randn(2, 1, *[6, 7, 5][:dims])
    with torch.no_grad():
        got = MirrorTTA(net, axes)(x)
        assert net.calls == 2 ** len(axes)
        dims_sets = [[a + 2 for a in c] for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]
        manual = sum(torch.flip(net(torch.flip(x, d)), d) if d else net(x) for d in dims_sets) / len(dims_sets)
    assert torch.allclose(got, manual, atol=1e-6)
    if axes:
        assert not torch.allclose(got, net(x), atol=1e-3)
    else:
        assert torch.equal(got, net(x))


def test_mirror_tta_of_flip_equivariant_network_is_identity():
    torch.manual_seed(2)
    conv = nn.Conv3d(1, 2, 3, padding=1)
    with torch.no_grad():  # a kernel symmetric under every flip makes the conv flip-equivariant
        w = conv.weight
        conv.weight.copy_(sum(torch.flip(w, [d + 2 for d in c]) for r in range(4)
                              for c in itertools.combinations(range(3), r)) / 8)
        x = torch.randn(1, 1, 9, 8, 7)
        assert torch.allclose(MirrorTTA(conv, (0, 1, 2))(x), conv(x), atol=1e-5)
        assert torch.allclose(MirrorTTA(nn.Sigmoid(), (0, 2))(x), torch.sigmoid(x), atol=1e-6)


def test_mirror_tta_refuses_deep_supervision_outputs():
    x = torch.randn(1, 1, 16, 16, 16)
    for net in (tiny_resenc(), tiny_dynunet()):
        with pytest.raises(TypeError, match="eval mode"):
            MirrorTTA(net.train())(x)
    with pytest.raises(ValueError):
        MirrorTTA(nn.Identity(), (-1,))


def test_traced_mirror_tta_resenc_reproduces_outputs():
    tta = MirrorTTA(tiny_resenc(), (0, 1, 2)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad(), warnings.catch_warnings():
        # no data-dependent control flow in our code (torch's own shape checks may still warn)
        warnings.filterwarnings("error", category=torch.jit.TracerWarning, module=r"bundles\.scripts\.networks")
        traced = torch.jit.trace(tta, x, check_trace=False)
        assert torch.allclose(traced(x), tta(x), atol=1e-5)
        other = torch.randn(1, 1, 8, 16, 24)  # the trace is not tied to the example's shape
        assert torch.allclose(traced(other), tta(other), atol=1e-5)


def test_resenc_scripts_with_and_without_deep_supervision():
    """``ckpt_export`` scripts by default; unlike DynUNet with deep supervision, ResEnc scripts in both modes."""
    net = tiny_resenc()
    x = torch.randn(1, 1, 16, 16, 16)
    scripted = torch.jit.script(net)
    scripted_tta = torch.jit.script(MirrorTTA(net.eval(), (0,)))
    with torch.no_grad():
        assert torch.allclose(scripted.eval()(x), net.eval()(x), atol=1e-6)
        assert [o.shape[2:] for o in scripted.train()(x)] == [(16, 16, 16), (8, 8, 8)]
        assert torch.allclose(scripted_tta(x), MirrorTTA(net.eval(), (0,))(x), atol=1e-6)


def test_mirror_tta_as_sliding_window_network():
    net = tiny_resenc().eval()
    x = torch.randn(1, 1, 24, 16, 16)
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        out = inferer(x, MirrorTTA(net, (0, 1)))
        traced = torch.jit.trace(MirrorTTA(net, (0, 1)), torch.randn(1, 1, 16, 16, 16), check_trace=False)
        assert torch.allclose(inferer(x, traced), out, atol=1e-5)
    assert tuple(out.shape) == (1, 3, 24, 16, 16)
