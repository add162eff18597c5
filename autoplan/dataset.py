"""The raw dataset: what dataset.json means and which files make up each case (spec section 1).

Supports nnU-Net v2's folder convention (``imagesTr/CASE_XXXX<ending>``, ``labelsTr/CASE<ending>``) and the
optional explicit ``dataset`` mapping in dataset.json. Problems are collected, never raised one by one, so that a
user sees every problem of a dataset in one run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPARSE_MARKER = -1  # the DIAG fork's value for unannotated voxels, declared as "ignore": -1
SUPPORTED_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl", ".png", ".bmp", ".tif", ".tiff")


class DatasetError(Exception):
    """Raised with the full list of problems; each one names the file and what is wrong."""

    def __init__(self, problems: list[str], warnings: list[str] | None = None):
        self.problems = list(problems)
        self.warnings = list(warnings or [])
        super().__init__("\n".join(self.problems))


@dataclass
class Case:
    identifier: str
    images: list[Path]
    label: Path | None = None

    @property
    def complete(self) -> bool:
        return self.label is not None and all(p.is_file() for p in self.images + [self.label])


@dataclass
class Labels:
    """nnU-Net's label-manager semantics, derived from ``dataset.json['labels']``."""

    mapping: dict
    ignore_label: int | None
    all_labels: list[int]
    foreground_regions: list
    has_regions: bool
    regions_class_order: list[int] | None
    ignore_in_files: int | None = None

    @property
    def sparse(self) -> bool:
        """The DIAG fork's convention: label files mark unannotated voxels with -1 (``"ignore": -1``)."""
        return self.ignore_in_files == SPARSE_MARKER

    def to_internal(self, seg: np.ndarray) -> np.ndarray:
        """A label map with the -1 marker replaced by the ignore label nnU-Net uses (max label + 1)."""
        if not self.sparse:
            return seg
        return np.where(seg == SPARSE_MARKER, self.ignore_label, seg).astype(seg.dtype, copy=False)

    @property
    def foreground_labels(self) -> list[int]:
        return [v for v in self.all_labels if v != 0]

    @property
    def allowed_values(self) -> set[int]:
        """Integer values a label map may contain."""
        values = set(self.all_labels)
        if self.ignore_in_files is not None:
            values.add(self.ignore_in_files)
        return values

    @property
    def num_outputs(self) -> int:
        return len(self.foreground_regions) if self.has_regions else len(self.all_labels)


@dataclass
class Dataset:
    root: Path
    json_path: Path
    spec: dict
    labels: Labels
    cases: list[Case]  # every case found; ``complete`` tells which have all their files
    problems: list[str] = field(default_factory=list)  # layout problems; per-case checks still run
    warnings: list[str] = field(default_factory=list)

    @property
    def complete_cases(self) -> list[Case]:
        return [c for c in self.cases if c.complete]

    @property
    def file_ending(self) -> str:
        return self.spec["file_ending"]

    @property
    def channel_names(self) -> dict:
        return channel_names(self.spec)

    @property
    def name(self) -> str:
        return dataset_name(self.json_path, self.spec)


def channel_names(spec: dict) -> dict:
    """``channel_names`` (v2) or the v1 ``modality`` fallback."""
    return spec.get("channel_names", spec.get("modality", {}))


def dataset_name(json_path: Path, spec: dict) -> str:
    """nnU-Net names a dataset after its folder (``DatasetXXX_Name``); fall back to dataset.json's ``name``."""
    folder = Path(json_path).resolve().parent.name
    if re.fullmatch(r"Dataset\d{3}_.+", folder):
        return folder
    return spec.get("name") or folder


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_labels(labels: dict, regions_class_order=None) -> Labels:
    """Interpret a v2 ``labels`` mapping (name -> int or list of ints). Assumes it passed ``check_spec``."""
    ignore = labels.get("ignore")
    values = [v for k, v in labels.items() if k != "ignore"]
    all_labels = set()
    regions = []
    has_regions = False
    for v in values:
        if isinstance(v, (list, tuple)):
            all_labels.update(int(i) for i in v)
            if len(v) > 1:
                has_regions = True
        else:
            all_labels.add(int(v))
    for v in values:
        is_background = (not isinstance(v, (list, tuple)) and v == 0) or (
            isinstance(v, (list, tuple)) and len(v) == 1 and v[0] == 0
        )
        if not is_background:
            regions.append(tuple(int(i) for i in v) if isinstance(v, (list, tuple)) else int(v))
    ignore = int(ignore) if ignore is not None else None
    return Labels(
        mapping=dict(labels),
        ignore_label=max(all_labels) + 1 if ignore == SPARSE_MARKER else ignore,
        ignore_in_files=ignore,
        all_labels=sorted(all_labels),
        foreground_regions=regions,
        has_regions=has_regions,
        regions_class_order=list(regions_class_order) if regions_class_order is not None else None,
    )


