"""``tools/evaluate.py`` against ``nnUNetv2_evaluate_folder`` (nnU-Net 2.8.1, in its own venv) on the same files.

Three sets of predictions are written to a scratch folder:

* ``hippocampus``: ~20 label maps of ``../shared/data/Dataset004_Hippocampus/labelsTr`` with perturbed copies as
  predictions (shifts, erosion, dilation, label swaps, speckle, a deleted label, an empty prediction, an exact copy);
* ``ignore``: synthetic anisotropic volumes with an ``ignore`` label (=3), predictions that write into the ignored
  voxels, and a label absent from both reference and prediction (NaN Dice);
* ``regions``: synthetic BraTS-style regions (``[1, 2, 3]``, ``[2, 3]``, ``[3]``) with ``regions_class_order`` and an
  ignore label (=4).

Both tools evaluate every set; every key nnU-Net writes must be in our summary.json with an equal value: counts
exactly (and both integers), floats within 1e-12 (NaN equals NaN), file paths identical. Exit status 0 when all sets
agree, 1 otherwise.

Usage::

    python benchmarks/compare_evaluate.py [--cases 20] [--processes 2] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from nnunet_venv import ensure_nnunet_venv, venv_bin  # noqa: E402

SHARED = ROOT.parent / "shared"
HIPPOCAMPUS = SHARED / "data" / "Dataset004_Hippocampus"
PLANS = SHARED / "reference" / "nnunet_plans" / "Dataset004_Hippocampus" / "nnUNetPlans.json"
FLOAT_TOLERANCE = 1e-12


# ------------------------------------------------------------------------------------------------- prediction sets

def _write(array: np.ndarray, like: sitk.Image | None, path: Path, spacing=None, origin=None) -> None:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    if like is not None:
        image.CopyInformation(like)
    else:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def perturb(label: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong prediction of ``label`` (z, y, x)."""
    pred = label.copy()
    if kind == "copy":
        return pred
    if kind == "shift":
        return np.roll(pred, int(rng.choice([-2, -1, 1, 2])), axis=int(rng.integers(0, 3)))
    if kind == "erode":
        for value in (1, 2):
            mask = label == value
            pred[mask & ~ndimage.binary_erosion(mask)] = 0
        return pred
    if kind == "dilate":
        grown = ndimage.grey_dilation(label, size=(3, 3, 3))
        pred[(label == 0) & (grown > 0)] = grown[(label == 0) & (grown > 0)]
        return pred
    if kind == "swap":
        box = tuple(slice(0, n // 2) for n in label.shape)
        part = pred[box]
        pred[box] = np.where(part == 1, 2, np.where(part == 2, 1, part))
        return pred
    if kind == "speckle":
        flip = rng.random(label.shape) < 0.03
        pred[flip] = rng.integers(0, 3, int(flip.sum()))
        return pred
    if kind == "drop2":
        pred[pred == 2] = 0
        return pred
    if kind == "empty":
        return np.zeros_like(label)
    raise ValueError(kind)


KINDS = ["copy", "shift", "erode", "dilate", "swap", "speckle", "shift", "drop2", "speckle", "empty"]


def hippocampus_set(folder: Path, cases: int, rng: np.random.Generator) -> dict:
    labels_dir = HIPPOCAMPUS / "labelsTr"
    files = sorted(p for p in labels_dir.iterdir() if p.name.endswith(".nii.gz"))[:cases]
    ref, pred = folder / "ref", folder / "pred"
    ref.mkdir(parents=True)
    pred.mkdir()
    for i, f in enumerate(files):
        shutil.copy(f, ref / f.name)
        image = sitk.ReadImage(str(f))
        _write(perturb(sitk.GetArrayFromImage(image), KINDS[i % len(KINDS)], rng), image, pred / f.name)
    shutil.copy(HIPPOCAMPUS / "dataset.json", folder / "dataset.json")
    return {"ref": ref, "pred": pred, "dataset_json": folder / "dataset.json", "cases": len(files)}


def _blobs(shape, rng, values) -> np.ndarray:
    """Label map of a few overlapping ellipsoids, later values painted over earlier ones."""
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    seg = np.zeros(shape, np.uint8)
    for value in values:
        centre = [rng.uniform(0.3 * n, 0.7 * n) for n in shape]
        radii = [rng.uniform(0.12 * n, 0.3 * n) for n in shape]
        inside = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + \
                 ((xx - centre[2]) / radii[2]) ** 2 <= 1
        seg[inside] = value
    return seg


def synthetic_set(folder: Path, kind: str, rng: np.random.Generator, cases: int = 6) -> dict:
    if kind == "ignore":
        labels = {"background": 0, "left": 1, "right": 2, "ignore": 3}
        extra = {}
        values, ignore = (1, 2), 3
    else:
        labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3], "ignore": 4}
        extra = {"regions_class_order": [1, 2, 3]}
        values, ignore = (1, 2, 3), 4
    spec = {"channel_names": {"0": "MR"}, "labels": labels, "numTraining": cases, "file_ending": ".nii.gz", **extra}
    ref_dir, pred_dir = folder / "ref", folder / "pred"
    ref_dir.mkdir(parents=True)
    pred_dir.mkdir()
    spacing, origin = (0.7, 0.9, 2.5), (-12.5, 30.0, 4.0)
    for i in range(cases):
        shape = (int(rng.integers(10, 16)), int(rng.integers(24, 34)), int(rng.integers(24, 34)))
        ref = _blobs(shape, rng, values)
        if i == 1:  # the last label absent from reference and prediction: NaN Dice for it
            ref[ref == values[-1]] = 0
        pred = ref.copy()
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=2)
        noise = rng.random(shape) < 0.05
        pred[noise] = rng.choice(np.array((0,) + values), int(noise.sum()))
        if i == 1:
            pred[pred == values[-1]] = 0
        if i != 2:  # an ignored slab and a few scattered ignored voxels; predictions there must not count
            ref[:, : shape[1] // 4] = ignore
            ref[rng.random(shape) < 0.02] = ignore
            pred[:, : shape[1] // 4] = rng.choice(np.array(values), (shape[0], shape[1] // 4, shape[2]))
        if i == 3:
            pred[:] = 0
        name = f"case_{i:03d}.nii.gz"
        _write(ref, None, ref_dir / name, spacing, origin)
        _write(pred, None, pred_dir / name, spacing, origin)
    (folder / "dataset.json").write_text(json.dumps(spec, indent=4))
    return {"ref": ref_dir, "pred": pred_dir, "dataset_json": folder / "dataset.json", "cases": cases}


# ---------------------------------------------------------------------------------------------------- comparison

def compare(nnunet, ours, path="summary") -> tuple[int, list[str]]:
    """Every key and value nnU-Net wrote must be in ours and equal. Returns (values compared, mismatches)."""
    if isinstance(nnunet, dict):
        if not isinstance(ours, dict):
            return 0, [f"{path}: nnU-Net has an object, ours {type(ours).__name__}"]
        count, problems = 0, []
        for key, value in nnunet.items():
            if key not in ours:
                problems.append(f"{path}.{key}: missing from ours")
                continue
            c, p = compare(value, ours[key], f"{path}.{key}")
            count, problems = count + c, problems + p
        return count, problems
    if isinstance(nnunet, list):
        if not isinstance(ours, list) or len(ours) != len(nnunet):
            return 0, [f"{path}: nnU-Net has {len(nnunet)} entries, ours "
                       f"{len(ours) if isinstance(ours, list) else type(ours).__name__}"]
        count, problems = 0, []
        for i, (a, b) in enumerate(zip(nnunet, ours)):
            c, p = compare(a, b, f"{path}[{i}]")
            count, problems = count + c, problems + p
        return count, problems
    if isinstance(nnunet, bool) or isinstance(nnunet, str) or nnunet is None:
        return 1, [] if nnunet == ours else [f"{path}: nnU-Net {nnunet!r} != ours {ours!r}"]
    if isinstance(nnunet, int):
        ok = isinstance(ours, int) and not isinstance(ours, bool) and ours == nnunet
        return 1, [] if ok else [f"{path}: nnU-Net count {nnunet!r} != ours {ours!r}"]
    if isinstance(nnunet, float):
        if not isinstance(ours, (int, float)) or isinstance(ours, bool):
            return 1, [f"{path}: nnU-Net {nnunet!r} != ours {ours!r}"]
        if math.isnan(nnunet) or math.isnan(ours):
            ok = math.isnan(nnunet) and math.isnan(ours)
        else:
            ok = abs(nnunet - ours) <= FLOAT_TOLERANCE
        return 1, [] if ok else [f"{path}: nnU-Net {nnunet!r} != ours {ours!r} (diff {abs(nnunet - ours):.3g})"]
    return 1, [f"{path}: unexpected value {nnunet!r}"]


def run_set(name: str, data: dict, work: Path, nnunet_python: Path, processes: int) -> dict:
    out_nnunet, out_ours = work / name / "nnunet" / "summary.json", work / name / "ours" / "summary.json"
    out_nnunet.parent.mkdir(parents=True)
    env = {**os.environ, "nnUNet_compile": "f", "OMP_NUM_THREADS": "1"}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.setdefault(var, str(work / var))
        Path(env[var]).mkdir(exist_ok=True)
    tool = venv_bin(nnunet_python.parent.parent, "nnUNetv2_evaluate_folder")
    cmd_nnunet = [str(tool), str(data["ref"]), str(data["pred"]), "-djfile", str(data["dataset_json"]),
                  "-pfile", str(PLANS), "-o", str(out_nnunet), "-np", str(processes)]
    cmd_ours = [sys.executable, str(ROOT / "tools" / "evaluate.py"), str(data["ref"]), str(data["pred"]),
                "--dataset-json", str(data["dataset_json"]), "--out", str(out_ours), "--processes", str(processes)]
    timings = {}
    for who, cmd in (("nnunet", cmd_nnunet), ("ours", cmd_ours)):
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        timings[who] = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"{name}: {who} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                             f"{result.stderr[-3000:]}")
    nnunet, ours = json.loads(out_nnunet.read_text()), json.loads(out_ours.read_text())
    count, problems = compare(nnunet, ours)
    extra = all("HD95" in m and "NSD" in m for c in ours["metric_per_case"] for m in c["metrics"].values())
    if not extra:
        problems.append("ours: HD95/NSD missing from metric_per_case")
    for suffix in (".csv", "_dice.png"):
        side = out_ours.with_name("summary" + suffix) if suffix == ".csv" else out_ours.with_name("summary_dice.png")
        if not side.is_file():
            problems.append(f"ours: {side.name} not written")
    return {"set": name, "cases": data["cases"], "keys": sorted(nnunet["mean"]), "values_compared": count,
            "mismatches": problems, "seconds_nnunet": round(timings["nnunet"], 2),
            "seconds_ours": round(timings["ours"], 2),
            "foreground_dice": nnunet["foreground_mean"]["Dice"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=20, help="Hippocampus cases (default 20)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (HIPPOCAMPUS / "labelsTr").is_dir() or not PLANS.is_file():
        print(f"skipped: {HIPPOCAMPUS} or {PLANS} is absent", file=sys.stderr)
        return 0
    nnunet_python = ensure_nnunet_venv()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="compare_evaluate-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        print(f"{work}: not empty", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    try:
        sets = {
            "hippocampus": hippocampus_set(work / "hippocampus" / "data", args.cases, rng),
            "ignore": synthetic_set(work / "ignore" / "data", "ignore", rng),
            "regions": synthetic_set(work / "regions" / "data", "regions", rng),
        }
        results = [run_set(name, data, work, nnunet_python, args.processes) for name, data in sets.items()]
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    ok = True
    for r in results:
        status = "OK" if not r["mismatches"] else f"{len(r['mismatches'])} MISMATCHES"
        print(f"{r['set']:<12} {r['cases']:>3} cases, keys {r['keys']}: {r['values_compared']} values compared, "
              f"{status}; foreground Dice {r['foreground_dice']:.6f}; nnU-Net {r['seconds_nnunet']} s, "
              f"ours {r['seconds_ours']} s (incl. HD95/NSD)")
        for p in r["mismatches"][:20]:
            print(f"    {p}")
        ok &= not r["mismatches"]
    print("all equal" if ok else "DIFFERENCES FOUND")
    if args.keep or args.work:
        print(f"files kept in {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
