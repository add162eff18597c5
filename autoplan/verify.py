"""Dataset integrity checks: nnU-Net's ``--verify_dataset_integrity`` (spec 1.2) and more.

Every problem names the file and what is wrong, and all problems are collected in one run. Files are only read.
The per-case check is shared with the fingerprint, which runs it on the arrays it reads anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoplan.dataset import SPARSE_MARKER, Case, DatasetError, Labels, load_dataset
from autoplan.image_io import Geometry, ImageReadError, count_nonfinite, read_array, read_images
from autoplan.multitask import check_classification, class_distribution
from autoplan.parallel import map_cases


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    num_cases: int = 0
    class_counts: dict = field(default_factory=dict)  # cases per class (dataset.json's classification block)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class CheckedCase:
    data: np.ndarray | None
    seg: np.ndarray | None
    geometry: Geometry | None
    problems: list[str]
    warnings: list[str]


def _close(a, b) -> bool:
    return a is None or b is None or (len(a) == len(b) and np.allclose(a, b, rtol=1e-4, atol=1e-4))


def _geometry_problems(path: Path, geometry: Geometry, reference: Geometry, reference_path: Path) -> list[str]:
    problems = []
    for attribute in ("spacing", "origin", "direction"):
        mine, theirs = getattr(geometry, attribute), getattr(reference, attribute)
        if not _close(mine, theirs):
            problems.append(f"{path}: {attribute} {tuple(round(float(v), 6) for v in mine)} differs from "
                            f"{reference_path.name} {tuple(round(float(v), 6) for v in theirs)}")
    return problems


def _label_value_problems(path: Path, seg: np.ndarray, labels: Labels) -> tuple[list[str], list[str]]:
    try:
        nonfinite = count_nonfinite(path, seg)
    except ImageReadError as exc:
        return [str(exc)], []
    if nonfinite:
        return [f"{path}: label map contains NaN or Inf"], []
    values = np.unique(seg)
    if values.dtype.kind == "f" and np.any(values != np.round(values)):
        return [f"{path}: label map contains non-integer values {values[values != np.round(values)][:5].tolist()}"], []
    unexpected = sorted(set(int(v) for v in values) - labels.allowed_values)
    if SPARSE_MARKER in unexpected:
        return [f"{path}: label value -1 (unannotated voxels) but dataset.json declares no ignore label; "
                "add \"ignore\": -1 to its \"labels\""], []
    if unexpected:
        return [f"{path}: label values {unexpected} are not declared in dataset.json "
                f"(declared: {sorted(labels.allowed_values)})"], []
    if labels.ignore_in_files is not None and np.all(values == labels.ignore_in_files):
        return [], [f"{path}: every voxel is marked unannotated ({labels.ignore_in_files}); training refuses this case"]
    if not np.any(np.isin(values, labels.foreground_labels)):
        return [], [f"{path}: label map has no foreground"]
    return [], []


def read_checked_case(case: Case, labels: Labels) -> CheckedCase:
    """Read a case and run every per-case check; arrays are returned only when the case is valid."""
    problems, warnings = [], []
    try:
        data, geometries = read_images(case.images)
    except ImageReadError as exc:
        return CheckedCase(None, None, None, [str(exc)], [])
    for path, geometry in zip(case.images[1:], geometries[1:]):
        problems += _geometry_problems(path, geometry, geometries[0], case.images[0])
    for path, channel in zip(case.images, data):
        try:
            bad = count_nonfinite(path, channel)
        except ImageReadError as exc:
            problems.append(str(exc))
            continue
        if bad:
            problems.append(f"{path}: {bad} voxels are NaN or Inf")
    seg = None
    if case.label is not None:
        try:
            seg, seg_geometry = read_array(case.label)
        except ImageReadError as exc:
            problems.append(str(exc))
        else:
            if seg.shape != data.shape[1:]:
                problems.append(f"{case.label}: shape {seg.shape} differs from the image's {data.shape[1:]} "
                                f"({case.images[0].name})")
            else:
                problems += _geometry_problems(case.label, seg_geometry, geometries[0], case.images[0])
            p, w = _label_value_problems(case.label, seg, labels)
            problems += p
            warnings += w
            seg = labels.to_internal(seg)[None]
    if problems:
        return CheckedCase(None, None, None, problems, warnings)
    return CheckedCase(data, seg, geometries[0], problems, warnings)


def _check_case_job(job) -> tuple[list[str], list[str]]:
    checked = read_checked_case(*job)
    return checked.problems, checked.warnings


def verify_dataset(root, processes: int = 2) -> Report:
    """Check a raw dataset folder. Never raises for dataset problems: they are in the report."""
    try:
        dataset = load_dataset(Path(root))
    except DatasetError as exc:
        return Report(exc.problems, exc.warnings)
    report = Report(list(dataset.problems), list(dataset.warnings), num_cases=len(dataset.cases))
    case_ids = [c.identifier for c in dataset.cases]
    report.problems += check_classification(dataset.spec, case_ids, str(dataset.json_path))
    report.class_counts = class_distribution(dataset.spec, case_ids)
    jobs = [(case, dataset.labels) for case in dataset.complete_cases]
    for problems, warnings in map_cases(_check_case_job, jobs, processes, desc="verify"):
        report.problems += problems
        report.warnings += warnings
    return report
