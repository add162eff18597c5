"""Train every bundle of a work folder as Ray tasks, then select; predict with the selected bundle.

nnU-Net leaves the 5 folds x 4 configurations to the user's loops or cluster scripts. Here each fold bundle is one
Ray task that runs the bundle itself (``python -m monai.bundle run training`` inside its folder, so a bundle stays
the unit a person can rerun by hand), asking Ray for the CPUs and GPUs one training needs. Ray starts a local
instance for the run, or joins a cluster (``--address``) whose nodes see the work folder on a shared filesystem.
A cascade fold's task takes the previous stage's tasks as inputs, so Ray starts it once they all finished.

State lives in the bundle folders, never in the driver: a bundle with final weights and a validation summary is
done and skipped; one with a resume checkpoint resumes (the bundle's ``TrainingProgress`` decides); each task's
output goes to ``eval/train.log`` in its bundle, which also tells the driver that the task has started.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from autoplan.files import write_json_atomic

FINAL_FILES = ("models/model.pt", "eval/validation/summary.json")
RESUME_FILE = "models/resume/checkpoint_latest.pt"
LOG_FILE = "eval/train.log"
REPORT_FILE = "train_report.json"
DONE_BEFORE = "done before"


class TrainError(ValueError):
    """Bad input to ``train`` or ``predict`` (no bundles, unknown configuration, no selection): exit status 2."""


@dataclass
class Job:
    bundle: Path
    dataset: str
    configuration: str
    fold: int
    previous_stage: str | None

    @property
    def name(self) -> str:
        return self.bundle.name


def finished(bundle: Path) -> bool:
    return all((bundle / f).is_file() for f in FINAL_FILES)


def find_jobs(work_dir, configurations=None, folds=None) -> list[Job]:
    """The fold bundles under ``WORK/bundles`` to train, previous stages first; a chosen cascade brings its previous
    stage's unfinished folds along, since it cannot train without their validation predictions."""
    from tools.ensemble import ToolError
    from tools.find_best import find_bundles, order_configurations, previous_stage

    bundles_dir = Path(str(work_dir)).resolve() / "bundles"  # absolute: tasks run in other folders and on other nodes
    if not bundles_dir.is_dir():
        raise TrainError(f"{bundles_dir}: no such folder (autoplan run RAW --out {work_dir} writes the bundles)")
    try:
        found = find_bundles(bundles_dir)
    except ToolError as exc:
        raise TrainError(str(exc)) from None
    if not found:
        raise TrainError(f"{bundles_dir}: no bundles named <Dataset>_<configuration>_fold<k> with "
                         "configs/inference.json")
    jobs = []
    for dataset, configs in found.items():
        unknown = [c for c in configurations or () if c not in configs]
        if unknown:
            raise TrainError(f"{bundles_dir}: no bundles of configuration(s) {', '.join(unknown)} of {dataset} "
                             f"(found {', '.join(order_configurations(configs))})")
        stages = {c: previous_stage(next(iter(f.values()))) for c, f in configs.items()}
        wanted = set(configurations or configs)
        needed = {stages[c] for c in wanted if stages[c] in configs}
        for c in order_configurations(wanted | needed):
            for fold, bundle in sorted(configs[c].items()):
                if folds is None or fold in folds or c in needed:
                    jobs.append(Job(bundle, dataset, c, fold, stages[c]))
    if not jobs:
        raise TrainError(f"{bundles_dir}: no bundles of fold(s) {folds}")
    return jobs


def bundle_args(epochs=None, iterations=None, device=None, overrides=()) -> list[str]:
    """Command-line overrides of ``monai.bundle run training``, the same for every bundle."""
    args = []
    for key, value in (("epochs", epochs), ("iterations_per_epoch", iterations), ("device", device)):
        if value is not None:
            args += [f"--{key}", str(value)]
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise TrainError(f"--override {item!r}: expected KEY=VALUE (a top-level id of configs/train.json)")
        args += [f"--{key}", value]
    return args


