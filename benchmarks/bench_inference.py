"""Benchmark inference speed and memory of our bundle against nnU-Net 2.8.1 (same plan, CPU, one process).

Both systems get a freshly initialised network (weights do not matter for speed): nnU-Net a model folder with
``fold_F/checkpoint_final.pth`` written by ``nnUNetTrainer.save_checkpoint``; ours ``models/model.pt`` =
``torch.save(network_def.state_dict())``. The bundle is emitted from nnU-Net's own ``nnUNetPlans.json``
(``../shared/reference/nnunet_plans/<dataset>/``, or nnU-Net's planner when absent).

For N cases of ``imagesTr`` (default 5, the first in sorted order), with and without mirroring TTA:

* nnU-Net: ``nnUNetPredictor(use_mirroring=..., device=cpu)`` + ``predict_from_files_sequential`` one case at a
  time (no multiprocessing): read, preprocess, sliding window, resample back, write.
* ours: the bundle's ``configs/inference.json`` through ``ConfigWorkflow`` (``--use_tta``), ``num_workers`` 0;
  per case from the evaluator's get-batch event to its iteration-completed event: load, preprocess, sliding
  window, restore, write.

Seconds per case are reported as the median over cases 2..N (the first case carries one-off costs, reported apart)
and the mean over all; setup (model load) and the whole subprocess's wall time separately. Every run is repeated
(``--repeats``, default 2, alternating which system goes first) and the least disturbed repeat is reported: the
machines are shared, and a competing process can slow a run several-fold. Peak memory is the peak
summed PSS (and RSS) of the process tree. ``foreign_cpu_fraction`` records how busy the (shared) machine was.

Usage::

    python benchmarks/bench_inference.py                  # 5 Hippocampus cases, TTA on and off
    python benchmarks/bench_inference.py --cases 10 --threads 2 --only ours
    python benchmarks/bench_inference.py --device cuda --cases 20   # on a GPU machine

Writes ``benchmarks/results/inference.json``. Exit status: 0 ok, 2 a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
from nnunet_venv import NNUNET_VERSION, ensure_nnunet_venv, venv_bin  # noqa: E402

DEFAULT_OUT = bu.BENCH / "results" / "inference.json"


def list_image_cases(images_dir: Path, file_ending: str, num_channels: int, n: int) -> list[dict]:
    cases = sorted({p.name[: -len(file_ending) - 5] for p in images_dir.glob(f"*_0000{file_ending}")})[:n]
    return [{"case": c, "image": [str(images_dir / f"{c}_{i:04d}{file_ending}") for i in range(num_channels)]}
            for c in cases]


def summarize(per_case: list[dict]) -> dict:
    secs = [c["seconds"] for c in per_case]
    rest = secs[1:] if len(secs) > 1 else secs
    return {"per_case_median_s": statistics.median(rest), "per_case_mean_s": statistics.fmean(secs),
            "per_case_min_s": min(secs),
            "first_case_s": secs[0] if secs else None, "cases": len(secs), "all_s": secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Inference speed/memory of our bundle vs nnU-Net 2.8.1 (CPU).")
    bu.add_runner_arguments(ap, DEFAULT_OUT, "keep the work folder (predictions, logs)")
    ap.add_argument("--cases", type=int, default=5, help="cases of imagesTr to predict (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both (default: all cores)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs per system and TTA setting, alternating order; the least disturbed is reported "
                         "(default 2)")
    ap.add_argument("--tta", choices=("both", "on", "off"), default="both")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="both systems predict on this device (nnU-Net with perform_everything_on_device on CUDA, "
                         "as nnUNetv2_predict does)")
    bu.add_quiet_wait_argument(ap)
    args = ap.parse_args(argv)

    bu.QUIET["max_wait_s"] = args.quiet_wait
    raw = bu.raw_dataset(ap, args)
    spec = json.loads((raw / "dataset.json").read_text())
    tools = ["ours", "nnunet"] if args.only == "both" else [args.only]
    ttas = {"both": [1, 0], "on": [1], "off": [0]}[args.tta]
    work = Path(tempfile.mkdtemp(prefix="autoplan_bench_infer_"))
    name, _ = bu.dataset_folder_name(raw)
    result = {"dataset": str(raw), "configuration": args.configuration, "fold": args.fold, "device": args.device,
              "nnunet_version": NNUNET_VERSION, "cpu_count": os.cpu_count(), "threads": args.threads,
              "memory_method": bu.MEMORY_METHOD, "loadavg_start": bu.loadavg(),
              "per_case_method": "median over cases 2..N of the per-case wall time (read, preprocess, sliding "
                                 "window, resample back, write); first case reported apart"}
    print(f"dataset {raw}\nwork folder {work}\nthreads {args.threads}, load average {result['loadavg_start']}",
          flush=True)
    venv_dir = ensure_nnunet_venv(args.venv).parent.parent
    nn_py = venv_bin(venv_dir, "python")

    plans = bu.plans_for(raw, work, venv_dir, 2)
    if plans is None:
        return 2
    plans_file, fp_file = plans
    result["plans_used"] = str(plans_file)
    bundle = bu.emit_bundle(plans_file, raw, work / "bundles", args.configuration, args.fold)
    nn_root = work / "nnunet"
    bu.setup_nnunet_folders(nn_root, raw, plans_file, fp_file)
    nn_env = bu.nnunet_env(nn_root, args.threads)
    ours_env = bu.ours_env(args.threads)

    n_channels = len(spec.get("channel_names", spec.get("modality", {})))
    cases = list_image_cases(raw / "imagesTr", spec["file_ending"], n_channels, args.cases)
    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps(cases, indent=1))
    result["case_ids"] = [c["case"] for c in cases]
    for c in cases:
        for f in c["image"]:
            Path(f).read_bytes()  # page cache warm for both

    exit_code = 0
    model_dir = None
    if "ours" in tools:
        m = bu.run_driver(sys.executable, "ours_driver.py", ["make-checkpoint", "--bundle", bundle], work,
                          "ours_checkpoint", env=ours_env, cwd=bu.REPO)
        if m["result"] is None:
            print(f"ours checkpoint FAILED:\n{m['error_tail']}")
            return 2
        result["ours_checkpoint"] = m["result"]
    if "nnunet" in tools:
        m = bu.run_driver(nn_py, "nnunet_driver.py", ["make-checkpoint", "--dataset", name, "--configuration",
                                                      args.configuration, "--fold", args.fold], work,
                          "nnunet_checkpoint", env=nn_env)
        if m["result"] is None:
            print(f"nnunet checkpoint FAILED:\n{m['error_tail']}")
            return 2
        result["nnunet_checkpoint"] = m["result"]
        model_dir = m["result"]["model_dir"]

    runs: dict[str, list] = {}
    for rep in range(args.repeats):
        for tta in ttas:
            for tool in (tools if rep % 2 == 0 else tools[::-1]):  # alternate who goes first
                key = f"{tool}_tta_{'on' if tta else 'off'}"
                out = work / "predictions" / f"{key}_{rep}"
                if tool == "ours":
                    m = bu.run_driver(sys.executable, "ours_driver.py",
                                      ["predict", "--bundle", bundle, "--cases", cases_file, "--out", out,
                                       "--tta", tta, "--device", args.device], work, f"{key}_{rep}",
                                      env=ours_env, cwd=bu.REPO)
                else:
                    m = bu.run_driver(nn_py, "nnunet_driver.py",
                                      ["predict", "--dataset", name, "--configuration", args.configuration,
                                       "--fold", args.fold, "--model-dir", model_dir, "--cases", cases_file,
                                       "--out", out, "--tta", tta, "--device", args.device], work,
                                      f"{key}_{rep}", env=nn_env)
                if m["result"] is None or len(m["result"].get("per_case", [])) != len(cases):
                    exit_code = 2
                    bu.print_failure(key, m)
                else:
                    m["summary"] = summarize(m["result"]["per_case"])
                    m["per_case_median_s"] = m["summary"]["per_case_median_s"]
                    if len(m["result"].get("outputs", [])) != len(cases):
                        print(f"WARNING {key}: {len(m['result'].get('outputs', []))} output files for "
                              f"{len(cases)} cases")
                    print(f"{key}: {m['summary']['per_case_median_s']:.2f} s/case (median), first "
                          f"{m['summary']['first_case_s']:.2f} s, setup {m['result']['setup_s']:.2f} s, peak PSS "
                          f"{m['peak_pss_mb']:.0f} MB (foreign CPU {m['foreign_cpu_fraction']:.0%})", flush=True)
                runs.setdefault(key, []).append(m)
    result["runs"] = {k: {"runs": v, **bu.best_of(v, "per_case_median_s")} for k, v in runs.items()}

    def get(key, *path):
        return bu.dig(result["runs"], key, *path)

    def min_over(key):  # least-disturbed single case over every repeat: robust to bursts of foreign load
        values = [r["summary"]["per_case_min_s"] for r in runs.get(key, []) if r.get("summary")]
        return min(values) if values else None

    rows = []
    for t in ("on", "off") if len(ttas) == 2 else (("on",) if ttas == [1] else ("off",)):
        o, n = f"ours_tta_{t}", f"nnunet_tta_{t}"
        b = ("best", "summary")
        rows += [(f"TTA {t}: s/case (median, cases 2..N)", get(o, *b, "per_case_median_s"),
                  get(n, *b, "per_case_median_s"), ".2f"),
                 (f"TTA {t}: s/case (fastest case, any repeat)", min_over(o), min_over(n), ".2f"),
                 (f"TTA {t}: s/case (mean, all)", get(o, *b, "per_case_mean_s"), get(n, *b, "per_case_mean_s"),
                  ".2f"),
                 (f"TTA {t}: first case s", get(o, *b, "first_case_s"), get(n, *b, "first_case_s"), ".2f"),
                 (f"TTA {t}: model setup s", get(o, "best", "result", "setup_s"), get(n, "best", "result", "setup_s"),
                  ".2f"),
                 (f"TTA {t}: process wall s (incl. imports)", get(o, "best", "wall_s"), get(n, "best", "wall_s"),
                  ".1f"),
                 (f"TTA {t}: peak PSS MB", get(o, "peak_pss_mb_max"), get(n, "peak_pss_mb_max"), ".0f"),
                 (f"TTA {t}: peak RSS MB", get(o, "peak_rss_mb_max"), get(n, "peak_rss_mb_max"), ".0f")]
        if args.device == "cuda":
            rows.append((f"TTA {t}: peak GPU MB (torch allocator)", get(o, "best", "result", "cuda_peak_allocated_mb"),
                         get(n, "best", "result", "cuda_peak_allocated_mb"), ".0f"))
    print()
    if args.repeats > 1:
        print(f"(best of {args.repeats} repeats per system; memory: maximum over repeats)")
    bu.print_table(rows, ("", "ours", "nnU-Net"))
    result["table"] = [{"metric": r[0], "ours": r[1], "nnunet": r[2], "ratio_ours_over_nnunet": bu.ratio(r[1], r[2])}
                       for r in rows]
    result["foreign_cpu_fraction"] = {k: [round(m.get("foreign_cpu_fraction", 0), 3) for m in v]
                                      for k, v in runs.items()}
    result["loadavg_end"] = bu.loadavg()
    print(f"\nforeign CPU load during each run (0 = quiet machine): {result['foreign_cpu_fraction']}")
    print(f"load average at start {result['loadavg_start']}, end {result['loadavg_end']}")
    bu.finish(args.out, result, work, args.keep)
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
