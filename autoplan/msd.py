"""Convert a Medical Segmentation Decathlon / nnU-Net v1 task into the nnU-Net v2 raw layout (spec 1.3).

v1 keeps all channels of a case in one 4-D NIfTI, maps integers to label names and lists files under ``training``.
v2 wants one file per channel (``CASE_XXXX.nii.gz``), names mapped to integers and ``channel_names``. The source
folder is only read; the output folder appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from autoplan.dataset import DatasetError, load_json
from autoplan.files import atomic_folder

DROPPED_KEYS = ("training", "test", "numTest", "tensorImageSize", "modality", "labels")


def _case_id(path: str) -> str:
    name = Path(path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def _split_channels(src: Path, dst_dir: Path, case: str, num_channels: int) -> None:
    """Write one NIfTI per channel; a 3-D file is copied byte for byte."""
    import nibabel as nib

    try:
        image = nib.load(str(src))
        ndim = len(image.shape)
    except Exception as exc:  # nibabel raises many types for bad files
        raise DatasetError([f"{src}: unreadable NIfTI ({exc})"]) from None
    if ndim == 3:
        if num_channels != 1:
            raise DatasetError([f"{src}: 3-D image but dataset.json declares {num_channels} modalities"])
        shutil.copyfile(src, dst_dir / f"{case}_0000.nii.gz")
        return
    if ndim != 4 or image.shape[3] != num_channels:
        raise DatasetError([f"{src}: shape {image.shape} does not hold the {num_channels} declared modalities "
                            "along the 4th axis"])
    for c in range(num_channels):
        nib.save(image.slicer[..., c], str(dst_dir / f"{case}_{c:04d}.nii.gz"))


def convert_msd(task_dir, out_dir) -> Path:
    """Convert ``task_dir`` (with dataset.json, imagesTr, labelsTr, optional imagesTs) into ``out_dir``."""
    task_dir, out_dir = Path(task_dir), Path(out_dir)
    spec = load_json(task_dir / "dataset.json")
    problems = [f"{task_dir / 'dataset.json'}: required v1 key '{k}' is missing"
                for k in ("modality", "labels", "training") if k not in spec]
    if problems:
        raise DatasetError(problems)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DatasetError([f"{out_dir}: output folder already exists and is not empty"])
    modalities = {str(k): v for k, v in sorted(spec["modality"].items(), key=lambda kv: int(kv[0]))}
    num_channels = len(modalities)
    with atomic_folder(out_dir) as tmp:
        for sub in ("imagesTr", "labelsTr"):
            (tmp / sub).mkdir()
        for entry in spec["training"]:
            image, label = task_dir / entry["image"], task_dir / entry["label"]
            for f in (image, label):
                if not f.is_file():
                    raise DatasetError([f"{f}: listed in dataset.json 'training' but not found"])
            case = _case_id(entry["image"])
            _split_channels(image, tmp / "imagesTr", case, num_channels)
            shutil.copyfile(label, tmp / "labelsTr" / f"{case}.nii.gz")
        tests = sorted(p for p in (task_dir / "imagesTs").glob("*.nii.gz") if not p.name.startswith(".")) \
            if (task_dir / "imagesTs").is_dir() else []
        if tests:
            (tmp / "imagesTs").mkdir()
            for image in tests:
                _split_channels(image, tmp / "imagesTs", _case_id(image.name), num_channels)
        v2 = {k: v for k, v in spec.items() if k not in DROPPED_KEYS}
        v2["channel_names"] = modalities
        v2["labels"] = {name: int(value) for value, name in sorted(spec["labels"].items(), key=lambda kv: int(kv[0]))}
        v2["numTraining"] = len(spec["training"])
        v2["file_ending"] = ".nii.gz"
        (tmp / "dataset.json").write_text(json.dumps(v2, indent=4) + "\n")
    return out_dir
