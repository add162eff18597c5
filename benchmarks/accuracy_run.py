"""Train one fold with the same plan and the same budget in our bundle and in nnU-Net 2.8.1, then compare the Dice
of their final validation (both with mirroring TTA, both written as nnU-Net's ``summary.json``).

* Plan: nnU-Net's own ``nnUNetPlans.json`` (``../shared/reference/nnunet_plans/<dataset>/``, or nnU-Net's planner
  when absent) for both; the bundle is emitted from it.
* Split: nnU-Net's 5-fold split (``autoplan.splits``, identical to nnU-Net's ``splits_final.json``), written for
  both systems; ``--val-cases K`` keeps only the first K validation cases of the fold (for a quick check), the
  training cases are unchanged.
* nnU-Net: ``nnUNetv2_preprocess``, then ``nnUNetTrainer`` with ``num_epochs`` / ``num_iterations_per_epoch`` /
  ``num_val_iterations_per_epoch`` set (a subclass defined in ``nnunet_driver.py``, nothing else changed),
  ``run_training()`` + ``perform_actual_validation()``.
* ours: ``python -m monai.bundle run training --config_file configs/train.json --epochs E --iterations_per_epoch I
  --val_iterations V --num_workers W --device ...`` in the bundle (preprocessing cache, training, final validation
  into ``eval/validation/summary.json``).
* Initial weights (``--init same``, the default): nnU-Net draws one network (``torch.manual_seed(--seed)``, its own
  He init), saved as its ``checkpoint_final.pth``; both systems start from it (nnU-Net's trainer loads every weight
  after ``initialize()``, the bundle takes ``--initial_weights``, renamed into DynUNet). The initial draw alone
  moves a short run's Dice a lot (one draw's first loss can be twice another's), so a short budget compares the
  training, not the luck of two draws. ``--init own`` lets each system draw its own, as a user's runs would.

Reports per-label Dice (mean over validation cases) of both and the difference ours - nnU-Net, the training time
and the epoch times; writes ``benchmarks/results/accuracy.json``. With a short budget the Dice values say little
about accuracy (they are dominated by chance): a meaningful comparison needs a GPU, e.g.::

    python benchmarks/accuracy_run.py --device cuda --epochs 100 --iterations 250 --val-iterations 50 --workers 12

(``--compile`` compiles the network in both, nnU-Net's default on CUDA, the bundle's ``--compile True``; without it
both run eagerly.)

(on a GPU machine the nnU-Net venv of ``nnunet_venv.py`` needs a CUDA build of torch; ``--venv`` points at one).

Quick check that the machinery works (CPU, a few minutes)::

    python benchmarks/accuracy_run.py --epochs 1 --iterations 3 --val-iterations 2 --val-cases 4

Exit status: 0 ok, 2 a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
from nnunet_venv import NNUNET_VERSION, ensure_nnunet_venv, venv_bin  # noqa: E402

DEFAULT_OUT = bu.BENCH / "results" / "accuracy.json"


def make_splits(raw: Path, fold: int, val_cases: int | None, out: Path) -> dict:
    """nnU-Net's 5-fold split of the dataset's cases, the fold's validation list cut to ``val_cases``."""
    sys.path.insert(0, str(bu.REPO))
    from autoplan.dataset import load_dataset
    from autoplan.splits import kfold_splits

    dataset = load_dataset(raw)
    splits = kfold_splits([c.identifier for c in dataset.cases])
    if val_cases is not None:
        splits[fold]["val"] = splits[fold]["val"][:val_cases]
    out.write_text(json.dumps(splits, indent=2))
    return splits[fold]


def dice_table(summary: dict) -> dict:
    """{label: mean Dice} from nnU-Net's summary.json schema, plus 'foreground_mean'."""
    out = {str(k): v.get("Dice") for k, v in summary.get("mean", {}).items()}
    out["foreground_mean"] = summary.get("foreground_mean", {}).get("Dice")
    out["n_cases"] = len(summary.get("metric_per_case", []))
    return out


