"""Synthetic labelled datasets in nnU-Net v2 raw layout, for the demo and the tests.

Each case is a body (an ellipsoid; zero outside it for MR, air at -1000 HU for CT) holding several labelled
ellipsoidal structures whose sizes are set in millimetres, so anisotropic spacings give anisotropic voxel shapes.
Every channel gives the structures a different contrast. 2-D shapes are written as PNG files.
With ``classes`` (K >= 2) every training case also gets a case-level class, learnable from the image: the size of
``structure_1`` (class 0 smallest, class K-1 largest), declared in dataset.json's ``classification`` block.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from autoplan.files import atomic_folder


def _as_tuple(value, n: int | None = None) -> tuple:
    if isinstance(value, str):
        value = [float(v) for v in value.replace("x", ",").split(",") if v.strip()]
    value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * (n or 1)
    return value


def _ellipsoid(shape_zyx, spacing_zyx, center_mm, radii_mm) -> np.ndarray:
    """Voxels inside an ellipsoid; an axis of length 1 (a 2-D image) is ignored."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape_zyx)]
    dist = sum(((g * sp - c) / r) ** 2 for g, sp, c, r, n in zip(grids, spacing_zyx, center_mm, radii_mm, shape_zyx)
               if n > 1)
    return dist <= 1.0


def _smooth_field(rng, shape, strength: float) -> np.ndarray:
    """A low-frequency multiplicative bias field around 1."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    field = sum(rng.uniform(-1, 1) * g for g in grids) + rng.uniform(-1, 1) * grids[-1] * grids[0]
    return 1.0 + strength * field / max(len(grids), 1)


def class_size_range(cls: int, classes: int) -> tuple[float, float]:
    """The relative radius range of ``structure_1`` for a case of class ``cls`` of ``classes``: disjoint bins of
    0.16..0.44 of the body's radii, each trimmed by 15 % on both sides so that the classes do not touch."""
    low, width = 0.16, (0.44 - 0.16) / classes
    return low + width * (cls + 0.15), low + width * (cls + 0.85)


def _place_structures(rng, shape_zyx, spacing_zyx, body, body_center, body_radii, num_labels: int,
                      structure_size, separate: bool, first_size=None) -> np.ndarray:
    """The label map: ``num_labels`` ellipsoids inside the body; with ``separate``, no two of them touch.

    Separate structures are drawn again, all together, until they fit apart (a later one cannot crowd out an earlier).
    """
    for _ in range(1000 if separate else 1):
        placed = []
        for k in range(num_labels):
            radii = body_radii * rng.uniform(*(first_size if first_size and k == 0 else structure_size), 3)
            spread = rng.uniform(-0.9, 0.9, 3) if separate else rng.uniform(-0.45, 0.45, 3)
            placed.append((body_center + spread * (body_radii - radii), radii))
        if not separate or all(np.linalg.norm(c1 - c2) > r1.max() + r2.max()
                               for i, (c1, r1) in enumerate(placed) for c2, r2 in placed[:i]):
            break
    else:
        raise ValueError(f"cannot place {num_labels} separate structures of relative size {structure_size}")
    label = np.zeros(shape_zyx, np.uint8)
    for k, (center, radii) in enumerate(placed, start=1):
        label[_ellipsoid(shape_zyx, spacing_zyx, center, radii) & body] = k
    return label


def make_case(rng, shape_zyx, spacing_zyx, num_channels: int, num_labels: int, modality: str,
              structure_size=(0.25, 0.4), separate: bool = False, first_size=None):
    """One case: a list of channel arrays (float32) and a uint8 label map, arrays in (z, y, x) order.

    ``structure_size`` is the range of a structure's radii relative to the body's; ``separate`` keeps structures apart
    (by default a later one may cover part of an earlier one); ``first_size``, if given, is ``structure_1``'s range.
    """
    extent = np.array(shape_zyx) * np.array(spacing_zyx)
    body_center = extent / 2 + rng.uniform(-0.05, 0.05, 3) * extent
    body_radii = extent * rng.uniform(0.38, 0.45, 3)
    body = _ellipsoid(shape_zyx, spacing_zyx, body_center, body_radii)
    label = _place_structures(rng, shape_zyx, spacing_zyx, body, body_center, body_radii, num_labels, structure_size,
                              separate, first_size)
    channels = []
    for c in range(num_channels):
        if modality.upper() == "CT":
            means = [40.0] + [40.0 + 90.0 * k * (1 + 0.5 * c) for k in range(1, num_labels + 1)]
            image = np.full(shape_zyx, -1000.0)
            noise = 15.0
        else:
            means = [200.0 * (1 + 0.3 * c)] + [200.0 * (1 + 0.3 * c) + 150.0 * ((k + c) % (num_labels + 1) + 1)
                                               for k in range(1, num_labels + 1)]
            image = np.zeros(shape_zyx)
            noise = 20.0
        tissue = np.take(np.array(means), label) * _smooth_field(rng, shape_zyx, 0.2)
        tissue = tissue + rng.normal(0, noise, shape_zyx)
        image[body] = tissue[body]
        if modality.upper() != "CT":
            image[body] = np.maximum(image[body], 1.0)  # MR: the body stays non-zero, the outside is exactly 0
        channels.append(image.astype(np.float32))
    return channels, label


