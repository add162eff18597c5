"""CPU inference on a large anisotropic CT that is resampled on the way in and out: ours vs ``nnUNetv2_predict``.

Same weights in both systems: a tiny nnU-Net model is trained in nnU-Net 2.8.1's venv (``nnunet_driver.py train``, a
trainer subclass, rounds of 1 epoch x ``--iterations``) on a small synthetic CT dataset whose plan spacing differs
from the benchmark case's, and imported with ``autoplan import-nnunet``. The plan is nnU-Net's own, with the network
shrunk (``features_per_stage`` capped, ``--features``) so that a CPU run takes minutes, not hours: the benchmark is
about everything around the network (reading, preprocessing, resampling back, writing, processes), and the network's
share is reported in the split.

Setup (cached in ``--work``; delete it to start over):

1. ``raw/Dataset990_CpuBench``: ``autoplan.synthetic`` CT, 6 training cases of about 96 x 96 x 40 voxels at
   2.5 x 2.5 x 5.0 mm (the plan's spacing), 2 labels; the case ``big/case_big_0000.nii.gz``: 512 x 512 x 120
   voxels at 0.7 x 0.7 x 2.5 mm (``--big-shape``, ``--big-spacing``), about 143 x 143 x 60 on the plan's grid.
2. ``nnUNetv2_extract_fingerprint``, ``nnUNetv2_plan_experiment``, the network shrunk, ``nnUNetv2_preprocess``,
   training (``--iterations``: each round starts from the previous round's weights), then one model folder per
   resampling preset with the same checkpoint and the plans' resampling functions set as the preset's planner writes
   them: ``default`` (``nnUNetPlans``), ``torchres`` (``nnUNetPlanner_torchres``: trilinear) and ``torchres_sepz``
   (the ``_sepz`` planner's functions: bilinear in-plane, nearest-exact along the coarse axis).
   ``autoplan import-nnunet`` turns each into a bundle.

Per preset and repeat (alternating who goes first), each system runs twice: once for the wall time, with nothing
polling its memory, and once as a process tree whose peak summed PSS and RSS are polled (``treemem.py``; reading
/proc/PID/smaps_rollup 20 times a second slowed our run from 38 s to 64 s and nnU-Net's from 65 s to 77 s, so
times and peaks come from separate runs):

* nnU-Net: ``nnUNetv2_predict -i big -o OUT -d 990 -c 3d_fullres -f 0 -p PLANS -device cpu -npp P -nps P``
  (TTA on, ``P = --processes``, default 2).
* ours: the imported bundle's ``configs/inference.json`` through ``ConfigWorkflow`` (what ``python -m monai.bundle
  run`` does), TTA on, ``DataLoader`` with ``P - 1`` workers (``P`` processes), timed per phase (appended to a
  file, in both runs): load, preprocess, network (sliding window with TTA), resampling back (``NnUNetRestored``),
  writing (``SaveImaged``); in the memory run also the peak per phase. It runs in two environments
  (``--ours-envs``): ``ours``, this interpreter with the development install (``requirements.txt``: mlflow,
  matplotlib, tensorboard, Ray...), and ``ours_inference``, a venv in the work folder with only
  ``requirements-inference.txt``, as a CPU inference machine would install it. MONAI imports every optional package
  it finds, so the two differ by 3–5 s of start-up and exit; nnU-Net runs in its own venv, which holds only
  nnunetv2 and its dependencies.

Then the label maps are compared (voxel agreement, Dice per label); the default training (250 + 300 iterations,
about 75 minutes on 2 cores) gives a model that segments both structures (nnU-Net's validation Dice 0.965 and 0.986
in our run), so the comparison is on real boundaries. Both use torch's default thread count
(``--threads`` to set it). Writes ``benchmarks/results/cpu_inference.json``; exit status 0 ok, 2 a run failed.

Usage::

    python benchmarks/bench_cpu_inference.py                       # all three presets, 1 repeat
    python benchmarks/bench_cpu_inference.py --presets default --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

DATASET_ID, DATASET = 990, "Dataset990_CpuBench"
DEFAULT_OUT = bu.BENCH / "results" / "cpu_inference.json"
DEFAULT_WORK = Path.home() / ".cache" / "autoplan" / "bench_cpu_inference"
PRESETS = ("default", "torchres", "torchres_sepz")
OURS_ENVS = ("ours", "ours_inference")


def preset_plans(plans: dict, preset: str) -> dict:
    """nnU-Net's plans with the resampling functions of ``preset`` (as its planner writes them) and its name."""
    from autoplan.planner import RESAMPLING, torch_resampling

    resampling = {"default": RESAMPLING, "torchres": torch_resampling(False),
                  "torchres_sepz": torch_resampling(True)}[preset]
    name = {"default": "nnUNetPlans", "torchres": "nnUNetPlans_torchres",
            "torchres_sepz": "nnUNetPlans_torchres_sepz"}[preset]
    out = json.loads(json.dumps(plans))
    out["plans_name"] = name
    for config in out["configurations"].values():
        if "resampling_fn_data" in config:
            config.update(json.loads(json.dumps(resampling)))
    return out


