"""The real MONAI Deploy App SDK 4.0.0 runs emitted bundles, from another working directory, with a loader that hands
over a channel-less image (as the SDK's DICOM path does), and its label maps equal the bundles' own inference.

The SDK is not a dependency of autoplan; this script installs it once in its own virtual environment
(``~/.cache/autoplan/monai-deploy-4.0.0-venv`` or ``--venv``; created with the system's packages visible so that
it reuses the installed torch): ``monai-deploy-app-sdk==4.0.0`` with ``pydicom`` and ``highdicom`` (the SDK imports
them without listing them), then the installed MONAI version again inside the venv (the SDK's ``monai.deploy``
lives in the venv's ``monai`` folder, which the system's ``monai`` package would otherwise shadow) and ``filelock``
(Holoscan's wheel finalises itself at interpreter start, before the system packages are on the path).

Everything else happens in ``--work`` (default: a new temporary folder): a synthetic dataset, two 3d_fullres fold
bundles trained one short epoch each by their own command, an ensemble bundle of both (``tools/ensemble.py
make-bundle``), the fold bundle's ``models/model.ts`` (``ckpt_export``, scripting), and the Deploy application
(``deploy_app.py``, an ``Application`` of a NIfTI loader, ``MonaiBundleInferenceOperator`` and a NIfTI writer, as in
the SDK's spleen example), run in ``work/elsewhere``.

Checks (each printed as ok / FAILED; the exit status is 1 if any failed), for each route the bundle docs describe:
1. the fold bundle folder as ``bundle_path``;
2. the fold bundle's TorchScript file as ``bundle_path`` (configs from its ``extra/``, the bundle folder on
   ``PYTHONPATH`` for ``scripts``);
3. the ensemble bundle folder as ``bundle_path``;
each label map equals the bundle's own ``monai.bundle run`` inference, voxel for voxel, in the same geometry.

Usage::

    python integration/monai_deploy.py [--work DIR] [--venv DIR] [--regions]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

PACKAGES = ["monai-deploy-app-sdk==4.0.0", "pydicom", "highdicom"]
DEFAULT_VENV = Path.home() / ".cache" / "autoplan" / "monai-deploy-4.0.0-venv"
FAST = ["--epochs", "1", "--iterations_per_epoch", "5", "--val_iterations", "1", "--num_workers", "0"]

# The application, run by the venv's python: loader -> MonaiBundleInferenceOperator -> writer.
APP = '''
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from holoscan.conditions import CountCondition
from monai.deploy.core import Application, ConditionType, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.monai_bundle_inference_operator import IOMapping, MonaiBundleInferenceOperator


class ChannelLessNiftiLoader(Operator):
    """A NIfTI file as an SDK Image of shape (x, y, z), no channel, with its affine (as the DICOM path gives)."""

    def __init__(self, fragment, *args, path, **kwargs):
        self.path = path
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        from monai.transforms import LoadImage

        image = LoadImage(image_only=True)(self.path)
        array = image.numpy()
        assert array.ndim == 3, array.shape
        affine = np.asarray(image.affine)
        meta = {"spacing": np.asarray(image.pixdim), "original_affine": affine, "affine": affine,
                "spatial_shape": np.asarray(array.shape), "original_channel_dim": "no_channel",
                "filename_or_obj": self.path}
        op_output.emit(Image(array, metadata=meta), "image")


class NiftiWriter(Operator):
    """The label map Image ((z, y, x) after the operator's axis swap) with the input file's geometry."""

    def __init__(self, fragment, *args, reference, out, **kwargs):
        self.reference, self.out = reference, out
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("pred")

    def compute(self, op_input, op_output, context):
        labels = sitk.GetImageFromArray(np.asarray(op_input.receive("pred").asnumpy(), dtype=np.uint8))
        labels.CopyInformation(sitk.ReadImage(self.reference))
        sitk.WriteImage(labels, self.out)


class BundleApp(Application):
    def compose(self):
        image, bundle, out = sys.argv[1:4]
        loader = ChannelLessNiftiLoader(self, CountCondition(self, 1), path=image, name="loader")
        infer = MonaiBundleInferenceOperator(
            self, app_context=Application.init_app_context({}), bundle_path=Path(bundle), name="bundle",
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)])
        writer = NiftiWriter(self, reference=image, out=out, name="writer")
        self.add_flow(loader, infer, {("image", "image")})
        self.add_flow(infer, writer, {("pred", "pred")})


if __name__ == "__main__":
    BundleApp().run()
'''


def ensure_venv(path: Path) -> Path:
    """The venv's python, installing the SDK first when it is not there."""
    python = path / "bin" / "python"
    marker = path / ".autoplan-complete"
    if not marker.exists():
        import monai

        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *PACKAGES], check=True)
        subprocess.run([*pip, "--ignore-installed", "--no-deps", f"monai=={monai.__version__}", "filelock"],
                       check=True)
        marker.write_text("\n".join(PACKAGES) + "\n")
    return python


