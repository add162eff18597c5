"""Dataset fingerprint compatible with nnU-Net v2's ``dataset_fingerprint.json`` (spec section 2).

Each case is read once, checked (``verify``), cropped to non-zero and summarised in a worker process. Pooled
foreground intensity statistics follow nnU-Net's definition (every case with foreground contributes equally, 10^8
samples in all) but are computed without drawing 10^8 random samples: a case with fewer foreground voxels than its
sample quota contributes all its voxels with the weight quota / count, which is the expectation of nnU-Net's
sampling with replacement; a larger case contributes nnU-Net's own draw (same seed). Weighted statistics over those
values reproduce nnU-Net's numbers to well within its own sampling noise, faster and with less memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoplan.dataset import DatasetError, load_dataset
from autoplan.files import write_json_atomic
from autoplan.parallel import map_cases
from autoplan.multitask import check_classification, class_distribution, has_classes
from autoplan.verify import read_checked_case
from bundles.scripts.cropping import crop_to_nonzero

TOTAL_SAMPLES = 10**8
SAMPLING_SEED = 1234
STAT_KEYS = ("max", "mean", "median", "min", "percentile_00_5", "percentile_99_5", "std")


def weighted_statistics(values: np.ndarray, weights: np.ndarray) -> dict:
    """nnU-Net's intensity statistics of a multiset in which each value occurs ``weight`` times.

    Percentiles use numpy's linear interpolation on the (virtually) expanded sorted array; std is the population std.
    """
    order = np.argsort(values, kind="stable")
    values = values[order].astype(np.float64)
    weights = weights[order].astype(np.float64)
    cumulative = np.cumsum(weights)
    total = cumulative[-1]
    mean = float(np.dot(weights, values) / total)
    std = float(np.sqrt(np.dot(weights, (values - mean) ** 2) / total))

    def percentile(q: float) -> float:
        rank = q / 100.0 * (total - 1)
        lower = np.floor(rank)
        i = min(np.searchsorted(cumulative, lower, side="right"), len(values) - 1)
        j = min(np.searchsorted(cumulative, lower + 1, side="right"), len(values) - 1)
        return float(values[i] + (rank - lower) * (values[j] - values[i]))

    return {"max": float(values[-1]), "mean": mean, "median": percentile(50), "min": float(values[0]),
            "percentile_00_5": percentile(0.5), "percentile_99_5": percentile(99.5), "std": std}


def analyze_case(job) -> dict:
    """Fingerprint one case (runs in a worker). Returns the case's problems instead of statistics if it is invalid."""
    case, labels, num_samples = job
    checked = read_checked_case(case, labels)
    result = {"case": case.identifier, "problems": checked.problems, "warnings": checked.warnings}
    if checked.problems:
        return result
    shape_before = checked.data.shape[1:]
    data, seg, _ = crop_to_nonzero(checked.data, checked.seg)
    foreground = seg[0] > 0
    count = int(np.count_nonzero(foreground))
    rng = np.random.RandomState(SAMPLING_SEED)
    samples, stats = [], []
    for channel in data:
        voxels = channel[foreground]
        if count == 0:
            samples.append(np.empty(0, np.float32))
            stats.append(None)
            continue
        samples.append(voxels if count <= num_samples else rng.choice(voxels, num_samples, replace=True))
        p005, p50, p995 = np.percentile(voxels, (0.5, 50, 99.5))
        stats.append({"mean": float(voxels.mean()), "std": float(voxels.std()), "min": float(voxels.min()),
                      "max": float(voxels.max()), "median": float(p50), "percentile_00_5": float(p005),
                      "percentile_99_5": float(p995)})
    values, counts = np.unique(seg[seg >= 0], return_counts=True)
    result.update(
        spacing=[float(s) for s in checked.geometry.spacing],
        shape_after_crop=[int(s) for s in data.shape[1:]],
        relative_size=float(np.prod(data.shape[1:], dtype=np.float64) / np.prod(shape_before, dtype=np.float64)),
        samples=samples,
        weight=(num_samples / count) if 0 < count <= num_samples else 1.0,
        intensity_stats=stats,
        class_voxel_counts={str(int(v)): int(c) for v, c in zip(values, counts)},
    )
    return result


def extract_fingerprint(raw_dir, processes: int = 2) -> tuple[dict, list[str]]:
    """Check and fingerprint a raw dataset; returns (fingerprint, warnings).

    Raises DatasetError listing every problem of every case.
    """
    dataset = load_dataset(Path(raw_dir))
    num_channels = len(dataset.channel_names)
    num_samples = int(TOTAL_SAMPLES // max(len(dataset.cases), 1))
    jobs = [(case, dataset.labels, num_samples) for case in dataset.complete_cases]
    problems, warnings = list(dataset.problems), list(dataset.warnings)
    per_case = []
    pooled = [[] for _ in range(num_channels)]
    pooled_weights = [[] for _ in range(num_channels)]
    for result in map_cases(analyze_case, jobs, processes, desc="fingerprint"):
        problems += result["problems"]
        warnings += result["warnings"]
        if result["problems"]:
            continue
        for c, samples in enumerate(result.pop("samples")):
            pooled[c].append(samples)
            pooled_weights[c].append(np.full(len(samples), result["weight"], np.float32))
        per_case.append(result)
    problems += check_classification(dataset.spec, [c.identifier for c in dataset.cases], str(dataset.json_path))
    if problems:
        raise DatasetError(problems, warnings)
    intensity = {}
    for c in range(num_channels):
        values = np.concatenate(pooled[c]) if pooled[c] else np.empty(0)
        if values.size == 0:
            raise DatasetError([f"{dataset.root}: no case has foreground, so intensity statistics are undefined"])
        intensity[str(c)] = weighted_statistics(values, np.concatenate(pooled_weights[c]))
        pooled[c] = pooled_weights[c] = None
    return {
        "spacings": [r["spacing"] for r in per_case],
        "shapes_after_crop": [r["shape_after_crop"] for r in per_case],
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float(np.median([r["relative_size"] for r in per_case])),
        # Extra keys (nnU-Net ignores them): which case is which, and per-case statistics.
        "case_identifiers": [r["case"] for r in per_case],
        **({"class_distribution": class_distribution(dataset.spec, [r["case"] for r in per_case])}
           if has_classes(dataset.spec) else {}),
        "per_case": [
            {"class_voxel_counts": r["class_voxel_counts"],
             "foreground_intensity_per_channel": {str(c): s for c, s in enumerate(r["intensity_stats"])},
             "relative_size_after_cropping": r["relative_size"]}
            for r in per_case
        ],
    }, warnings


def write_fingerprint(raw_dir, out_file, processes: int = 2) -> tuple[dict, list[str]]:
    fingerprint, warnings = extract_fingerprint(raw_dir, processes)
    write_json_atomic(out_file, fingerprint, sort_keys=True)
    return fingerprint, warnings
