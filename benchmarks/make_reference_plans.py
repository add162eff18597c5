"""Generate nnU-Net 2.8.1 reference plans for synthetic dataset fingerprints (planner parity fixtures).

For every scenario this script

1. draws a realistic per-case fingerprint (spacings, shapes after crop, intensity statistics) with a seeded numpy RNG;
2. lays out a throw-away ``nnUNet_raw/DatasetXXX_Name/`` (dataset.json + one tiny dummy case, which nnU-Net opens only
   to choose its image reader) and ``nnUNet_preprocessed/DatasetXXX_Name/dataset_fingerprint.json``;
3. runs nnU-Net's own ``nnUNetv2_plan_experiment -d ID -pl PLANNER`` (from the venv of ``nnunet_venv.py``) for the
   default planner and the ResEnc M/L/XL presets, plus memory-target runs for some scenarios;
4. copies dataset.json, the fingerprint and every plans file nnU-Net wrote into
   ``tests/fixtures/nnunet_reference_plans/<scenario>/``, with ``runs.json`` listing the runs
   (``planner``, ``gpu_memory_target``, ``plans_name``, ``plans_file`` or ``error``).

nnU-Net is only *called*; nothing of it is copied into the repository.

Usage::

    python benchmarks/make_reference_plans.py                 # all scenarios
    python benchmarks/make_reference_plans.py --only prostate_like tiny_images
    python benchmarks/make_reference_plans.py --list
    python benchmarks/make_reference_plans.py --torchres      # the torchres planners -> nnunet_torchres_plans/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_venv import NNUNET_VERSION, ensure_nnunet_venv, venv_bin  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "nnunet_reference_plans"

DEFAULT_PLANNERS = [
    ("ExperimentPlanner", "nnUNetPlans"),
    ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
    ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans"),
]
# (planner, gpu_memory_target, plans name) run in addition for scenarios with memory_target_runs=True
# nnU-Net 2.8.1's torch-resampling planners (experiment_planning/experiment_planners/resampling/), run with
# --torchres into their own fixture folder
TORCHRES_PLANNERS = [
    ("nnUNetPlanner_torchres", "nnUNetPlans_torchres"),
    ("nnUNetPlannerResEncL_torchres", "nnUNetResEncUNetLPlans_torchres"),
    ("nnUNetPlannerResEncL_torchres_sepz", "nnUNetResEncUNetLPlans_torchres_sepz"),
]
TORCHRES_OUT = REPO / "tests" / "fixtures" / "nnunet_torchres_plans"
TORCHRES_SCENARIOS = ["hippocampus_like", "prostate_like", "ct_coarse_last_axis", "natural_2d", "very_anisotropic",
                      "tiny_images"]
MEMORY_TARGET_RUNS = [
    ("ExperimentPlanner", 24, "nnUNetPlans_G24"),
    ("nnUNetPlannerResEncM", 80, "nnUNetResEncUNetMPlans_G80"),
]


# --------------------------------------------------------------------------------------------------------------------
# helpers to draw realistic values


def f32(x) -> float:
    """Round through float32, as spacings and intensities read from NIfTI headers / float32 images usually are."""
    return float(np.float32(x))


def mr_stats(rng: np.random.Generator, scale: float) -> dict:
    """Foreground intensity statistics of an MR-like (positive, skewed) channel."""
    median = scale * rng.uniform(0.8, 1.2)
    mean = median * rng.uniform(1.0, 1.15)
    std = mean * rng.uniform(0.25, 0.5)
    p005 = median * rng.uniform(0.1, 0.3)
    p995 = mean + std * rng.uniform(2.5, 3.5)
    return {"max": f32(p995 * rng.uniform(1.2, 2.0)), "mean": f32(mean), "median": f32(median),
            "min": f32(rng.uniform(0, p005 * 0.5)), "percentile_00_5": f32(p005), "percentile_99_5": f32(p995),
            "std": f32(std)}


def ct_stats(rng: np.random.Generator) -> dict:
    """Foreground intensity statistics of a CT channel (HU)."""
    mean = rng.uniform(60, 120)
    std = rng.uniform(40, 70)
    return {"max": f32(rng.uniform(1500, 3071)), "mean": f32(mean), "median": f32(mean + rng.uniform(-8, 8)),
            "min": f32(-1024.0), "percentile_00_5": f32(mean - rng.uniform(150, 400)),
            "percentile_99_5": f32(mean + rng.uniform(150, 300)), "std": f32(std)}


def unit_stats(rng: np.random.Generator, hi: float) -> dict:
    """Statistics of a channel living in [0, hi]."""
    mean = hi * rng.uniform(0.3, 0.6)
    return {"max": f32(hi), "mean": f32(mean), "median": f32(mean * rng.uniform(0.9, 1.1)), "min": 0.0,
            "percentile_00_5": f32(hi * rng.uniform(0.0, 0.05)), "percentile_99_5": f32(hi * rng.uniform(0.9, 1.0)),
            "std": f32(hi * rng.uniform(0.1, 0.25))}


def median_half(rng: np.random.Generator, n: int, lo: int, mid: int, hi: int) -> list[int]:
    """n (even) integers whose median is exactly mid + 0.5: half drawn from [lo, mid], half from [mid+1, hi]."""
    assert n % 2 == 0
    low = list(rng.integers(lo, mid + 1, n // 2))
    high = list(rng.integers(mid + 1, hi + 1, n // 2))
    low[0], high[0] = mid, mid + 1
    vals = [int(v) for v in low + high]
    rng.shuffle(vals)
    return vals


# --------------------------------------------------------------------------------------------------------------------
# scenarios


@dataclass
class Scenario:
    name: str
    dataset_id: int
    dataset_name: str
    description: str
    dataset_json: dict
    fingerprint: dict
    memory_target_runs: bool = False
    extra: dict = field(default_factory=dict)


def _fp(spacings, shapes, stats, mrsac) -> dict:
    return {"foreground_intensity_properties_per_channel": {str(i): s for i, s in enumerate(stats)},
            "median_relative_size_after_cropping": float(mrsac),
            "shapes_after_crop": [[int(v) for v in s] for s in shapes],
            "spacings": spacings}


def _ds(channels, labels, n_train, ending=".nii.gz", **extra) -> dict:
    d = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
         "numTraining": int(n_train), "file_ending": ending}
    d.update(extra)
    return d


def sc_hippocampus_like(rng):
    n = 120
    shapes = [(rng.integers(31, 44), rng.integers(40, 60), rng.integers(29, 44)) for _ in range(n)]
    spacings = [[1.0, 1.0, 1.0] for _ in range(n)]
    return ("isotropic 1 mm MR, small volumes ~(36,50,35), 1 channel, 3 labels; like Dataset004_Hippocampus",
            _ds(["MRI"], {"background": 0, "Anterior": 1, "Posterior": 2}, n),
            _fp(spacings, shapes, [mr_stats(rng, 400.0)], 1.0), False)


def sc_prostate_like(rng):
    n = 32
    spacings, shapes = [], []
    for _ in range(n):
        sz = float(rng.choice([3.0, 3.3, 3.6, 3.6, 3.6, 3.6, 4.0]))
        sxy = f32(rng.choice([0.625, 0.625, 0.625, 0.6, 0.65, 0.5, 0.75]))
        nxy = int(rng.choice([256, 320, 320, 320, 384]))
        spacings.append([sz, sxy, sxy])
        shapes.append((rng.integers(15, 25), nxy, nxy))
    return ("anisotropic MR, spacing ~(3.6,0.62,0.62) varying, shapes ~(20,320,320), 2 channels T2/ADC, 3 labels",
            _ds(["T2", "ADC"], {"background": 0, "PZ": 1, "TZ": 2}, n),
            _fp(spacings, shapes, [mr_stats(rng, 350.0), mr_stats(rng, 1200.0)], 1.0), True)


def sc_ct_coarse_last_axis(rng):
    n = 40
    spacings, shapes = [], []
    for _ in range(n):
        sxy = f32(rng.uniform(0.6, 0.95))
        sz = float(rng.choice([5.0, 5.0, 5.0, 3.0, 2.5, 7.5]))
        spacings.append([sxy, sxy, sz])
        shapes.append((512, 512, int(round(rng.uniform(150, 350) / sz))))
    return ("CT with the coarse axis LAST: spacing ~(0.8,0.8,5.0), shapes ~(512,512,40) -> transpose_forward [2,0,1]",
            _ds(["CT"], {"background": 0, "liver": 1, "tumor": 2}, n),
            _fp(spacings, shapes, [ct_stats(rng)], 0.93), False)


def sc_ct_abdomen_many_labels(rng):
    n = 120
    organs = ["spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
              "inferior_vena_cava", "portal_vein", "pancreas", "right_adrenal", "left_adrenal"]
    labels = {"background": 0, **{o: i + 1 for i, o in enumerate(organs)}}
    spacings, shapes = [], []
    for _ in range(n):
        sz = float(rng.choice([2.5, 2.5, 2.5, 2.0, 3.0, 5.0, 1.5, 1.25]))
        sxy = f32(rng.uniform(0.6, 0.98))
        fov_z = rng.uniform(300, 650)
        shapes.append((int(round(fov_z / sz)), 512, 512))
        spacings.append([sz, sxy, sxy])
    return ("large abdominal CT, 14 label keys, spacing ~(2.5,0.8,0.8), shapes ~(200,512,512), 120 cases "
            "-> 3d_lowres + 3d_cascade_fullres",
            _ds(["CT"], labels, n), _fp(spacings, shapes, [ct_stats(rng)], 0.97), True)


def sc_mixed_channels_cropped(rng):
    n = 50
    spacings, shapes = [], []
    for _ in range(n):
        sxy = f32(rng.uniform(0.85, 1.05))
        spacings.append([float(rng.choice([1.5, 1.5, 2.0])), sxy, sxy])
        shapes.append((rng.integers(100, 161), rng.integers(200, 261), rng.integers(200, 261)))
    ch = ["CT", "T1", "noNorm", "rescale_to_0_1", "ZScore"]
    stats = [ct_stats(rng), mr_stats(rng, 600.0), unit_stats(rng, 4.0), unit_stats(rng, 1000.0), mr_stats(rng, 50.0)]
    return ("median_relative_size_after_cropping 0.62 < 0.75 with channels CT, T1, noNorm, rescale_to_0_1, ZScore "
            "(normalization schemes, casefold, use_mask_for_norm only for ZScore channels)",
            _ds(ch, {"background": 0, "lesion": 1}, n), _fp(spacings, shapes, stats, 0.6187), False)


def sc_ignore_label(rng):
    n = 60
    spacings, shapes = [], []
    for _ in range(n):
        sxy = f32(rng.choice([0.9, 0.9, 0.8, 1.0]))
        spacings.append([1.25, sxy, sxy])
        shapes.append((rng.integers(70, 111), rng.integers(140, 181), rng.integers(140, 181)))
    return ("dataset with an ignore label: background 0, a 1, b 2, ignore 3 (4 label keys enter the VRAM estimate)",
            _ds(["MRI"], {"background": 0, "a": 1, "b": 2, "ignore": 3}, n),
            _fp(spacings, shapes, [mr_stats(rng, 800.0)], 0.8), False)


def sc_brats_regions(rng):
    n = 120
    shapes = [(rng.integers(125, 151), rng.integers(150, 186), rng.integers(120, 151)) for _ in range(n)]
    spacings = [[1.0, 1.0, 1.0] for _ in range(n)]
    labels = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}
    return ("region-based BraTS-like: 4 MR channels, regions whole_tumor/tumor_core/enhancing_tumor, "
            "regions_class_order [1,2,3], 1 mm isotropic, median_relative_size 0.55",
            _ds(["FLAIR", "T1w", "T1gd", "T2w"], labels, n, regions_class_order=[1, 2, 3]),
            _fp(spacings, shapes, [mr_stats(rng, s) for s in (300.0, 500.0, 700.0, 450.0)], 0.5512), False)


def sc_natural_2d(rng):
    n = 80
    shapes = [(1, rng.integers(400, 701), rng.integers(500, 901)) for _ in range(n)]
    spacings = [[999, 1, 1] for _ in range(n)]  # NaturalImage2DIO reports the ints (999, 1, 1)
    return ("2-D natural images (.png, NaturalImage2DIO), 3 channels R/G/B, spacing [999,1,1], shapes [1,H,W]",
            _ds(["R", "G", "B"], {"background": 0, "road": 1}, n, ending=".png"),
            _fp(spacings, shapes, [unit_stats(rng, 255.0) for _ in range(3)], 1.0), False)


def sc_very_anisotropic(rng):
    n = 100
    spacings, shapes = [], []
    for _ in range(n):
        sz = float(rng.choice([5.0, 5.0, 5.0, 6.0, 6.5, 7.0, 7.0, 10.0]))
        sxy = f32(rng.choice([1.5625, 1.5625, 1.40625, 1.25, 1.6796875]))
        nxy = int(round(rng.uniform(200, 400) / sxy))
        spacings.append([sz, sxy, sxy])
        shapes.append((rng.integers(6, 19), nxy, nxy))
    return ("very anisotropic cine-MR-like (ACDC): slice spacing 5-10 mm with many ties, in-plane ~1.5 mm, ~10 slices "
            "-> 10th-percentile target spacing rule",
            _ds(["cineMRI"], {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}, n),
            _fp(spacings, shapes, [mr_stats(rng, 150.0)], 1.0), False)


def sc_tiny_images(rng):
    n = 24
    z = median_half(rng, n, 7, 9, 12)
    y = median_half(rng, n, 9, 11, 15)
    x = median_half(rng, n, 6, 8, 11)
    shapes = list(zip(z, y, x))
    spacings = [[1.0, 1.0, 1.0] for _ in range(n)]
    return ("tiny images ~(10,12,9), 24 fingerprint cases with medians ending in .5, numTraining 31 (odd, differs "
            "from the number of fingerprint cases)",
            _ds(["MRI"], {"background": 0, "blob": 1}, 31),
            _fp(spacings, shapes, [mr_stats(rng, 100.0)], 1.0), False)


def sc_tied_coarse_axes(rng):
    n = 30
    spacings, shapes = [], []
    for _ in range(n):
        s0 = f32(rng.choice([0.75, 0.8]))
        s12 = float(rng.choice([3.0, 3.0, 3.5]))
        spacings.append([s0, s12, s12])
        shapes.append((rng.integers(300, 421), rng.integers(60, 91), rng.integers(60, 91)))
    return ("two coarse axes tied for the largest spacing (~0.8,3,3): argmax picks axis 1 -> transpose [1,0,2]; "
            "not anisotropic by the 3x rule",
            _ds(["MRI"], {"background": 0, "nerve": 1}, n),
            _fp(spacings, shapes, [mr_stats(rng, 250.0)], 0.9), False)


def sc_iso_cube_ties(rng):
    n = 41
    offs = list(range(-20, 21))
    shapes = []
    perms = [rng.permutation(offs) for _ in range(3)]
    for i in range(n):
        shapes.append((256 + 3 * int(perms[0][i]), 256 + 2 * int(perms[1][i]), 256 + 4 * int(perms[2][i])))
    spacings = [[1.0, 1.0, 1.0] for _ in range(n)]
    return ("isotropic 1 mm, median shape exactly (256,256,256): all axes tie in the patch-shrink loop "
            "(argsort picks the last); lowres",
            _ds(["CT"], {"background": 0, "bone": 1}, n),
            _fp(spacings, shapes, [ct_stats(rng)], 0.85), False)


def sc_spec_prostate_const(rng):
    n = 32
    spacings = [[3.6, 0.625, 0.625] for _ in range(n)]
    shapes = [(20, 320, 320) for _ in range(n)]
    return ("constant spacing (3.6,0.625,0.625) and shape (20,320,320), 32 cases, 3 labels: the prostate worked "
            "example of the spec, section 3.11",
            _ds(["T2"], {"background": 0, "PZ": 1, "TZ": 2}, n),
            _fp(spacings, shapes, [mr_stats(rng, 350.0)], 1.0), False)


def sc_spec_ct_const(rng):
    n = 100
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, 14)}}
    spacings = [[2.5, 0.8, 0.8] for _ in range(n)]
    shapes = [(200, 512, 512) for _ in range(n)]
    return ("constant spacing (2.5,0.8,0.8) and shape (200,512,512), 100 cases, 14 label keys: the synthetic CT "
            "worked example of the spec, section 3.11",
            _ds(["CT"], labels, n), _fp(spacings, shapes, [ct_stats(rng)], 1.0), False)


def sc_mixed_protocol_clamp(rng):
    n = 40
    spacings, shapes = [], []
    for i in range(n):
        if i % 7 == 3:  # 6 of 40 cases are near-isotropic 3-D acquisitions
            spacings.append([0.7, 0.7, 0.7])
            shapes.append((rng.integers(170, 191), rng.integers(270, 291), rng.integers(270, 291)))
        else:
            sxy = f32(rng.choice([0.78125, 0.78125, 0.8, 0.75]))
            spacings.append([float(rng.choice([4.0, 4.0, 4.5, 5.0])), sxy, sxy])
            shapes.append((rng.integers(22, 31), 256, 256))
    return ("mixed protocols: 34 thick-slice cases (4-5, 0.78, 0.78) and 6 isotropic 0.7 mm cases; the 10th percentile "
            "of the coarse axis falls below the in-plane spacing -> clamped to max(other axes) + 1e-5",
            _ds(["T1"], {"background": 0, "lesion": 1}, n),
            _fp(spacings, shapes, [mr_stats(rng, 500.0)], 0.9), False)


SCENARIOS: dict[str, Callable] = {
    "hippocampus_like": sc_hippocampus_like,
    "prostate_like": sc_prostate_like,
    "ct_coarse_last_axis": sc_ct_coarse_last_axis,
    "ct_abdomen_many_labels": sc_ct_abdomen_many_labels,
    "mixed_channels_cropped": sc_mixed_channels_cropped,
    "ignore_label": sc_ignore_label,
    "brats_regions": sc_brats_regions,
    "natural_2d": sc_natural_2d,
    "very_anisotropic": sc_very_anisotropic,
    "tiny_images": sc_tiny_images,
    "tied_coarse_axes": sc_tied_coarse_axes,
    "iso_cube_ties": sc_iso_cube_ties,
    "spec_prostate_const": sc_spec_prostate_const,
    "spec_ct_const": sc_spec_ct_const,
    "mixed_protocol_clamp": sc_mixed_protocol_clamp,
}


def build_scenario(name: str, index: int, seed: int) -> Scenario:
    """Draw a scenario's dataset.json and fingerprint (deterministic for a given seed and index)."""
    rng = np.random.default_rng([seed, index])
    desc, ds, fp, mem = SCENARIOS[name](rng)
    ds_id = 900 + index
    camel = "".join(p.capitalize() for p in name.split("_"))
    ds_name = f"Dataset{ds_id:03d}_{camel}"
    ds = {"name": camel, "description": f"synthetic autoplan fixture: {desc}", **ds}
    return Scenario(name, ds_id, ds_name, desc, ds, fp, mem)


