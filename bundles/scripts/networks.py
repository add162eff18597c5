"""Networks for the bundles: nnU-Net's U-Nets from a plan, and mirror test-time augmentation.

The default nnU-Net topology (PlainConvUNet) is MONAI's ``DynUNet`` where that computes the same thing, i.e. when
every stage has one kernel size and two convs (``dynunet_is_exact``). Anisotropic plans (1x3x3 kernels next to
3x3x3) and other conv counts get ``PlainConvUNet`` written here, since DynUNet's decoder picks other kernels. MONAI
has no ResEnc U-Net (DynUNet's ``res_block`` puts one residual block per stage in encoder *and* decoder), so it is
written here too. Both are plain torch with the same outputs and parameters as dynamic_network_architectures', and
nnU-Net's checkpoints load into them (``nnunet_state_dict``). Every network here scripts (``torch.jit.script``, what
the model zoo's ``ckpt_export`` does by default) and traces in eval mode (``--use_trace``), and exports to ONNX;
``tests/test_bundle_export.py`` compares each form's output with the eager network's.

In training mode with deep supervision every network returns a list of logits, one per decoder stage at that stage's
own resolution, highest first (nnU-Net's outputs; MONAI's own ``DynUNet`` would upsample every head to full
resolution and stack them, which costs memory and a full-resolution loss per head). A loss that resizes the target to
each output's shape (MONAI's ``DeepSupervisionLoss``, nearest-exact as nnU-Net) takes the list; in eval mode they
return one ``(B, C, *spatial)`` tensor. ``split_deep_supervision`` also accepts MONAI's stacked form.
"""

import itertools
import logging
from typing import List, Optional, Sequence, Union

import torch
from monai.networks.nets import DynUNet
from torch import nn

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _per_axis(value, spatial_dims: int) -> List[int]:
    """An int or a per-axis sequence, as a list of ``spatial_dims`` ints."""
    if isinstance(value, int):
        return [value] * spatial_dims
    value = [int(v) for v in value]
    if len(value) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} values per axis, got {value}")
    return value


