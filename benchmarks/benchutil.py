"""Shared helpers of the training, inference and accuracy benchmarks (autoplan vs nnU-Net 2.8.1).

* ``run_measured``: run a command as a subprocess and report its wall time, exit code, peak summed RSS/PSS of its
  whole process tree (/proc polled with ``treemem``'s primitives), the CPU seconds the tree used and how busy the
  rest of the machine was meanwhile (``foreign_cpu_fraction``: system-wide busy CPU time minus the tree's and minus
  this process's own polling, over wall x cores; the machines are shared, so this is the noise indicator printed
  beside every figure).
* ``nnunet_env`` / ``setup_nnunet_folders``: the ``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results``
  layout for one dataset, with the plans file we want nnU-Net to use.
* ``compare_plans``: our ``nnUNetPlans.json`` against nnU-Net's (exact, except intensity statistics that come from
  random sampling and are compared with the fingerprint benchmark's tolerance).
* ``emit_bundle``: one bundle (configuration, fold) through ``autoplan.emit.emit``.

Nothing here imports torch, monai or nnU-Net at import time: the drivers (``ours_driver.py`` in this interpreter,
``nnunet_driver.py`` in nnU-Net's venv) do the work in their own processes, and import this module too for
``driver_threads`` and ``run_driver_command`` (which import torch when called).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treemem import POLL_S, tree, tree_rss_pss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SHARED = REPO.parent / "shared"
DEFAULT_RAW = SHARED / "data" / "Dataset004_Hippocampus"
REFERENCE_PLANS_ROOT = SHARED / "reference" / "nnunet_plans"
MEMORY_METHOD = ("peak over time of the summed PSS (and RSS) of the process and all its descendants, "
                 f"/proc polled every {int(POLL_S * 1000)} ms")
INTENSITY_KEYS = ("max", "mean", "median", "min", "percentile_00_5", "percentile_99_5", "std")


# --------------------------------------------------------------------------------------------------------------------
# command line of the ours-vs-nnU-Net runners


def add_runner_arguments(ap, out_default: Path, keep_help: str, per_fold: bool = True) -> None:
    """The options every runner takes: the dataset, (with ``per_fold``) the configuration and fold, which systems,
    nnU-Net's venv, the result file and whether to keep the work folder."""
    ap.add_argument("--raw", type=Path, default=DEFAULT_RAW, help=f"raw dataset (default {DEFAULT_RAW})")
    if per_fold:
        ap.add_argument("--configuration", default="3d_fullres")
        ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--only", choices=("both", "ours", "nnunet"), default="both", help="which system(s) to run")
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    ap.add_argument("--out", type=Path, default=out_default, help=f"result JSON (default {out_default})")
    ap.add_argument("--keep", action="store_true", help=keep_help)


def add_quiet_wait_argument(ap) -> None:
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each measured run wait up to this many seconds for the shared machine to be less "
                         "than 25%% busy (default 60; 0 = do not wait)")


def raw_dataset(ap, args) -> Path:
    """``--raw`` resolved; a folder without dataset.json is a usage error (exit 2, naming the folder)."""
    raw = args.raw.resolve()
    if not (raw / "dataset.json").is_file():
        ap.error(f"{raw} has no dataset.json")
    return raw


# --------------------------------------------------------------------------------------------------------------------
# measuring a subprocess