# --- setup -------------------------------------------------------------------------------------------------------
def _run(cmd, env=None, cwd=None, log=None):
    print("  $", " ".join(str(c) for c in cmd), flush=True)
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {p.returncode}); see {log}")


def make_data(work: Path, big_shape, big_spacing) -> tuple[Path, Path]:
    import numpy as np

    from autoplan.synthetic import _write, make_case, make_synthetic_dataset

    raw = work / "nnUNet_raw" / DATASET
    if not raw.exists():
        make_synthetic_dataset(raw, cases=6, shape=(96, 96, 40), spacing=(2.5, 2.5, 5.0), modality="CT", labels=2,
                               seed=1, structure_size=(0.3, 0.45))
    big = work / "big"
    image = big / "case_big_0000.nii.gz"
    if not image.exists():
        big.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(2)
        shape_zyx, spacing_zyx = tuple(big_shape[::-1]), tuple(big_spacing[::-1])
        channels, _ = make_case(rng, shape_zyx, spacing_zyx, 1, 2, "CT", (0.3, 0.45))
        tmp = big / ".case_big_0000.nii.gz"
        _write(channels[0], tmp, spacing_zyx, (-180.0, -180.0, 0.0), False)
        os.replace(tmp, image)
    return raw, big


def setup_nnunet(work: Path, nn_bin: Path, features: int, iterations: list, presets, log: Path) -> dict:
    """Plans, preprocessing, training and one model folder per preset; returns {preset: model folder}."""
    root = work
    env = bu.nnunet_env(root, 0)
    env.pop("BENCH_THREADS", None)
    pre = root / "nnUNet_preprocessed" / DATASET
    results = root / "nnUNet_results" / DATASET
    plans_file = pre / "nnUNetPlans.json"
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        _run([nn_bin / "nnUNetv2_extract_fingerprint", "-d", DATASET_ID, "-np", 2], env, log=log)
        _run([nn_bin / "nnUNetv2_plan_experiment", "-d", DATASET_ID], env, log=log)
        plans = json.loads(plans_file.read_text())
        for config in plans["configurations"].values():
            arch = config.get("architecture", {}).get("arch_kwargs")
            if arch:
                arch["features_per_stage"] = [min(f, features * 2 ** i) for i, f in
                                              enumerate(arch["features_per_stage"])]
        plans_file.write_text(json.dumps(plans, indent=4))
        _run([nn_bin / "nnUNetv2_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", 2], env, log=log)
    trained = results / "nnUNetTrainer_Bench__nnUNetPlans__3d_fullres"
    checkpoint = trained / "fold_0" / "checkpoint_final.pth"
    done = trained / "fold_0" / "bench_rounds.json"
    if not done.is_file():
        drv_env = dict(env, BENCH_THREADS="0", nnUNet_n_proc_DA="2")
        start = None
        for i, n in enumerate(iterations):  # each round starts from the previous round's weights
            _run([nn_bin / "python", bu.BENCH / "nnunet_driver.py", "train", "--dataset", DATASET, "--device",
                  "cpu", "--epochs", 1, "--iterations", n, "--val-iterations", 1, "--result",
                  work / f"train_{i}.json"] + (["--initial-weights", start] if start else []), drv_env, log=log)
            start = work / f"round_{i}.pth"
            shutil.copyfile(checkpoint, start)
        done.write_text(json.dumps({"iterations": list(iterations)}))
    plans = json.loads(plans_file.read_text())
    folders = {}
    for preset in presets:
        p = preset_plans(plans, preset)
        folder = results / f"nnUNetTrainer__{p['plans_name']}__3d_fullres"
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        (pre / f"{p['plans_name']}.json").write_text(json.dumps(p, indent=4))
        (folder / "plans.json").write_text(json.dumps(p, indent=4))
        shutil.copyfile(trained / "dataset.json", folder / "dataset.json")
        shutil.copyfile(trained / "dataset_fingerprint.json", folder / "dataset_fingerprint.json")
        target = folder / "fold_0" / "checkpoint_final.pth"
        if not target.is_file():  # nnUNetv2_predict finds the trainer by the checkpoint's name: the stock one
            _run([nn_bin / "python", "-c", "import sys, torch; c = torch.load(sys.argv[1], weights_only=False); "
                  "c['trainer_name'] = 'nnUNetTrainer'; torch.save(c, sys.argv[2])", checkpoint, target], env,
                 log=log)
        folders[preset] = folder
    return folders