def initial_weights(args, work: Path, raw: Path, name: str, plans_file, fp_file, venv_dir: Path) -> Path | None:
    """One freshly initialised nnU-Net network for both systems, as ``work/initial_weights.pth``; None on failure.
    It is drawn in the nnU-Net folders that the training uses (as plain ``nnUNetTrainer``, whose results folder the
    budgeted trainer does not share)."""
    root = work / "nnunet"
    bu.setup_nnunet_folders(root, raw, plans_file, fp_file)
    m = bu.run_driver(venv_bin(venv_dir, "python"), "nnunet_driver.py",
                      ["make-checkpoint", "--dataset", name, "--configuration", args.configuration, "--fold", args.fold,
                       "--seed", args.seed], work, "initial_weights", env=bu.nnunet_env(root, 1))
    if m["result"] is None:
        bu.print_failure("initial weights", m)
        return None
    path = work / "initial_weights.pth"
    shutil.copyfile(m["result"]["checkpoint"], path)
    return path


def train_nnunet(args, work: Path, raw: Path, name: str, ds_id: int, plans_file, fp_file, splits_file: Path,
                 venv_dir: Path, threads: int, init: Path | None) -> dict:
    """nnUNetv2_preprocess, then the budgeted nnUNetTrainer (training + final validation); the measured run."""
    nn_root = work / "nnunet"
    pre = bu.setup_nnunet_folders(nn_root, raw, plans_file, fp_file)
    shutil.copyfile(splits_file, pre / "splits_final.json")
    env = bu.nnunet_env(nn_root, threads, args.workers)
    env["nnUNet_def_n_proc"] = str(args.workers)  # final validation's export pool
    env["nnUNet_compile"] = "t" if args.compile else "f"
    cmd = [venv_bin(venv_dir, "nnUNetv2_preprocess"), "-d", ds_id, "-plans_name", Path(plans_file).stem,
           "-c", args.configuration, "-np", args.workers, "--no_pbar"]
    m_pre = bu.run_measured(cmd, env=env, log=work / "nnunet_preprocess.log")
    if m_pre["returncode"] != 0:
        print(f"nnunet preprocessing FAILED:\n{bu.log_tail(work / 'nnunet_preprocess.log')}", flush=True)
        return {"preprocessing": m_pre}
    print(f"nnunet preprocessing {m_pre['wall_s']:.1f} s", flush=True)
    m = bu.run_driver(venv_bin(venv_dir, "python"), "nnunet_driver.py",
                      ["train", "--dataset", name, "--configuration", args.configuration, "--fold", args.fold,
                       "--device", args.device, "--epochs", args.epochs, "--iterations", args.iterations,
                       "--val-iterations", args.val_iterations,
                       *(["--initial-weights", init] if init else [])], work, "nnunet_train", env=env)
    m["preprocessing"] = m_pre
    if m["result"] is None or not Path(m["result"]["summary"]).is_file():
        bu.print_failure("nnunet training", m)
    else:
        m["summary_json"] = m["result"]["summary"]
        print(f"nnunet: training {m['result']['train_s']:.0f} s, final validation "
              f"{m['result']['validation_s']:.0f} s, peak PSS {m['peak_pss_mb']:.0f} MB", flush=True)
    return m