def _system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user/nice
    return (total - idle) / hz, total / hz


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def wait_for_quiet(max_wait_s: float = 0.0, threshold: float = 0.25, window_s: float = 2.0) -> dict:
    """Wait (up to ``max_wait_s``) until the machine's busy fraction over ``window_s`` is below ``threshold``
    (other engineers' jobs share these machines). Returns how long it waited and the last busy fraction."""
    cores = os.cpu_count() or 1
    t0 = time.perf_counter()
    busy_fraction = None
    while True:
        b0, _ = _system_cpu()
        time.sleep(window_s)
        b1, _ = _system_cpu()
        busy_fraction = (b1 - b0) / (window_s * cores)
        waited = time.perf_counter() - t0
        if busy_fraction < threshold or waited >= max_wait_s:
            return {"waited_s": round(waited, 1), "busy_fraction_before": round(busy_fraction, 3)}


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None,
                 log: Path | None = None, timeout: float | None = None, memory: bool = True) -> dict:
    """Run cmd; start time (to line up with the command's log), wall time, exit code, peak summed RSS/PSS of its
    process tree, CPU use of the tree and of the rest.

    ``memory=False`` polls only for the exit (every ``POLL_S``), without reading the tree's memory: reading
    smaps_rollup of large processes 20 times a second slows them (contention on the kernel's memory-map lock), so
    wall times meant for comparison come from such runs and peaks from separate ones (peaks are then 0)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    self0 = _self_cpu()
    busy0, _ = _system_cpu()
    t0, started_at = time.perf_counter(), time.time()
    p = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    peak_rss = peak_pss = max_procs = 0
    status = rusage = None
    timed_out = False
    while True:
        pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            break
        if memory:
            rss, pss, n_procs = tree_rss_pss(p.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            max_procs = max(max_procs, n_procs)
        if timeout is not None and time.perf_counter() - t0 > timeout:
            timed_out = True
            for q in reversed(tree(p.pid)):
                try:
                    os.kill(q, 9)
                except OSError:
                    pass
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    busy1, _ = _system_cpu()
    monitor_cpu = _self_cpu() - self0  # this process's own polling, not the machine's other users
    p.returncode = os.waitstatus_to_exitcode(status)
    if log:
        out.close()
    tree_cpu = rusage.ru_utime + rusage.ru_stime  # the child and every descendant it waited for
    cores = os.cpu_count() or 1
    foreign = max(0.0, (busy1 - busy0) - tree_cpu - monitor_cpu)
    return {"wall_s": wall, "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
            "returncode": -9 if timed_out else p.returncode, "timed_out": timed_out,
            "peak_rss_mb": peak_rss / 2 ** 20, "peak_pss_mb": peak_pss / 2 ** 20, "max_processes": max_procs,
            "tree_cpu_s": tree_cpu, "monitor_cpu_s": monitor_cpu,
            "foreign_cpu_fraction": foreign / (wall * cores) if wall > 0 else 0.0}


def log_tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def print_failure(what: str, m: dict) -> None:
    """``<what> FAILED (exit N):`` and the log tail of a failed measurement (``m`` from ``run_driver`` or one with
    ``error_tail`` set)."""
    print(f"{what} FAILED (exit {m['returncode']}):\n{m.get('error_tail', '')}", flush=True)


QUIET = {"max_wait_s": 0.0, "threshold": 0.25}  # set by the benchmarks' --quiet-wait


def maybe_wait_for_quiet() -> dict | None:
    return wait_for_quiet(QUIET["max_wait_s"], QUIET["threshold"]) if QUIET["max_wait_s"] > 0 else None


def run_driver(python: str | os.PathLike, script: str, args: list, work: Path, name: str, env: dict | None = None,
               cwd: str | os.PathLike | None = None, timeout: float | None = None) -> dict:
    """Run a driver script (``python script args --result FILE``), measured; returns the measurement merged with the
    driver's JSON result under ``result`` (None when it failed, with the log's tail under ``error_tail``).
    Waits first for a quiet machine when ``QUIET["max_wait_s"]`` > 0."""
    result_file = work / f"{name}.json"
    log = work / f"{name}.log"
    result_file.unlink(missing_ok=True)
    cmd = [str(python), str(BENCH / script), *[str(a) for a in args], "--result", str(result_file)]
    quiet = maybe_wait_for_quiet()
    m = run_measured(cmd, env=env, cwd=cwd, log=log, timeout=timeout)
    m["quiet_wait"] = quiet
    m["command"] = " ".join(cmd)
    m["log"] = str(log)
    if m["returncode"] == 0 and result_file.is_file():
        m["result"] = json.loads(result_file.read_text())
    else:
        m["result"] = None
        m["error_tail"] = log_tail(log)
    return m


def ours_env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["BENCH_THREADS"] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def nnunet_env(root: Path, threads: int, n_proc_da: int | None = None) -> dict:
    env = dict(os.environ, nnUNet_raw=str(root / "nnUNet_raw"), nnUNet_preprocessed=str(root / "nnUNet_preprocessed"),
               nnUNet_results=str(root / "nnUNet_results"), nnUNet_compile="f", BENCH_THREADS=str(threads),
               nnUNet_def_n_proc=str(max(1, threads)))
    env.setdefault("PYTHONWARNINGS", "ignore")
    if n_proc_da is not None:
        env["nnUNet_n_proc_DA"] = str(n_proc_da)
    env.pop("PYTHONPATH", None)
    return env


# --------------------------------------------------------------------------------------------------------------------
# nnU-Net folders


def dataset_folder_name(raw: Path) -> tuple[str, int]:
    """nnU-Net folder name and id for the raw dataset (its own name when it is DatasetXXX_Name)."""
    m = re.fullmatch(r"Dataset(\d{3})_(.+)", raw.name)
    if m:
        return raw.name, int(m.group(1))
    return "Dataset999_Bench", 999


def make_nnunet_folders(root: Path, raw: Path) -> tuple[str, int]:
    """root/{nnUNet_raw, nnUNet_preprocessed, nnUNet_results}, with nnUNet_raw/<name> a symlink to raw; returns the
    dataset's nnU-Net (name, id)."""
    name, ds_id = dataset_folder_name(raw)
    for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / d).mkdir(parents=True, exist_ok=True)
    link = root / "nnUNet_raw" / name
    if not link.exists():
        link.symlink_to(raw.resolve(), target_is_directory=True)
    return name, ds_id