def import_bundles(work: Path, folders: dict, log: Path) -> dict:
    """Imported afresh on every run, so that the bundles carry this checkout's runtime (``scripts/``)."""
    bundles = {}
    for preset, folder in folders.items():
        out = work / "bundles" / preset
        shutil.rmtree(out, ignore_errors=True)
        _run([sys.executable, "-m", "autoplan", "import-nnunet", folder, "--out", out], bu.ours_env(0), cwd=bu.REPO,
             log=log)
        bundles[preset] = out / f"{DATASET}_3d_fullres_fold0"
    return bundles


def ensure_inference_venv(work: Path, log: Path) -> Path:
    """A venv with only ``requirements-inference.txt`` (and this interpreter's torch): a CPU inference machine's
    install. Rebuilt when that file changes; returns its python."""
    import hashlib
    from importlib.metadata import version

    requirements = bu.REPO / "requirements-inference.txt"
    venv = work / "inference-venv"
    python = venv / "bin" / "python"
    stamp = venv / "requirements.sha256"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if not python.is_file() or not stamp.is_file() or stamp.read_text() != digest:
        shutil.rmtree(venv, ignore_errors=True)
        _run([sys.executable, "-m", "venv", venv], log=log)
        _run([python, "-m", "pip", "install", "-q", f"torch=={version('torch').split('+')[0]}"], log=log)
        _run([python, "-m", "pip", "install", "-q", "-r", requirements], log=log)
        stamp.write_text(digest)
    return python


# --- ours, inside the measured process ---------------------------------------------------------------------------
class _Timed:
    """Calls ``inner`` and appends ``{"phase", "s", "pid"}`` to a JSON-lines file (works from loader workers); in
    the main process the memory monitor attributes the peak to the phase."""

    monitor = None

    def __init__(self, inner, phase: str, log: str):
        self.inner, self.phase, self.log = inner, phase, log

    def __call__(self, *args, **kwargs):
        if _Timed.monitor is not None:
            _Timed.monitor.phase(self.phase)
        t = time.perf_counter()
        out = self.inner(*args, **kwargs)
        with open(self.log, "a") as f:
            f.write(json.dumps({"phase": self.phase, "s": time.perf_counter() - t, "pid": os.getpid()}) + "\n")
        if _Timed.monitor is not None:
            _Timed.monitor.phase("other")
        return out


