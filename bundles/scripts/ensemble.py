"""Ensembles of nnU-Net bundles: one network holding every member, one inferer that predicts their average, and the
offline averaging of saved probabilities (``nnUNetv2_ensemble``).

How an ensemble bundle predicts (``EnsembleInferer``, called as ``inferer(image, network)`` by MONAI's
``SupervisedEvaluator``, MONAI Label and MONAI Deploy): the ``image`` it receives is the loaded image in its original
geometry (``preprocessing`` is only ``LoadImaged``), because members of different configurations need different
preprocessing (spacing, crop, normalization) and only the original grid is common to all of them. Members are grouped
by configuration (same plans and preprocessing). Within a group the image is preprocessed once, each member predicts
with its sliding window and mirroring TTA, and the **logits are averaged** (nnU-Net's multi-fold prediction); the mean
logits are restored to the original geometry and turned into softmax probabilities. The groups' **probabilities are
then averaged** (nnU-Net's ensembling of configurations, ``nnUNetv2_ensemble``). ``fold_averaging="probabilities"``
instead restores every member separately and averages all members' probabilities with equal weight. The output is
(B, C, *spatial) probabilities on the input's grid with the input's meta data, so ``ProbabilitiesToLabelsd`` (argmax,
or region painting for region-based members) and ``SaveImaged`` (or MONAI Label's ``Restored``) finish the job
without any inverse transform. Region-based members' probabilities are their regions' sigmoids.

Cascade members (``3d_cascade_fullres``) receive the label map of their previous stage (``3d_lowres``), predicted by
the previous stage's members of the same ensemble (members with ``"averaged": false`` only serve that purpose).

``EnsembleNetwork`` is an ``nn.Module`` holding every member network in a ``ModuleList``; its state dict (keys
``members.<i>.<member key>``) is the bundle's ``models/model.pt``. Its ``forward`` (the mean of the members' logits)
is only defined when all members share one configuration, i.e. take the same input tensor; the real prediction is
the inferer's.

Multi-task members (``scripts.classification``) also give each image's class probabilities, averaged like the
segmentation's (folds, then configurations); ``pop_classification`` hands them to the postprocessing's
``ClassificationOutputd``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import List

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import nn

from .inference import NnUNetInferer
from .networks import network_from_plan, single_tensor
from .preprocessing import (PlanSettings, from_nnunet_order, labels_from_probabilities, logits_to_original,
                            preprocess_case, resolve_configuration, spacing_from_meta, to_nnunet_order)

FOLD_AVERAGING = ("logits", "probabilities")


# --- members ---------------------------------------------------------------------------------------------------
def member_group_key(member: dict) -> str:
    """Members with the same key are folds of one configuration: same plans, configuration and preprocessing."""
    plans = member["plans"]
    settings = asdict(PlanSettings.from_plans(plans, member["configuration"]))
    text = json.dumps([plans.get("plans_name"), member["configuration"], settings], sort_keys=True)
    return f"{plans.get('plans_name')}:{member['configuration']}:{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def member_groups(members: list) -> list:
    """``[(key, [member indices])]`` in order of first appearance."""
    groups: dict = {}
    for i, member in enumerate(members):
        groups.setdefault(member_group_key(member), []).append(i)
    return list(groups.items())


def previous_stage_group(members: list, group: list, groups: list):
    """Index (into ``groups``) of the group that provides ``group``'s previous stage, or None (no cascade)."""
    member = members[group[0]]
    previous = resolve_configuration(member["plans"], member["configuration"]).get("previous_stage")
    if not previous:
        return None
    plans_name = member["plans"].get("plans_name")
    for g, (_, indices) in enumerate(groups):
        other = members[indices[0]]
        if other["configuration"] == previous and other["plans"].get("plans_name") == plans_name:
            return g
    raise ValueError(f"ensemble member {member.get('name', member['configuration'])!r} is a cascade stage and needs "
                     f"the members of its previous stage {previous!r}, which the ensemble lacks")


