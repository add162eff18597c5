"""The demo: a synthetic task a CPU learns in minutes, taken through every stage, ending in a Dice table and a picture.

The data are easy but honest: the usual noise and bias field of ``autoplan.synthetic``, with structures large and apart
enough that the unchanged nnU-Net recipe (augmentation included) learns them in about 60 iterations of ``3d_fullres``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset

DICE_TARGET = 0.85
CONFIGURATION = "3d_fullres"  # learns these blobs far faster than 2d, which sees one slice at a time
DATASET = "Dataset900_Synthetic"


def make_demo_dataset(raw, seed: int = 0) -> Path:
    """32^3 voxels at 1 mm (a 28^3 patch, so an iteration is quick), two separate structures of 4-8 voxel radii."""
    return make_synthetic_dataset(raw, cases=10, shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0), labels=2, test_cases=2,
                                  seed=seed, structure_size=(0.4, 0.5), separate=True)


def compute_threads(processes: int) -> str:
    """Torch threads for the bundles: the cores the data workers leave free, at least one (``OMP_NUM_THREADS`` wins).

    torch's default, a thread per core, makes its threads wait for one another whenever another process (a data
    worker, or anyone else's job) takes a core; on 2 busy cores that made the whole demo nearly twice as slow.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, cores - processes))


def _bundle(command: list, bundle: Path, threads: str) -> None:
    """Run ``python -m monai.bundle ...`` inside a bundle folder, as a user would."""
    print(f"$ (cd {bundle} && OMP_NUM_THREADS={threads} python -m monai.bundle {' '.join(command)})", flush=True)
    subprocess.run([sys.executable, "-m", "monai.bundle", *command], cwd=bundle, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": threads})


def dice_table(summary: dict, names: dict, target: float = DICE_TARGET) -> tuple[str, list[str]]:
    """The per-label validation Dice as a table, and the names of the labels below ``target``."""
    lines = [f"{'label':<16}{'Dice':>7}   vs {target}"]
    failed = []
    for key, metrics in summary["mean"].items():
        dice = metrics["Dice"]
        passed = dice >= target  # NaN (nothing to find, nothing found in every case) fails
        failed += [] if passed else [names.get(key, key)]
        lines.append(f"{names.get(key, key):<16}{dice:>7.3f}   {'pass' if passed else 'FAIL'}")
    return "\n".join(lines), failed


def write_overview(image_path, prediction_path, names: dict, out, slices: int = 4) -> Path:
    """A PNG of ``slices`` axial slices through the predicted structures, the prediction overlaid on the image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from autoplan.image_io import read_array

    image, _ = read_array(image_path)
    prediction, _ = read_array(prediction_path)
    if image.shape != prediction.shape:
        raise ValueError(f"{prediction_path}: shape {prediction.shape} differs from the image's {image.shape}")
    occupied = np.flatnonzero(prediction.reshape(len(prediction), -1).any(axis=1))
    first, last = (occupied[0], occupied[-1]) if occupied.size else (0, len(image) - 1)
    picks = np.unique(np.linspace(first, last, slices + 2).round().astype(int)[1:-1])
    colours = ListedColormap(["tab:red", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:olive"])
    fig = Figure(figsize=(3 * len(picks), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for ax, z in zip(fig.subplots(1, len(picks), squeeze=False)[0], picks):
        ax.imshow(image[z], cmap="gray", interpolation="nearest")
        overlay = np.ma.masked_equal(prediction[z], 0)
        ax.imshow((overlay - 1) % colours.N, cmap=colours, vmin=0, vmax=colours.N - 1, alpha=0.45,
                  interpolation="nearest")
        ax.set_title(f"slice z={z}", fontsize=9)
        ax.axis("off")
    labels = sorted(int(k) for k in names if int(k) > 0)
    fig.legend(handles=[Patch(color=colours((k - 1) % colours.N), label=names[str(k)]) for k in labels],
               loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"{Path(image_path).name}: prediction overlaid", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    out = Path(out)
    fig.savefig(out)
    return out


def demo(out="demo_out", processes: int = 2, epochs: int = 5, iterations: int = 12, seed: int = 0) -> Path:
    """Generate the demo dataset, plan, emit, train fold 0 of ``3d_fullres``, predict ``imagesTs`` and report.

    Returns the bundle folder. A run below the Dice target says so but does not fail: it is a demo.
    """
    for name, value in (("processes", processes), ("epochs", epochs), ("iterations", iterations)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    started = time.perf_counter()
    out = Path(out)
    raw, work = out / "raw" / DATASET, out / "work"
    for generated in (raw, work):
        if generated.exists():
            shutil.rmtree(generated)
    make_demo_dataset(raw, seed)
    print(f"generated {raw}")
    plans = json.loads(run(raw, work, processes=processes, configurations=[CONFIGURATION], folds=[0]).read_text())
    bundle = work / "bundles" / f"{plans['dataset_name']}_{CONFIGURATION}_fold0"
    threads = compute_threads(processes)
    _bundle(["run", "training", "--config_file", "configs/train.json", "--epochs", str(epochs),
             "--iterations_per_epoch", str(iterations), "--val_iterations", "1", "--num_workers", str(processes)],
            bundle, threads)
    predictions = bundle / "eval" / "test_predictions"
    _bundle(["run", "--config_file", "configs/inference.json", "--dataset_dir", str((raw / "imagesTs").resolve()),
             "--output_dir", str(predictions.resolve())], bundle, threads)

    names = {str(v): k for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items()}
    summary = json.loads((bundle / "eval" / "validation" / "summary.json").read_text())
    table, failed = dice_table(summary, names)
    case = sorted(predictions.glob("*.nii.gz"))[0]
    overview = write_overview(raw / "imagesTs" / case.name.replace(".nii.gz", "_0000.nii.gz"), case, names,
                              out / "overview.png")
    print(f"\nvalidation Dice of fold 0 ({len(summary['metric_per_case'])} held-out cases, full-volume sliding window) "
          f"after {epochs} epochs x {iterations} iterations:\n{table}")
    if failed:
        print(f"NOT LEARNED: {', '.join(failed)} stayed below Dice {DICE_TARGET}; this run is too short or unlucky "
              f"(try more --epochs)")
    else:
        print(f"learned: every label reached Dice {DICE_TARGET} or more")
    print(f"training curves: {bundle / 'eval' / 'progress.png'}")
    print(f"test-set predictions: {predictions}")
    print(f"overview of {case.name}: {overview}")
    print(f"total wall time: {time.perf_counter() - started:.0f} s")
    return bundle
