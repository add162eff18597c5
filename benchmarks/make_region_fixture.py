"""Generate ``tests/fixtures/nnunet_regions.pt``: nnU-Net 2.8.1's own region-based training targets, region loss and
region export, computed in the venv of ``nnunet_venv.py`` on small seeded arrays.

Recorded, for a BraTS-like label set (regions (1, 2, 3), (2, 3), (3,), ``regions_class_order`` [1, 2, 3]), with and
without an ignore label (4) and with ``batch_dice`` off and on:

- the label maps and deep-supervision logits fed to the loss, the targets nnU-Net builds from them
  (``ConvertSegmentationToRegionsTransform`` with the ignore label appended as the last channel, then
  ``DownsampleSegForDSTransform``), and the loss of ``DeepSupervisionWrapper(DC_and_BCE_loss)`` with the trainer's
  settings (``_build_loss``: soft Dice on the sigmoid with background, smooth 1e-5, BCE-with-logits, the trainer's
  deep-supervision weights);
- the label map and the per-region sigmoid probabilities of ``LabelManager.convert_logits_to_segmentation`` /
  ``apply_inference_nonlin`` for random logits, and ``revert_cropping_on_probabilities`` into a larger image.

It also writes ``tests/fixtures/nnunet_ignore_fingerprint.json``: nnU-Net's ``nnUNetv2_extract_fingerprint`` of a
tiny synthetic dataset (``make_synthetic_dataset(..., sparse=True)``) whose unannotated voxels hold nnU-Net's ignore
label (max label + 1). The test fingerprints the same data with the DIAG fork's -1 marks and ``"ignore": -1``.

The tests compute the same with the bundle's ``nnunet_loss`` / ``DeepSupervisedLoss`` (which take the label map and
build the regions inside the loss) and ``labels_from_probabilities`` / ``logits_to_original``'s uncropping, so
parity with nnU-Net is checked without nnU-Net being a dependency. nnU-Net is only called; none of its code is copied.

Usage::

    python benchmarks/make_region_fixture.py [--venv DIR]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nnunet_venv import fixture_venv_python, write_fixture  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nnunet_regions.pt"
FINGERPRINT = FIXTURE.with_name("nnunet_ignore_fingerprint.json")
# the sparse dataset of the fingerprint fixture; tests/test_verify.py builds the same one
SPARSE_DATASET = {"cases": 4, "shape": (20, 18, 10), "spacing": (1, 1, 2), "labels": 2, "seed": 6, "sparse": True}

# runs inside the nnU-Net venv; argv[1] = output file
GENERATOR = r'''
import sys
import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.label_handling.label_handling import LabelManager

REGIONS = [(1, 2, 3), (2, 3), (3,)]
ORDER = [1, 2, 3]
SCALES = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
torch.manual_seed(0)
out = {"regions": [list(r) for r in REGIONS], "regions_class_order": ORDER, "scales": SCALES, "losses": []}

weights = np.array([1 / 2 ** i for i in range(len(SCALES))])
weights[-1] = 0
weights = weights / weights.sum()
for ignore in (None, 4):
    for batch_dice in (False, True):
        seg = torch.randint(0, 4, (2, 1, 8, 12, 16))
        seg[:, :, 2:5, 3:9, 4:12] = 3  # a block of the innermost region
        if ignore is not None:
            seg[:, :, :, :, :3] = ignore  # unannotated voxels
        logits = [torch.randn(2, 3, *[int(round(s * f)) for s, f in zip(seg.shape[2:], scale)]) * 2
                  for scale in SCALES]
        regions = list(REGIONS) + ([ignore] if ignore is not None else [])
        convert = ConvertSegmentationToRegionsTransform(regions=regions, channel_in_seg=0)
        downsample = DownsampleSegForDSTransform(ds_scales=SCALES)
        per_sample = [downsample(segmentation=convert(segmentation=s)["segmentation"])["segmentation"] for s in seg]
        targets = [torch.stack([sample[k] for sample in per_sample]) for k in range(len(SCALES))]
        loss = DeepSupervisionWrapper(DC_and_BCE_loss(
            {}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
            use_ignore_label=ignore is not None, dice_class=MemoryEfficientSoftDiceLoss), weights)
        value = loss(logits, targets)
        out["losses"].append({"ignore_label": ignore, "batch_dice": batch_dice, "seg": seg.to(torch.int16),
                              "logits": logits, "targets": [t.bool() for t in targets], "loss": float(value)})

labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": [3]}
manager = LabelManager(labels, ORDER)
logits = torch.randn(3, 6, 7, 9) * 2
out["export"] = {
    "labels": labels,
    "logits": logits,
    "segmentation": torch.from_numpy(np.asarray(manager.convert_logits_to_segmentation(logits.numpy())).astype(np.int16)),
    "probabilities": manager.apply_inference_nonlin(logits),
    "bbox": [[1, 7], [2, 9], [0, 9]],
    "original_shape": [8, 12, 10],
}
out["export"]["uncropped"] = torch.as_tensor(manager.revert_cropping_on_probabilities(
    out["export"]["probabilities"].numpy(), out["export"]["bbox"], out["export"]["original_shape"]))
torch.save(out, sys.argv[1])
print("wrote", sys.argv[1])
'''


def ignore_label_fingerprint(python: Path) -> None:
    """nnU-Net's fingerprint of the sparse dataset with its -1 marks rewritten as the ignore label (max + 1)."""
    import json
    import os
    import tempfile

    import numpy as np
    import SimpleITK as sitk

    sys.path.insert(0, str(FIXTURE.parents[2]))
    from autoplan.synthetic import make_synthetic_dataset

    with tempfile.TemporaryDirectory() as tmp:
        raw = make_synthetic_dataset(Path(tmp) / "raw" / "Dataset967_Ignore", **SPARSE_DATASET)
        ignore = SPARSE_DATASET["labels"] + 1
        for label in (raw / "labelsTr").glob("*.nii.gz"):
            image = sitk.ReadImage(str(label))
            array = sitk.GetArrayFromImage(image).astype(np.int16)
            rewritten = sitk.GetImageFromArray(np.where(array == -1, ignore, array).astype(np.int16))
            rewritten.CopyInformation(image)
            sitk.WriteImage(rewritten, str(label), True)
        spec = json.loads((raw / "dataset.json").read_text())
        spec["labels"]["ignore"] = ignore
        (raw / "dataset.json").write_text(json.dumps(spec))
        env = {**os.environ, "nnUNet_raw": str(raw.parent), "nnUNet_preprocessed": str(Path(tmp) / "pre"),
               "nnUNet_results": str(Path(tmp) / "results")}
        subprocess.run([str(python.parent / "nnUNetv2_extract_fingerprint"), "-d", "967", "-np", "1"], check=True,
                       env=env)
        fingerprint = Path(tmp) / "pre" / "Dataset967_Ignore" / "dataset_fingerprint.json"
        FINGERPRINT.write_text(fingerprint.read_text())
    print("wrote", FINGERPRINT)


def main(argv=None) -> int:
    python = fixture_venv_python(__doc__, argv)
    write_fixture(python, FIXTURE, GENERATOR)
    ignore_label_fingerprint(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
