"""Command line: ``python -m autoplan COMMAND`` (built on fire; ``--help`` works on every command).

Commands import their stage lazily, so ``plan`` never loads image libraries, torch or monai. Dataset problems are
printed one per line, naming the file, and exit with status 2 (no traceback).
"""

from __future__ import annotations

import sys

import fire

EXIT_DATASET_ERROR = 2


def _fail(problems, warnings=()) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{len(problems)} problem(s) found", file=sys.stderr)
    raise SystemExit(EXIT_DATASET_ERROR)


def _guarded(fn, *args, **kwargs):
    """Run a stage, turning dataset and planning errors into a clean message and exit status 2."""
    from autoplan.dataset import DatasetError
    from autoplan.planner import PlanningError

    try:
        return fn(*args, **kwargs)
    except DatasetError as exc:
        _fail(exc.problems, exc.warnings)
    except (PlanningError, FileExistsError, ValueError, OSError) as exc:
        _fail([str(exc)])


def synthetic(out_dir, cases: int = 8, shape="48,48,32", spacing=None, channels: int = 1, modality: str = "MR",
              labels: int = 2, test_cases: int = 0, spacing_jitter: float = 0.0, seed: int = 0):
    """Generate a synthetic labelled dataset in nnU-Net v2 raw layout.

    Args:
        out_dir: folder to create (e.g. raw/Dataset900_Synthetic); must not exist or be empty.
        cases: number of labelled training cases.
        shape: image size x,y,z in voxels (two numbers give a 2-D PNG dataset).
        spacing: voxel spacing x,y,z in mm, e.g. 0.8,0.8,4 for anisotropic data (default 1 mm).
        channels: number of image channels (modalities).
        modality: MR (zero background, z-score) or CT (air at -1000 HU, CT normalization).
        labels: number of labelled structures besides background.
        test_cases: extra unlabelled cases written to imagesTs.
        spacing_jitter: vary each case's spacing by up to this fraction.
        seed: random seed.
    """
    from autoplan.synthetic import make_synthetic_dataset

    path = _guarded(make_synthetic_dataset, out_dir, cases=cases, shape=shape, spacing=spacing, channels=channels,
                    modality=modality, labels=labels, test_cases=test_cases, spacing_jitter=spacing_jitter, seed=seed)
    print(f"wrote {path}")


def convert_msd(task_dir, out_dir):
    """Convert a Medical Segmentation Decathlon (nnU-Net v1) task into the nnU-Net v2 raw layout.

    Args:
        task_dir: the TaskXX_Name folder with dataset.json, imagesTr, labelsTr (and optional imagesTs).
        out_dir: the new DatasetXXX_Name folder; 4-D images are split into one file per channel.
    """
    from autoplan.msd import convert_msd as convert

    print(f"wrote {_guarded(convert, task_dir, out_dir)}")


def verify(raw_dir, processes: int = 2):
    """Check a raw dataset like nnU-Net's --verify_dataset_integrity, and more. Exit status 2 on problems.

    Args:
        raw_dir: the dataset folder (dataset.json, imagesTr, labelsTr).
        processes: worker processes.
    """
    from autoplan.verify import verify_dataset

    report = verify_dataset(raw_dir, processes)
    if not report.ok:
        _fail(report.problems, report.warnings)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"{raw_dir}: {report.num_cases} cases, no problems found")


def fingerprint(raw_dir, out="dataset_fingerprint.json", processes: int = 2):
    """Verify the dataset and write nnU-Net's dataset_fingerprint.json.

    Args:
        raw_dir: the dataset folder.
        out: output file.
        processes: worker processes.
    """
    from autoplan.fingerprint import write_fingerprint

    _, warnings = _guarded(write_fingerprint, raw_dir, out, processes)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {out}")


