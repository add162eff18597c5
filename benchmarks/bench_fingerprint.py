"""Benchmark autoplan's dataset fingerprint against nnU-Net 2.8.1's, and check that they agree.

Runs, each as a separate subprocess (``--repeats`` times):

* ours:    ``python -m autoplan fingerprint RAW_DIR --out FILE --processes N``
* nnU-Net: ``nnUNetv2_extract_fingerprint -d ID -np N --clean`` from the venv of ``nnunet_venv.py``, on a temporary
  ``nnUNet_raw`` holding a symlink named like the dataset folder (``Dataset004_Hippocampus`` by default).

Measures wall time and peak memory of the whole process tree (the command and all its worker processes): /proc is
polled every 50 ms and the resident set sizes (RSS) of every process in the tree are summed; the peak of that sum is
reported. The proportional set size (PSS, shared pages split between processes, from /proc/PID/smaps_rollup) is summed
the same way and reported beside it, since RSS double-counts pages that forked workers share (nnU-Net forks a
12-process pool just to list the files, which makes its RSS sum jump from run to run; PSS is the steadier figure).
Before timing, every file of the dataset is read once so that both tools find it in the page cache.

Then compares the two fingerprints: ``spacings`` and ``shapes_after_crop`` must be equal, each statistic of
``foreground_intensity_properties_per_channel`` must be within 1 % of nnU-Net's (percentile_99_5 - percentile_00_5)
range, and ``median_relative_size_after_cropping`` within 1e-6. Prints a table and PASS/FAIL per check and writes
everything to ``--out`` (JSON).

Usage::

    python benchmarks/bench_fingerprint.py                       # Hippocampus from ../shared, 2 processes
    python benchmarks/bench_fingerprint.py --raw DIR --processes 2 --repeats 3
    python benchmarks/bench_fingerprint.py --only nnunet           # nnU-Net half only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import REPO, add_runner_arguments, log_tail, make_nnunet_folders, raw_dataset, run_measured  # noqa: E402
from nnunet_venv import NNUNET_VERSION, ensure_nnunet_venv, venv_bin  # noqa: E402
from treemem import POLL_S  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "fingerprint.json"
STAT_KEYS = ("max", "mean", "median", "min", "percentile_00_5", "percentile_99_5", "std")
MEMORY_METHOD = ("peak over time of the summed RSS (and PSS) of the process and all its descendants, "
                 f"/proc polled every {int(POLL_S * 1000)} ms")


# --------------------------------------------------------------------------------------------------------------------
# the two tools


def warm_page_cache(raw: Path) -> int:
    """Read every file under raw once (untimed), so neither tool pays for a cold disk cache; returns bytes read."""
    n = 0
    for f in sorted(raw.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    n += len(chunk)
    return n


def run_ours(raw: Path, processes: int, work: Path) -> tuple[dict, Path]:
    fp = work / "ours_fingerprint.json"
    cmd = [sys.executable, "-m", "autoplan", "fingerprint", str(raw), "--out", str(fp), "--processes", str(processes)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    m = run_measured(cmd, env=env, cwd=str(REPO), log=work / "ours.log")
    m["command"] = " ".join(cmd)
    return m, fp


def run_nnunet(raw: Path, processes: int, work: Path, venv_dir: Path) -> tuple[dict, Path]:
    name, ds_id = make_nnunet_folders(work, raw)
    nn_raw, nn_pre, nn_res = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    env = dict(os.environ, nnUNet_raw=str(nn_raw), nnUNet_preprocessed=str(nn_pre), nnUNet_results=str(nn_res),
               nnUNet_compile="f")
    cmd = [str(venv_bin(venv_dir, "nnUNetv2_extract_fingerprint")), "-d", str(ds_id), "-np", str(processes),
           "--clean", "--no_pbar"]
    m = run_measured(cmd, env=env, log=work / "nnunet.log")
    m["command"] = "nnUNetv2_extract_fingerprint " + " ".join(cmd[1:])
    return m, nn_pre / name / "dataset_fingerprint.json"


# --------------------------------------------------------------------------------------------------------------------
# comparison


def compare(ours: dict, ref: dict) -> list[dict]:
    """Checks of our fingerprint against nnU-Net's; each {'check', 'pass', 'detail'}."""
    checks = []

    def add(name, ok, detail):
        checks.append({"check": name, "pass": bool(ok), "detail": detail})

    so, sr = ours.get("spacings"), ref["spacings"]
    if so is None or len(so) != len(sr):
        add("spacings", False, f"case count ours {None if so is None else len(so)} vs nnU-Net {len(sr)}")
    else:
        diffs = [abs(float(a) - float(b)) for x, y in zip(so, sr) for a, b in zip(x, y)]
        bad = sum(len(x) != len(y) for x, y in zip(so, sr))
        worst = max(diffs) if diffs else 0.0
        add("spacings", bad == 0 and worst == 0.0, f"{len(sr)} cases, max abs difference {worst:.3g}")

    co, cr = ours.get("shapes_after_crop"), ref["shapes_after_crop"]
    if co is None or len(co) != len(cr):
        add("shapes_after_crop", False, f"case count ours {None if co is None else len(co)} vs nnU-Net {len(cr)}")
    else:
        n_bad = sum([int(v) for v in x] != [int(v) for v in y] for x, y in zip(co, cr))
        add("shapes_after_crop", n_bad == 0, f"{len(cr)} cases, {n_bad} differ")

    mo, mr = ours.get("median_relative_size_after_cropping"), ref["median_relative_size_after_cropping"]
    add("median_relative_size_after_cropping", mo is not None and abs(float(mo) - float(mr)) <= 1e-6,
        f"ours {mo} vs nnU-Net {mr}")

    io_, ir = ours.get("foreground_intensity_properties_per_channel", {}), \
        ref["foreground_intensity_properties_per_channel"]
    for ch, rstats in sorted(ir.items()):
        ostats = io_.get(ch) or io_.get(str(ch)) or {}
        rng = float(rstats["percentile_99_5"]) - float(rstats["percentile_00_5"])
        tol = 0.01 * abs(rng)
        for k in STAT_KEYS:
            ov, rv = ostats.get(k), rstats[k]
            if ov is None:
                add(f"intensity[{ch}].{k}", False, f"missing in ours (nnU-Net {rv})")
                continue
            d = abs(float(ov) - float(rv))
            add(f"intensity[{ch}].{k}", d <= tol and math.isfinite(float(ov)),
                f"ours {float(ov):.6g} vs nnU-Net {float(rv):.6g}; |diff| {d:.4g} <= tol {tol:.4g} "
                f"({d / abs(rng) * 100 if rng else float('nan'):.3f}% of p99.5-p0.5 range)")
    return checks


