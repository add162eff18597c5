"""Command line: ``autoplan COMMAND`` or ``python -m autoplan COMMAND`` (``--help`` works on every command).

The dataset-to-bundles stages are fire commands defined here; ``evaluate``, ``ensemble``, ``select`` and ``export``
hand their arguments unchanged to the ``main`` of their module in ``tools/``, so they take the same options as
``python tools/FILE.py``. Commands import their stage lazily, so ``plan`` never loads image libraries, torch or
monai. Dataset problems are printed one per line, naming the file, and exit with status 2 (no traceback).
"""

from __future__ import annotations

import importlib
import sys

import fire

EXIT_BAD_INPUT = 2


def _fail(problems, warnings=()) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{len(problems)} problem(s) found", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def _guarded(fn, *args, **kwargs):
    """Run a stage, turning dataset and planning errors into a clean message and exit status 2."""
    from autoplan.dataset import DatasetError
    from autoplan.planner import PlanningError

    try:
        return fn(*args, **kwargs)
    except DatasetError as exc:
        _fail(exc.problems, exc.warnings)
    except OSError as exc:  # "PATH: Not a directory" rather than "[Errno 20] Not a directory: 'PATH'"
        _fail([f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)])
    except (PlanningError, ValueError) as exc:
        _fail([str(exc)])


