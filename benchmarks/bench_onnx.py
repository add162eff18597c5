"""Benchmark inference time per case of one bundle on CPU with its network run by PyTorch vs ONNX Runtime
(``network_backend`` "torch" vs "onnxruntime"), everything else identical.

The bundle is emitted from nnU-Net's plans for ``--raw`` (``../shared/reference/nnunet_plans/<dataset>/``, else our
planner), gets freshly initialised weights (speed does not depend on them) and ``models/model.onnx`` from
``autoplan export BUNDLE --onnx`` (which checks onnxruntime's logits against PyTorch's, max abs diff <= 1e-4). Each
backend then predicts the same N cases of ``imagesTr`` through ``configs/inference.json`` (``ours_driver.py
predict``: per case from the evaluator's get-batch event to its iteration-completed event: load, preprocess, sliding
window, restore, write), with and without mirroring TTA, ``--repeats`` times alternating which backend goes first;
the least disturbed repeat is reported (the machines are shared). Both backends use ``--threads`` threads (torch's
and onnxruntime's intra-op pools both follow ``OMP_NUM_THREADS``). The label maps of both backends are compared.

Usage::

    python benchmarks/bench_onnx.py                          # 5 Hippocampus cases, TTA on and off
    python benchmarks/bench_onnx.py --cases 10 --threads 2

Writes ``benchmarks/results/onnx.json``. Exit status: 0 ok, 2 a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402
from bench_inference import list_image_cases, summarize  # noqa: E402

DEFAULT_OUT = bu.BENCH / "results" / "onnx.json"
BACKENDS = ("torch", "onnxruntime")


def label_maps_equal(a: Path, b: Path) -> dict:
    """Voxels that differ between the two backends' predictions of every case."""
    import SimpleITK as sitk

    differing, total = 0, 0
    for f in sorted(a.glob("*.nii.gz")):
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(b / f.name)))
        differing, total = differing + int((x != y).sum()), total + x.size
    return {"voxels_differing": differing, "voxels": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Inference time per case: PyTorch vs ONNX Runtime (CPU).")
    ap.add_argument("--raw", type=Path, default=bu.DEFAULT_RAW, help=f"raw dataset (default {bu.DEFAULT_RAW})")
    ap.add_argument("--configuration", default="3d_fullres")
    ap.add_argument("--cases", type=int, default=5, help="cases of imagesTr to predict (default 5)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both backends (default: all)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per backend and TTA setting (default 2)")
    ap.add_argument("--tta", choices=("both", "on", "off"), default="both")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (bundle, predictions, logs)")
    bu.add_quiet_wait_argument(ap)
    args = ap.parse_args(argv)

    bu.QUIET["max_wait_s"] = args.quiet_wait
    raw = bu.raw_dataset(ap, args)
    spec = json.loads((raw / "dataset.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="autoplan_bench_onnx_"))
    ttas = {"both": [1, 0], "on": [1], "off": [0]}[args.tta]
    plans_file, _ = bu.reference_plans(raw)
    if plans_file is None:
        plans_file, _ = bu.run_our_planner(raw, work, 1)
    bundle = bu.emit_bundle(plans_file, raw, work / "bundles", args.configuration, 0)
    env = bu.ours_env(args.threads)
    m = bu.run_driver(sys.executable, "ours_driver.py", ["make-checkpoint", "--bundle", bundle], work, "checkpoint",
                      env=env, cwd=bu.REPO)
    if m["result"] is None:
        print(f"checkpoint FAILED:\n{m['error_tail']}")
        return 2
    export = subprocess.run([sys.executable, "-m", "autoplan", "export", str(bundle), "--onnx"], cwd=bu.REPO,
                            env=env, capture_output=True, text=True)
    print(export.stdout.strip() or export.stderr[-2000:], flush=True)
    if export.returncode != 0:
        return 2
    n_channels = len(spec.get("channel_names", spec.get("modality", {})))
    cases = list_image_cases(raw / "imagesTr", spec["file_ending"], n_channels, args.cases)
    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps(cases, indent=1))
    result = {"dataset": str(raw), "configuration": args.configuration, "plans_used": str(plans_file),
              "threads": args.threads, "cpu_count": os.cpu_count(), "case_ids": [c["case"] for c in cases],
              "onnx_export": export.stdout.strip(), "loadavg_start": bu.loadavg(),
              "per_case_method": "median over cases 2..N of the per-case wall time (read, preprocess, sliding "
                                 "window, restore, write); first case reported apart"}
    runs: dict[str, list] = {}
    exit_code = 0
    for rep in range(args.repeats):
        for tta in ttas:
            for backend in (BACKENDS if rep % 2 == 0 else BACKENDS[::-1]):
                key = f"{backend}_tta_{'on' if tta else 'off'}"
                out = work / "predictions" / f"{key}_{rep}"
                m = bu.run_driver(sys.executable, "ours_driver.py",
                                  ["predict", "--bundle", bundle, "--cases", cases_file, "--out", out, "--tta", tta,
                                   "--backend", backend], work, f"{key}_{rep}", env=env, cwd=bu.REPO)
                if m["result"] is None or len(m["result"].get("per_case", [])) != len(cases):
                    exit_code = 2
                    bu.print_failure(key, m)
                    continue
                m["summary"] = summarize(m["result"]["per_case"])
                m["per_case_median_s"] = m["summary"]["per_case_median_s"]
                m["predictions"] = str(out)
                print(f"{key}: {m['per_case_median_s']:.2f} s/case (median), first "
                      f"{m['summary']['first_case_s']:.2f} s, setup {m['result']['setup_s']:.2f} s, peak PSS "
                      f"{m['peak_pss_mb']:.0f} MB (foreign CPU {m['foreign_cpu_fraction']:.0%})", flush=True)
                runs.setdefault(key, []).append(m)
    result["runs"] = {k: {"runs": v, **bu.best_of(v, "per_case_median_s")} for k, v in runs.items()}
    rows = []
    for t in ("on", "off") if len(ttas) == 2 else (("on",) if ttas == [1] else ("off",)):
        o, n = (bu.dig(result["runs"], f"{b}_tta_{t}", "best") for b in BACKENDS)
        if not (o and n):
            continue
        rows += [(f"TTA {t}: s/case (median, cases 2..N)", n["summary"]["per_case_median_s"],
                  o["summary"]["per_case_median_s"], ".2f"),
                 (f"TTA {t}: first case s", n["summary"]["first_case_s"], o["summary"]["first_case_s"], ".2f"),
                 (f"TTA {t}: setup s", n["result"]["setup_s"], o["result"]["setup_s"], ".2f"),
                 (f"TTA {t}: peak PSS MB", n["peak_pss_mb"], o["peak_pss_mb"], ".0f")]
        result[f"tta_{t}_labels"] = label_maps_equal(Path(o["predictions"]), Path(n["predictions"]))
        print(f"TTA {t}: label maps of the two backends: {result[f'tta_{t}_labels']}")
    print()
    bu.print_table(rows, ("", "onnxruntime", "torch"), "ort/torch")
    result["table"] = [{"metric": r[0], "onnxruntime": r[1], "torch": r[2],
                        "ratio_onnxruntime_over_torch": bu.ratio(r[1], r[2])} for r in rows]
    result["loadavg_end"] = bu.loadavg()
    bu.finish(args.out, result, work, args.keep)
    return exit_code


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