def bundle_run(bundle: Path, *args) -> None:
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=bundle,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{bundle}: monai.bundle {args[0]} failed:\n{result.stderr[-3000:]}")


def prepare(work: Path, regions: bool = False) -> tuple[dict, Path]:
    """Two trained fold bundles, their ensemble and the fold bundle's model.ts; returns them and a test image. With
    ``regions`` the dataset declares BraTS-style regions."""
    from autoplan.pipeline import run
    from autoplan.synthetic import make_synthetic_dataset
    from tools import ensemble

    raw = make_synthetic_dataset(work / "raw" / "Dataset965_Deploy", cases=8, shape=(32, 32, 16), spacing=(1, 1, 2),
                                 labels=3 if regions else 2, test_cases=1, seed=13, regions=regions)
    run(raw, work / "work", processes=1, configurations=["3d_fullres"], folds=[0, 1])
    folds = [work / "work" / "bundles" / f"Dataset965_Deploy_3d_fullres_fold{k}" for k in (0, 1)]
    for bundle in folds:
        bundle_run(bundle, "run", "training", "--config_file", "configs/train.json", *FAST)
    if ensemble.main(["make-bundle", *map(str, folds), "--out", str(work / "Dataset965_Deploy_ensemble")]) != 0:
        raise RuntimeError("make-bundle failed")
    bundle_run(folds[0], "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file",
               "models/model.pt", "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")
    image = next((raw / "imagesTs").glob("*_0000.nii.gz"))
    return {"fold": folds[0], "ensemble": work / "Dataset965_Deploy_ensemble"}, image


def own_inference(bundle: Path, image: Path, out: Path) -> sitk.Image:
    bundle_run(bundle, "run", "--config_file", "configs/inference.json", "--dataset_dir", image, "--output_dir", out)
    return sitk.ReadImage(str(out / (image.name[: -len("_0000.nii.gz")] + ".nii.gz")))


def deploy(python: Path, app: Path, image: Path, bundle_path: Path, out: Path, cwd: Path, pythonpath=None):
    """Runs the app in ``cwd`` with the venv's python; returns the label map it wrote and the seconds taken."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", 'ulimit -s 32768 && exec "$@"', "app", str(python), str(app), str(image),
                             str(bundle_path), str(out)], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the Deploy app failed ({bundle_path}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return sitk.ReadImage(str(out)), time.monotonic() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the SDK's virtual environment")
    parser.add_argument("--regions", action="store_true", help="a region-based (BraTS-style) dataset")
    args = parser.parse_args(argv)
    work = (args.work or Path(tempfile.mkdtemp(prefix="autoplan-deploy-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(args.venv)
    bundles, image = prepare(work, args.regions)
    app = work / "deploy_app.py"
    app.write_text(APP)
    elsewhere = work / "elsewhere"  # as a packaged app: not the bundle folder
    elsewhere.mkdir(exist_ok=True)
    results = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append(ok)
        print(f"{'ok    ' if ok else 'FAILED'} {name}{': ' + detail if detail else ''}", flush=True)

    routes = [("fold bundle folder as bundle_path", bundles["fold"], bundles["fold"], None),
              ("fold bundle's model.ts as bundle_path (bundle folder on PYTHONPATH)", bundles["fold"],
               bundles["fold"] / "models" / "model.ts", bundles["fold"]),
              ("ensemble bundle folder as bundle_path", bundles["ensemble"], bundles["ensemble"], None)]
    for i, (name, bundle, bundle_path, pythonpath) in enumerate(routes):
        own = own_inference(bundle, image, work / f"own_{i}")
        got, seconds = deploy(python, app, image, bundle_path, work / f"deploy_{i}.nii.gz", elsewhere, pythonpath)
        a, b = sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(own)
        same_geometry = (got.GetSize() == own.GetSize() and np.allclose(got.GetSpacing(), own.GetSpacing())
                         and np.allclose(got.GetOrigin(), own.GetOrigin()))
        check(f"{name}: equals the bundle's own inference", same_geometry and np.array_equal(a, b),
              f"{int((a != b).sum()) if a.shape == b.shape else 'shape ' + str(a.shape)} of {b.size} voxels "
              f"differ, labels {sorted(np.unique(b).tolist())}, {seconds:.0f} s")
    print(json.dumps({"work": str(work), "passed": sum(results), "failed": len(results) - sum(results)}))
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