def check_spec(spec, path: Path) -> tuple[list[str], list[str]]:
    """Validate dataset.json against nnU-Net v2's rules. Returns (problems, warnings)."""
    problems: list[str] = []
    warnings: list[str] = []
    where = str(path)
    if not isinstance(spec, dict):
        return [f"{where}: must hold a JSON object"], warnings
    for key in ("labels", "numTraining", "file_ending"):
        if key not in spec:
            problems.append(f"{where}: required key '{key}' is missing")
    if "channel_names" not in spec:
        if "modality" in spec:
            warnings.append(f"{where}: 'modality' is the nnU-Net v1 key; rename it to 'channel_names'")
        else:
            problems.append(f"{where}: required key 'channel_names' is missing")
    names = channel_names(spec)
    if not isinstance(names, dict) or not names:
        problems.append(f"{where}: 'channel_names' must be a non-empty mapping such as {{\"0\": \"CT\"}}")
    elif sorted(names) != [str(i) for i in range(len(names))]:
        problems.append(f"{where}: 'channel_names' keys must be \"0\"..\"{len(names) - 1}\", got {sorted(names)}")
    if "numTraining" in spec and (not _is_int(spec["numTraining"]) or spec["numTraining"] < 1):
        problems.append(f"{where}: 'numTraining' must be a positive integer, got {spec['numTraining']!r}")
    ending = spec.get("file_ending")
    if ending is not None and (not isinstance(ending, str) or ending not in SUPPORTED_ENDINGS):
        problems.append(f"{where}: 'file_ending' {ending!r} is not supported; use one of {', '.join(SUPPORTED_ENDINGS)}")
    labels = spec.get("labels")
    if labels is not None:
        problems += _check_labels(labels, spec.get("regions_class_order"), where)
    return problems, warnings


def _check_labels(labels, regions_class_order, where: str) -> list[str]:
    if not isinstance(labels, dict):
        return [f"{where}: 'labels' must map names to integers (v2), e.g. {{\"background\": 0, \"liver\": 1}}"]
    problems = []
    if all(isinstance(k, str) and k.isdigit() for k in labels):
        return [f"{where}: 'labels' maps integers to names (nnU-Net v1); v2 maps names to integers. "
                "Convert the dataset with 'python -m autoplan convert-msd'"]
    if labels.get("background") != 0 or not _is_int(labels.get("background")):
        problems.append(f"{where}: 'labels' must contain \"background\": 0")
    plain_values = []
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            if name == "ignore":
                problems.append(f"{where}: the 'ignore' label must be a single integer, not a region")
            elif not value or not all(_is_int(i) and i >= 0 for i in value):
                problems.append(f"{where}: region '{name}' must be a non-empty list of non-negative integers")
        elif name == "ignore" and value == SPARSE_MARKER:
            continue
        elif not _is_int(value) or value < 0:
            problems.append(f"{where}: label '{name}' has value {value!r}; labels must be non-negative integers")
        elif name != "ignore":
            plain_values.append(value)
    if problems:
        return problems
    duplicates = sorted({v for v in plain_values if plain_values.count(v) > 1})
    if duplicates:
        problems.append(f"{where}: label values {duplicates} are used by more than one label name")
    parsed = parse_labels(labels, regions_class_order)
    expected = list(parsed.all_labels)
    if parsed.ignore_label is not None:
        if parsed.ignore_label != max(parsed.all_labels) + 1:
            problems.append(f"{where}: the 'ignore' label must be max(other labels) + 1 = "
                            f"{max(parsed.all_labels) + 1} (nnU-Net), or -1 (the DIAG fork's sparse labels), "
                            f"got {parsed.ignore_label}")
        expected.append(parsed.ignore_label)
    if any(b - a != 1 for a, b in zip(expected, expected[1:])) or expected[0] != 0:
        problems.append(f"{where}: labels must be consecutive integers starting at 0, got {expected}")
    if parsed.has_regions:
        if regions_class_order is None:
            problems.append(f"{where}: region-based labels need 'regions_class_order'")
        elif len(regions_class_order) != len(parsed.foreground_regions):
            problems.append(f"{where}: 'regions_class_order' needs {len(parsed.foreground_regions)} entries "
                            f"(one per region), got {len(regions_class_order)}")
    return problems