def setup_nnunet_folders(root: Path, raw: Path, plans_file: Path, fingerprint_file: Path | None) -> Path:
    """nnUNet_raw/<name> (symlink to raw), nnUNet_preprocessed/<name>/{nnUNetPlans.json, dataset.json,
    dataset_fingerprint.json}; returns the preprocessed dataset folder. The plans' dataset_name is set to <name>."""
    name, _ = make_nnunet_folders(root, raw)
    pre = root / "nnUNet_preprocessed" / name
    pre.mkdir(exist_ok=True)
    plans = json.loads(Path(plans_file).read_text())
    plans["dataset_name"] = name
    (pre / f"{plans.get('plans_name', 'nnUNetPlans')}.json").write_text(json.dumps(plans, indent=4))
    shutil.copyfile(raw / "dataset.json", pre / "dataset.json")
    if fingerprint_file is not None and Path(fingerprint_file).is_file():
        shutil.copyfile(fingerprint_file, pre / "dataset_fingerprint.json")
    else:  # the trainer copies it into the results folder; its content is not used
        (pre / "dataset_fingerprint.json").write_text("{}\n")
    return pre


# --------------------------------------------------------------------------------------------------------------------
# plans


def compare_plans(ours: dict, ref: dict, tolerance: float = 0.01) -> dict:
    """Every key of nnU-Net's plans against ours. Exact equality, except the foreground intensity statistics (random
    sampling in nnU-Net): within ``tolerance`` of nnU-Net's percentile_99_5 - percentile_00_5 range. Keys only in
    ours are listed, not failed."""
    exact, approx, extra = [], [], []

    def walk(o, r, path):
        if path == "/foreground_intensity_properties_per_channel":
            for ch, rs in r.items():
                os_ = (o or {}).get(ch, {})
                rng = float(rs["percentile_99_5"]) - float(rs["percentile_00_5"])
                for k in INTENSITY_KEYS:
                    ov, rv = os_.get(k), rs.get(k)
                    rel = abs(float(ov) - float(rv)) / abs(rng) if ov is not None and rng else float("inf")
                    approx.append({"key": f"{path}/{ch}/{k}", "ours": ov, "nnunet": rv, "rel_to_range": rel,
                                   "pass": rel <= tolerance})
            return
        if isinstance(r, dict) and isinstance(o, dict):
            for k in r:
                if k not in o:
                    exact.append({"key": f"{path}/{k}", "ours": "<missing>", "nnunet": r[k]})
                else:
                    walk(o[k], r[k], f"{path}/{k}")
            extra.extend(f"{path}/{k}" for k in o if k not in r)
        elif _norm(o) != _norm(r):
            exact.append({"key": path, "ours": o, "nnunet": r})

    walk(ours, ref, "")
    ok = not exact and all(a["pass"] for a in approx)
    return {"identical_except_sampled_intensity_stats": ok, "differences": exact,
            "intensity_stats": approx, "keys_only_in_ours": extra,
            "max_intensity_rel_diff": max((a["rel_to_range"] for a in approx), default=0.0)}