# --------------------------------------------------------------------------------------------------------------------


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["returncode"] == 0]
    if not ok:
        return {"ok": False, "runs": runs}
    walls = [r["wall_s"] for r in ok]
    return {"ok": len(ok) == len(runs), "runs": runs, "wall_s_median": statistics.median(walls),
            "wall_s_min": min(walls), "peak_rss_mb_max": max(r["peak_rss_mb"] for r in ok),
            "peak_pss_mb_max": max(r["peak_pss_mb"] for r in ok)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time autoplan's fingerprint vs nnU-Net's nnUNetv2_extract_fingerprint "
                                             "and check that the fingerprints agree.")
    add_runner_arguments(ap, DEFAULT_OUT, "keep the temporary work folder (logs, fingerprints)", per_fold=False)
    ap.add_argument("--processes", type=int, default=2, help="worker processes for both tools (default 2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool (default 1)")
    args = ap.parse_args(argv)

    raw = raw_dataset(ap, args)
    work = Path(tempfile.mkdtemp(prefix="autoplan_bench_fp_"))
    result = {"dataset": str(raw), "processes": args.processes, "repeats": args.repeats,
              "nnunet_version": NNUNET_VERSION, "memory_method": MEMORY_METHOD, "cpu_count": os.cpu_count()}
    print(f"dataset {raw}\nprocesses {args.processes}, repeats {args.repeats}\nmemory: {MEMORY_METHOD}\n"
          f"work folder {work}")

    tools = ["ours", "nnunet"] if args.only == "both" else [args.only]
    print(f"page cache warmed: {warm_page_cache(raw) / 2 ** 20:.1f} MB read")
    venv_dir = ensure_nnunet_venv(args.venv).parent.parent if "nnunet" in tools else None
    fps: dict[str, Path] = {}
    for tool in tools:
        runs = []
        for i in range(args.repeats):
            w = work / f"{tool}_{i}"
            w.mkdir()
            m, fp = run_ours(raw, args.processes, w) if tool == "ours" else \
                run_nnunet(raw, args.processes, w, venv_dir)
            if m["returncode"] == 0 and not fp.is_file():
                m["returncode"] = -999
            if m["returncode"] != 0:
                log = log_tail(w / f"{tool}.log", 2000)
                m["error_tail"] = log
                print(f"{tool} run {i + 1} FAILED (exit {m['returncode']}):\n{log}")
            else:
                fps[tool] = fp
            print(f"{tool} run {i + 1}: {m['wall_s']:.2f} s, peak RSS {m['peak_rss_mb']:.0f} MB, "
                  f"PSS {m['peak_pss_mb']:.0f} MB, {m['max_processes']} processes", flush=True)
            runs.append(m)
        result[tool] = _summary(runs)

    # table
    print()
    print(f"{'':10s} {'wall s (median)':>16s} {'peak RSS MB':>12s} {'peak PSS MB':>12s}")
    for tool in tools:
        s = result[tool]
        if "wall_s_median" in s:
            print(f"{tool:10s} {s['wall_s_median']:16.2f} {s['peak_rss_mb_max']:12.0f} {s['peak_pss_mb_max']:12.0f}")
        else:
            print(f"{tool:10s} {'failed':>16s}")
    if all(t in result and "wall_s_median" in result[t] for t in ("ours", "nnunet")):
        o, n = result["ours"], result["nnunet"]
        result["ratio_ours_over_nnunet"] = {
            "wall": o["wall_s_median"] / n["wall_s_median"],
            "peak_rss": o["peak_rss_mb_max"] / n["peak_rss_mb_max"],
            "peak_pss": o["peak_pss_mb_max"] / n["peak_pss_mb_max"]}
        r = result["ratio_ours_over_nnunet"]
        print(f"{'ratio':10s} {r['wall']:16.2f} {r['peak_rss']:12.2f} {r['peak_pss']:12.2f}   (ours / nnU-Net)")
    print("(RSS sums count pages shared by forked workers once per process; PSS splits them and is steadier)")

    # comparison
    exit_code = 0
    if "ours" in fps and "nnunet" in fps:
        checks = compare(json.loads(fps["ours"].read_text()), json.loads(fps["nnunet"].read_text()))
        result["checks"] = checks
        print()
        for c in checks:
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['detail']}")
        n_fail = sum(not c["pass"] for c in checks)
        result["verdict"] = "PASS" if n_fail == 0 else "FAIL"
        print(f"\n{len(checks) - n_fail} passed, {n_fail} failed")
        exit_code = 0 if n_fail == 0 else 1
    else:
        result["verdict"] = "NOT COMPARED"
        missing = [t for t in tools if t not in fps]
        if missing:
            exit_code = 2
        print("\nfingerprints not compared (need both tools to succeed)")
    for tool, fp in fps.items():
        result[f"{tool}_fingerprint_file"] = str(fp) if args.keep else None

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"result written to {args.out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