def build_member_network(member: dict) -> nn.Module:
    config = resolve_configuration(member["plans"], member["configuration"])
    if member.get("classification"):  # a multi-task member: its classification head too
        from .classification import multitask_from_plan

        return multitask_from_plan(config, int(member["in_channels"]), int(member["num_classes"]), True,
                                   **member["classification"])
    return network_from_plan(config, int(member["in_channels"]), int(member["num_classes"]), deep_supervision=True)


class EnsembleNetwork(nn.Module):
    """Every member's network (as its own bundle builds it) in ``self.members``; see the module docstring."""

    def __init__(self, members: list):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList([build_member_network(m) for m in members])
        self.single_group = len(member_groups(members)) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.single_group:
            raise RuntimeError("EnsembleNetwork: members of different configurations need different inputs; predict "
                               "with scripts.ensemble.EnsembleInferer (the bundle's 'inferer')")
        outputs: List[torch.Tensor] = []
        for member in self.members:
            outputs.append(single_tensor(member(x), x.dim()))  # eval mode: one logits tensor per member
        return torch.stack(outputs).mean(0)


# --- inference -------------------------------------------------------------------------------------------------
class EnsembleInferer(Inferer):
    """Predicts the ensemble's softmax probabilities for a batch of loaded images; see the module docstring.

    Args:
        members: the member descriptions (``configs/members.json``'s ``members``).
        use_tta: mirroring test-time augmentation (each member's own ``mirror_axes``).
        fold_averaging: ``"logits"`` (nnU-Net) or ``"probabilities"`` within a configuration's folds.
        sw_batch_size, overlap, mode, sigma_scale: sliding-window settings (a member's own ``inferer`` settings in
            its description win).
    """

    def __init__(self, members: list, use_tta: bool = True, fold_averaging: str = "logits", sw_batch_size: int = 1,
                 overlap: float = 0.5, mode: str = "gaussian", sigma_scale: float = 0.125):
        super().__init__()
        if fold_averaging not in FOLD_AVERAGING:
            raise ValueError(f"fold_averaging must be one of {FOLD_AVERAGING}, got {fold_averaging!r}")
        self.members = members
        self.fold_averaging = fold_averaging
        self.plans = [PlanSettings.from_plans(m["plans"], m["configuration"]) for m in members]
        self.groups = member_groups(members)
        self.previous = [previous_stage_group(members, indices, self.groups) for _, indices in self.groups]
        self.inferers = []
        for m in members:
            settings = {"overlap": overlap, "mode": mode, "sigma_scale": sigma_scale, **(m.get("inferer") or {})}
            self.inferers.append(NnUNetInferer(
                roi_size=[int(p) for p in m["patch_size"]], mirror_axes=m["mirror_axes"] if use_tta else [],
                two_d=bool(m["two_d"]), sw_batch_size=sw_batch_size, **settings))
        self.order = self._dependency_order()
        self.class_outputs = collections.deque(maxlen=4096)

    def _dependency_order(self) -> list:
        order, seen = [], set()

        def visit(g, stack=()):
            if g in seen:
                return
            if g in stack:
                raise ValueError("ensemble members: circular previous_stage")
            if self.previous[g] is not None:
                visit(self.previous[g], stack + (g,))
            seen.add(g)
            order.append(g)

        for g in range(len(self.groups)):
            visit(g)
        return order

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        net = getattr(network, "module", network)  # DataParallel / DDP
        if not isinstance(getattr(net, "members", None), nn.ModuleList) or len(net.members) != len(self.members):
            raise TypeError(f"EnsembleInferer needs the EnsembleNetwork of its {len(self.members)} members")
        outputs = [self.predict_image(inputs[b], net.members) for b in range(inputs.shape[0])]
        out = torch.from_numpy(np.stack(outputs)).to(inputs.device)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out).copy_meta_from(inputs)
        return out

    def _member_device(self, member: nn.Module) -> torch.device:
        parameter = next(member.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def predict_image(self, image: torch.Tensor, members: nn.ModuleList) -> np.ndarray:
        """Probabilities (C, *spatial) of one loaded image (C, *spatial), on its own grid and axis order."""
        array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        spatial_dims = array.ndim - 1
        nn_array, spacing = to_nnunet_order(array, spacing_from_meta(image))
        probabilities = {}  # group -> list of (C, z, y, x) probability arrays in nnU-Net order
        for g in self.order:
            indices = self.groups[g][1]
            plan = self.plans[indices[0]]
            data, _, props = preprocess_case(nn_array, spacing, plan)
            if self.previous[g] is not None:
                previous = self.members[self.groups[self.previous[g]][1][0]]
                data = np.concatenate([data, self._previous_channels(probabilities[self.previous[g]], props,
                                                                     self.members[indices[0]], plan,
                                                                     previous.get("regions_class_order"))])
            logits = []
            for i in indices:
                device = self._member_device(members[i])
                x = torch.from_numpy(data)[None].to(device)
                logits.append(self.inferers[i](x, members[i])[0].detach().float().cpu().numpy())
            if self.fold_averaging == "logits":
                logits = [np.mean(logits, axis=0)] if len(logits) > 1 else logits
            regions = self.members[indices[0]].get("regions_class_order")
            probabilities[g] = [logits_to_original(lg, props, plan, True, regions)[1] for lg in logits]
        averaged = [p for g, (_, indices) in enumerate(self.groups)
                    if any(self.members[i].get("averaged", True) for i in indices) for p in probabilities[g]]
        if not averaged:
            raise ValueError("ensemble has no averaged member")
        mean = averaged[0] if len(averaged) == 1 else np.mean(averaged, axis=0)
        self.class_outputs.append(self._class_probabilities())
        return from_nnunet_order(mean.astype(np.float32, copy=False), spatial_dims)

    def _class_probabilities(self):
        """The image's class probabilities from the multi-task members' inferers (None without such members): the
        folds of a configuration averaged, then the configurations, as the segmentation's probabilities; members
        that only feed a cascade do not count."""
        by_group = []
        for _, indices in self.groups:
            outputs = [(i, self.inferers[i].pop_classification()) for i in indices]
            probabilities = [p for i, p in outputs if p is not None and self.members[i].get("averaged", True)]
            if probabilities:
                by_group.append(np.mean(probabilities, axis=0))
        return np.mean(by_group, axis=0) if by_group else None

    def pop_classification(self):
        """The class probabilities (K,) of the oldest image not yet popped; None when there is none."""
        return self.class_outputs.popleft() if self.class_outputs else None

    @staticmethod
    def _previous_channels(previous_probabilities: list, props: dict, member: dict, plan: PlanSettings,
                           regions_class_order=None):
        """The previous stage's label map on this case's preprocessed grid, as one-hot foreground channels."""
        from .preprocessing import one_hot, preprocess_previous_stage

        mean = previous_probabilities[0] if len(previous_probabilities) == 1 else np.mean(previous_probabilities, 0)
        labels = labels_from_probabilities(mean, regions_class_order)[None].astype(np.int16)
        previous = preprocess_previous_stage(labels, props, plan)
        return one_hot(previous, member["foreground_labels"]).astype(np.float32)


class NnUNetLayoutd(MapTransform):
    """Copies (C, *spatial) probabilities from ``keys`` to ``output_key`` in nnU-Net's (C, z, y, x) layout, for
    ``scripts.inference.SaveProbabilitiesd``; does nothing when ``output_key`` is None."""

    def __init__(self, keys: KeysCollection, output_key: str | None = "probabilities",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.output_key = output_key

    def __call__(self, data):
        d = dict(data)
        if self.output_key is None:
            return d
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            d[self.output_key] = to_nnunet_order(array.astype(np.float32, copy=False), [1.0] * (array.ndim - 1))[0]
        return d


# --- offline ensembling of saved probabilities (nnUNetv2_ensemble) ---------------------------------------------
def load_probabilities(path) -> np.ndarray:
    """``probabilities`` of a ``CASE.npz`` (nnU-Net's layout), as float32."""
    with np.load(path) as z:
        if "probabilities" not in z.files:
            raise ValueError(f"{path}: no 'probabilities' array (has {', '.join(z.files) or 'nothing'})")
        return np.asarray(z["probabilities"], dtype=np.float32)


def average_probability_files(files) -> np.ndarray:
    """Mean of the ``probabilities`` of several ``CASE.npz`` files (float32, as nnU-Net)."""
    files = list(files)
    total = None
    for path in files:
        p = load_probabilities(path)
        if total is not None and p.shape != total.shape:
            raise ValueError(f"{path}: probabilities of shape {p.shape} differ from {files[0]}'s {total.shape}")
        total = p.copy() if total is None else total + p
    return total / len(files)


def probabilities_to_labels(probabilities: np.ndarray, labels: dict | None = None,
                            regions_class_order=None) -> np.ndarray:
    """Argmax (labels) or nnU-Net's region painting (sigmoid > 0.5 in ``regions_class_order``) to a label map."""
    is_region = labels is not None and any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    if is_region and not regions_class_order:
        raise ValueError("region-based labels need regions_class_order")
    return labels_from_probabilities(probabilities, regions_class_order if is_region else None)


class ProbabilitiesToLabelsd(MapTransform):
    """(B or C, ...) probabilities in ``keys`` -> a (1, ...) label map per item: argmax, or for region-based
    ensembles nnU-Net's painting of each region's probability > 0.5 in ``regions_class_order``."""

    def __init__(self, keys: KeysCollection, regions_class_order=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.regions_class_order = list(regions_class_order) if regions_class_order else None

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            seg = labels_from_probabilities(array, self.regions_class_order)[None].astype(np.float32)
            if isinstance(value, MetaTensor):
                d[key] = MetaTensor(torch.from_numpy(seg), meta=dict(value.meta))
            else:
                d[key] = torch.from_numpy(seg) if isinstance(value, torch.Tensor) else seg
        return d


def write_label_map(seg: np.ndarray, reference_file, output_file) -> Path:
    """Writes a label map in nnU-Net order ((z, y, x), SimpleITK's array order) with the geometry (spacing, origin,
    direction) of ``reference_file``, atomically. A 2-D reference takes the (1, y, x) map's only slice."""
    import SimpleITK as sitk

    reference = sitk.ReadImage(str(reference_file))
    expected = tuple(reversed(reference.GetSize()))
    if seg.ndim == len(expected) + 1 and seg.shape[0] == 1:
        seg = seg[0]
    if tuple(seg.shape) != expected:
        raise ValueError(f"{reference_file}: image shape {expected} differs from the probabilities' {seg.shape}")
    image = sitk.GetImageFromArray(seg)
    image.CopyInformation(reference)
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    name = output_file.name
    stem = name.split(".", 1)
    ending = "." + stem[1] if len(stem) > 1 else ""
    tmp = output_file.with_name(f".{stem[0]}.{os.getpid()}.tmp{ending}")
    try:
        sitk.WriteImage(image, str(tmp), True)
        os.replace(tmp, output_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return output_file


def save_probabilities_npz(probabilities: np.ndarray, output_file) -> Path:
    """``CASE.npz`` with ``probabilities`` (float32), atomically."""
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_file.with_name(f".{output_file.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez_compressed(tmp, probabilities=np.asarray(probabilities, dtype=np.float32))
        os.replace(tmp, output_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return output_file


def common_cases(folders) -> List[str]:
    """Case names with a ``CASE.npz`` in every folder, sorted."""
    sets = []
    for folder in folders:
        sets.append({p.name[:-4] for p in Path(folder).glob("*.npz") if not p.name.startswith(".")})
    return sorted(set.intersection(*sets)) if sets else []
