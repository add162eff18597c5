"""Generate ``tests/fixtures/nnunet_preprocessed.npz``: cases preprocessed by nnU-Net 2.8.1's own
``DefaultPreprocessor.run_case`` (in the venv of ``nnunet_venv.py``), for the tests to compare with the bundle's
``preprocess_case``.

- ``hippocampus_001``, ``_003``, ``_004`` of ``../shared/data/Dataset004_Hippocampus`` with nnU-Net's reference plans
  (``3d_fullres``: crop to non-zero, z-score; spacing 1 mm, so nothing is resampled).
- Two small synthetic 2-channel cases that must be resampled, with a plan derived from the Hippocampus plans:
  channel 0 ``CTNormalization``, channel 1 z-score inside the non-zero mask, ``transpose_forward`` [0, 2, 1], a zero
  border and a zero hole inside (the crop fills it), labels 0-2. ``aniso`` (spacing z 3.1, y 0.8, x 0.7 mm) is
  resampled with separate z; ``mild`` (1.3, 1.1, 0.9 mm) is not anisotropic itself, but the targets of
  ``3d_fullres`` are. Each goes through ``3d_fullres`` (spacing 2.0, 0.75, 0.6 after transposition), ``3d_iso``
  (1 mm, a plain 3-D order-3 resize) and ``2d`` (in-plane only). Their raw arrays and spacings (as read back from
  NIfTI, i.e. rounded to float32) are stored too, so the tests need neither the files nor scikit-image: the
  fixture carries the results of nnU-Net's skimage-based resampling.

Arrays with few distinct values (the Hippocampus ones: z-scored 8-bit intensities) are stored as their distinct values
plus an index map, compressed, so the file stays small; everything is exact float32. nnU-Net is only called; none of
its code is copied.

Usage::

    python benchmarks/make_preprocessing_fixture.py [--venv DIR] [--shared DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_venv import ensure_nnunet_venv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "nnunet_preprocessed.npz"
HIPPOCAMPUS_CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]
SYNTHETIC = {  # (z, y, x) shape and spacing, nnU-Net order
    "aniso": {"shape": [7, 16, 14], "spacing": [3.1, 0.8, 0.7]},
    "mild": {"shape": [10, 12, 11], "spacing": [1.3, 1.1, 0.9]},
}
CONFIGURATIONS = ["3d_fullres", "3d_iso", "2d"]

_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import numpy as np
import SimpleITK as sitk
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

hippo_root, hippo_plans_file, hippo_cases, synthetic, configurations, out = json.loads(sys.argv[1])
arrays = {}


def store(key, array):
    values, index = np.unique(array, return_inverse=True)
    if array.dtype.kind == "f" and len(values) < 2 ** 16:
        arrays[key + "__values"] = values
        arrays[key + "__index"] = index.reshape(array.shape).astype(np.uint16)
    else:
        arrays[key] = array


def record(key, data, seg, props):
    store(key + "/data", data)
    arrays[key + "/seg"] = seg
    arrays[key + "/properties"] = np.array(json.dumps({
        "shape_before_cropping": [int(s) for s in props["shape_before_cropping"]],
        "bbox_used_for_cropping": [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]],
        "shape_after_cropping_and_before_resampling":
            [int(s) for s in props["shape_after_cropping_and_before_resampling"]]}))


hippo_plans = json.loads(Path(hippo_plans_file).read_text())
hippo_json = json.loads((Path(hippo_root) / "dataset.json").read_text())
pm = PlansManager(hippo_plans)
for case in hippo_cases:
    data, seg, props = DefaultPreprocessor(verbose=False).run_case(
        [str(Path(hippo_root) / "imagesTr" / f"{case}_0000.nii.gz")],
        str(Path(hippo_root) / "labelsTr" / f"{case}.nii.gz"), pm, pm.get_configuration("3d_fullres"), hippo_json)
    record(f"{case}/3d_fullres", data, seg, props)

plans = json.loads(json.dumps(hippo_plans))
plans["dataset_name"] = "Dataset999_Synthetic"
plans["transpose_forward"], plans["transpose_backward"] = [0, 2, 1], [0, 2, 1]
plans["foreground_intensity_properties_per_channel"] = {
    "0": {"max": 900.0, "mean": 120.0, "median": 110.0, "min": -300.0, "percentile_00_5": -150.0,
          "percentile_99_5": 600.0, "std": 170.0},
    "1": {"max": 5.0, "mean": 1.0, "median": 1.0, "min": 0.0, "percentile_00_5": 0.1, "percentile_99_5": 4.0,
          "std": 1.0}}
full = plans["configurations"]["3d_fullres"]
full.update(spacing=[2.0, 0.75, 0.6], normalization_schemes=["CTNormalization", "ZScoreNormalization"],
            use_mask_for_norm=[False, True])
plans["configurations"]["3d_iso"] = {"inherits_from": "3d_fullres", "spacing": [1.0, 1.0, 1.0]}
two_d = plans["configurations"]["2d"]
two_d.update(spacing=[0.75, 0.6], normalization_schemes=["CTNormalization", "ZScoreNormalization"],
             use_mask_for_norm=[False, True])
arrays["synthetic_plans"] = np.array(json.dumps(plans))
dataset_json = {"channel_names": {"0": "CT", "1": "MR"}, "labels": {"background": 0, "a": 1, "b": 2},
                "numTraining": 2, "file_ending": ".nii.gz"}
pm = PlansManager(plans)
rng = np.random.RandomState(4)
with tempfile.TemporaryDirectory() as tmp:
    for name, case in synthetic.items():
        shape, spacing = case["shape"], case["spacing"]
        zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
        body = (yy ** 2 + xx ** 2 < 0.8) & (np.abs(zz) < 0.9)
        body[:, :2] = False  # a zero border: the crop removes it
        hole = (yy ** 2 + (xx - 0.1) ** 2 < 0.05) & (np.abs(zz) < 0.4)  # zero in every channel, filled by the crop
        ct = np.where(body & ~hole, 200 * zz + 150 * xx + rng.normal(100, 80, shape), 0).astype(np.float32)
        mr = np.where(body & ~hole, rng.gamma(2.0, 0.7, shape) + yy, 0).astype(np.float32)
        seg = np.zeros(shape, np.float32)
        seg[body & (yy ** 2 + xx ** 2 < 0.35)] = 1
        seg[body & (yy > 0.2) & (xx < 0.0) & (zz > -0.5)] = 2
        files = []
        for c, channel in enumerate([ct, mr]):
            image = sitk.GetImageFromArray(channel)
            image.SetSpacing(spacing[::-1])
            files.append(str(Path(tmp) / f"{name}_{c:04d}.nii.gz"))
            sitk.WriteImage(image, files[-1])
        label = sitk.GetImageFromArray(seg.astype(np.uint8))
        label.SetSpacing(spacing[::-1])
        sitk.WriteImage(label, str(Path(tmp) / f"{name}.nii.gz"))
        arrays[f"{name}/raw_data"] = np.stack([ct, mr])
        arrays[f"{name}/raw_seg"] = seg.astype(np.int8)[None]
        for configuration in configurations:
            data, seg_out, props = DefaultPreprocessor(verbose=False).run_case(
                files, str(Path(tmp) / f"{name}.nii.gz"), pm, pm.get_configuration(configuration), dataset_json)
            record(f"{name}/{configuration}", data, seg_out, props)
        # the spacing as nnU-Net's reader returns it: NIfTI stores float32, so 1.1 reads as 1.100000023841858
        arrays[f"{name}/spacing"] = np.array(props["spacing"], dtype=np.float64)
np.savez_compressed(out, **arrays)
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"),
                    help="the shared reference folder (default ../shared)")
    args = ap.parse_args(argv)
    python = ensure_nnunet_venv(args.venv)
    shared = Path(args.shared)
    hippocampus = shared / "data" / "Dataset004_Hippocampus"
    plans = shared / "reference" / "nnunet_plans" / "Dataset004_Hippocampus" / "nnUNetPlans.json"
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    tmp = FIXTURE.with_name(f".{FIXTURE.stem}.tmp.npz")
    payload = [str(hippocampus), str(plans), HIPPOCAMPUS_CASES, SYNTHETIC, CONFIGURATIONS, str(tmp)]
    subprocess.run([str(python), "-c", _SCRIPT, json.dumps(payload)], check=True)
    tmp.replace(FIXTURE)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