def _norm(v):
    """JSON value with tuples as lists and ints as floats where they compare equal (1 == 1.0)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def reference_plans(raw: Path) -> tuple[Path | None, Path | None]:
    """nnU-Net's own nnUNetPlans.json / dataset_fingerprint.json for this dataset from ../shared, if there."""
    folder = REFERENCE_PLANS_ROOT / raw.name
    plans, fp = folder / "nnUNetPlans.json", folder / "dataset_fingerprint.json"
    return (plans if plans.is_file() else None), (fp if fp.is_file() else None)


def make_nnunet_plans(raw: Path, work: Path, venv_dir: Path, processes: int) -> tuple[Path, Path, dict]:
    """Plans from nnU-Net itself (fingerprint + default planner), when ../shared has none for this dataset."""
    root = work / "nnunet_planning"
    name, ds_id = make_nnunet_folders(root, raw)
    env = nnunet_env(root, processes)
    cmd = [venv_dir / "bin" / "nnUNetv2_plan_and_preprocess", "-d", str(ds_id), "-np", str(processes),
           "--no_pp", "--clean"]
    m = run_measured(cmd, env=env, log=work / "nnunet_planning.log")
    pre = root / "nnUNet_preprocessed" / name
    return pre / "nnUNetPlans.json", pre / "dataset_fingerprint.json", m


def plans_for(raw: Path, work: Path, venv_dir: Path, processes: int,
              announce: bool = False) -> tuple[Path, Path | None] | None:
    """(plans, fingerprint) files for the benchmarks: nnU-Net's own from ../shared, else made with nnU-Net's planner
    (``announce``: say so first). None, after printing the planner's log tail, when the planner fails."""
    plans_file, fp_file = reference_plans(raw)
    if plans_file is None:
        if announce:
            print("no reference plans in ../shared: planning with nnU-Net", flush=True)
        plans_file, fp_file, m = make_nnunet_plans(raw, work, venv_dir, processes)
        if m["returncode"] != 0:
            print(log_tail(work / "nnunet_planning.log"))
            return None
    return plans_file, fp_file


def run_our_planner(raw: Path, work: Path, processes: int) -> tuple[Path, dict]:
    """``python -m autoplan run RAW --out WORK --processes N``; returns the plans file and the measurement."""
    out = work / "ours_plan"
    cmd = [sys.executable, "-m", "autoplan", "run", str(raw), "--out", str(out), "--processes", str(processes)]
    m = run_measured(cmd, env=ours_env(processes), cwd=REPO, log=work / "ours_plan.log")
    m["command"] = " ".join(cmd)
    plans = sorted(out.glob("*Plans*.json")) if out.is_dir() else []
    return (plans[0] if plans else out / "nnUNetPlans.json"), m


# --------------------------------------------------------------------------------------------------------------------
# bundles


def emit_bundle(plans_file: Path, raw: Path, out: Path, configuration: str = "3d_fullres", fold: int = 0,
                splits_file: Path | None = None) -> Path:
    """Emit one bundle with ``autoplan.emit.emit`` (in a subprocess, so this process never imports torch)."""
    code = ("import sys, json\nfrom autoplan.emit import emit\n"
            "kw = {} if sys.argv[6] == '-' else {'splits_file': sys.argv[6]}\n"
            "paths = emit(sys.argv[1], sys.argv[2], sys.argv[3], configurations=[sys.argv[4]],"
            " folds=[int(sys.argv[5])], **kw)\n"
            "print(json.dumps([str(p) for p in paths]))\n")
    r = subprocess.run([sys.executable, "-c", code, str(plans_file), str(raw), str(out), configuration, str(fold),
                        str(splits_file) if splits_file else "-"], env=ours_env(1), cwd=REPO, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emit failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return Path(json.loads(r.stdout.strip().splitlines()[-1])[0])


# --------------------------------------------------------------------------------------------------------------------
# statistics and printing


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}


