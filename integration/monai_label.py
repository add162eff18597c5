"""A real MONAI Label 0.8.5 server runs an emitted bundle through the active-learning loop: infer, train, submit a
corrected label, train again (in the background, as 3D Slicer does), infer again.

MONAI Label is not a dependency of autoplan; this script installs it once in its own virtual environment
(``~/.cache/autoplan/monailabel-0.8.5-venv`` or ``--venv``; created with the system's packages visible, so that it
uses the torch already installed, plus ``monailabel==0.8.5`` and ``pydicom<3``, MONAI Label's own pin). Everything
else happens in ``--work`` (default: a new temporary folder): a synthetic dataset, its 3d_fullres fold-0 bundle in
the ``monaibundle`` sample app's ``model/`` folder, a studies folder in MONAI Label's layout, and the server's log.

Checks (each printed as ok / FAILED; the exit status is 1 if any failed):
1. the server's first inference equals the bundle's own inference of the same image;
2. each "Train" request trains (``models/model.pt`` changes) and its learning rate ends where nnU-Net's poly schedule
   for ``max_epochs`` ends;
3. a label submitted through ``PUT /datastore/label`` reaches the next training (the cached arrays change);
4. the second inference differs from the first (the model the server serves was updated);
5. with ``--ensemble``: an ensemble bundle of folds 0 and 1 (``tools/ensemble.py make-bundle``) is served from the
   same app, and its inference equals the ensemble bundle's own, with the same labels.

The bundle's epoch is shortened (``iterations_per_epoch`` 20) so that the run takes minutes on a CPU; nothing else
in the bundle is changed.

Usage::

    python integration/monai_label.py [--work DIR] [--venv DIR] [--port 8765] [--ensemble] [--regions] [--classes K]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

BUNDLE = "autoplan_synthetic_segmentation"  # MONAI Label takes the task type from a name with "segmentation"
ENSEMBLE = "autoplan_synthetic_ensemble_segmentation"
PACKAGES = ["monailabel==0.8.5", "pydicom<3"]
DEFAULT_VENV = Path.home() / ".cache" / "autoplan" / "monailabel-0.8.5-venv"


def ensure_venv(path: Path) -> Path:
    """The venv's python, installing MONAI Label first when it is not there."""
    if not (path / "bin" / "monailabel").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
        subprocess.run([str(path / "bin" / "pip"), "install", "-q", *PACKAGES], check=True)
    return path / "bin" / "python"


def monailabel_command(python: Path) -> list[str]:
    """``monailabel`` through the venv's python: the ``monailabel`` shell script would also put the folder holding
    the venv on PYTHONPATH, where any other package lying there would be imported."""
    return [str(python), "-m", "monailabel.main"]


def venv_env(python: Path) -> dict:
    """The environment of an activated venv (its bin/ first on PATH)."""
    return {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(work: Path, monailabel: Path, with_ensemble: bool = False, regions: bool = False,
            classes: int = 0) -> tuple[Path, Path, list[str]]:
    """Dataset, bundle (trained one short epoch by its own command, so the server has weights to serve), app and
    studies; with ``with_ensemble`` also fold 1 (trained the same way) and the ensemble bundle of both folds in the
    app's ``model/``; with ``regions`` the dataset declares BraTS-style regions, with ``classes`` a case-level class
    (multi-task bundles). Returns the bundle, the studies folder and the unlabelled cases."""
    from autoplan.pipeline import run
    from autoplan.synthetic import make_synthetic_dataset

    raw = make_synthetic_dataset(work / "raw" / "Dataset963_LabelLoop", cases=8, shape=(32, 32, 16),
                                 spacing=(1, 1, 2), labels=3 if regions else 2, test_cases=2, seed=11,
                                 regions=regions, classes=classes)
    run(raw, work / "work", processes=1, configurations=["3d_fullres"], folds=[0, 1] if with_ensemble else [0])
    subprocess.run([*monailabel_command(monailabel), "apps", "--download", "--name", "monaibundle", "--output",
                    str(work / "apps")],
                   check=True, env=venv_env(monailabel))
    bundle = work / "apps" / "monaibundle" / "model" / BUNDLE
    shutil.copytree(work / "work" / "bundles" / "Dataset963_LabelLoop_3d_fullres_fold0", bundle)
    fold1 = work / "work" / "bundles" / "Dataset963_LabelLoop_3d_fullres_fold1"
    for folder in [bundle, fold1] if with_ensemble else [bundle]:
        train = json.loads((folder / "configs" / "train.json").read_text())
        train.update(iterations_per_epoch=20, val_iterations=2, num_workers=0)
        (folder / "configs" / "train.json").write_text(json.dumps(train, indent=4))
        subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
                        "--epochs", "1", "--dataset_dir", str(raw)], cwd=folder, check=True, capture_output=True)
    if with_ensemble:
        from tools import ensemble

        if ensemble.main(["make-bundle", str(bundle), str(fold1), "--out", str(bundle.parent / ENSEMBLE)]) != 0:
            raise RuntimeError("make-bundle failed")
    studies = work / "studies"
    return bundle, studies, write_studies(raw, studies)


