"""Generate the torch-resampling fixture with nnU-Net 2.8.1's own ``resample_torch_fornnunet``.

Seeded inputs (float32 data, float16 logits as nnU-Net's predictor hands them to the export, int8/int16 label maps
with -1) go through nnU-Net's function with the keyword arguments its ``*_torchres`` planners write (and a few
more: forced separate axis, memory-efficient labels, axes other than the first, a 2-D stack, labels >= 127). The
inputs, arguments and outputs are stored in ``tests/fixtures/nnunet_torch_resampling.npz`` (cases listed in its
``cases`` entry as JSON); ``tests/test_bundle_resampling.py`` compares ``resample_torch`` and ``resampled_argmax``
with them. nnU-Net is only called (in its venv); nothing of it is copied.

Usage::

    python benchmarks/make_torch_resampling_fixture.py [--out tests/fixtures/nnunet_torch_resampling.npz]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_venv import ensure_nnunet_venv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "nnunet_torch_resampling.npz"

SEPZ = {"force_separate_z": None, "memefficient_seg_resampling": False, "separate_z_anisotropy_threshold": 3}
NOSEP = {"force_separate_z": False, "memefficient_seg_resampling": False}
# name, input kind, input shape (c, x, y, z), new shape, current spacing, new spacing, kwargs (is_seg added)
CASES = [
    ("data_nosep_up", "data", (2, 7, 13, 11), (9, 20, 16), (2.0, 1.0, 1.0), (1.5, 0.7, 0.7), NOSEP),
    ("data_nosep_down", "data", (1, 12, 21, 17), (5, 14, 9), (1.0, 1.0, 1.0), (2.4, 1.5, 1.9), NOSEP),
    ("data_sepz_axis0", "data", (2, 6, 15, 14), (9, 22, 19), (3.6, 0.8, 0.8), (2.4, 0.55, 0.6), SEPZ),
    ("data_sepz_axis0_zdown", "data", (1, 11, 15, 14), (7, 10, 21), (3.0, 0.8, 0.8), (4.7, 1.2, 0.55), SEPZ),
    ("data_sepz_axis2", "data", (1, 16, 13, 5), (12, 18, 8), (0.7, 0.7, 3.5), (0.93, 0.5, 2.2), SEPZ),
    ("data_sepz_from_new_spacing", "data", (1, 10, 12, 12), (4, 16, 16), (2.0, 1.0, 1.0), (5.0, 0.75, 0.75), SEPZ),
    ("data_force_sepz", "data", (1, 6, 10, 9), (8, 14, 12), (2.0, 1.0, 1.0), (1.5, 0.7, 0.75),
     {**SEPZ, "force_separate_z": True}),
    ("data_2d_stack", "data", (2, 1, 17, 23), (1, 25, 12), (999.0, 0.7, 0.7), (999.0, 0.48, 1.34), SEPZ),
    ("data_2d_stack_nosep", "data", (1, 1, 17, 23), (1, 25, 12), (999.0, 0.7, 0.7), (999.0, 0.48, 1.34), NOSEP),
    ("logits_fp16_sepz", "logits", (3, 9, 14, 12), (7, 26, 20), (2.0, 1.0, 1.0), (2.5, 0.7, 0.7), SEPZ),
    ("logits_fp16_nosep", "logits", (3, 9, 14, 12), (7, 26, 20), (2.0, 1.0, 1.0), (2.5, 0.7, 0.7), NOSEP),
    ("logits_sepz_zup", "logits", (4, 6, 11, 12), (10, 8, 9), (3.0, 1.0, 1.0), (1.8, 1.4, 1.3), SEPZ),
    ("seg_nosep_up", "seg", (1, 7, 13, 11), (9, 20, 16), (2.0, 1.0, 1.0), (1.5, 0.7, 0.7), NOSEP),
    ("seg_nosep_down", "seg", (1, 12, 21, 17), (5, 14, 9), (1.0, 1.0, 1.0), (2.4, 1.5, 1.9), NOSEP),
    ("seg_sepz", "seg", (1, 6, 15, 14), (9, 22, 19), (3.6, 0.8, 0.8), (2.4, 0.55, 0.6), SEPZ),
    ("seg_sepz_axis1", "seg", (2, 15, 5, 14), (19, 9, 22), (0.8, 3.6, 0.8), (0.6, 2.4, 0.55), SEPZ),
    ("seg_memefficient", "seg", (1, 7, 13, 11), (9, 20, 16), (2.0, 1.0, 1.0), (1.5, 0.7, 0.7),
     {**NOSEP, "memefficient_seg_resampling": True}),
    ("seg_large_labels", "seg200", (1, 7, 13, 11), (5, 17, 8), (2.0, 1.0, 1.0), (2.6, 0.8, 1.7), NOSEP),
    ("seg_2d_stack", "seg", (1, 1, 17, 23), (1, 25, 12), (999.0, 0.7, 0.7), (999.0, 0.48, 1.34), SEPZ),
]

_VENV_SCRIPT = r"""
import json, sys
import numpy as np
from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

cases, out = json.loads(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(2026)
arrays = {}
for name, kind, shape, new_shape, current, new, kwargs in cases:
    if kind == "data":
        x = rng.normal(0, 3, shape).astype(np.float32)
    elif kind == "logits":
        x = rng.normal(0, 2, shape).astype(np.float16)
    else:
        labels = [-1, 0, 1, 2, 3] if kind == "seg" else [0, 5, 130, 200]
        coarse = rng.choice(labels, size=[shape[0]] + [max(1, s // 3) for s in shape[1:]])
        x = coarse.repeat(3, 1).repeat(3, 2).repeat(3, 3)[:, :shape[1], :shape[2], :shape[3]]
        x = np.pad(x, [(0, 0)] + [(0, max(0, s - x.shape[i + 1])) for i, s in enumerate(shape[1:])], mode="edge")
        x = x.astype(np.int8 if kind == "seg" else np.int16)
    y = resample_torch_fornnunet(x, new_shape, current, new, is_seg=kind.startswith("seg"), **kwargs)
    arrays[name + "/in"] = x
    arrays[name + "/out"] = np.asarray(y)
np.savez_compressed(out, cases=np.array(json.dumps(cases)), **arrays)
print(len(cases), "cases")
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="nnU-Net 2.8.1's torch resampling on seeded inputs -> npz fixture")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    args = ap.parse_args(argv)
    venv_py = ensure_nnunet_venv(args.venv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(venv_py), "-c", _VENV_SCRIPT, json.dumps(CASES), str(args.out)], check=True,
                   env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
