"""Benchmark training speed and memory of our bundle against nnU-Net 2.8.1, with the SAME plan.

On one dataset (default ``../shared/data/Dataset004_Hippocampus``), one configuration (``3d_fullres``) and fold 0:

0. Plans: nnU-Net's own ``nnUNetPlans.json`` (``../shared/reference/nnunet_plans/<dataset>/``; made with nnU-Net's
   planner in its venv when absent) is used by BOTH systems: the bundle is emitted from it. Our planner
   (``python -m autoplan run``) is run too and its plans are compared with nnU-Net's (exact, except the sampled
   intensity statistics, within 1 % of the p0.5-p99.5 range); a mismatch makes the exit status 1.
1. Preprocessing of every labelled case, timed separately: ``nnUNetv2_preprocess -c 3d_fullres -np P`` against our
   cache build (``scripts.data.preprocess_to_cache``, what the bundle's training does on first use, P workers).
2. Data pipeline alone: batches per second of ``next()`` on nnU-Net's ``get_dataloaders()`` augmenter
   (``nnUNet_n_proc_DA`` = W workers) and on the bundle's ``train#dataloader`` (``num_workers`` = W), same batch
   size (the plan's), after a warm-up that drains their prefetch queues. Both validation loaders run beside them
   (W // 2 workers, at least 1), as in training. W is not capped at the core count in either system (nnU-Net's
   driver lifts nnU-Net's cap, see ``nnunet_driver.py``), so both run the same processes.
3. The loaders across epochs: both systems' training and validation loaders consumed as their training loops
   consume them (nnU-Net: ``run_training()``'s order; ours: ignite engines over the loaders the bundle's trainer
   and evaluator are given), ``--loop-epochs`` epochs of ``--loop-batches`` training batches, each followed by
   ``--loop-val-batches`` validation batches, with sleeps of ``--loop-step-s`` (0.02 s for validation) in place of
   the steps. Reported: the epoch's wall time beyond its sleeps and the waits for the first training and first
   validation batch, medians of the epochs after the first. Choose a step longer than a batch takes to make (the
   default suits 2 workers on a CPU; on a GPU machine use the measured step, e.g. ``--loop-step-s 0.02
   --loop-batches 250 --loop-val-batches 50``).
4. Training iterations (peak memory of the timed iterations from a monitor thread in each driver, and of the whole
   subprocess from outside): nnU-Net's ``nnUNetTrainer`` (``on_train_start()``, then ``next(dataloader_train)`` and
   ``train_step()`` timed separately) against the bundle's ``train#trainer`` (MONAI ``SupervisedTrainer`` with the
   bundle's network, loss, optimizer and dataloader, train handlers removed; data and step time from the engine's
   events). The first ``--warmup`` iterations are discarded; then a few more batches are drawn, the loaders are
   stopped, and those iterations are split into forward / loss / backward / clip+optimizer (+ MONAI's decollate)
   for both.

Each phase of each system runs in its own subprocess (nnU-Net's in its venv, see ``nnunet_venv.py``), with the same
torch thread count; peak memory is the peak summed PSS (and RSS) of the process tree (workers included), /proc polled
every 50 ms. The machines are shared: before each run the benchmark waits (``--quiet-wait``, default up to 60 s) for
the machine to be less than 25 % busy, each measurement records ``foreign_cpu_fraction`` (CPU time used by other
processes over wall x cores; 0 = quiet machine), printed beside the table, and ``--repeats R`` runs every phase R
times in alternating order and reports the least disturbed run.

If the bundle's ``train#preprocessing`` returns labels of different dtypes with and without the spatial augmentation
(a collation crash), ``--label-float auto`` (default) adds ``dtype=float32`` to its final ``EnsureTyped`` and says
so; ``off`` runs it unchanged.

Usage::

    python benchmarks/bench_training.py                              # Hippocampus, 10 timed iterations + 2 warm-up
    python benchmarks/bench_training.py --iterations 20 --warmup 3 --workers 2 --threads 2
    python benchmarks/bench_training.py --repeats 2 --quiet-wait 120  # steadier on a shared machine
    python benchmarks/bench_training.py --only ours --skip-plan-check
    python benchmarks/bench_training.py --device cuda --workers 12 --iterations 50 --warmup 10  # GPU machine

Writes ``benchmarks/results/training.json``. Exit status: 0 ok, 1 plans differ, 2 a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
from nnunet_venv import NNUNET_VERSION, ensure_nnunet_venv, venv_bin  # noqa: E402

DEFAULT_OUT = bu.BENCH / "results" / "training.json"


def _timed(values: list[float], warmup: int) -> list[float]:
    return values[warmup:] if len(values) > warmup else values


def summarize_train(r: dict, warmup: int) -> dict:
    data = _timed(r["data_s"], warmup)
    step = _timed(r["step_s"], warmup)
    total = [a + b for a, b in zip(data, step)]
    out = {"iteration_s": bu.stats(total), "data_wait_s": bu.stats(data), "step_s": bu.stats(step),
           "step_cpu_s": bu.stats(_timed(r.get("step_cpu_s", []), warmup))}
    if r.get("breakdown"):
        keys = [k for k in r["breakdown"][0] if isinstance(r["breakdown"][0][k], float)]
        out["breakdown_median_s"] = {k: bu.stats([b[k] for b in r["breakdown"]])["median"] for k in keys}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Training speed/memory of our bundle vs nnU-Net 2.8.1 (same plan).")
    bu.add_runner_arguments(ap, DEFAULT_OUT, "keep the work folder")
    ap.add_argument("--iterations", type=int, default=10, help="timed training iterations (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="training iterations discarded first (default 2)")
    ap.add_argument("--breakdown", type=int, default=3, help="extra iterations split into parts (default 3)")
    ap.add_argument("--loader-batches", type=int, default=150, help="timed data-loader batches (default 150)")
    ap.add_argument("--loader-warmup", type=int, default=8, help="data-loader batches discarded (default 8)")
    ap.add_argument("--loop-epochs", type=int, default=4,
                    help="epochs of the loader loop with simulated steps (default 4; 0 or 1 skips it)")
    ap.add_argument("--loop-batches", type=int, default=12, help="training batches per loop epoch (default 12)")
    ap.add_argument("--loop-val-batches", type=int, default=6, help="validation batches per loop epoch (default 6)")
    ap.add_argument("--loop-step-s", type=float, default=0.25,
                    help="simulated training step, s (default 0.25: slower than 2 workers' batches)")
    ap.add_argument("--workers", type=int, default=2, help="data-loading worker processes, both (default 2)")
    ap.add_argument("--processes", type=int, default=2, help="preprocessing / planning processes (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both (default: all cores)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every phase per system, in alternating order; the least disturbed is reported")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="device of the timed training iterations, both systems (AMP on CUDA in both, as in their "
                         "training); the per-part breakdown is CPU only")
    ap.add_argument("--skip-plan-check", action="store_true", help="do not run our planner for the plan comparison")
    ap.add_argument("--label-float", choices=("auto", "on", "off"), default="auto")
    bu.add_quiet_wait_argument(ap)
    args = ap.parse_args(argv)

    bu.QUIET["max_wait_s"] = args.quiet_wait
    raw = bu.raw_dataset(ap, args)
    tools = ["ours", "nnunet"] if args.only == "both" else [args.only]
    work = Path(tempfile.mkdtemp(prefix="autoplan_bench_train_"))
    name, ds_id = bu.dataset_folder_name(raw)
    result = {"dataset": str(raw), "configuration": args.configuration, "fold": args.fold, "device": args.device,
              "nnunet_version": NNUNET_VERSION, "cpu_count": os.cpu_count(), "threads": args.threads,
              "workers": args.workers, "processes": args.processes, "iterations": args.iterations,
              "warmup": args.warmup, "memory_method": bu.MEMORY_METHOD, "loadavg_start": bu.loadavg(),
              "noise_note": "foreign_cpu_fraction = CPU used by other processes / (wall x cores) during a run"}
    print(f"dataset {raw}\nwork folder {work}\nthreads {args.threads}, workers {args.workers}, "
          f"load average {result['loadavg_start']}", flush=True)
    exit_code = 0
    venv_dir = ensure_nnunet_venv(args.venv).parent.parent
    nn_py = venv_bin(venv_dir, "python")

    # ---- 0. plans --------------------------------------------------------------------------------------------------
    plans = bu.plans_for(raw, work, venv_dir, args.processes, announce=True)
    if plans is None:
        return 2
    plans_file, fp_file = plans
    result["plans_used"] = str(plans_file)
    if not args.skip_plan_check:
        ours_plans, m = bu.run_our_planner(raw, work, args.processes)
        check = {"command": m["command"], "returncode": m["returncode"]}
        if ours_plans.is_file():
            check |= bu.compare_plans(json.loads(ours_plans.read_text()), json.loads(Path(plans_file).read_text()))
            ok = check["identical_except_sampled_intensity_stats"]
            print(f"our plans vs nnU-Net's: {'IDENTICAL' if ok else 'DIFFERENT'} (sampled intensity statistics within "
                  f"{check['max_intensity_rel_diff'] * 100:.3f}% of the range; {len(check['differences'])} other "
                  f"differences)", flush=True)
            for d in check["differences"][:20]:
                print(f"  {d['key']}: ours {d['ours']} vs nnU-Net {d['nnunet']}")
            exit_code = 0 if ok else 1
        else:
            print(f"our planner failed (exit {m['returncode']}):\n{bu.log_tail(work / 'ours_plan.log')}")
            check["error_tail"] = bu.log_tail(work / "ours_plan.log")
            exit_code = 1
        result["plan_check"] = check

    bundle = bu.emit_bundle(plans_file, raw, work / "bundles", args.configuration, args.fold)
    nn_root = work / "nnunet"
    bu.setup_nnunet_folders(nn_root, raw, plans_file, fp_file)
    nn_env = bu.nnunet_env(nn_root, args.threads, args.workers)
    ours_env = bu.ours_env(args.threads)
    print(f"bundle {bundle}", flush=True)

    def failed(tool, phase, m):
        nonlocal exit_code
        exit_code = 2
        bu.print_failure(f"{tool} {phase}", m)

    def order(rep):  # alternate which system goes first, so slow drifts of the machine's load hit both alike
        return tools if rep % 2 == 0 else tools[::-1]

    # ---- 1. preprocessing ------------------------------------------------------------------------------------------
    for f in sorted(raw.rglob("*")):  # page cache warm for both
        if f.is_file():
            f.read_bytes()
    pre = {t: [] for t in tools}
    for rep in range(args.repeats):
        for tool in order(rep):
            if tool == "nnunet":
                cmd = [venv_bin(venv_dir, "nnUNetv2_preprocess"), "-d", ds_id, "-plans_name",
                       Path(plans_file).stem, "-c", args.configuration, "-np", args.processes, "--no_pbar"]
                quiet = bu.maybe_wait_for_quiet()
                m = bu.run_measured(cmd, env=nn_env, log=work / f"nnunet_preprocess_{rep}.log")
                m["quiet_wait"] = quiet
                m["command"] = "nnUNetv2_preprocess " + " ".join(str(c) for c in cmd[1:])
                if m["returncode"] != 0:
                    m["error_tail"] = bu.log_tail(work / f"nnunet_preprocess_{rep}.log")
            else:  # the first run fills the bundle's own cache, later ones a fresh folder each
                extra = [] if rep == 0 else ["--cache-dir", work / f"ours_cache_{rep}"]
                m = bu.run_driver(sys.executable, "ours_driver.py", ["preprocess", "--bundle", bundle, "--workers",
                                                                       args.processes, *extra],
                                  work, f"ours_preprocess_{rep}", env=ours_env, cwd=bu.REPO)
                if m["result"] is None:
                    m["returncode"] = m["returncode"] or -1
            if m["returncode"] != 0:
                failed(tool, "preprocessing", m)
            pre[tool].append(m)
            print(f"{tool} preprocessing: {m['wall_s']:.1f} s wall, {m['tree_cpu_s']:.1f} s CPU, peak PSS "
                  f"{m['peak_pss_mb']:.0f} MB (foreign CPU {m['foreign_cpu_fraction']:.0%})", flush=True)
    result["preprocessing"] = {t: {"runs": runs, **bu.best_of(runs, "wall_s")} for t, runs in pre.items()}
    if exit_code == 2:
        bu.write_result(args.out, result)
        return 2

    # ---- label dtype probe -----------------------------------------------------------------------------------------
    label_float = args.label_float == "on"
    if "ours" in tools and args.label_float == "auto":
        m = bu.run_driver(sys.executable, "ours_driver.py", ["probe-label-dtype", "--bundle", bundle], work,
                          "ours_probe", env=ours_env, cwd=bu.REPO)
        result["label_dtype_probe"] = m["result"] or {"error_tail": m.get("error_tail")}
        if m["result"] and m["result"].get("mixed"):
            label_float = True
            print(f"WARNING: the bundle's train#preprocessing gives labels of dtype "
                  f"{m['result']['label_dtypes']} with/without spatial augmentation; DataLoader cannot collate such a "
                  f"batch. Measuring with EnsureTyped(dtype=float32) appended (--label-float).", flush=True)
    result["label_float_workaround"] = label_float
    lf = ["--label-float"] if label_float else []

    def drive(tool, command, common, log_name):
        """One driver subcommand for one system in its own process: ours on the bundle, nnU-Net's on its dataset."""
        if tool == "ours":
            return bu.run_driver(sys.executable, "ours_driver.py", [command, "--bundle", bundle, "--workers",
                                                                    args.workers, *common, *lf],
                                 work, f"ours_{log_name}", env=ours_env, cwd=bu.REPO)
        return bu.run_driver(nn_py, "nnunet_driver.py", [command, "--dataset", name, "--configuration",
                                                         args.configuration, "--fold", args.fold, *common],
                             work, f"nnunet_{log_name}", env=nn_env)

    def measured_runs(command, common, phase, log_name, on_result):
        """``args.repeats`` runs of one driver subcommand per system, alternating which goes first."""
        runs = {t: [] for t in tools}
        for rep in range(args.repeats):
            for tool in order(rep):
                m = drive(tool, command, common, f"{log_name}_{rep}")
                if m["result"] is None:
                    failed(tool, phase, m)
                else:
                    on_result(tool, m)
                runs[tool].append(m)
        return runs

    # ---- 2. data loader alone --------------------------------------------------------------------------------------
    def loader_done(tool, m):
        m["batches_per_s"] = m["result"]["batches_per_s"]
        m["train_workers"], m["val_workers"] = m["result"]["workers"]
        print(f"{tool} dataloader: {m['batches_per_s']:.2f} batches/s, peak PSS {m['peak_pss_mb']:.0f} MB, "
              f"workers {m['train_workers']} + {m['val_workers']} validation "
              f"(foreign CPU {m['foreign_cpu_fraction']:.0%})", flush=True)

    loaders = measured_runs("dataloader", ["--warmup", args.loader_warmup, "--batches", args.loader_batches],
                            "dataloader", "dataloader", loader_done)
    result["dataloader"] = {t: {"runs": runs, **bu.best_of(runs, "batches_per_s", higher=True)}
                            for t, runs in loaders.items()}

    # ---- 3. the loaders across epochs ------------------------------------------------------------------------------
    def epochs_done(tool, m):
        r = m["result"]
        m["overhead_median_s"] = r["overhead_s"]["median"]
        print(f"{tool} loaders across epochs: {r['overhead_s']['median']:.3f} s per epoch beyond the simulated steps, "
              f"first batch waits: training {r['first_train_wait_s']['median']:.3f} s, validation "
              f"{r['first_val_wait_s']['median']:.3f} s (medians of epochs 2-{args.loop_epochs}; foreign CPU "
              f"{m['foreign_cpu_fraction']:.0%})", flush=True)

    if args.loop_epochs > 1:
        loops = measured_runs("epochs", ["--epochs", args.loop_epochs, "--batches-per-epoch", args.loop_batches,
                                         "--val-batches", args.loop_val_batches, "--step-s", args.loop_step_s,
                                         "--device", args.device], "epoch loop", "epochs", epochs_done)
        result["epoch_loop"] = {t: {"runs": runs, **bu.best_of(runs, "overhead_median_s")} for t, runs in loops.items()}

    # ---- 4. training iterations ------------------------------------------------------------------------------------
    def train_done(tool, m):
        m["summary"] = summarize_train(m["result"], args.warmup)
        m["iteration_median_s"] = m["summary"]["iteration_s"]["median"]
        s = m["summary"]["iteration_s"]
        print(f"{tool} training: {s['median']:.2f} s/iteration (median of {s['n']}), step CPU "
              f"{m['summary']['step_cpu_s'].get('median', float('nan')):.2f} s, peak PSS "
              f"{m['peak_pss_mb']:.0f} MB (foreign CPU {m['foreign_cpu_fraction']:.0%})", flush=True)

    # the breakdown times unsynchronised parts of a step without AMP: meaningful on a CPU only
    trains = measured_runs("train-steps", ["--iterations", args.iterations, "--warmup", args.warmup, "--device",
                                           args.device, "--breakdown", args.breakdown if args.device == "cpu" else 0],
                           "training", "train", train_done)
    result["training"] = {t: {"runs": runs, **bu.best_of(runs, "iteration_median_s")} for t, runs in trains.items()}
    for t, v in result["training"].items():
        # per-part times: the fastest over every repeat's breakdown iterations (bursts of foreign load only add)
        split = [b for r in v["runs"] if r.get("result") for b in r["result"].get("breakdown", [])]
        if split:
            parts = [k for k in split[0] if isinstance(split[0][k], float)]
            v["breakdown_min_s"] = {k: min(b[k] for b in split) for k in parts}
            v["breakdown_iterations"] = len(split)
        # memory of the timed iterations alone (the drivers' own monitor)
        timed = [r["result"]["memory_by_phase"]["timed"] for r in v["runs"]
                 if r.get("result") and "timed" in r["result"].get("memory_by_phase", {})]
        if timed:
            v["timed_peak_pss_mb_max"] = max(m["peak_pss_mb"] for m in timed)
            v["timed_peak_rss_mb_max"] = max(m["peak_rss_mb"] for m in timed)

    # ---- splits ----------------------------------------------------------------------------------------------------
    nn_split = nn_root / "nnUNet_preprocessed" / name / "splits_final.json"
    our_split = work / "bundles" / "splits_final.json"
    if nn_split.is_file() and our_split.is_file():
        result["splits_identical"] = json.loads(nn_split.read_text()) == json.loads(our_split.read_text())
        print(f"cross-validation splits identical: {result['splits_identical']}")

    # ---- table -----------------------------------------------------------------------------------------------------
    def get(section, tool, *keys):
        return bu.dig(result.get(section, {}), tool, *keys)

    def both(label, section, *keys, spec=".2f"):
        return (label, get(section, "ours", *keys), get(section, "nnunet", *keys), spec)

    rows = [
        both("preprocessing wall s (all cases)", "preprocessing", "best", "wall_s", spec=".1f"),
        both("preprocessing CPU s (process tree)", "preprocessing", "best", "tree_cpu_s", spec=".1f"),
        ("  ours in-process s (excl. interpreter start)", get("preprocessing", "ours", "best", "result", "seconds"),
         None, ".1f"),
        both("preprocessing peak PSS MB", "preprocessing", "peak_pss_mb_max", spec=".0f"),
        both("data-loading workers, training", "dataloader", "best", "train_workers", spec="d"),
        both("data-loading workers, validation", "dataloader", "best", "val_workers", spec="d"),
        both("dataloader batches/s", "dataloader", "best", "batches_per_s"),
        both("dataloader peak PSS MB", "dataloader", "peak_pss_mb_max", spec=".0f"),
        both("epoch loop: s per epoch beyond its steps", "epoch_loop", "best", "result", "overhead_s", "median",
             spec=".3f"),
        both("  first training batch wait s", "epoch_loop", "best", "result", "first_train_wait_s", "median",
             spec=".3f"),
        both("  first validation batch wait s", "epoch_loop", "best", "result", "first_val_wait_s", "median",
             spec=".3f"),
        both("train s/iteration (median)", "training", "best", "summary", "iteration_s", "median"),
        both("train s/iteration (mean)", "training", "best", "summary", "iteration_s", "mean"),
        both("  of which data wait s (median)", "training", "best", "summary", "data_wait_s", "median", spec=".3f"),
        both("  of which step s (median)", "training", "best", "summary", "step_s", "median"),
        both("  step CPU s, main process (median)", "training", "best", "summary", "step_cpu_s", "median"),
    ]
    for part in ("forward", "loss", "backward", "clip_and_optimizer", "decollate"):
        rows.append(both(f"  part, fastest of repeats: {part} s", "training", "breakdown_min_s", part,
                         spec=".3f"))
    rows.append(both("training peak PSS MB, timed iterations (tree)", "training", "timed_peak_pss_mb_max",
                     spec=".0f"))
    rows.append(both("training peak RSS MB, timed iterations (tree)", "training", "timed_peak_rss_mb_max",
                     spec=".0f"))
    rows.append(both("training peak PSS MB, whole run (tree)", "training", "peak_pss_mb_max", spec=".0f"))
    if args.device == "cuda":
        rows.append(both("training peak GPU MB (torch allocator)", "training", "best", "result",
                         "cuda_peak_allocated_mb", spec=".0f"))
    print()
    if args.repeats > 1:
        print(f"(best of {args.repeats} repeats per system; memory: maximum over repeats)")
    bu.print_table(rows, ("", "ours", "nnU-Net"))
    result["table"] = [{"metric": r[0].strip(), "ours": r[1], "nnunet": r[2], "ratio_ours_over_nnunet":
                        bu.ratio(r[1], r[2])} for r in rows]
    noise = {f"{sec}.{tool}": [round(m.get("foreign_cpu_fraction", 0), 3) for m in v["runs"]]
             for sec in ("preprocessing", "dataloader", "epoch_loop", "training") for tool, v in result.get(sec, {}).items()}
    result["foreign_cpu_fraction"] = noise
    result["loadavg_end"] = bu.loadavg()
    print(f"\nforeign CPU load during each run (0 = quiet machine): {noise}")
    print(f"load average at start {result['loadavg_start']}, end {result['loadavg_end']}")
    if label_float:
        print("NOTE: ours measured with --label-float (EnsureTyped dtype=float32) because the stock pipeline "
              "cannot collate mixed label dtypes")

    bu.finish(args.out, result, work, args.keep)
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