def train_bundle(bundle: str, args: list[str], *previous: dict) -> dict:
    """One Ray task: the bundle's own training in its folder, output appended to its ``eval/train.log``.

    ``previous`` are the results of the previous stage's tasks (Ray passes them once they finished); when one of
    them failed the training would fail on missing inputs, so it is not started."""
    failed = [p["bundle"] for p in previous if p["status"] == "failed" or p["status"].startswith("not run")]
    if failed:
        return {"bundle": bundle, "status": "not run: previous stage failed", "failed_previous": failed}
    folder = Path(bundle)
    log = folder / LOG_FILE
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json", *args]
    with open(log, "a") as out:
        out.write(f"=== autoplan train on {socket.gethostname()} at {time.ctime(start)}: {' '.join(command)}\n")
        out.flush()
        returncode = subprocess.run(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT).returncode
    end = time.time()
    return {"bundle": bundle, "status": "trained" if returncode == 0 and finished(folder) else "failed",
            "returncode": returncode, "start": start, "end": end, "host": socket.gethostname(), "log": str(log)}


# --- progress ----------------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def total_epochs(bundle: Path, epochs) -> str:
    if epochs is not None:
        return str(epochs)
    try:
        return str(json.loads((bundle / "configs" / "train.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError):
        return "?"


def progress_line(job: Job, launched: float, total: str) -> str | None:
    """``epoch e/E, pseudo-Dice d, ETA t`` from the bundle's ``eval/progress.json``, None until its task started."""
    log = job.bundle / LOG_FILE
    if not log.is_file() or log.stat().st_mtime < launched:
        return None
    path = job.bundle / "eval" / "progress.json"
    try:
        history = json.loads(path.read_text()) if path.stat().st_mtime >= launched else None
    except (OSError, ValueError):
        history = None
    if not history or not history.get("epoch"):
        return f"{job.name}: started"
    epoch, dice = history["epoch"][-1], history["val_pseudo_dice"][-1]
    line = f"{job.name}: epoch {epoch}/{total}, pseudo-Dice {'-' if dice is None else f'{dice:.3f}'}"
    if total.isdigit():
        seconds = history["epoch_seconds"][-5:]
        line += f", ETA {_duration(sum(seconds) / len(seconds) * max(int(total) - epoch, 0))}"
    return line


def validation_dice(bundle: Path):
    try:
        return float(json.loads((bundle / "eval/validation/summary.json").read_text())["foreground_mean"]["Dice"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def results_table(results: list[dict]) -> str:
    rows = [("bundle", "status", "time", "validation Dice")]
    for r in results:
        dice = r.get("dice")
        rows.append((Path(r["bundle"]).name, r["status"] + (f" (log: {r['log']})" if r["status"] == "failed" else ""),
                     _duration(r["end"] - r["start"]) if "end" in r else "-", "-" if dice is None else f"{dice:.4f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# --- the driver --------------------------------------------------------------------------------------------------
def start_ray(address=None, num_cpus=None):
    """Join ``address``, or start a local instance; Ray's workers import this checkout (or the installed package)."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": path}})
    return True


def train(work_dir, configurations=None, folds=None, address=None, num_cpus=None, gpus_per_task=None,
          cpus_per_task: float = 1, epochs=None, iterations=None, device=None, overrides=(), tracking=None,
          tracking_uri=None, select: bool = True, poll_seconds: float = 5.0) -> list[dict]:
    """Train the bundles, print progress and the end table, write ``bundles/train_report.json``, then select
    (when nothing failed). Returns one result per bundle; a status of ``failed`` or ``not run...`` is a failure."""
    import ray

    jobs = find_jobs(work_dir, configurations, folds)
    bundles_dir = jobs[0].bundle.parent
    datasets = sorted({j.dataset for j in jobs})
    if tracking and tracking != "mlflow":
        raise TrainError(f"--tracking {tracking!r}: only mlflow is supported")
    uri = tracking_uri or f"sqlite:///{bundles_dir / 'mlflow.db'}"
    common = bundle_args(epochs, iterations, device, overrides)
    started_ray = start_ray(address, num_cpus)
    try:
        gpus = gpus_per_task if gpus_per_task is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
        remote = ray.remote(train_bundle).options(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=0)
        resources = ray.cluster_resources()
        print(f"ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs on "
              f"{len(ray.nodes())} node(s); each training asks for {cpus_per_task:g} CPU(s), {gpus:g} GPU(s)",
              flush=True)
        launched = time.time()
        refs, results, pending = {}, {}, {}
        for job in jobs:
            args = common + (["--tracking", tracking, "--tracking_uri", uri, "--experiment_name", job.dataset,
                              "--run_name", job.name] if tracking else [])
            if finished(job.bundle):
                results[job.name] = {"bundle": str(job.bundle), "status": DONE_BEFORE}
                continue
            previous = [refs[j.name] for j in jobs if j.dataset == job.dataset and j.configuration ==
                        job.previous_stage and j.name in refs]
            refs[job.name] = remote.remote(str(job.bundle), args, *previous)
            pending[refs[job.name]] = job
            resume = " (resuming)" if (job.bundle / RESUME_FILE).is_file() else ""
            waits = f", after {job.previous_stage}" if previous else ""
            print(f"queued {job.name}{resume}{waits}", flush=True)
        print(f"{len(pending)} to train, {len(jobs) - len(pending)} done before", flush=True)
        shown = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=poll_seconds)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died (e.g. out of memory) or Ray failed
                    result = {"bundle": str(job.bundle), "status": "failed", "log": str(job.bundle / LOG_FILE),
                              "error": str(exc).splitlines()[0]}
                results[job.name] = result
                took = f" in {_duration(result['end'] - result['start'])}" if "end" in result else ""
                where = f", log {result['log']}" if result["status"] == "failed" else ""
                print(f"{job.name}: {result['status']}{took}{where} [{len(results)}/{len(jobs)}]", flush=True)
            for job in pending.values():
                line = progress_line(job, launched, total_epochs(job.bundle, epochs))
                if line and shown.get(job.name) != line:
                    shown[job.name] = line
                    print(line, flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    ordered = [results[j.name] for j in jobs]
    for job, result in zip(jobs, ordered):
        result["dice"] = validation_dice(job.bundle)
    write_json_atomic(bundles_dir / REPORT_FILE, ordered)
    print(results_table(ordered), flush=True)
    failures = [r for r in ordered if r["status"] not in ("trained", DONE_BEFORE)]
    if failures:
        print(f"{len(failures)} bundle(s) failed or did not run; see their logs (selection skipped)", file=sys.stderr)
    elif select:
        for dataset in datasets:
            run_selection(bundles_dir, dataset, configurations, sorted({j.fold for j in jobs if j.dataset == dataset}),
                          device, uri if tracking else None)
    return ordered


def run_selection(bundles_dir: Path, dataset: str, configurations, folds: list[int], device, tracking_uri) -> None:
    """``autoplan select`` over the trained configurations and folds; with MLflow, its report goes into the
    dataset's experiment."""
    from tools.find_best import select

    select(bundles_dir, configurations=",".join(configurations) if configurations else None,
           folds=",".join(map(str, folds)), dataset=dataset, device=device)
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(dataset)
        with mlflow.start_run(run_name="selection"):
            for name in ("report.json", "report.md"):
                mlflow.log_artifact(str(bundles_dir / "selection" / name))


# --- predict -----------------------------------------------------------------------------------------------------
def selected_bundle(work_dir) -> Path:
    """The final bundle that ``select`` recorded in ``selection/report.json``."""
    report = Path(str(work_dir)) / "bundles" / "selection" / "report.json"
    if not report.is_file():
        raise TrainError(f"{report}: missing; run autoplan train {work_dir} (or autoplan select) first, or pass "
                         "--bundle")
    final = json.loads(report.read_text()).get("final_bundle")
    if not final:
        raise TrainError(f"{report}: no final bundle (select ran with --no-bundle); pass --bundle")
    return report.parent.parent / final


def predict(work_dir, input_dir, output_dir, bundle=None, device=None, overrides=()) -> int:
    """Run the bundle's inference on a folder of images; returns the bundle run's exit status."""
    folder = Path(str(bundle)) if bundle else selected_bundle(work_dir)
    if not (folder / "configs" / "inference.json").is_file():
        raise TrainError(f"{folder / 'configs' / 'inference.json'}: missing (not a bundle)")
    if not Path(str(input_dir)).is_dir():
        raise TrainError(f"{input_dir}: no such folder")
    args = bundle_args(device=device, overrides=overrides)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
               "--dataset_dir", str(Path(str(input_dir)).resolve()), "--output_dir",
               str(Path(str(output_dir)).resolve()), *args]
    print(f"predicting with {folder}", flush=True)
    return subprocess.run(command, cwd=folder).returncode