def best_of(runs: list[dict], key: str, higher: bool = False) -> dict:
    """The repeat with the best ``key`` (least disturbed by other load) as ``best``; peak memory over all repeats."""
    ok = [r for r in runs if r.get(key) is not None]
    if not ok:
        return {"best": None}
    best = (max if higher else min)(ok, key=lambda r: r[key])
    return {"best": best, "all_" + key: [r[key] for r in ok],
            "peak_pss_mb_max": max(r["peak_pss_mb"] for r in ok), "peak_rss_mb_max": max(r["peak_rss_mb"] for r in ok)}


def dig(v, *keys):
    """v[k1][k2]...; None where a level is missing, None or not a dict."""
    for k in keys:
        if not isinstance(v, dict) or v.get(k) is None:
            return None
        v = v[k]
    return v


def ratio(a, b):
    try:
        return a / b if a is not None and b else None
    except TypeError:
        return None


def fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "nan"
    return format(v, spec)


def print_table(rows: list[tuple], header: tuple, ratio_title: str = "ours/nnU-Net") -> None:
    """rows of (label, first, second, unit/format); ratio = first / second."""
    print(f"{header[0]:44s} {header[1]:>12s} {header[2]:>12s} {ratio_title:>13s}")
    for label, o, n, spec in rows:
        print(f"{label:44s} {fmt(o, spec):>12s} {fmt(n, spec):>12s} {fmt(ratio(o, n), '.2f'):>13s}")


def write_result(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# inside the drivers (both venvs)


def driver_threads() -> int:
    """torch's thread count from ``BENCH_THREADS`` (unset or 0: torch's default); torch imported only when called."""
    import torch

    n = int(os.environ.get("BENCH_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def add_epoch_loop_arguments(p) -> None:
    """Options of the drivers' ``epochs`` subcommand (the same for both systems)."""
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batches-per-epoch", type=int, default=12)
    p.add_argument("--val-batches", type=int, default=6)
    p.add_argument("--step-s", type=float, default=0.25, help="simulated training step per batch")
    p.add_argument("--val-step-s", type=float, default=0.02, help="simulated validation step per batch")


def epoch_loop_result(args, epochs: list[dict]) -> dict:
    """Per-epoch records ``{epoch_s, train_wait_s: [...], val_wait_s: [...]}`` of a loop whose steps are sleeps,
    summarised over the epochs after the first (which starts the workers): the epoch's wall time beyond its sleeps
    (the loaders' cost to the loop), and the waits for the first training and the first validation batch."""
    budget = args.batches_per_epoch * args.step_s + args.val_batches * args.val_step_s
    later = epochs[1:]
    return {"epochs": epochs, "budget_s": budget, "step_s": args.step_s, "val_step_s": args.val_step_s,
            "batches_per_epoch": args.batches_per_epoch, "val_batches": args.val_batches,
            "overhead_s": stats([e["epoch_s"] - budget for e in later]),
            "first_train_wait_s": stats([e["train_wait_s"][0] for e in later]),
            "first_val_wait_s": stats([e["val_wait_s"][0] for e in later])}


def run_driver_command(fn, args, started: float) -> int:
    """Run a driver's subcommand and write its figures to ``args.result``, with the seconds spent importing (since
    ``started``, taken before the heavy imports) and running it: beside the runner's wall time they show start-up
    and exit costs."""
    import torch

    result_file = Path(args.result).resolve()  # before the subcommand, which may change the working directory
    command_started = time.time()
    result = fn(args)
    result.update(imports_s=command_started - started, command_s=time.time() - command_started,
                  torch_version=torch.__version__)
    write_result(result_file, result)
    sys.stdout.flush()
    return 0


def finish(out: Path, result: dict, work: Path, keep: bool) -> None:
    """Write the result JSON and say where; keep the work folder (and say so) or delete it."""
    write_result(out, result)
    print(f"result written to {out}")
    if keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