class ConvNormAct(nn.Module):
    """conv -> InstanceNorm(eps 1e-5, affine) -> optional LeakyReLU(0.01), 'same' padding, as nnU-Net's conv unit.

    Attribute names ``conv``/``norm`` match nnU-Net's state-dict keys (see ``ResidualEncoderUNet``).
    """

    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size, stride=1, bias=True, act=True):
        super().__init__()
        kernel_size = _per_axis(kernel_size, spatial_dims)
        self.conv = _CONV[spatial_dims](in_channels, out_channels, kernel_size, _per_axis(stride, spatial_dims),
                                        padding=[(k - 1) // 2 for k in kernel_size], bias=bias)
        self.norm = _NORM[spatial_dims](out_channels, eps=1e-5, affine=True)
        self.nonlin = nn.LeakyReLU(0.01, inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.nonlin(self.norm(self.conv(x)))


class ConvStack(nn.Module):
    """``n`` ConvNormAct units; only the first may change channels or stride (nnU-Net's stem and decoder stages)."""

    def __init__(self, n, spatial_dims, in_channels, out_channels, kernel_size, stride=1):
        super().__init__()
        if n < 1:
            raise ValueError(f"a conv stack needs at least one conv, got {n}")
        self.convs = nn.Sequential(*[
            ConvNormAct(spatial_dims, in_channels if i == 0 else out_channels, out_channels, kernel_size,
                        stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: conv(stride)-norm-act-conv-norm, plus a skip, then act.

    The skip is AvgPool(stride) if the block strides, then a bias-free 1x1 conv + norm if it changes width (identity
    if neither), as in nnU-Net: pooling instead of a strided 1x1 conv keeps the skip from dropping 3/4 of the voxels.
    A strided block of unchanged width (e.g. 320 -> 320 deep in 3-D) thus has a pool-only skip.
    The pool uses ``ceil_mode`` so odd sizes match the strided conv's ceil(n/s) output; nnU-Net floors, which only
    differs on sizes its planner never produces.
    """

    def __init__(self, spatial_dims, in_channels, out_channels, kernel_size, stride=1):
        super().__init__()
        stride = _per_axis(stride, spatial_dims)
        self.conv1 = ConvNormAct(spatial_dims, in_channels, out_channels, kernel_size, stride)
        self.conv2 = ConvNormAct(spatial_dims, out_channels, out_channels, kernel_size, 1, act=False)
        self.nonlin2 = nn.LeakyReLU(0.01, inplace=True)
        skip = []  # an empty Sequential is the identity
        if any(s != 1 for s in stride):
            skip.append(_POOL[spatial_dims](stride, stride, ceil_mode=True))
        if in_channels != out_channels:  # nnU-Net projects only on a width change, not on stride alone
            skip.append(ConvNormAct(spatial_dims, in_channels, out_channels, 1, 1, bias=False, act=False))
        self.skip = nn.Sequential(*skip)

    def forward(self, x):
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.nonlin2(out)


class ResidualStage(nn.Module):
    """One encoder stage: ``n`` BasicBlockD, the first one strided."""

    def __init__(self, n, spatial_dims, in_channels, out_channels, kernel_size, stride):
        super().__init__()
        if n < 1:
            raise ValueError(f"a residual stage needs at least one block, got {n}")
        self.blocks = nn.Sequential(*[
            BasicBlockD(spatial_dims, in_channels if i == 0 else out_channels, out_channels, kernel_size,
                        stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.blocks(x)


class ResidualEncoder(nn.Module):
    """Stem (one conv unit at full resolution) followed by the residual stages; returns every stage's output."""

    def __init__(self, spatial_dims, in_channels, features_per_stage, kernel_sizes, strides, n_blocks_per_stage):
        super().__init__()
        self.stem = ConvStack(1, spatial_dims, in_channels, features_per_stage[0], kernel_sizes[0])
        widths = [features_per_stage[0]] + list(features_per_stage)
        self.stages = nn.ModuleList([
            ResidualStage(n_blocks_per_stage[s], spatial_dims, widths[s], widths[s + 1], kernel_sizes[s], strides[s])
            for s in range(len(features_per_stage))])

    def forward(self, x) -> List[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class PlainConvEncoder(nn.Module):
    """nnU-Net's plain encoder: per stage ``n_conv_per_stage[s]`` conv units, the first one strided; returns every
    stage's output. Each stage is wrapped in a Sequential, so state-dict keys match nnU-Net's (``stages.S.0.convs``)."""

    def __init__(self, spatial_dims, in_channels, features_per_stage, kernel_sizes, strides, n_conv_per_stage):
        super().__init__()
        widths = [in_channels] + list(features_per_stage)
        self.stages = nn.ModuleList([
            nn.Sequential(ConvStack(n_conv_per_stage[s], spatial_dims, widths[s], widths[s + 1], kernel_sizes[s],
                                    strides[s]))
            for s in range(len(features_per_stage))])

    def forward(self, x) -> List[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Plain decoder: transposed conv (kernel = stride), concat with the skip, conv units, 1x1 head per stage.

    Stages run from the bottom up; ``n_conv_per_stage[i]`` and heads ``seg_layers[i]`` are indexed in that order,
    as in nnU-Net. Every head exists even without deep supervision so checkpoints load either way.
    """

    def __init__(self, spatial_dims, out_channels, features_per_stage, kernel_sizes, strides, n_conv_per_stage):
        super().__init__()
        n = len(features_per_stage)
        self.transpconvs = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.seg_layers = nn.ModuleList()
        for below in range(n - 1, 0, -1):  # the stage whose output is upsampled
            skip = below - 1
            stride = _per_axis(strides[below], spatial_dims)
            self.transpconvs.append(_CONV_T[spatial_dims](features_per_stage[below], features_per_stage[skip], stride,
                                                          stride, bias=True))
            self.stages.append(ConvStack(n_conv_per_stage[n - 1 - below], spatial_dims, 2 * features_per_stage[skip],
                                         features_per_stage[skip], kernel_sizes[skip]))
            self.seg_layers.append(_CONV[spatial_dims](features_per_stage[skip], out_channels, 1, bias=True))

    def forward(self, skips: List[torch.Tensor], deep_supervision: bool) -> List[torch.Tensor]:
        """Logits, highest resolution first: every head's with ``deep_supervision``, else only the last one."""
        x = skips[-1]
        outputs: List[torch.Tensor] = []
        i = 0
        for up, stage, head in zip(self.transpconvs, self.stages, self.seg_layers):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), 1))
            if deep_supervision or i == len(self.stages) - 1:
                outputs.append(head(x))
            i += 1
        return outputs[::-1]


def _per_stage(value, n: int, name: str) -> List[int]:
    """A per-stage setting given as one int or as ``n`` values, as a list of ``n`` ints."""
    values = [value] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} needs {n} entries, got {value}")
    return values


class _EncoderDecoderUNet(nn.Module):
    """An encoder returning every stage's output and nnU-Net's plain decoder. Training mode with
    ``deep_supervision`` returns a list of ``n_stages - 1`` logits at their own resolutions, highest first; otherwise
    one full-resolution tensor. Input sizes must be divisible by the product of strides.

    Module names follow dynamic_network_architectures, so an nnU-Net checkpoint's state dict loads after dropping its
    duplicate keys (those containing ``.all_modules.`` or starting with ``decoder.encoder.``); see
    ``nnunet_state_dict``.
    """

    def __init__(self, spatial_dims: int, deep_supervision: bool, encoder: nn.Module, decoder: UNetDecoder):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.deep_supervision = deep_supervision
        self.encoder = encoder
        self.decoder = decoder
        self.apply(_init_he)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        ds = self.training and self.deep_supervision  # module state, not data: fixed when traced in eval mode
        outputs = self.decoder(self.encoder(x), ds)
        if ds:
            return outputs
        return outputs[0]


class PlainConvUNet(_EncoderDecoderUNet):
    """nnU-Net's default U-Net (PlainConvUNet): ``n_conv_per_stage`` conv units per encoder stage (conv with bias,
    InstanceNorm, LeakyReLU), the plain decoder with ``n_conv_per_stage_decoder`` units (deepest first) that convolve
    with the kernel of the stage they upsample to. Used where MONAI's DynUNet differs from it (see
    ``dynunet_is_exact``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence, strides: Sequence, n_conv_per_stage: Union[int, Sequence[int]],
                 n_conv_per_stage_decoder: Union[int, Sequence[int]], deep_supervision: bool = True):
        n = len(features_per_stage)
        if n < 2 or len(kernel_sizes) != n or len(strides) != n:
            raise ValueError("a U-Net needs at least 2 stages and one kernel size and stride per stage")
        super().__init__(
            spatial_dims, deep_supervision,
            PlainConvEncoder(spatial_dims, in_channels, features_per_stage, kernel_sizes, strides,
                             _per_stage(n_conv_per_stage, n, "n_conv_per_stage")),
            UNetDecoder(spatial_dims, out_channels, features_per_stage, kernel_sizes, strides,
                        _per_stage(n_conv_per_stage_decoder, n - 1, "n_conv_per_stage_decoder")))


class ResidualEncoderUNet(_EncoderDecoderUNet):
    """nnU-Net's ResidualEncoderUNet (ResEnc M/L/XL presets) with BasicBlockD encoder and plain decoder.

    ``kernel_sizes``/``strides`` have one entry per stage (ints or per-axis lists; ``strides[0]`` is usually 1);
    ``n_conv_per_stage_decoder`` has ``n_stages - 1`` entries, deepest decoder stage first, as in nnU-Net plans.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, features_per_stage: Sequence[int],
                 kernel_sizes: Sequence, strides: Sequence, n_blocks_per_stage: Sequence[int],
                 n_conv_per_stage_decoder: Union[int, Sequence[int]], deep_supervision: bool = True):
        n = len(features_per_stage)
        if n < 2:
            raise ValueError("a U-Net needs at least 2 stages")
        if isinstance(n_blocks_per_stage, int):
            n_blocks_per_stage = [n_blocks_per_stage] * n
        if isinstance(n_conv_per_stage_decoder, int):
            n_conv_per_stage_decoder = [n_conv_per_stage_decoder] * (n - 1)
        if not (len(kernel_sizes) == len(strides) == len(n_blocks_per_stage) == n == len(n_conv_per_stage_decoder) + 1):
            raise ValueError("kernel_sizes, strides, n_blocks_per_stage need one entry per stage, "
                             "n_conv_per_stage_decoder one fewer")
        super().__init__(
            spatial_dims, deep_supervision,
            ResidualEncoder(spatial_dims, in_channels, features_per_stage, kernel_sizes, strides, n_blocks_per_stage),
            UNetDecoder(spatial_dims, out_channels, features_per_stage, kernel_sizes, strides,
                        n_conv_per_stage_decoder))
        for m in self.modules():
            if isinstance(m, BasicBlockD):  # each block starts as (nearly) the identity, as in nnU-Net
                nn.init.zeros_(m.conv2.norm.weight)
                nn.init.zeros_(m.conv2.norm.bias)


def _init_he(module: nn.Module) -> None:
    """nnU-Net's He init: kaiming_normal_(a=0.01) on (transposed) conv weights, zero biases."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                           nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def nnunet_state_dict(state_dict: dict) -> dict:
    """An nnU-Net PlainConvUNet or ResidualEncoderUNet state dict without its duplicate aliases, loadable into ours."""
    return {k: v for k, v in state_dict.items() if ".all_modules." not in k and not k.startswith("decoder.encoder.")}


def dynunet_state_dict(state_dict: dict, n_stages: int) -> dict:
    """An nnU-Net PlainConvUNet state dict (``nnunet_state_dict`` form) renamed for the ``DynUNet`` of the same plan,
    for plans where ``dynunet_is_exact`` holds. The conv-unit biases are left out: DynUNet has none, and the
    InstanceNorm after each conv cancels a per-channel bias, so the outputs are unchanged. Keys it cannot place
    are kept under their own names, so a caller's key check reports them."""
    names = {}
    blocks = ["input_block", *[f"downsamples.{i}" for i in range(n_stages - 2)], "bottleneck"]
    blocks = [(f"encoder.stages.{i}.0.convs", block) for i, block in enumerate(blocks)]
    for i in range(n_stages - 1):
        names[f"decoder.transpconvs.{i}."] = f"upsamples.{i}.transp_conv.conv."
        blocks.append((f"decoder.stages.{i}.convs", f"upsamples.{i}.conv_block"))
    for source, block in blocks:
        for j in (0, 1):
            names[f"{source}.{j}.conv.weight"] = f"{block}.conv{j + 1}.conv.weight"
            names[f"{source}.{j}.conv.bias"] = None
            names[f"{source}.{j}.norm."] = f"{block}.norm{j + 1}."
    names[f"decoder.seg_layers.{n_stages - 2}."] = "output_block.conv.conv."
    for j in range(n_stages - 2):
        names[f"decoder.seg_layers.{n_stages - 3 - j}."] = f"deep_supervision_heads.{j}.conv.conv."
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in names if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        elif names[prefix] is not None:
            out[names[prefix] + key[len(prefix):]] = value
    return out


_HEADS = ("decoder.seg_layers.", "output_block.", "deep_supervision_heads.")


def _numpy_globals() -> list:
    """Exactly the numpy types nnU-Net's checkpoints pickle besides tensors, allowed by
    ``torch.load(weights_only=True)``: its float32 / float64 scalars (the Dice values and losses in 'logging',
    '_best_ema'; float64 where numpy 1.x promoted them), which pickle as ``multiarray.scalar`` with their ``dtype``.
    A checkpoint written with numpy 1.x names the scalar ``numpy.core.multiarray.scalar``."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    scalar = multiarray.multiarray.scalar
    dtypes = [type(np.dtype(np.float32)), type(np.dtype(np.float64))]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def load_checkpoint(path):
    """``torch.load(path, weights_only=True)`` with nnU-Net's numpy scalars and dtypes allowed: anything else a
    pickle could construct (and run) is refused with ``ValueError`` naming the file."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        why = next((line.strip() for line in lines if "global" in line.casefold()), lines[0])
        raise ValueError(f"{path}: refused, the checkpoint holds objects other than tensors, plain containers and "
                         f"numpy scalars ({why})") from None


def load_initial_weights(network: nn.Module, path) -> List[str]:
    """Start training from saved weights, like nnU-Net's ``-pretrained_weights``.

    ``path`` holds a plain state dict (another bundle's ``models/model.pt``), a bundle's
    ``models/resume/checkpoint_latest.pt`` or an nnU-Net ``checkpoint_final.pth`` of the same architecture (renamed for
    DynUNet where the bundle uses it). Every weight must fit except the segmentation heads. nnU-Net always leaves the heads out; here they load when they fit,
    and heads for another label count keep their initialisation, so a model trained on other labels can be
    fine-tuned. Returns the head keys left out. A resumed training replaces these weights with its checkpoint's.
    ``network`` is the plain module (the bundles pass ``network_def``, never a DDP or compiled wrapper).
    """
    state = load_checkpoint(path)
    if isinstance(state, dict):
        state = state.get("network_weights", state.get("network", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict, bundle checkpoint or nnU-Net checkpoint")
    state = nnunet_state_dict({k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()})
    if isinstance(network, DynUNet) and any(k.startswith("encoder.stages.") for k in state):
        state = dynunet_state_dict(state, len(network.kernel_size))
    # named_* list each tensor once: DynUNet's skip_layers aliases are left out
    own = dict(itertools.chain(network.named_parameters(), network.named_buffers()))
    aliases = set(network.state_dict()) - set(own)
    state = {k: v for k, v in state.items() if k not in aliases}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in set(state) - set(own) if not k.startswith(_HEADS))
    if missing or unexpected:
        raise ValueError(f"{path}: weights of another network: {len(missing)} of this network's weights missing "
                         f"({', '.join(missing[:3])}), {len(unexpected)} unknown ({', '.join(unexpected[:3])})")
    skipped = []
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            if not key.startswith(_HEADS):
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, this network's has "
                                 f"{tuple(own[key].shape)}")
            skipped.append(key)
    network.load_state_dict({k: v for k, v in state.items() if k in own and k not in skipped}, strict=False)
    logging.getLogger(__name__).info(f"initial weights from {path}" + (
        f"; {len(skipped)} head weights of another label count keep their initialisation" if skipped else ""))
    return skipped


def _check_arch_kwargs(kw: dict) -> None:
    """Refuse plan settings these networks do not implement, rather than silently building something else."""
    problems = []
    if kw.get("dropout_op") is not None:
        problems.append(f"dropout_op={kw['dropout_op']}")
    norm = kw.get("norm_op")
    if norm is not None and "InstanceNorm" not in str(norm):
        problems.append(f"norm_op={norm}")
    norm_kw = kw.get("norm_op_kwargs") or {}
    if float(norm_kw.get("eps", 1e-5)) != 1e-5 or not norm_kw.get("affine", True):
        problems.append(f"norm_op_kwargs={norm_kw}")
    nonlin = kw.get("nonlin")
    if nonlin is not None and "LeakyReLU" not in str(nonlin):
        problems.append(f"nonlin={nonlin}")
    if float((kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01)) != 0.01:
        problems.append(f"nonlin_kwargs={kw['nonlin_kwargs']}")
    if problems:
        raise ValueError("unsupported architecture settings: " + ", ".join(problems))


class NativeResolutionDynUNet(DynUNet):
    """MONAI's ``DynUNet`` whose deep-supervision heads stay at their own resolution in training (a list, highest
    resolution first), like nnU-Net's PlainConvUNet; same modules and state dict as ``DynUNet``.

    ``forward`` walks the blocks itself instead of through DynUNet's recursive ``skip_layers`` (kept, unused, for
    the state dict's alias keys): those write the heads into a shared ``Optional`` list, which ``torch.jit.script``
    rejects, so this is what makes ``ckpt_export`` without ``--use_trace`` work.
    """

    __jit_ignored_attributes__ = ["skip_layers"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.deep_supervision:  # an empty list, so the scripted forward compiles (no state-dict keys)
            self.deep_supervision_heads = nn.ModuleList()

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        skips: List[torch.Tensor] = [self.input_block(x)]
        for down in self.downsamples:
            skips.append(down(skips[-1]))
        x = self.bottleneck(skips[-1])
        decoded: List[torch.Tensor] = []  # decoder outputs, deepest first (upsamples[0] is the deepest)
        for up in self.upsamples:
            x = up(x, skips[len(skips) - 1 - len(decoded)])
            decoded.append(x)
        out = self.output_block(x)
        if not (self.training and self.deep_supervision):
            return out
        outputs: List[torch.Tensor] = [out]
        for head in self.deep_supervision_heads:  # head j reads the decoder output one level above the last read
            outputs.append(head(decoded[len(decoded) - 1 - len(outputs)]))
        return outputs


def dynunet_is_exact(arch_kwargs: dict) -> bool:
    """Whether MONAI's DynUNet computes what nnU-Net's PlainConvUNet computes for this plan: at least 3 stages of
    exactly 2 convs each, and one kernel size for every stage (DynUNet's decoder stage at level t convolves with
    ``kernel_sizes[t + 1]`` where nnU-Net uses ``kernel_sizes[t]``). DynUNet's missing conv biases do not count: the
    InstanceNorm after each conv cancels a bias."""
    kernels = [list(k) if isinstance(k, (list, tuple)) else [k] for k in arch_kwargs["kernel_sizes"]]
    return len(kernels) >= 3 and _conv_count_not_two(arch_kwargs) is None and all(k == kernels[0] for k in kernels)


def _conv_count_not_two(arch_kwargs: dict):
    """The first conv-count setting of the plan that is not 2 in every stage, as ``(key, value)``; None if none."""
    for key in ("n_conv_per_stage", "n_conv_per_stage_decoder"):
        per_stage = arch_kwargs.get(key, 2)
        if any(int(c) != 2 for c in ([per_stage] if isinstance(per_stage, int) else per_stage)):
            return key, per_stage
    return None


def dynunet_from_plan(arch_kwargs: dict, in_channels: int, out_channels: int, deep_supervision: bool = True):
    """MONAI ``DynUNet`` for an nnU-Net PlainConvUNet plan (``architecture.arch_kwargs``).

    Same stages, strides, widths, norm, activation and init as nnU-Net, and the same ``n_stages - 1``
    deep-supervision outputs at their own resolutions (``NativeResolutionDynUNet``). Its convs have no bias
    (cancelled by the InstanceNorm after each; its transposed convs get one via ``trans_bias``, as nnU-Net's), and its
    decoder kernels equal nnU-Net's only when every stage has the same kernel (``dynunet_is_exact``).
    DynUNet has exactly two convs per stage and needs at least 3 stages; other plans raise ``ValueError``.
    """
    _check_arch_kwargs(arch_kwargs)
    kernels, strides = arch_kwargs["kernel_sizes"], arch_kwargs["strides"]
    n = len(kernels)
    if n < 3:
        raise ValueError(f"DynUNet needs at least 3 stages, the plan has {n}")
    other = _conv_count_not_two(arch_kwargs)
    if other is not None:
        raise ValueError(f"DynUNet has 2 convs per stage; the plan has {other[0]}={other[1]}")
    return NativeResolutionDynUNet(len(kernels[0]), in_channels, out_channels, kernel_size=kernels, strides=strides,
                   upsample_kernel_size=strides[1:], filters=arch_kwargs["features_per_stage"],
                   norm_name=("INSTANCE", {"affine": True}),
                   act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                   deep_supervision=deep_supervision, deep_supr_num=max(1, n - 2), res_block=False,
                   trans_bias=bool(arch_kwargs.get("conv_bias", True)))


def plain_from_plan(arch_kwargs: dict, in_channels: int, out_channels: int, deep_supervision: bool = True):
    """``PlainConvUNet`` for an nnU-Net default-planner plan (``architecture.arch_kwargs``)."""
    _check_arch_kwargs(arch_kwargs)
    if not arch_kwargs.get("conv_bias", True):
        raise ValueError("PlainConvUNet here always has conv biases (nnU-Net plans set conv_bias true)")
    kernels = arch_kwargs["kernel_sizes"]
    return PlainConvUNet(len(kernels[0]), in_channels, out_channels, arch_kwargs["features_per_stage"], kernels,
                         arch_kwargs["strides"], arch_kwargs.get("n_conv_per_stage", 2),
                         arch_kwargs.get("n_conv_per_stage_decoder", 2), deep_supervision)


def resenc_from_plan(arch_kwargs: dict, in_channels: int, out_channels: int, deep_supervision: bool = True):
    """``ResidualEncoderUNet`` for an nnU-Net ResEnc plan (``architecture.arch_kwargs``)."""
    _check_arch_kwargs(arch_kwargs)
    if not arch_kwargs.get("conv_bias", True):
        raise ValueError("ResidualEncoderUNet here always has conv biases (nnU-Net plans set conv_bias true)")
    kernels = arch_kwargs["kernel_sizes"]
    return ResidualEncoderUNet(len(kernels[0]), in_channels, out_channels, arch_kwargs["features_per_stage"],
                               kernels, arch_kwargs["strides"], arch_kwargs["n_blocks_per_stage"],
                               arch_kwargs["n_conv_per_stage_decoder"], deep_supervision)


def network_from_plan(plan_configuration: dict, in_channels: int, out_channels: int, deep_supervision: bool = True,
                      classification_head: Optional[str] = None, num_classification_classes: int = 2,
                      lesion_labels=(1,), classification_sigma: float = 1.0):
    """The network of one (inheritance-resolved) plans configuration, by ``architecture.network_class_name``.

    PlainConvUNet -> MONAI DynUNet where it computes the same (``dynunet_is_exact``), else ours; ResidualEncoderUNet
    -> ours. ``out_channels`` is the number of label keys (or regions); ``in_channels`` the number of image channels
    (plus one-hot previous stage for a cascade). With a ``classification_head`` the network also classifies the
    case (``scripts.classification.multitask_from_plan``); the templates pass the bundle's ids, null in a
    segmentation-only bundle.
    """
    if classification_head:
        from .classification import multitask_from_plan

        return multitask_from_plan(plan_configuration, in_channels, out_channels, deep_supervision,
                                   classification_head, num_classification_classes, lesion_labels,
                                   classification_sigma)
    arch = plan_configuration.get("architecture", plan_configuration)
    name = str(arch["network_class_name"]).rsplit(".", 1)[-1]
    kwargs = arch["arch_kwargs"]
    if name == "PlainConvUNet":
        builder = dynunet_from_plan if dynunet_is_exact(kwargs) else plain_from_plan
    elif name == "ResidualEncoderUNet":
        builder = resenc_from_plan
    else:
        raise ValueError(f"unsupported network_class_name {arch['network_class_name']!r}")
    return builder(kwargs, in_channels, out_channels, deep_supervision)


def split_deep_supervision(output, spatial_dims: int) -> List[torch.Tensor]:
    """Training output of either network as a list of logits tensors, highest resolution first.

    A list/tuple (ResEnc) is returned as a list; DynUNet's stacked ``(B, K, C, *spatial)`` tensor is unbound along
    dim 1; a plain ``(B, C, *spatial)`` tensor (no deep supervision, or eval mode) becomes a one-element list.
    ``spatial_dims`` tells stacked from plain tensors (a loss can pass ``target.ndim - 2``).
    """
    if isinstance(output, (list, tuple)):
        return list(output)
    if output.ndim == spatial_dims + 3:
        return list(torch.unbind(output, dim=1))
    if output.ndim == spatial_dims + 2:
        return [output]
    raise ValueError(f"output of shape {tuple(output.shape)} does not fit spatial_dims={spatial_dims}")


class MirrorTTA(nn.Module):
    """Mean of ``network``'s logits over the input and all flips along any subset of spatial ``axes`` (nnU-Net's
    mirroring TTA: 2**len(axes) passes). ``axes`` are spatial indices (0 = first spatial dim); ``()`` disables it.

    Averaging logits (not probabilities) matches nnU-Net. Use it in eval mode only: the wrapped network must return a
    single tensor, which deep-supervised networks do only in eval mode. It is a plain module, so it can be the
    ``network`` of ``SlidingWindowInferer`` and is ``torch.jit.trace``-able (the flips unroll).
    """

    flips: List[List[int]]  # declared here so TorchScript also types an empty list (axes=())

    def __init__(self, network: nn.Module, axes: Sequence[int] = (0, 1, 2)):
        super().__init__()
        axes = sorted({int(a) for a in axes})
        if any(a < 0 for a in axes):
            raise ValueError(f"axes are non-negative spatial indices, got {axes}")
        self.network = network
        self.axes = tuple(axes)
        # every non-empty subset of the axes, as tensor dims (batch and channel come first)
        self.flips = [[a + 2 for a in subset] for r in range(1, len(axes) + 1)
                      for subset in itertools.combinations(axes, r)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one pass at a time: on CPUs, batching the 8 passes was slower per pass (0.31-0.38 s vs 0.25-0.27 s for the
        # CPU benchmark's network, 0.51 s vs 0.42 s for Hippocampus' 3d_fullres network), and GPUs gain nothing
        out = single_tensor(self.network(x), x.dim())
        for dims in self.flips:
            out = out + torch.flip(single_tensor(self.network(torch.flip(x, dims)), x.dim()), dims)
        return out / (len(self.flips) + 1)


def single_tensor(out: Union[torch.Tensor, List[torch.Tensor]], ndim: int) -> torch.Tensor:
    """The network's output if it is one (B, C, *spatial) tensor; a DS list or DynUNet's stacked DS tensor is refused.

    The isinstance check also narrows the type for TorchScript.
    """
    if isinstance(out, torch.Tensor):  # nested, not `and`: TorchScript narrows the Union only this way
        if out.dim() == ndim:
            return out
    raise TypeError("one (B, C, *spatial) logits tensor expected: put the network in eval mode (deep supervision "
                    "returns several outputs)")
