"""The experiment planner: nnU-Net v2's configurations, number for number (spec section 3).

Reads only dataset.json and the fingerprint, never images, and imports neither torch nor monai so that planning is
instant. The output has nnU-Net's ``nnUNetPlans.json`` schema and key order, so either tool can read the other's plans.
Float arithmetic mirrors nnU-Net's order of operations (numpy float64, Python's half-to-even ``round``).
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np

from autoplan.image_io import reader_name
from autoplan.topology import (Topology, plain_unet_feature_map_size, pool_and_conv_props,
                               resenc_unet_feature_map_size)

ANISO_THRESHOLD = 3
LOWRES_CREATION_THRESHOLD = 0.25
SPACING_INCREASE_FACTOR = 1.03
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
MIN_BATCH_SIZE = 2
REFERENCE_BATCH_SIZE = {2: 12, 3: 2}
INITIAL_PATCH_EDGE = {2: 2048, 3: 256}
RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)

NORMALIZATION_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}


RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}


def torch_resampling(separate_z: bool) -> dict:
    """What nnU-Net's ``*_torchres`` planners write: ``resample_torch_fornnunet`` (torch ``interpolate``) for data,
    segmentations and the export. ``_sepz`` keeps a separate low-resolution axis (nearest along it, decided as the
    default resampling does); the others interpolate all axes at once (``force_separate_z`` False)."""
    def kwargs(is_seg: bool) -> dict:
        k = {"is_seg": is_seg, "force_separate_z": None if separate_z else False, "memefficient_seg_resampling": False}
        if separate_z:
            k["separate_z_anisotropy_threshold"] = ANISO_THRESHOLD
        return k

    name = "resample_torch_fornnunet"
    return {"resampling_fn_data": name, "resampling_fn_seg": name, "resampling_fn_data_kwargs": kwargs(False),
            "resampling_fn_seg_kwargs": kwargs(True), "resampling_fn_probabilities": name,
            "resampling_fn_probabilities_kwargs": kwargs(False)}


@dataclass(frozen=True)
class Preset:
    """One nnU-Net planner: network family, memory reference, batch-size cap and resampling functions."""

    planner_class: str
    plans_name: str
    residual: bool
    default_gpu_gb: float
    reference_gb: float
    reference_value: dict
    max_dataset_covered: float
    resampling: dict = field(default_factory=lambda: RESAMPLING)
    own_data_identifier: bool = False  # the torchres planners name every configuration's data after their plans

    def over_budget(self, estimate: float, reference: float, dim: int) -> bool:
        # The default planner scales the estimate by the reference batch size; the ResEnc planners do not.
        if self.residual:
            return estimate > reference
        return estimate / REFERENCE_BATCH_SIZE[dim] * 2 > reference

    def data_identifier(self, plans_name: str, configuration: str) -> str:
        # ResEnc planners share the default planner's 2d and 3d_fullres preprocessing; the torchres ones do not.
        if self.residual and not self.own_data_identifier and configuration in ("2d", "3d_fullres"):
            return f"nnUNetPlans_{configuration}"
        return f"{plans_name}_{configuration}"


_DEFAULT = dict(residual=False, default_gpu_gb=8, reference_gb=8, reference_value={3: 560_000_000, 2: 85_000_000},
                max_dataset_covered=0.05)
_RESENC_L = dict(residual=True, default_gpu_gb=24, reference_gb=24,
                 reference_value={3: 2_100_000_000, 2: 380_000_000}, max_dataset_covered=1.0)
PRESETS = {
    "default": Preset("ExperimentPlanner", "nnUNetPlans", **_DEFAULT),
    "resenc-m": Preset("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", True, 8, 8,
                       {3: 680_000_000, 2: 135_000_000}, 1.0),
    "resenc-l": Preset("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", **_RESENC_L),
    "resenc-xl": Preset("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans", True, 40, 40,
                        {3: 3_600_000_000, 2: 560_000_000}, 1.0),
    # nnU-Net 2.8.1's torch-resampling planners (experiment_planners/resampling/resample_with_torch.py); 2.8.1 has
    # no ResEnc M or XL variant
    "torchres": Preset("nnUNetPlanner_torchres", "nnUNetPlans_torchres", **_DEFAULT,
                       resampling=torch_resampling(False), own_data_identifier=True),
    "resenc-l-torchres": Preset("nnUNetPlannerResEncL_torchres", "nnUNetResEncUNetLPlans_torchres", **_RESENC_L,
                                resampling=torch_resampling(False), own_data_identifier=True),
    "resenc-l-torchres-sepz": Preset("nnUNetPlannerResEncL_torchres_sepz", "nnUNetResEncUNetLPlans_torchres_sepz",
                                     **_RESENC_L, resampling=torch_resampling(True), own_data_identifier=True),
}


class PlanningError(ValueError):
    """dataset.json or the fingerprint cannot be planned; the message says which key is wrong."""


def normalization_schemes(dataset_json: dict, fingerprint: dict) -> tuple[list[str], list[bool]]:
    """Scheme per channel from its name (anything unknown is z-score) and whether the non-zero mask is used."""
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    schemes = [NORMALIZATION_BY_CHANNEL_NAME.get(str(n).casefold(), "ZScoreNormalization") for n in names.values()]
    crop_shrinks = fingerprint["median_relative_size_after_cropping"] < 3 / 4.0
    return schemes, [crop_shrinks and s == "ZScoreNormalization" for s in schemes]


def fullres_target_spacing(fingerprint: dict) -> np.ndarray:
    """Median spacing, except a clearly anisotropic coarse axis, which gets its 10th-percentile spacing."""
    spacings = np.vstack(fingerprint["spacings"])
    target = np.percentile(spacings, 50, 0)
    target_size = np.percentile(np.vstack(fingerprint["shapes_after_crop"]), 50, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacings = [target[i] for i in others]
    other_sizes = [target_size[i] for i in others]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(other_spacings)
    aniso_voxels = target_size[worst] * ANISO_THRESHOLD < min(other_sizes)
    if aniso_spacing and aniso_voxels:
        coarse = np.percentile(spacings[:, worst], 10)
        if coarse < max(other_spacings):
            coarse = max(max(other_spacings), coarse) + 1e-5
        target[worst] = coarse
    return target


def transpose_axes(target_spacing) -> tuple[list[int], list[int]]:
    """Move the coarsest axis first; the rest keep their order."""
    worst = int(np.argmax(target_spacing))
    forward = [worst] + [i for i in range(3) if i != worst]
    backward = [forward.index(i) for i in range(3)]
    return forward, backward


def _resampled_shape(old_shape, old_spacing, new_spacing) -> list[int]:
    return [int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)]


class Planner:
    """Plans the configurations of one dataset with one preset (spec 3.2 to 3.10)."""

    def __init__(self, dataset_json: dict, fingerprint: dict, preset: str = "default",
                 gpu_memory_gb: float | None = None, plans_name: str | None = None,
                 dataset_name: str | None = None):
        if preset not in PRESETS:
            raise PlanningError(f"unknown planner '{preset}'; choose one of {', '.join(PRESETS)}")
        for key in ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                    "median_relative_size_after_cropping"):
            if key not in fingerprint:
                raise PlanningError(f"the fingerprint lacks '{key}'")
        for key in ("labels", "numTraining", "file_ending"):
            if key not in dataset_json:
                raise PlanningError(f"dataset.json lacks '{key}'")
        if "channel_names" not in dataset_json and "modality" not in dataset_json:
            raise PlanningError("dataset.json lacks 'channel_names'")
        if not fingerprint["spacings"] or len(fingerprint["spacings"]) != len(fingerprint["shapes_after_crop"]):
            raise PlanningError("the fingerprint's 'spacings' and 'shapes_after_crop' must be non-empty and "
                                "of equal length")
        self.dataset_json = dataset_json
        self.fingerprint = fingerprint
        self.preset = PRESETS[preset]
        self.gpu_memory_gb = float(gpu_memory_gb) if gpu_memory_gb else self.preset.default_gpu_gb
        self.plans_name = plans_name or self.preset.plans_name
        self.dataset_name = dataset_name or dataset_json.get("name", "Dataset")
        self.num_classes = len(dataset_json["labels"])
        self.schemes, self.use_mask = normalization_schemes(dataset_json, fingerprint)

    # --- one configuration -------------------------------------------------------------------------------------
    def _architecture(self, topology: Topology, dim: int) -> dict:
        n = topology.n_stages
        features = [min(BASE_FEATURES * 2**i, MAX_FEATURES[dim]) for i in range(n)]
        if self.preset.residual:
            network = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
            encoder_key, encoder_units, decoder_units = "n_blocks_per_stage", list(RESENC_BLOCKS[:n]), [1] * (n - 1)
        else:
            network = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
            encoder_key, encoder_units, decoder_units = "n_conv_per_stage", [2] * n, [2] * (n - 1)
        kwargs = {
            "n_stages": n,
            "features_per_stage": features,
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d",
            "kernel_sizes": topology.kernel_sizes,
            "strides": topology.strides,
            encoder_key: encoder_units,
            "n_conv_per_stage_decoder": decoder_units,
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        }
        return {"network_class_name": network, "arch_kwargs": kwargs,
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}

    def _estimate(self, topology: Topology, arch: dict) -> int:
        kw = arch["arch_kwargs"]
        if self.preset.residual:
            return resenc_unet_feature_map_size(topology.patch_size, topology.strides, kw["features_per_stage"],
                                                kw["n_blocks_per_stage"], kw["n_conv_per_stage_decoder"],
                                                self.num_classes)
        return plain_unet_feature_map_size(topology.patch_size, topology.strides, kw["features_per_stage"],
                                           kw["n_conv_per_stage"], kw["n_conv_per_stage_decoder"], self.num_classes)

    def plan_configuration(self, spacing, median_shape, data_identifier: str, dataset_voxels: float) -> dict:
        """Patch size, topology and batch size for one spacing (spec 3.6)."""
        spacing = np.asarray(spacing, dtype=np.float64)
        dim = len(spacing)
        inverse = 1 / spacing
        edge = INITIAL_PATCH_EDGE[dim]
        initial = [round(i) for i in inverse * (edge**dim / np.prod(inverse)) ** (1 / dim)]
        initial = [min(i, j) for i, j in zip(initial, list(median_shape)[:dim])]

        topology = pool_and_conv_props(spacing, initial)
        arch = self._architecture(topology, dim)
        estimate = self._estimate(topology, arch)
        reference = self.preset.reference_value[dim] * (self.gpu_memory_gb / self.preset.reference_gb)
        while self.preset.over_budget(estimate, reference, dim):
            patch = list(topology.patch_size)
            ratios = [p / m for p, m in zip(patch, list(median_shape)[:dim])]
            axis = max(i for i, r in enumerate(ratios) if r == max(ratios))  # last of equal maxima
            trial = list(patch)
            trial[axis] -= topology.divisor[axis]
            patch[axis] -= pool_and_conv_props(spacing, trial).divisor[axis]
            topology = pool_and_conv_props(spacing, patch)
            arch = self._architecture(topology, dim)
            estimate = self._estimate(topology, arch)

        reference_bs = REFERENCE_BATCH_SIZE[dim]
        batch_size = round(reference / estimate * reference_bs)
        cap = round(dataset_voxels * self.preset.max_dataset_covered / np.prod(topology.patch_size, dtype=np.float64))
        batch_size = max(min(batch_size, cap), MIN_BATCH_SIZE)
        return {
            "data_identifier": data_identifier,
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": int(batch_size),
            "patch_size": [int(p) for p in topology.patch_size],
            "median_image_size_in_voxels": [m if isinstance(m, int) else float(m) for m in median_shape],
            "spacing": [float(s) for s in spacing],
            "normalization_schemes": list(self.schemes),
            "use_mask_for_norm": [bool(u) for u in self.use_mask],
            **deepcopy(self.preset.resampling),
            "architecture": arch,
        }

    # --- the whole plan ----------------------------------------------------------------------------------------
    def plan(self) -> dict:
        """All configurations in nnU-Net's order: 2d, 3d_lowres, 3d_fullres, 3d_cascade_fullres (spec 3.7)."""
        fp = self.fingerprint
        target = fullres_target_spacing(fp)
        forward, backward = transpose_axes(target)
        new_shapes = [_resampled_shape(shape, spacing, target)
                      for spacing, shape in zip(fp["spacings"], fp["shapes_after_crop"])]
        median_shape = np.median(new_shapes, 0)[forward]
        fullres_spacing = target[forward]
        num_training = self.dataset_json["numTraining"]
        dataset_voxels = float(np.prod(median_shape, dtype=np.float64) * num_training)
        identifier = lambda c: self.preset.data_identifier(self.plans_name, c)  # noqa: E731

        fullres = lowres = None
        if median_shape[0] != 1:
            fullres = self.plan_configuration(fullres_spacing, median_shape, identifier("3d_fullres"), dataset_voxels)
            lowres = self._plan_lowres(fullres, median_shape, identifier("3d_lowres"))
            fullres["batch_dice"] = lowres is not None
        plan_2d = self.plan_configuration(fullres_spacing[1:], median_shape[1:], identifier("2d"), dataset_voxels)
        plan_2d["batch_dice"] = True

        configurations = {"2d": plan_2d}
        if lowres is not None:
            configurations["3d_lowres"] = lowres
            lowres["next_stage"] = "3d_cascade_fullres"
        if fullres is not None:
            configurations["3d_fullres"] = fullres
            if lowres is not None:
                configurations["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}

        intensity = fp["foreground_intensity_properties_per_channel"]
        return {
            "dataset_name": self.dataset_name,
            "plans_name": self.plans_name,
            "original_median_spacing_after_transp": [float(i) for i in np.median(fp["spacings"], 0)[forward]],
            "original_median_shape_after_transp": [int(round(i)) for i in np.median(fp["shapes_after_crop"], 0)[forward]],
            "image_reader_writer": self.dataset_json.get("overwrite_image_reader_writer")
            or reader_name(self.dataset_json["file_ending"]),
            "transpose_forward": forward,
            "transpose_backward": backward,
            "configurations": configurations,
            "experiment_planner_used": self.preset.planner_class,
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {
                c: {k: float(v) for k, v in sorted(stats.items())} for c, stats in intensity.items()
            },
        }

    def _plan_lowres(self, fullres: dict, median_shape: np.ndarray, data_identifier: str) -> dict | None:
        """Coarsen the spacing by 3 % steps until the patch covers 25 % of the median image (spec 3.7)."""
        fullres_spacing = np.array(fullres["spacing"])
        patch_voxels = np.prod(fullres["patch_size"], dtype=np.float64)
        median_voxels = np.prod(median_shape, dtype=np.float64)
        lowres_spacing = fullres_spacing.copy()
        lowres = None
        while patch_voxels / median_voxels < LOWRES_CREATION_THRESHOLD:
            max_spacing = max(lowres_spacing)
            coarser = (max_spacing / lowres_spacing) > 2
            if np.any(coarser):
                lowres_spacing[coarser] *= SPACING_INCREASE_FACTOR
            else:
                lowres_spacing *= SPACING_INCREASE_FACTOR
            median_voxels = np.prod(fullres_spacing / lowres_spacing * median_shape, dtype=np.float64)
            lowres_median = tuple(round(i) for i in fullres_spacing / lowres_spacing * median_shape)
            lowres = self.plan_configuration(lowres_spacing, lowres_median, data_identifier,
                                             float(median_voxels * self.dataset_json["numTraining"]))
            patch_voxels = np.prod(lowres["patch_size"], dtype=np.int64)
        if np.prod(median_shape, dtype=np.float64) / median_voxels < 2:
            return None
        lowres["batch_dice"] = False
        return lowres


def plan(dataset_json: dict, fingerprint: dict, planner: str = "default", gpu_memory_gb: float | None = None,
         plans_name: str | None = None, dataset_name: str | None = None) -> dict:
    """Convenience wrapper: the plans dictionary for one preset."""
    return Planner(dataset_json, fingerprint, planner, gpu_memory_gb, plans_name, dataset_name).plan()
