"""Decathlon (nnU-Net v1) tasks become the v2 layout (spec 1.3)."""

import json
import re

import nibabel as nib
import numpy as np
import pytest

from conftest import folder_digest
from autoplan.dataset import DatasetError
from autoplan.msd import convert_msd
from autoplan.verify import verify_dataset


def make_task(root, cases=3, channels=2):
    root.mkdir()
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir()
    affine = np.diag([0.9, 0.9, 2.5, 1.0])
    rng = np.random.default_rng(0)
    training = []
    for i in range(cases):
        image = rng.normal(100, 10, (12, 10, 6, channels)).astype(np.float32)
        label = np.zeros((12, 10, 6), np.uint8)
        label[3:7, 3:6, 2:4] = 1
        label[8:10, 6:8, 1:3] = 2
        nib.save(nib.Nifti1Image(image, affine), str(root / "imagesTr" / f"prostate_{i:02d}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"prostate_{i:02d}.nii.gz"))
        training.append({"image": f"./imagesTr/prostate_{i:02d}.nii.gz", "label": f"./labelsTr/prostate_{i:02d}.nii.gz"})
    nib.save(nib.Nifti1Image(np.ones((12, 10, 6, channels), np.float32), affine),
             str(root / "imagesTs" / "prostate_99.nii.gz"))
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"macOS resource fork")
    spec = {"name": "PROSTATE", "modality": {"0": "T2", "1": "ADC"}, "labels": {"0": "background", "1": "PZ",
            "2": "TZ"}, "numTraining": cases, "numTest": 1, "tensorImageSize": "4D", "training": training,
            "test": ["./imagesTs/prostate_99.nii.gz"], "licence": "CC-BY-SA 4.0"}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_convert_splits_channels_and_inverts_labels(tmp_path):
    task = make_task(tmp_path / "Task05_Prostate")
    before = folder_digest(task)
    out = convert_msd(task, tmp_path / "Dataset005_Prostate")
    assert folder_digest(task) == before
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T2", "1": "ADC"}
    assert spec["labels"] == {"background": 0, "PZ": 1, "TZ": 2}
    assert spec["numTraining"] == 3 and spec["file_ending"] == ".nii.gz" and spec["licence"] == "CC-BY-SA 4.0"
    assert not {"modality", "training", "test", "numTest", "tensorImageSize"} & set(spec)
    assert sorted(p.name for p in (out / "imagesTr").iterdir())[:2] == ["prostate_00_0000.nii.gz",
                                                                      "prostate_00_0001.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["prostate_99_0000.nii.gz",
                                                                   "prostate_99_0001.nii.gz"]
    original = nib.load(str(task / "imagesTr" / "prostate_01.nii.gz"))
    channel1 = nib.load(str(out / "imagesTr" / "prostate_01_0001.nii.gz"))
    np.testing.assert_array_equal(channel1.get_fdata(), original.get_fdata()[..., 1])
    np.testing.assert_allclose(channel1.affine, original.affine)
    report = verify_dataset(out, processes=1)
    assert report.ok, report.problems


def test_convert_refuses_existing_output_and_bad_task(tmp_path):
    task = make_task(tmp_path / "Task05_Prostate")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(DatasetError, match="already exists"):
        convert_msd(task, tmp_path / "taken")
    spec = json.loads((task / "dataset.json").read_text())
    spec["modality"] = {"0": "T2"}  # the files hold 2 channels
    (task / "dataset.json").write_text(json.dumps(spec))
    message = (f"{task / 'imagesTr' / 'prostate_00.nii.gz'}: shape (12, 10, 6, 2) does not hold the 1 declared "
               "modalities along the 4th axis")
    with pytest.raises(DatasetError, match=re.escape(message)):
        convert_msd(task, tmp_path / "Dataset005_Prostate")
    assert not (tmp_path / "Dataset005_Prostate").exists()  # nothing half-written