def ours_predict(args) -> int:
    """The bundle's inference.json on the benchmark case, with the phases timed (runs in the measured process)."""
    started = time.perf_counter()
    bundle = Path(args.bundle).resolve()
    os.chdir(bundle)
    sys.path.insert(0, str(bundle))
    import torch
    from monai.bundle import ConfigWorkflow
    from treemem import TreeMemoryMonitor

    _Timed.monitor = TreeMemoryMonitor() if args.memory else None

    if args.threads:
        torch.set_num_threads(args.threads)
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                              meta_file=str(bundle / "configs" / "metadata.json"), logging_file=False,
                              workflow_type="infer", bundle_root=str(bundle), dataset_dir=str(args.input),
                              output_dir=str(args.output), use_tta=True, device=torch.device("cpu"),
                              **{"dataloader#num_workers": args.workers})
    workflow.initialize()
    parser = workflow.parser
    compose = parser.get_parsed_content("preprocessing")  # the dataset's Compose: its transforms are wrapped
    compose.transforms = tuple(_Timed(t, "load" if type(t).__name__ in ("LoadImaged", "ChannelFirstd")
                                      else "preprocess", args.split_log) for t in compose.transforms)
    post = parser.get_parsed_content("postprocessing")
    post.transforms = tuple(_Timed(t, {"NnUNetRestored": "resample_back", "SaveImaged": "write"}.get(
        type(t).__name__, "postprocess_other"), args.split_log) for t in post.transforms)
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.inferer = _Timed(evaluator.inferer, "network", args.split_log)
    setup_s = time.perf_counter() - started
    workflow.run()
    workflow.finalize()
    Path(args.result).write_text(json.dumps({"setup_s": setup_s, "threads": torch.get_num_threads(),
                                             "run_s": time.perf_counter() - started - setup_s,
                                             "peak_mb_by_phase": _Timed.monitor.stop() if args.memory else None}))
    return 0


def ours_run(args, work: Path, tag: str, bundle: Path, big: Path, out: Path, memory: bool, env: dict,
             python) -> dict:
    """One measured ``ours-predict`` subprocess under ``python``; with its phase split (and, in memory runs, peaks
    per phase)."""
    split = work / f"{tag}.split.jsonl"
    split.unlink(missing_ok=True)
    cmd = [python, Path(__file__).resolve(), "ours-predict", "--bundle", bundle, "--input", big, "--output",
           out, "--workers", args.processes - 1, "--threads", args.threads, "--split-log", split, "--result",
           work / f"{tag}.json"] + (["--memory"] if memory else [])
    m = bu.run_measured(cmd, env=env, log=work / f"{tag}.log", memory=memory)
    if split.is_file():
        phases: dict = {}
        for line in split.read_text().splitlines():
            rec = json.loads(line)
            phases[rec["phase"]] = phases.get(rec["phase"], 0.0) + rec["s"]
        m["split_s"] = phases
    if (work / f"{tag}.json").is_file():
        m["driver"] = json.loads((work / f"{tag}.json").read_text())
    m["cmd"] = cmd
    return m