def plan(dataset_json, fingerprint, out="plans.json", planner: str = "default", gpu_memory_gb: float = None,
         plans_name: str = None, dataset_name: str = None):
    """Plan the configurations from dataset.json and a fingerprint (nnU-Net's plans schema). Reads no images.

    Args:
        dataset_json: the dataset's dataset.json.
        fingerprint: dataset_fingerprint.json (ours or nnU-Net's).
        out: output plans file.
        planner: default, resenc-m, resenc-l or resenc-xl.
        gpu_memory_gb: GPU memory target; defaults to the preset's (8, 8, 24, 40).
        plans_name: override the plans name (e.g. when using a memory target).
        dataset_name: override the dataset name (default: the DatasetXXX_Name folder of dataset.json).
    """
    from autoplan.pipeline import describe_plans, plan_files

    plans = _guarded(plan_files, dataset_json, fingerprint, out, planner, gpu_memory_gb, plans_name, dataset_name)
    print(describe_plans(plans))
    print(f"wrote {out}")


def _folds(folds):
    """``0,1,2`` / ``"0 1 2"`` / ``all`` / a single int, as fire hands them over."""
    if isinstance(folds, (list, tuple)):
        return [f if f == "all" else int(f) for f in folds]
    if isinstance(folds, int) or str(folds) == "all":
        return [folds]
    return [f if f == "all" else int(f) for f in str(folds).replace(",", " ").split()]


def _names(value):
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()


def emit(plans, raw, out="bundles", configurations=None, folds="0,1,2,3,4", splits=None):
    """Emit one MONAI Bundle per configuration and fold from a plans file (ours or nnU-Net's).

    Args:
        plans: plans.json (nnU-Net schema).
        raw: the raw dataset folder (dataset.json, imagesTr, labelsTr).
        out: folder for the bundles, splits_final.json and the shared preprocessing cache.
        configurations: e.g. 3d_fullres,2d (default: every supported configuration in the plans).
        folds: e.g. 0,1,2,3,4 (default), 0, or all (train and validate on every case).
        splits: a splits_final.json to use instead of nnU-Net's 5-fold split (raw/splits_final.json is used if present).
    """
    from autoplan.emit import emit as emit_bundles

    for path in _guarded(emit_bundles, plans, raw, out, _names(configurations), _folds(folds), splits):
        print(f"wrote {path}")


def run(raw_dir, out="work", planner: str = "default", gpu_memory_gb: float = None, processes: int = 2,
        configurations=None, folds="0,1,2,3,4"):
    """Verify, fingerprint, plan and emit the bundles of a dataset in one go.

    Args:
        raw_dir: the dataset folder.
        out: work folder: fingerprint, plans, and bundles/ (one per configuration and fold).
        planner: default, resenc-m, resenc-l or resenc-xl.
        gpu_memory_gb: GPU memory target.
        processes: worker processes.
        configurations: configurations to emit (default: all supported).
        folds: folds to emit, e.g. 0,1,2,3,4 or all.
    """
    from autoplan.pipeline import run as run_pipeline

    _guarded(run_pipeline, raw_dir, out, planner, gpu_memory_gb, processes, _names(configurations), _folds(folds))


def demo(out="demo_out", processes: int = 2, epochs: int = 5, iterations: int = 12, seed: int = 0):
    """A synthetic task taken through plan, bundles, training, inference and evaluation; ~3 minutes on 2 CPU cores.

    Prints the validation Dice of every label against 0.85, and the paths of the training curves and of an overview
    picture of one predicted test case.

    Args:
        out: output folder (raw data under out/raw, everything else under out/work, the picture out/overview.png).
        processes: worker processes (planning, and data loading in the training; torch gets the cores left, at least 1).
        epochs: training epochs of the demo (nnU-Net's default is 1000).
        iterations: iterations per epoch (nnU-Net's default is 250).
        seed: seed of the synthetic dataset.
    """
    from autoplan.demo import demo as run_demo

    _guarded(run_demo, out, processes, epochs, iterations, seed)


COMMANDS = {
    "synthetic": synthetic,
    "convert-msd": convert_msd,
    "verify": verify,
    "fingerprint": fingerprint,
    "plan": plan,
    "emit": emit,
    "run": run,
    "demo": demo,
}


def main(argv=None):
    fire.Fire(COMMANDS, command=argv, name="autoplan")