def load_json(json_path: Path) -> dict:
    """Read a JSON file (dataset.json, a fingerprint), turning unreadable JSON into a DatasetError naming the file."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DatasetError([f"{json_path}: file not found"])
    try:
        return json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError([f"{json_path}: not valid JSON ({exc})"]) from None


def _visible_files(folder: Path, ending: str) -> list[str]:
    """File names with the ending, skipping hidden files such as macOS' ``._`` resource forks."""
    return sorted(f for f in os.listdir(folder) if f.endswith(ending) and not f.startswith("."))


def discover_cases(folder: Path, ending: str, num_channels: int) -> tuple[dict[str, list[Path]], list[str]]:
    """Group ``CASE_XXXX<ending>`` files of a folder into cases. Returns (case -> channel files, problems)."""
    problems = []
    found: dict[str, dict[int, Path]] = {}
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(ending) + r"$")
    for name in _visible_files(folder, ending):
        match = pattern.match(name)
        if not match:
            problems.append(f"{folder / name}: name does not follow CASE_XXXX{ending} (XXXX = 4-digit channel)")
            continue
        found.setdefault(match.group(1), {})[int(match.group(2))] = folder / name
    cases = {}
    for case, channels in sorted(found.items()):
        missing = [c for c in range(num_channels) if c not in channels]
        extra = sorted(c for c in channels if c >= num_channels)
        for c in missing:
            problems.append(f"{folder / f'{case}_{c:04d}{ending}'}: missing channel {c} of case '{case}'")
        for c in extra:
            problems.append(f"{channels[c]}: channel {c} is not declared in dataset.json "
                            f"(channel_names has {num_channels})")
        cases[case] = [channels.get(c, folder / f"{case}_{c:04d}{ending}") for c in range(num_channels)]
    return cases, problems


def _cases_from_mapping(root: Path, mapping: dict) -> list[Case]:
    def resolve(p):
        p = Path(os.path.expandvars(p))
        return p if p.is_absolute() else root / p

    return [Case(k, [resolve(i) for i in v["images"]], resolve(v["label"]) if v.get("label") else None)
            for k, v in sorted(mapping.items())]


def load_dataset(root: Path) -> Dataset:
    """Read dataset.json and list the training cases.

    Raises DatasetError when the dataset cannot be listed at all (no dataset.json, invalid keys, missing folders).
    Problems of single cases (a missing file, a misnamed file) are returned in ``Dataset.problems`` so that the
    per-case checks of the remaining cases still run and the user sees everything in one run.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError([f"{root}: dataset folder not found"])
    json_path = root / "dataset.json"
    spec = load_json(json_path)
    problems, warnings = check_spec(spec, json_path)
    if problems:
        raise DatasetError(problems, warnings)
    ending = spec["file_ending"]
    num_channels = len(channel_names(spec))
    if "dataset" in spec:
        cases = _cases_from_mapping(root, spec["dataset"])
        for case in cases:
            if len(case.images) != num_channels:
                problems.append(f"{json_path}: case '{case.identifier}' lists {len(case.images)} images, "
                                f"expected {num_channels} channels")
            for f in case.images + ([case.label] if case.label else []):
                if not f.is_file():
                    problems.append(f"{f}: file not found (listed for case '{case.identifier}' in dataset.json)")
            if case.label is None:
                problems.append(f"{json_path}: case '{case.identifier}' has no label")
    else:
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        for d in (images_dir, labels_dir):
            if not d.is_dir():
                problems.append(f"{d}: folder not found")
        if problems:
            raise DatasetError(problems, warnings)
        by_case, problems = discover_cases(images_dir, ending, num_channels)
        cases = []
        for case, images in by_case.items():
            label = labels_dir / f"{case}{ending}"
            if not label.is_file():
                problems.append(f"{label}: label file missing for case '{case}'")
            cases.append(Case(case, images, label))
        orphans = set(f[: -len(ending)] for f in _visible_files(labels_dir, ending)) - set(by_case)
        warnings += [f"{labels_dir / (o + ending)}: label has no images in imagesTr; it is ignored"
                     for o in sorted(orphans)]
    if not cases:
        problems.append(f"{root}: no training cases found")
    elif len(cases) != spec["numTraining"]:
        problems.append(f"{json_path}: numTraining is {spec['numTraining']} but {len(cases)} training cases were found")
    labels = parse_labels(spec["labels"], spec.get("regions_class_order"))
    return Dataset(root=root, json_path=json_path, spec=spec, labels=labels, cases=cases, problems=problems,
                   warnings=warnings)