def synthetic(out_dir, cases: int = 8, shape="48,48,32", spacing=None, channels: int = 1, modality: str = "MR",
              labels: int = 2, test_cases: int = 0, spacing_jitter: float = 0.0, seed: int = 0,
              regions: bool = False, sparse: bool = False, classes: int = 0):
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
        regions: declare BraTS-style nested regions (region k = labels k..L) with regions_class_order.
        sparse: mark every odd axial slice unannotated with -1 (the DIAG fork's sparse labels, "ignore": -1).
        classes: a case-level class per case (>= 2 classes; the size of structure_1 tells them apart), declared in
            dataset.json's classification block: a multi-task dataset.
    """
    from autoplan.synthetic import make_synthetic_dataset

    shape, spacing = _numbers(shape, "shape"), _numbers(spacing, "spacing")
    path = _guarded(make_synthetic_dataset, out_dir, cases=cases, shape=shape, spacing=spacing, channels=channels,
                    modality=modality, labels=labels, test_cases=test_cases, spacing_jitter=spacing_jitter, seed=seed,
                    regions=regions, sparse=sparse, classes=classes)
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
    if report.class_counts:
        print("classes: " + ", ".join(f"{name} {count}" for name, count in report.class_counts.items()))
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
        planner: default, resenc-m, resenc-l or resenc-xl; or nnU-Net's torch-resampling planners torchres,
            resenc-l-torchres, resenc-l-torchres-sepz.
        gpu_memory_gb: GPU memory target; defaults to the preset's (8, 8, 24, 40; torchres 8, the others 24).
        plans_name: override the plans name (e.g. when using a memory target).
        dataset_name: override the dataset name (default: the DatasetXXX_Name folder of dataset.json).
    """
    from autoplan.pipeline import describe_plans, plan_files

    plans = _guarded(plan_files, dataset_json, fingerprint, out, planner, gpu_memory_gb, plans_name, dataset_name)
    print(describe_plans(plans))
    print(f"wrote {out}")


def _numbers(value, name: str):
    """``48,48,32`` / ``"0.8 0.8 4"`` / a number, as fire hands them over, as a tuple of floats (None stays None);
    anything else ends the command with exit status 2."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).replace("x", ",").replace(",", " ").split()
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        _fail([f"--{name}: {value!r} is not a list of numbers such as 48,48,32"])


def _folds(folds):
    """``0,1,2`` / ``"0 1 2"`` / ``all`` / a single int, as fire hands them over; anything else ends the command
    with exit status 2."""
    if isinstance(folds, int) or str(folds) == "all":
        return [folds]
    items = folds if isinstance(folds, (list, tuple)) else str(folds).replace(",", " ").split()
    try:
        return [f if f == "all" else int(f) for f in items]
    except (TypeError, ValueError):
        _fail([f"--folds: {folds!r} is not a list of fold numbers (e.g. 0,1,2) or all"])


def _names(value):
    if value is None:
        return None
    return list(value) if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()


def emit(plans, raw, out="bundles", configurations=None, folds="0,1,2,3,4", splits=None, authors=None,
         copyright=None, classification_head=None):
    """Emit one MONAI Bundle per configuration and fold from a plans file (ours or nnU-Net's).

    Args:
        plans: plans.json (nnU-Net schema).
        raw: the raw dataset folder (dataset.json, imagesTr, labelsTr).
        out: folder for the bundles, splits_final.json and the shared preprocessing cache.
        configurations: e.g. 3d_fullres,2d (default: every supported configuration in the plans).
        folds: e.g. 0,1,2,3,4 (default), 0, or all (train and validate on every case).
        splits: a splits_final.json to use instead of nnU-Net's 5-fold split (raw/splits_final.json is used if present).
        authors: the model's authors, written to each bundle's metadata.json (e.g. "Jane Doe, Example Hospital").
        copyright: the model's copyright line for metadata.json (e.g. "Copyright (c) 2026 Example Hospital").
        classification_head: simple, roi (default) or attention, for a dataset with classes (docs/bundles.md).
    """
    from autoplan.emit import emit as emit_bundles

    for path in _guarded(emit_bundles, plans, raw, out, _names(configurations), _folds(folds), splits,
                         authors and str(authors), copyright and str(copyright),
                         classification_head and str(classification_head)):
        print(f"wrote {path}")


def run(raw_dir, out="work", planner: str = "default", gpu_memory_gb: float = None, processes: int = 2,
        configurations=None, folds="0,1,2,3,4", classification_head=None):
    """Verify, fingerprint, plan and emit the bundles of a dataset in one go.

    Args:
        raw_dir: the dataset folder.
        out: work folder: fingerprint, plans, and bundles/ (one per configuration and fold).
        planner: default, resenc-m, resenc-l, resenc-xl, torchres, resenc-l-torchres or resenc-l-torchres-sepz.
        gpu_memory_gb: GPU memory target.
        processes: worker processes.
        configurations: configurations to emit (default: all supported).
        folds: folds to emit, e.g. 0,1,2,3,4 or all.
        classification_head: simple, roi (default) or attention, for a dataset with classes (docs/bundles.md).
    """
    from autoplan.pipeline import run as run_pipeline

    _guarded(run_pipeline, raw_dir, out, planner, gpu_memory_gb, processes, _names(configurations), _folds(folds),
             classification_head and str(classification_head))


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


def _pairs(value):
    """``"KEY=VALUE KEY=VALUE"`` (fire keeps only the last of a repeated flag), split on spaces."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value).split()


def train(work_dir="work", configurations=None, folds=None, address=None, num_cpus: int = None,
          gpus_per_task: float = None, cpus_per_task: float = 1, epochs: int = None, iterations: int = None,
          device=None, override=None, tracking=None, tracking_uri=None, no_select: bool = False):
    """Train every bundle of a work folder as tasks on Ray (resumable), then select the best configuration.

    Each bundle trains in its own folder (``monai.bundle run training``; output in its eval/train.log); finished
    bundles are skipped, interrupted ones resume; a 3d_cascade_fullres fold starts once every 3d_lowres fold has
    finished. The exit status is 1 when a bundle failed (the others still train).

    Args:
        work_dir: the folder that ``autoplan run`` wrote (bundles under WORK_DIR/bundles).
        configurations: only these configurations, e.g. 2d,3d_fullres (a cascade brings its previous stage along).
        folds: only these folds, e.g. 0,1.
        address: an existing Ray cluster (auto, or ray://HOST:10001); default: a local Ray instance for this run.
        num_cpus: CPUs of the local Ray instance (default: all of this machine's).
        gpus_per_task: GPUs per training (default 1 when the cluster has GPUs, else 0); 0.5 puts two on a GPU.
        cpus_per_task: CPUs per training, e.g. 1 + the bundle's num_workers (default 1).
        epochs: training epochs (bundle default 1000).
        iterations: iterations per epoch (bundle default 250).
        device: e.g. cpu (default: cuda:0 when the task has a GPU).
        override: KEY=VALUE pairs for top-level ids of configs/train.json, e.g. "num_workers=4 val_iterations=10".
        tracking: mlflow: every bundle's run in one experiment named after the dataset, plus the selection report.
        tracking_uri: MLflow tracking URI (default: sqlite database WORK_DIR/bundles/mlflow.db).
        no_select: skip ``autoplan select`` after training.
    """
    from autoplan.train import train as train_all
    from tools.ensemble import ToolError

    try:
        results = _guarded(train_all, work_dir, _names(configurations), None if folds is None else _folds(folds),
                           address, num_cpus, gpus_per_task, cpus_per_task, epochs, iterations, device,
                           _pairs(override), tracking, tracking_uri, not no_select)
    except ToolError as exc:  # from the selection
        _fail([str(exc)])
    if any(r["status"] not in ("trained", "done before") for r in results):
        raise SystemExit(1)


def predict(work_dir, input_dir, output_dir, bundle=None, device=None, override=None):
    """Predict a folder of images with the selected final bundle (ensemble plus postprocessing).

    Args:
        work_dir: the work folder (its bundles/selection/report.json names the final bundle).
        input_dir: images named CASE_XXXX<ending> (nnU-Net's imagesTs layout).
        output_dir: folder for the label maps.
        bundle: predict with this bundle folder instead (any fold or ensemble bundle).
        device: e.g. cpu.
        override: KEY=VALUE pairs for top-level ids of configs/inference.json, e.g. "use_tta=False".
    """
    from autoplan.train import predict as run_predict

    status = _guarded(run_predict, work_dir, input_dir, output_dir, bundle, device, _pairs(override))
    if status:
        raise SystemExit(status)


def _interop(fn, *args, **kwargs):
    """Run an interop command; bad input -> one ``error:`` line and exit status 2 (no traceback)."""
    from autoplan.interop import InteropError

    try:
        return fn(*args, **kwargs)
    except (InteropError, FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        _fail([str(exc)])


def import_nnunet(*model_dirs, out=None, checkpoint: str = "final", folds=None, splits=None):
    """Import trained nnU-Net v2 model folders as bundles: one per fold, plus their ensemble.

    A model folder is TRAINER__PLANS__CONFIGURATION in $nnUNet_results/DatasetXXX_Name.

    Each fold_K/checkpoint_final.pth becomes the bundle <Dataset>_<configuration>_fold<K> (the plans' network, the
    checkpoint's mirroring axes, nnU-Net's postprocessing when find_best_configuration chose one for the folder);
    several folds, and every cascade, also become <Dataset>_<configuration>_ensemble, which predicts what
    nnUNetv2_predict -f <folds> predicts. A 3d_cascade_fullres folder brings its 3d_lowres folder (beside it, or
    given too). Checkpoints load with torch.load(weights_only=True); nnU-Net is not needed.

    Args:
        model_dirs: nnU-Net model folders, e.g.
            $nnUNet_results/Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres.
        out: folder for the bundles (created if needed; existing bundles are never overwritten).
        checkpoint: final (checkpoint_final.pth, default) or best (checkpoint_best.pth).
        folds: only these folds, e.g. 0,1 (default: every fold found).
        splits: nnU-Net's splits_final.json, for the bundles' train/validation cases (default:
            $nnUNet_preprocessed/<Dataset>/splits_final.json when present; else the lists stay empty).
    """
    from autoplan.interop import import_nnunet as run_import

    for path in _interop(run_import, *model_dirs, out=out, checkpoint=str(checkpoint),
                         folds=None if folds is None else _folds(folds), splits=splits):
        print(f"wrote {path}")


def export_nnunet(*bundles, out=None, trainer: str = "nnUNetTrainer", dataset_name=None):
    """Export trained bundles as an nnU-Net v2 results folder that nnUNetv2_predict predicts with.

    Writes OUT/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION/{plans.json, dataset.json, fold_K/checkpoint_final.pth}
    (an ensemble bundle exports each member); then nnUNet_results=OUT nnUNetv2_predict -d XXX -c CONFIGURATION -f K
    ... predicts with them. Bundles whose network is not the plans' PlainConvUNet or ResidualEncoderUNet are refused.

    Args:
        bundles: trained bundle folders (models/model.pt), fold or ensemble bundles.
        out: the results folder (nnUNet_results); existing checkpoints are never overwritten.
        trainer: the trainer name written into the checkpoints and the folder name (default nnUNetTrainer, whose
            network nnU-Net rebuilds from the plans).
        dataset_name: DatasetXXX_Name, when the plans' dataset_name is not in nnU-Net's form.
    """
    from autoplan.interop import export_nnunet as run_export

    written = _interop(run_export, *bundles, out=out, trainer=str(trainer), dataset_name=dataset_name)
    print(f"{len(written)} checkpoint(s) written under {out}")


COMMANDS = {
    "synthetic": synthetic,
    "convert-msd": convert_msd,
    "verify": verify,
    "fingerprint": fingerprint,
    "plan": plan,
    "emit": emit,
    "run": run,
    "demo": demo,
    "train": train,
    "predict": predict,
    "import-nnunet": import_nnunet,
    "export-nnunet": export_nnunet,
}

# module in tools/ and one-line summary; the summary lives here so that ``autoplan --help`` imports no tool
TOOLS = {
    "evaluate": ("tools.evaluate", "Evaluate predictions like nnUNetv2_evaluate_folder, plus HD95 and NSD."),
    "ensemble": ("tools.ensemble", "Predict with several bundles, average saved probabilities, or make one ensemble "
                                   "bundle."),
    "select": ("tools.find_best", "Choose the best configuration or ensemble and its postprocessing "
                                  "(find_best_configuration)."),
    "export": ("tools.export", "Zip a bundle reproducibly, or install such a zip safely (export install)."),
}


def usage() -> str:
    """Every command with its one-line summary (the first line of a fire command's docstring)."""
    summaries = {name: fn.__doc__.splitlines()[0] for name, fn in COMMANDS.items()}
    summaries.update({name: summary for name, (_, summary) in TOOLS.items()})
    width = max(map(len, summaries))
    return "\n".join(["usage: autoplan COMMAND [ARGS ...]   (autoplan COMMAND --help describes a command)", "",
                      "commands:"] + [f"  {name:<{width}}  {text}" for name, text in summaries.items()])


def main(argv=None) -> int:
    """Run one command and return its exit status; bad input may also end it with ``SystemExit(2)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(usage(), file=sys.stdout if argv else sys.stderr)
        except BrokenPipeError:  # e.g. piped into head
            pass
        return 0 if argv else EXIT_BAD_INPUT
    name, rest = argv[0], argv[1:]
    if name in TOOLS:
        return importlib.import_module(TOOLS[name][0]).main(rest, prog=f"autoplan {name}") or 0
    if name not in COMMANDS:
        print(f"error: unknown command {name!r} (autoplan --help lists the commands)", file=sys.stderr)
        return EXIT_BAD_INPUT
    fire.Fire(COMMANDS, command=argv, name="autoplan")
    return 0