# --------------------------------------------------------------------------------------------------------------------
# running nnU-Net


_DUMMY_WRITER = r"""
import json, sys
import numpy as np
files = json.loads(sys.argv[1])
for path, kind in files:
    if path.endswith('.png'):
        from skimage import io
        io.imsave(path, np.zeros((8, 8), np.uint8) + (1 if kind == 'seg' else 7), check_contrast=False)
    else:
        import SimpleITK as sitk
        arr = np.ones((4, 5, 6), np.uint8 if kind == 'seg' else np.float32)
        sitk.WriteImage(sitk.GetImageFromArray(arr), path)
"""


def write_compact_json(obj, path: Path) -> None:
    """JSON with sorted keys where each innermost list sits on one line (small and diff-friendly)."""
    def enc(o, ind):
        pad = " " * ind
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f'{pad}  {json.dumps(k)}: {enc(v, ind + 2)}' for k, v in sorted(o.items())]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list) and o and any(isinstance(v, (list, dict)) for v in o):
            return "[\n" + ",\n".join(f"{pad}  {enc(v, ind + 2)}" for v in o) + "\n" + pad + "]"
        return json.dumps(o)
    path.write_text(enc(obj, 0) + "\n")


def run_scenario(sc: Scenario, out_root: Path, venv_py: Path, timeout: int, planners=None) -> list[dict]:
    """Run all planner runs of one scenario; write its fixture folder; return the runs list."""
    venv_dir = venv_py.parent.parent
    dest = out_root / sc.name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix=f"autoplan_ref_{sc.name}_") as tmp:
        tmp = Path(tmp)
        raw = tmp / "nnUNet_raw" / sc.dataset_name
        pre = tmp / "nnUNet_preprocessed" / sc.dataset_name
        res = tmp / "nnUNet_results"
        for d in (raw / "imagesTr", raw / "labelsTr", pre, res):
            d.mkdir(parents=True)
        (raw / "dataset.json").write_text(json.dumps(sc.dataset_json, indent=4))
        write_compact_json(sc.fingerprint, pre / "dataset_fingerprint.json")
        ending = sc.dataset_json["file_ending"]
        files = [(str(raw / "imagesTr" / f"case_000_{c:04d}{ending}"), "img")
                 for c in range(len(sc.dataset_json["channel_names"]))]
        files.append((str(raw / "labelsTr" / f"case_000{ending}"), "seg"))
        subprocess.run([str(venv_py), "-c", _DUMMY_WRITER, json.dumps(files)], check=True)

        env = dict(os.environ, nnUNet_raw=str(tmp / "nnUNet_raw"), nnUNet_preprocessed=str(tmp / "nnUNet_preprocessed"),
                   nnUNet_results=str(res), nnUNet_compile="f", OMP_NUM_THREADS="1")
        todo = [(pl, None, name) for pl, name in (planners or DEFAULT_PLANNERS)]
        if sc.memory_target_runs and planners is None:
            todo += MEMORY_TARGET_RUNS
        for planner, gpu, plans_name in todo:
            cmd = [str(venv_bin(venv_dir, "nnUNetv2_plan_experiment")), "-d", str(sc.dataset_id), "-pl", planner]
            if gpu is not None:
                cmd += ["-gpu_memory_target", str(gpu), "-overwrite_plans_name", plans_name]
            entry = {"planner": planner, "gpu_memory_target": gpu, "plans_name": plans_name,
                     "command": " ".join(["nnUNetv2_plan_experiment"] + cmd[1:])}
            t0 = time.time()
            try:
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
                ok, err = p.returncode == 0, (p.stderr or p.stdout)[-3000:]
            except subprocess.TimeoutExpired:
                ok, err = False, f"timed out after {timeout} s"
            produced = pre / f"{plans_name}.json"
            if ok and produced.exists():
                shutil.copy(produced, dest / produced.name)
                entry["plans_file"] = produced.name
            else:
                entry["plans_file"] = None
                entry["error"] = err if not ok else f"exit 0 but {produced.name} was not written"
            print(f"  {sc.name}: {planner} gpu={gpu} -> {entry.get('plans_file') or 'FAILED'} "
                  f"({time.time() - t0:.1f} s)", flush=True)
            runs.append(entry)
        shutil.copy(raw / "dataset.json", dest / "dataset.json")
        shutil.copy(pre / "dataset_fingerprint.json", dest / "dataset_fingerprint.json")
    (dest / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run nnU-Net 2.8.1's planners on synthetic fingerprints and store the "
                                             "plans as test fixtures.")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"fixture root (default {DEFAULT_OUT}, with --torchres {TORCHRES_OUT})")
    ap.add_argument("--torchres", action="store_true",
                    help="run the torch-resampling planners (on a few scenarios unless --only) instead")
    ap.add_argument("--only", nargs="*", default=None, help="scenario names to (re)generate (default: all)")
    ap.add_argument("--list", action="store_true", help="list scenarios and exit")
    ap.add_argument("--seed", type=int, default=20260, help="RNG seed (default 20260)")
    ap.add_argument("--jobs", type=int, default=2, help="scenarios run in parallel (default 2)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds allowed per planner run (default 900)")
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    args = ap.parse_args(argv)

    names = list(SCENARIOS)
    if args.list:
        for i, n in enumerate(names):
            print(f"{n:26s} {build_scenario(n, i, args.seed).description}")
        return 0
    chosen = args.only or (TORCHRES_SCENARIOS if args.torchres else names)
    args.out = args.out or (TORCHRES_OUT if args.torchres else DEFAULT_OUT)
    planners = TORCHRES_PLANNERS if args.torchres else None
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {unknown}; use --list")

    venv_py = ensure_nnunet_venv(args.venv)
    args.out.mkdir(parents=True, exist_ok=True)
    scenarios = [build_scenario(n, names.index(n), args.seed) for n in chosen]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as ex:
        results = list(ex.map(lambda s: (s.name, run_scenario(s, args.out, venv_py, args.timeout, planners)),
                              scenarios))
    failed = [(n, r["planner"], r["gpu_memory_target"]) for n, runs in results for r in runs if not r["plans_file"]]
    print(f"done in {time.time() - t0:.0f} s; nnU-Net {NNUNET_VERSION}; {len(failed)} failed run(s)")
    for f in failed:
        print("  failed:", *f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