# --- comparison --------------------------------------------------------------------------------------------------
def agreement(ours_file: Path, nn_file: Path, labels) -> dict:
    import nibabel as nib
    import numpy as np

    a = np.asarray(nib.load(str(ours_file)).dataobj)
    b = np.asarray(nib.load(str(nn_file)).dataobj)
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    out = {"voxel_agreement": float((a == b).mean()), "voxels": int(a.size), "dice": {}}
    for label in labels:
        x, y = a == label, b == label
        denom = int(x.sum()) + int(y.sum())
        out["dice"][str(label)] = 1.0 if denom == 0 else 2.0 * int((x & y).sum()) / denom
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="CPU inference on a large anisotropic case: ours vs nnUNetv2_predict.")
    sub = ap.add_subparsers(dest="command")
    o = sub.add_parser("ours-predict", help="(internal) our side, run by the benchmark in a measured process")
    o.add_argument("--bundle", required=True)
    o.add_argument("--input", required=True)
    o.add_argument("--output", required=True)
    o.add_argument("--workers", type=int, default=1)
    o.add_argument("--threads", type=int, default=0)
    o.add_argument("--split-log", required=True)
    o.add_argument("--result", required=True)
    o.add_argument("--memory", action="store_true", help="poll the process tree's memory per phase")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"cached setup (default {DEFAULT_WORK})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--processes", type=int, default=2, help="nnU-Net's -npp/-nps; ours: DataLoader workers + 1")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (default: torch's default)")
    ap.add_argument("--features", type=int, default=4, help="the network's first-stage features (doubling, capped "
                                                            "by nnU-Net's plan; default 4)")
    ap.add_argument("--iterations", type=int, nargs="+", default=[250, 300],
                    help="training rounds of 1 epoch of this many iterations, each from the previous round's weights "
                         "(default 250 300)")
    ap.add_argument("--big-shape", type=int, nargs=3, default=[512, 512, 120], help="x y z")
    ap.add_argument("--big-spacing", type=float, nargs=3, default=[0.7, 0.7, 2.5], help="x y z (mm)")
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    ap.add_argument("--ours-envs", nargs="+", default=list(OURS_ENVS), choices=OURS_ENVS,
                    help="where ours runs: 'ours' in this interpreter (the development install, requirements.txt), "
                         "'ours_inference' in a venv with only requirements-inference.txt (default: both)")
    args = ap.parse_args(argv)
    if args.command == "ours-predict":
        return ours_predict(args)

    from nnunet_venv import NNUNET_VERSION, ensure_nnunet_venv

    nn_bin = ensure_nnunet_venv(args.venv).parent
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "setup.log"
    t0 = time.perf_counter()
    raw, big = make_data(work, args.big_shape, args.big_spacing)
    folders = setup_nnunet(work, nn_bin, args.features, args.iterations, args.presets, log)
    bundles = import_bundles(work, folders, log)
    print(f"setup {time.perf_counter() - t0:.0f} s (work folder {work})", flush=True)
    labels = [v for v in json.loads((raw / "dataset.json").read_text())["labels"].values() if v]
    plans = json.loads((folders[args.presets[0]] / "plans.json").read_text())["configurations"]["3d_fullres"]
    result = {"nnunet_version": NNUNET_VERSION, "cpu_count": os.cpu_count(), "processes": args.processes,
              "threads": args.threads or "torch default", "big_shape_xyz": args.big_shape,
              "big_spacing_xyz": args.big_spacing, "plan_spacing_zyx": plans["spacing"],
              "patch_size": plans["patch_size"],
              "features_per_stage": plans["architecture"]["arch_kwargs"]["features_per_stage"],
              "memory_method": bu.MEMORY_METHOD, "loadavg_start": bu.loadavg(), "runs": {}}
    nn_env = bu.nnunet_env(work, 0)
    nn_env.pop("BENCH_THREADS", None)
    nn_env["nnUNet_def_n_proc"] = str(args.processes)
    ours_env = bu.ours_env(0)
    ours_env.pop("BENCH_THREADS", None)
    lean_env = {k: v for k, v in ours_env.items() if k != "PYTHONPATH"}  # nothing from the development install
    pythons = {"ours": (sys.executable, ours_env)}
    if "ours_inference" in args.ours_envs:
        pythons["ours_inference"] = (ensure_inference_venv(work, log), lean_env)
    tools = [t for t in OURS_ENVS if t in args.ours_envs] + ["nnunet"]
    result["ours_environments"] = {t: str(pythons[t][0]) for t in tools if t != "nnunet"}
    exit_code = 0
    for preset in args.presets:
        plans_name = json.loads((folders[preset] / "plans.json").read_text())["plans_name"]
        for rep in range(args.repeats):
            order = tools if rep % 2 == 0 else tools[::-1]
            outs = {}
            for kind in ("time", "memory"):  # wall times unpolled; peaks from separate, polled runs
                for tool in order:
                    key = f"{preset}/{tool}/{rep}" + ("/memory" if kind == "memory" else "")
                    out = work / "predictions" / preset / f"{tool}_{rep}_{kind}"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    tag = f"{preset}_{tool}_{rep}_{kind}"
                    if tool == "nnunet":
                        cmd = [nn_bin / "nnUNetv2_predict", "-i", big, "-o", out, "-d", DATASET_ID, "-c",
                               "3d_fullres", "-f", "0", "-p", plans_name, "-device", "cpu", "-npp", args.processes,
                               "-nps", args.processes]
                        m = bu.run_measured(cmd, env=nn_env, log=work / f"{tag}.log", memory=kind == "memory")
                    else:
                        python, env = pythons[tool]
                        m = ours_run(args, work, tag, bundles[preset], big, out, kind == "memory", env, python)
                        cmd = m.pop("cmd")
                    m["command"] = " ".join(str(c) for c in cmd)
                    files = sorted(out.glob("*.nii.gz"))
                    if m["returncode"] != 0 or len(files) != 1:
                        exit_code = 2
                        m["error_tail"] = bu.log_tail(work / f"{tag}.log")
                        bu.print_failure(key, m)
                    elif kind == "time":
                        outs[tool] = files[0]
                    print(f"{key}: {m['wall_s']:.1f} s" + (
                        f", peak PSS {m['peak_pss_mb']:.0f} MB, RSS {m['peak_rss_mb']:.0f} MB, "
                        f"{m['max_processes']} processes" if kind == "memory" else "")
                        + f", foreign CPU {m['foreign_cpu_fraction']:.0%}"
                        + (f", split {json.dumps({k: round(v, 1) for k, v in m['split_s'].items()})}"
                           if m.get("split_s") else ""), flush=True)
                    result["runs"][key] = m
            for tool in (t for t in tools if t != "nnunet" and t in outs and "nnunet" in outs):
                agree = agreement(outs[tool], outs["nnunet"], labels)
                key = f"{preset}/agreement/{rep}" + ("" if tool == "ours" else f"/{tool}")
                result["runs"][key] = agree
                print(f"{key}: {json.dumps(agree)}", flush=True)
    rows = []
    for preset in args.presets:
        def ok(tool, kind):
            return [v for k, v in result["runs"].items() if k.startswith(f"{preset}/{tool}/")
                    and k.endswith("/memory") == (kind == "memory") and v["returncode"] == 0]

        nn, nn_mem = ok("nnunet", "time"), ok("nnunet", "memory")
        for tool in (t for t in tools if t != "nnunet"):
            ours, ours_mem = ok(tool, "time"), ok(tool, "memory")
            if not ours or not nn:
                continue
            best_o, best_n = min(ours, key=lambda m: m["wall_s"]), min(nn, key=lambda m: m["wall_s"])
            rows.append((f"{preset}, {tool}: wall s (best, unpolled)", best_o["wall_s"], best_n["wall_s"], ".1f"))
            if ours_mem and nn_mem:
                rows += [(f"{preset}, {tool}: peak PSS MB (max)", max(m["peak_pss_mb"] for m in ours_mem),
                          max(m["peak_pss_mb"] for m in nn_mem), ".0f"),
                         (f"{preset}, {tool}: peak RSS MB (max)", max(m["peak_rss_mb"] for m in ours_mem),
                          max(m["peak_rss_mb"] for m in nn_mem), ".0f")]
            driver = best_o.get("driver") or {}
            split = {"start-up and exit": best_o["wall_s"] - driver["run_s"] if driver else None,
                     **{phase: best_o.get("split_s", {}).get(phase)
                        for phase in ("load", "preprocess", "network", "resample_back", "write")}}
            rows += [(f"{preset}, {tool}: {phase} s", v, None, ".1f") for phase, v in split.items()]
    print()
    bu.print_table(rows, ("", "ours", "nnU-Net"))
    result["table"] = [{"metric": r[0], "ours": r[1], "nnunet": r[2], "ratio_ours_over_nnunet": bu.ratio(r[1], r[2])}
                       for r in rows]
    result["loadavg_end"] = bu.loadavg()
    bu.write_result(args.out, result)
    print(f"result written to {args.out}")
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