def train_ours(args, work: Path, raw: Path, plans_file, splits_file: Path, threads: int, result: dict,
               init: Path | None) -> dict:
    """The bundle emitted from the same plans and split, trained with ``monai.bundle run training``; the measured
    run (preprocessing cache, training and final validation)."""
    bundle = bu.emit_bundle(plans_file, raw, work / "bundles", args.configuration, args.fold, splits_file)
    env = bu.ours_env(threads)
    overrides = []
    label_float = args.label_float == "on"
    if args.label_float == "auto":
        probe = bu.run_driver(sys.executable, "ours_driver.py", ["probe-label-dtype", "--bundle", bundle], work,
                              "ours_probe", env=env, cwd=bu.REPO)
        result["label_dtype_probe"] = probe["result"] or {"error_tail": probe.get("error_tail")}
        label_float = bool(probe["result"] and probe["result"].get("mixed"))
    if label_float:
        config = json.loads((bundle / "configs" / "train.json").read_text())
        transforms = config["train"]["preprocessing"]["transforms"]
        idx = [i for i, t in enumerate(transforms) if str(t.get("_target_", "")).endswith("EnsureTyped")][-1]
        overrides = [f"--train#preprocessing#transforms#{idx}#dtype", "$torch.float32"]
        print("WARNING: the bundle's train#preprocessing gives mixed label dtypes (DataLoader collation crash); "
              "training with EnsureTyped(dtype=float32)", flush=True)
    result["label_float_workaround"] = label_float
    device = "$torch.device('cuda:0')" if args.device == "cuda" else "$torch.device('cpu')"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--epochs", args.epochs, "--iterations_per_epoch", args.iterations, "--val_iterations",
           args.val_iterations, "--num_workers", args.workers, "--device", device, "--compile", str(args.compile),
           *(["--initial_weights", init] if init else []), *overrides]
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(threads)
    m = bu.run_measured(cmd, env=env, cwd=bundle, log=work / "ours_train.log")
    m["command"] = f"(cd {bundle} && " + " ".join(str(c) if " " not in str(c) and "$" not in str(c)
                                                   else repr(str(c)) for c in cmd) + ")"
    summary = bundle / "eval" / "validation" / "summary.json"
    progress = bundle / "eval" / "progress.json"
    if m["returncode"] != 0 or not summary.is_file():
        m["error_tail"] = bu.log_tail(work / "ours_train.log")
        bu.print_failure("ours training", m)
        return m
    m["summary_json"] = str(summary)
    if progress.is_file():
        prog = json.loads(progress.read_text())
        m["result"] = {"epoch_seconds": prog.get("epoch_seconds"), "train_losses": prog.get("train_loss"),
                       "pseudo_dice": prog.get("val_pseudo_dice")}
    print(f"ours: training + final validation {m['wall_s']:.0f} s wall, peak PSS {m['peak_pss_mb']:.0f} MB",
          flush=True)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Same-budget training of our bundle and nnU-Net; Dice compared.")
    bu.add_runner_arguments(ap, DEFAULT_OUT, "keep the work folder (models, predictions, logs)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs (default 4)")
    ap.add_argument("--iterations", type=int, default=25, help="training iterations per epoch (default 25)")
    ap.add_argument("--val-iterations", type=int, default=5,
                    help="pseudo-Dice validation iterations per epoch (default 5; nnU-Net's own default is 50)")
    ap.add_argument("--val-cases", type=int, default=None, help="keep only the first K validation cases of the fold")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workers", type=int, default=2, help="data-loading workers for both (default 2)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on CPU (default: all cores)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the network in both (nnU-Net's default on CUDA; the bundle's is off; both run "
                         "eagerly when not given)")
    ap.add_argument("--parallel", action="store_true",
                    help="train both systems at the same time (a GPU machine with cores to spare: halves the wall "
                         "time; epoch times are then not a speed comparison)")
    ap.add_argument("--label-float", choices=("auto", "on", "off"), default="auto",
                    help="append dtype=float32 to train#preprocessing's EnsureTyped when labels come out with mixed "
                         "dtypes (collation crash); auto = when a probe finds it")
    ap.add_argument("--init", choices=("same", "own"), default="same",
                    help="same: both start from one nnU-Net initialisation (default); own: each draws its own")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the shared initialisation (default 0)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    args = ap.parse_args(argv)

    raw = bu.raw_dataset(ap, args)
    tools = ["ours", "nnunet"] if args.only == "both" else [args.only]
    work = (args.work or Path(tempfile.mkdtemp(prefix="autoplan_accuracy_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    name, ds_id = bu.dataset_folder_name(raw)
    threads = args.threads if args.device == "cpu" else 1
    result = {"dataset": str(raw), "configuration": args.configuration, "fold": args.fold, "device": args.device,
              "epochs": args.epochs, "iterations_per_epoch": args.iterations, "val_iterations": args.val_iterations,
              "val_cases_limit": args.val_cases, "workers": args.workers, "threads": threads, "compile": args.compile,
              "init": args.init, "init_seed": args.seed if args.init == "same" else None,
              "nnunet_version": NNUNET_VERSION, "loadavg_start": bu.loadavg(), "memory_method": bu.MEMORY_METHOD}
    print(f"dataset {raw}\nwork folder {work}\nbudget {args.epochs} epochs x {args.iterations} iterations "
          f"({args.val_iterations} validation iterations per epoch), device {args.device}", flush=True)
    need_venv = "nnunet" in tools or args.init == "same"
    venv_dir = ensure_nnunet_venv(args.venv).parent.parent if need_venv else None

    plans = bu.plans_for(raw, work, venv_dir, args.workers)
    if plans is None:
        return 2
    plans_file, fp_file = plans
    result["plans_used"] = str(plans_file)
    splits_file = work / "splits_final.json"
    fold_split = make_splits(raw, args.fold, args.val_cases, splits_file)
    result["n_train_cases"], result["val_cases"] = len(fold_split["train"]), fold_split["val"]
    print(f"fold {args.fold}: {len(fold_split['train'])} training cases, {len(fold_split['val'])} validation cases",
          flush=True)
    init = None
    if args.init == "same":
        init = initial_weights(args, work, raw, name, plans_file, fp_file, venv_dir)
        if init is None:
            return 2
        print(f"both start from one nnU-Net initialisation (seed {args.seed}): {init}", flush=True)
    jobs = {"nnunet": lambda: train_nnunet(args, work, raw, name, ds_id, plans_file, fp_file, splits_file, venv_dir,
                                           threads, init),
            "ours": lambda: train_ours(args, work, raw, plans_file, splits_file, threads, result, init)}
    if args.parallel and len(tools) == 2:
        print("both systems train at the same time, sharing the machine (the budget is the same for both)",
              flush=True)
        with ThreadPoolExecutor(2) as pool:
            futures = {t: pool.submit(jobs[t]) for t in ("nnunet", "ours")}
            runs = {t: f.result() for t, f in futures.items()}
    else:
        runs = {t: jobs[t]() for t in ("nnunet", "ours") if t in tools}
    exit_code = 0 if all(m.get("summary_json") for m in runs.values()) else 2
    result["runs"] = runs

    # ---- comparison ------------------------------------------------------------------------------------------------
    dice = {t: dice_table(json.loads(Path(m["summary_json"]).read_text())) for t, m in runs.items()
            if m.get("summary_json")}
    result["dice"] = dice
    if dice:
        labels = sorted({k for d in dice.values() for k in d if k not in ("n_cases", "foreground_mean")},
                        key=lambda s: (len(s), s)) + ["foreground_mean"]
        names = {str(v): k for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items()
                 if not isinstance(v, list)}
        print(f"\n{'Dice (mean over validation cases)':36s} {'ours':>8s} {'nnU-Net':>8s} {'ours-nnU':>9s}")
        diffs = {}
        for label in labels:
            o, n = dice.get("ours", {}).get(label), dice.get("nnunet", {}).get(label)
            diffs[label] = o - n if o is not None and n is not None else None
            title = f"label {label} ({names.get(label, '')})" if label != "foreground_mean" else "foreground mean"
            print(f"{title:36s} {bu.fmt(o, '.4f'):>8s} {bu.fmt(n, '.4f'):>8s} {bu.fmt(diffs[label], '+.4f'):>9s}")
        result["dice_difference_ours_minus_nnunet"] = diffs
        print("validation cases: " + ", ".join(f"{t} {d['n_cases']}" for t, d in dice.items()))
    for t, m in runs.items():
        es = (m.get("result") or {}).get("epoch_seconds")
        if es:
            print(f"{t} epoch seconds: {[round(x, 1) for x in es]}  (per iteration incl. validation iterations: "
                  f"{sum(es) / len(es) / max(args.iterations, 1):.2f} s)")
    if args.epochs * args.iterations < 10000:
        print("NOTE: a short budget; Dice differences at this budget are mostly chance, not accuracy.")
    result["loadavg_end"] = bu.loadavg()
    bu.finish(args.out, result, work, bool(args.keep or args.work))
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