def _write(array: np.ndarray, path: Path, spacing_zyx, origin_xyz, is_2d: bool):
    import SimpleITK as sitk

    if is_2d:
        if array.dtype != np.uint8:
            lo, hi = float(array.min()), float(array.max())
            array = np.round((array - lo) / max(hi - lo, 1e-8) * 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(array[0]), str(path))
        return
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])
    image.SetOrigin([float(o) for o in origin_xyz])
    sitk.WriteImage(image, str(path), useCompression=True)


def make_synthetic_dataset(out_dir, cases: int = 8, shape=(48, 48, 32), spacing=None, channels: int = 1,
                           modality: str = "MR", labels: int = 2, test_cases: int = 0, spacing_jitter: float = 0.0,
                           seed: int = 0, structure_size=(0.25, 0.4), separate: bool = False,
                           regions: bool = False, sparse: bool = False, classes: int = 0) -> Path:
    """Write a dataset to ``out_dir`` (which must not exist yet). Shape and spacing are given as (x, y, z).

    ``spacing`` defaults to 1 mm on every axis. ``spacing_jitter`` varies each case's spacing by up to that fraction;
    shapes vary by up to 10 % per case.
    ``structure_size`` and ``separate`` set how hard the task is (see ``make_case``).
    ``regions`` declares BraTS-style nested regions instead of labels: region k holds labels k..L
    (``regions_class_order`` 1..L). ``sparse`` marks every odd axial slice unannotated with -1 (the DIAG fork's
    sparse labels, declared as ``"ignore": -1``); 3-D only.
    ``classes`` (>= 2) adds a case-level class (``class_0`` ...) set by the size of ``structure_1``
    (``class_size_range``); the classes take turns over the cases, shuffled, so they are balanced. The classes of
    the test cases are written to ``imagesTs_classes.json`` (not part of nnU-Net's layout).
    The folder appears complete or not at all.
    """
    out_dir = Path(out_dir)
    shape = _as_tuple(shape)
    spacing = _as_tuple(1.0 if spacing is None else spacing, len(shape))
    is_2d = len(shape) == 2
    if len(shape) not in (2, 3) or len(spacing) != len(shape):
        raise ValueError(f"shape {shape} and spacing {spacing} must both have 2 or 3 entries (x, y[, z])")
    if cases < 1 or channels < 1 or labels < 1:
        raise ValueError("cases, channels and labels must be at least 1")
    if sparse and is_2d:
        raise ValueError("sparse labels (-1) need a 3-D dataset: PNG label files cannot hold -1")
    if classes == 1 or classes < 0:
        raise ValueError(f"classes must be 0 (none) or at least 2, got {classes}")
    shape_zyx = (1,) + tuple(shape[::-1]) if is_2d else tuple(shape[::-1])
    spacing_zyx = (1.0,) + tuple(spacing[::-1]) if is_2d else tuple(spacing[::-1])
    ending = ".png" if is_2d else ".nii.gz"
    rng = np.random.default_rng(seed)
    case_class = [int(c) for c in rng.permutation(np.arange(cases + test_cases) % classes)] if classes else []
    with atomic_folder(out_dir) as tmp:
        for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test_cases else ()):
            (tmp / sub).mkdir()
        for i in range(cases + test_cases):
            case_shape = tuple(max(int(round(s * rng.uniform(0.9, 1.1))), 8) if s > 1 else 1 for s in shape_zyx)
            case_spacing = tuple(s * rng.uniform(1 - spacing_jitter, 1 + spacing_jitter) for s in spacing_zyx)
            first_size = class_size_range(case_class[i], classes) if classes else None
            images, label = make_case(rng, case_shape, case_spacing, channels, labels, modality, structure_size,
                                      separate, first_size)
            origin = tuple(rng.uniform(-50, 50, 3))
            training = i < cases
            name = f"case_{i:03d}"
            folder = tmp / ("imagesTr" if training else "imagesTs")
            for c, image in enumerate(images):
                _write(image, folder / f"{name}_{c:04d}{ending}", case_spacing, origin, is_2d)
            if training:
                if sparse:
                    label = label.astype(np.int16)
                    label[1::2] = -1
                _write(label, tmp / "labelsTr" / f"{name}{ending}", case_spacing, origin, is_2d)
        channel_name = "CT" if modality.upper() == "CT" else "MR"
        spec = {
            "name": out_dir.name,
            "description": f"Synthetic {modality} dataset generated by autoplan (seed {seed})",
            "channel_names": {str(c): channel_name if c == 0 else f"{channel_name}{c}" for c in range(channels)},
            "labels": {"background": 0, **({f"region_{k}": list(range(k, labels + 1)) for k in range(1, labels + 1)}
                                           if regions else {f"structure_{k}": k for k in range(1, labels + 1)}),
                       **({"ignore": -1} if sparse else {})},
            **({"regions_class_order": list(range(1, labels + 1))} if regions else {}),
            "numTraining": cases,
            "file_ending": ending,
            "licence": "CC0 (synthetic)",
        }
        if classes:
            spec["classification"] = {"names": {str(k): f"class_{k}" for k in range(classes)},
                                      "cases": {f"case_{i:03d}": case_class[i] for i in range(cases)}}
            if test_cases:
                (tmp / "imagesTs_classes.json").write_text(json.dumps(
                    {f"case_{i:03d}": case_class[i] for i in range(cases, cases + test_cases)}, indent=4) + "\n")
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=4) + "\n")
    return out_dir