def write_studies(raw: Path, studies: Path) -> list[str]:
    """MONAI Label's studies layout from a single-channel raw dataset: ``CASE.nii.gz`` images, the training labels in
    ``labels/final/``. Returns the unlabelled (``imagesTs``) cases."""
    (studies / "labels" / "final").mkdir(parents=True)
    unlabelled = []
    for folder in ("imagesTr", "imagesTs"):
        for image in sorted((raw / folder).glob("*_0000.nii.gz")):
            case = image.name[: -len("_0000.nii.gz")]
            shutil.copyfile(image, studies / f"{case}.nii.gz")
            label = raw / "labelsTr" / f"{case}.nii.gz"
            if folder == "imagesTr":
                shutil.copyfile(label, studies / "labels" / "final" / f"{case}.nii.gz")
            else:
                unlabelled.append(case)
    return unlabelled


class Server:
    """``monailabel start_server`` in a subprocess, and the REST calls the loop needs."""

    def __init__(self, monailabel: Path, app: Path, studies: Path, port: int, log: Path, models: str = BUNDLE):
        import requests

        self.url, self.http = f"http://127.0.0.1:{port}", requests
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [*monailabel_command(monailabel), "start_server", "--app", str(app), "--studies", str(studies), "--host",
             "127.0.0.1",
             "--port", str(port), "--conf", "models", models, "--conf", "zoo_source", "github", "--conf", "sam2",
             "false"], stdout=self.log, stderr=subprocess.STDOUT, env=venv_env(monailabel))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {log}")
            try:
                if self.http.get(f"{self.url}/info/", timeout=5).ok:
                    return
            except self.http.ConnectionError:
                pass
            time.sleep(2)
        raise RuntimeError(f"the server did not answer within 600 s; see {log}")

    def infer(self, case: str, out: Path, model: str = BUNDLE) -> np.ndarray:
        r = self.http.post(f"{self.url}/infer/{model}", params={"image": case, "output": "image"},
                           data={"params": json.dumps({"device": "cpu"})}, timeout=600)
        r.raise_for_status()
        out.write_bytes(r.content)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))

    def train(self, background: bool = False) -> None:
        body = {"max_epochs": 1, "device": "cpu"}
        r = self.http.post(f"{self.url}/train/{BUNDLE}", params={"run_sync": not background}, json=body, timeout=1800)
        r.raise_for_status()
        if background:  # 3D Slicer's way: start, then poll the task's status
            task = r.json().get("id")
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                status = self.http.get(f"{self.url}/train/", timeout=30).json()
                if status.get("id") == task and status.get("status") in ("DONE", "ERROR"):
                    if status["status"] == "ERROR":
                        raise RuntimeError(f"background training failed: {status}")
                    return
                time.sleep(3)
            raise RuntimeError("background training did not finish within 1800 s")

    def save_label(self, case: str, label_file: Path) -> None:
        with open(label_file, "rb") as f:
            r = self.http.put(f"{self.url}/datastore/label", params={"image": case, "tag": "final"},
                              files={"label": (label_file.name, f)}, data={"params": "{}"}, timeout=120)
        r.raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def own_inference(bundle: Path, image: Path, out: Path) -> np.ndarray:
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                    "--dataset_dir", str(image), "--output_dir", str(out)], cwd=bundle, check=True,
                   capture_output=True)
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / image.name)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a new temporary one)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="MONAI Label's virtual environment")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ensemble", action="store_true", help="also serve an ensemble bundle of folds 0 and 1")
    parser.add_argument("--regions", action="store_true", help="a region-based (BraTS-style) dataset")
    parser.add_argument("--classes", type=int, default=0, help="a multi-task dataset with this many case classes")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="autoplan-monailabel-"))
    work.mkdir(parents=True, exist_ok=True)
    monailabel = ensure_venv(args.venv)
    bundle, studies, unlabelled = prepare(work, monailabel, args.ensemble, args.regions, args.classes)
    results = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        results.append(ok)
        print(f"{'ok    ' if ok else 'FAILED'} {name}{': ' + detail if detail else ''}", flush=True)

    models = f"{BUNDLE},{ENSEMBLE}" if args.ensemble else BUNDLE
    server = Server(monailabel, work / "apps" / "monaibundle", studies, args.port, work / "server.log", models)
    try:
        case = unlabelled[0]
        if args.ensemble:  # before any training changes the fold bundle
            served = server.infer(case, work / "infer_ensemble.nii.gz", ENSEMBLE)
            own = own_inference(bundle.parent / ENSEMBLE, studies / f"{case}.nii.gz", work / "own_ensemble")
            info = server.http.get(f"{server.url}/info/", timeout=30).json()
            labels = info.get("models", {}).get(ENSEMBLE, {}).get("labels")
            check("the server's ensemble inference equals the ensemble bundle's own",
                  np.array_equal(served, own), f"{int((served != own).sum())} of {own.size} voxels differ, "
                  f"labels served {labels}, predicted {sorted(np.unique(own).tolist())}")
        first = server.infer(case, work / "infer1.nii.gz")
        own = own_inference(bundle, studies / f"{case}.nii.gz", work / "own")
        check("the server's inference equals the bundle's own", np.array_equal(first, own),
              f"{int((first != own).sum())} of {first.size} voxels differ")
        seg_files = sorted((bundle.parent / "preprocessed").glob("*/case_000_seg.npy"))
        for round_, background in ((1, False), (2, True)):
            if round_ == 2:  # a clinician corrects case_000's label (label 2 painted as 1) and submits it
                cached = np.load(seg_files[0])
                label = sitk.ReadImage(str(studies / "labels" / "final" / "case_000.nii.gz"))
                array = sitk.GetArrayFromImage(label)
                array[array == 2] = 1
                corrected = sitk.GetImageFromArray(array)
                corrected.CopyInformation(label)
                sitk.WriteImage(corrected, str(work / "case_000_corrected.nii.gz"))
                server.save_label("case_000", work / "case_000_corrected.nii.gz")
            before = sha(bundle / "models" / "model.pt")
            started = time.monotonic()
            server.train(background)
            mode = "background" if background else "run_sync"
            check(f"train request {round_} ({mode}) trained", sha(bundle / "models" / "model.pt") != before,
                  f"{time.monotonic() - started:.0f} s")
            resume = torch.load(bundle / "models" / "resume" / "checkpoint_latest.pt", weights_only=True)
            lr = resume["optimizer"]["param_groups"][0]["lr"]
            check(f"train request {round_}: the learning rate ends where poly over max_epochs 1 ends",
                  lr == 0.0, f"learning rate after the last epoch {lr}")
            if round_ == 2:
                seg_files = sorted((bundle.parent / "preprocessed").glob("*/case_000_seg.npy"))
                recached = np.load(seg_files[0])
                check("the submitted label reached training", (cached == 2).any() and not (recached == 2).any(),
                      f"label-2 voxels cached before {int((cached == 2).sum())}, after {int((recached == 2).sum())}")
        second = server.infer(case, work / "infer2.nii.gz")
        check("inference after training differs from before", not np.array_equal(first, second),
              f"{int((first != second).sum())} voxels changed")
    finally:
        server.stop()
    print(f"{sum(results)} passed, {len(results) - sum(results)} failed (work folder {work})")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
