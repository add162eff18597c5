"""The bundle runtime pieces written here (not MONAI's): pre/postprocessing, patch sampling, augmentation settings,
TTA inferer, loss and pseudo-Dice."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from autoplan.emit import augmentation_settings
from bundles.scripts.data import PatchDataset, initial_patch_size
from bundles.scripts.inference import NnUNetInferer
from bundles.scripts.metrics import PseudoDice
from bundles.scripts.preprocessing import (PlanSettings, from_nnunet_order, logits_to_original, normalize,
                                           preprocess_case, to_nnunet_order)

RESAMPLING = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}


def plan(spacing, transpose=(0, 1, 2), schemes=("ZScoreNormalization",), use_mask=(False,), props=None):
    backward = [list(transpose).index(i) for i in range(3)]
    return PlanSettings(list(spacing), list(transpose), backward, list(schemes), list(use_mask),
                        props or {"0": {"mean": 10.0, "std": 2.0, "percentile_00_5": 0.0, "percentile_99_5": 20.0}},
                        dict(RESAMPLING), {**RESAMPLING, "is_seg": True, "order": 1},
                        {**RESAMPLING, "order": 1})


def test_axis_order_round_trip():
    array = np.random.rand(2, 5, 6, 7)
    nn, spacing = to_nnunet_order(array, [0.5, 0.7, 3.0])
    assert nn.shape == (2, 7, 6, 5) and spacing == [3.0, 0.7, 0.5]
    np.testing.assert_array_equal(from_nnunet_order(nn, 3), array)
    flat, spacing2d = to_nnunet_order(np.random.rand(1, 5, 6), [1.0, 1.0])
    assert flat.shape == (1, 1, 6, 5) and spacing2d == [999.0, 1.0, 1.0]


def test_normalization_schemes():
    data = np.stack([np.array([[[-50.0, 5.0], [15.0, 40.0]]]), np.array([[[0.0, 2.0], [4.0, 6.0]]])])
    seg = np.array([[[[-1, 0], [0, 0]]]])
    p = plan([1, 1, 1], schemes=("CTNormalization", "ZScoreNormalization"), use_mask=(False, True),
             props={"0": {"mean": 10.0, "std": 2.0, "percentile_00_5": 0.0, "percentile_99_5": 20.0}})
    out = normalize(data, seg, p)
    np.testing.assert_allclose(out[0].ravel(), [(0 - 10) / 2, (5 - 10) / 2, (15 - 10) / 2, (20 - 10) / 2])
    inside = np.array([2.0, 4.0, 6.0])
    assert out[1, 0, 0, 0] == 0.0  # outside the mask stays 0
    np.testing.assert_allclose(out[1].ravel()[1:], (inside - inside.mean()) / inside.std(), rtol=1e-6)


def test_preprocess_and_restore_round_trip_with_transpose_and_resampling():
    rng = np.random.default_rng(0)
    seg = np.zeros((1, 12, 30, 28), np.int16)
    seg[0, 3:9, 8:22, 6:20] = 1
    seg[0, 5:7, 12:16, 10:14] = 2
    data = np.zeros((1, 12, 30, 28), np.float32)
    data[:, 1:11, 2:28, 2:26] = rng.normal(100, 5, (1, 10, 26, 24))  # the zero border is cropped
    p = plan([0.8, 0.8, 2.4], transpose=(2, 0, 1))  # transposed spacing of (0.8, 0.8, 2.4) as nnU-Net stores it
    spacing = [0.8, 2.5, 0.8]  # (z, y, x): y is the coarse axis, moved first by the transpose
    pre, pre_seg, props = preprocess_case(data, spacing, p, seg)
    assert props["shape_before_cropping"] == [28, 12, 30]
    assert [tuple(b) for b in props["bbox_used_for_cropping"]] == [(2, 26), (1, 11), (2, 28)]
    # the cropped (24, 10, 26) voxels at transposed spacing (0.8, 0.8, 2.5) resampled to (0.8, 0.8, 2.4)
    assert pre.shape == (1, 24, 10, round(26 * 2.5 / 2.4)) and pre_seg.shape == (1, 24, 10, 27)
    onehot = np.stack([(pre_seg[0] == c) for c in range(3)]).astype(np.float32) * 10
    labels, probabilities = logits_to_original(onehot, json.loads(json.dumps(props)), p, return_probabilities=True)
    assert labels.shape == seg.shape[1:] and probabilities.shape == (3, *seg.shape[1:])
    for c in (1, 2):
        dice = 2 * np.sum((labels == c) & (seg[0] == c)) / (np.sum(labels == c) + np.sum(seg[0] == c))
        assert dice > 0.9, (c, dice)


def test_restore_inverts_crop_and_transpose_exactly_without_resampling():
    """At the plan's spacing only cropping and the transpose act, so the restored label map is the original one
    (Dice 1 for every label) and voxels outside the crop are background."""
    seg = np.zeros((1, 12, 30, 28), np.int16)
    seg[0, 3:9, 8:22, 6:20] = 1
    seg[0, 5:7, 12:16, 10:14] = 2
    data = np.zeros((1, 12, 30, 28), np.float32)
    data[:, 1:11, 2:28, 2:26] = np.random.default_rng(1).normal(100, 5, (1, 10, 26, 24))
    p = plan([0.8, 0.8, 2.5], transpose=(2, 0, 1))
    pre, pre_seg, props = preprocess_case(data, [0.8, 2.5, 0.8], p, seg)
    assert pre.shape == (1, 24, 10, 26)
    onehot = np.stack([(pre_seg[0] == c) for c in range(3)]).astype(np.float32) * 10
    labels, _ = logits_to_original(onehot, props, p, return_probabilities=True)
    np.testing.assert_array_equal(labels, seg[0])


def test_initial_patch_size_matches_spec_examples():
    assert initial_patch_size([40, 56, 40], np.pi / 6) == [73, 80, 64]
    assert initial_patch_size([128, 128, 128], np.pi / 6) == [205, 205, 205]
    assert initial_patch_size([512, 512], np.pi) == [602, 602]
    assert initial_patch_size([8, 160, 160], np.pi, dummy_2d=True)[0] == 8


def test_augmentation_settings_follow_the_patch():
    assert augmentation_settings([40, 56, 40]) == {"two_d": False, "dummy_2d": False, "rotation": np.pi / 6,
                                                   "mirror_axes": [0, 1, 2]}
    assert augmentation_settings([8, 160, 160])["dummy_2d"] and augmentation_settings([8, 160, 160])["rotation"] == np.pi
    assert augmentation_settings([320, 320])["rotation"] == np.pi
    assert augmentation_settings([512, 128])["rotation"] == pytest.approx(15 / 180 * np.pi)


def patch_dataset(root, seg, batch_size, oversample=0.33, ignore_label=None, length=300, sparse_sampling=True,
                  diag=False):
    """A PatchDataset built by its constructor over one 1 mm CT case with label map ``seg``: raw files, fingerprint,
    plans and the preprocessing cache are all made for real; patches are 8^3. With ``diag`` the label file marks
    ``ignore_label``'s voxels with -1 and dataset.json declares ``"ignore": -1`` (the DIAG fork's sparse labels)."""
    import SimpleITK as sitk

    from autoplan.fingerprint import extract_fingerprint
    from autoplan.planner import plan as make_plans

    raw = root / "Dataset999_One"
    for folder in ("imagesTr", "labelsTr"):
        (raw / folder).mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 10, seg.shape[1:]).astype(np.float32)),
                    str(raw / "imagesTr" / "a_0000.nii.gz"))
    on_disk = np.where(seg[0] == ignore_label, -1, seg[0]).astype(np.int16) if diag else seg[0].astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(on_disk), str(raw / "labelsTr" / "a.nii.gz"))
    declared = -1 if diag else ignore_label
    labels = {"background": 0, "fg": 1, **({"ignore": declared} if ignore_label is not None else {})}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    plans = make_plans(dataset_json, extract_fingerprint(raw, processes=1)[0])
    data = [{"image": [str(raw / "imagesTr" / "a_0000.nii.gz")], "label": str(raw / "labelsTr" / "a.nii.gz")}]
    return PatchDataset(data, plans, "3d_fullres", root / "cache", [1], [8, 8, 8], [8, 8, 8], batch_size, length,
                        oversample, ignore_label=ignore_label, sparse_sampling=sparse_sampling)


@pytest.mark.parametrize("batch_size, forced_positions", [(2, {1}), (9, {6, 7, 8}), (4, {1, 2, 3})])
def test_patch_dataset_forces_foreground_for_nnunets_share_of_each_batch(tmp_path, batch_size, forced_positions):
    """Sample j of a batch is centred on foreground iff j >= round(batch_size * 0.67): 1 of 2, the last 3 of 9; a
    share of 0.75 (a DDP rank's) forces 3 of 4. The other samples are uniform and rarely meet a 3^3 object."""
    seg = np.zeros((1, 40, 40, 40), np.int8)
    seg[0, 30:33, 30:33, 30:33] = 1
    ds = patch_dataset(tmp_path, seg, batch_size, 0.75 if batch_size == 4 else 0.33, length=40 * batch_size)
    hits = np.array([bool((ds[i]["label"] > 0).any()) for i in range(len(ds))]).reshape(-1, batch_size)
    assert hits[:, sorted(forced_positions)].all()
    others = [j for j in range(batch_size) if j not in forced_positions]
    assert hits[:, others].mean() < 0.2
    sample = ds[0]
    assert sample["image"].shape == (1, 8, 8, 8) and sample["label"].dtype == torch.float32 and sample["case"] == "a"


@pytest.mark.parametrize("diag", [False, True])
def test_sparse_annotation_centres_samples_on_annotated_voxels(tmp_path, diag):
    """By default (nnU-Net, the DIAG fork's nnUNetTrainerV2Sparse) every ordinary sample holds annotated voxels;
    ``sparse_sampling=False`` (nnUNetTrainerV2SparseNormalSampling) draws them anywhere, so most miss the two small
    annotated blocks. A -1 in the label file (``diag``) arrives as the ignore label (max + 1 = 2)."""
    seg = np.full((1, 40, 40, 40), 2, np.int8)  # 2 = ignore: almost nothing is annotated
    seg[0, 5:9, 5:9, 5:9] = 0
    seg[0, 30:32, 30:32, 30:32] = 1
    ds = patch_dataset(tmp_path / "sparse", seg, 3, ignore_label=2, length=120, diag=diag)
    ordinary = range(0, 120, 3)  # sample 0 of each batch of 3 is not forced
    assert all((ds[i]["label"] != 2).any() for i in ordinary)
    assert set(np.unique(ds[2]["label"].numpy())) <= {-1.0, 0.0, 1.0, 2.0} and (ds[2]["label"] == 1).any()
    normal = patch_dataset(tmp_path / "normal", seg, 3, ignore_label=2, length=120, sparse_sampling=False, diag=diag)
    annotated = np.mean([bool(((normal[i]["label"] == 0) | (normal[i]["label"] == 1)).any()) for i in ordinary])
    assert annotated < 0.5


def test_a_case_without_annotated_voxels_is_refused_at_training_start(tmp_path):
    seg = np.full((1, 12, 12, 12), 2, np.int8)  # every voxel -1 in the file
    with pytest.raises(ValueError, match=r"a\.nii\.gz: case a has no annotated voxel"):
        patch_dataset(tmp_path, seg, 2, ignore_label=2, diag=True)


@pytest.mark.parametrize("global_batch, world_size", [(9, 2), (2, 2), (9, 3), (12, 5), (7, 4), (3, 1)])
@pytest.mark.parametrize("oversample", [0.33, 0.5, 0.0, 1.0])
def test_ddp_ranks_split_the_batch_and_its_forced_samples(global_batch, world_size, oversample):
    """Per-rank batches add up to the plan's, differ by at most one (larger first), and the ranks' forced samples,
    laid end to end, are exactly the single-process pattern j >= round(B * (1 - p))."""
    from bundles.scripts.data import rank_batch

    split = [rank_batch(global_batch, oversample, r, world_size) for r in range(world_size)]
    sizes = [b for b, _ in split]
    assert sum(sizes) == global_batch and sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    pattern = [j >= round(b * (1 - p)) for b, p in split for j in range(b)]
    assert pattern == [j >= round(global_batch * (1 - oversample)) for j in range(global_batch)]


def test_ddp_split_of_hippocampus_batch():
    """The plan's batch of 9 on 2 ranks: 5 random samples on rank 0, 4 with 3 forced (0.75) on rank 1."""
    from bundles.scripts.data import rank_batch

    assert rank_batch(9, 0.33, 0, 2) == (5, 0.0) and rank_batch(9, 0.33, 1, 2) == (4, 0.75)
    with pytest.raises(ValueError, match="a batch of 1 cannot be split over 2 ranks"):
        rank_batch(1, 0.33, 0, 2)


def test_rolling_batches_continue_one_iterator_across_passes():
    """Each pass (one validation run) takes the next ``epoch_length`` batches; a loader that runs out restarts."""
    from bundles.scripts.data import RollingBatches

    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=2)
    rolling = RollingBatches(loader, 2)
    passes = [[b.tolist() for b in rolling] for _ in range(3)]
    assert len(rolling) == 2
    assert passes == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [0, 1]]]
    rolling.release()
    assert [b.tolist() for b in rolling] == [[0, 1], [2, 3]]  # after release, a new pass starts over


def test_inferer_mirroring_averages_flipped_predictions():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    inferer = NnUNetInferer(roi_size=[8, 8, 8], mirror_axes=[0, 1, 2], mode="constant")
    with torch.no_grad():
        out = inferer(x, net)
        manual = sum(torch.flip(net(torch.flip(x, dims)), dims) if dims else net(x)
                     for dims in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]) / 8
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-5)


def test_inferer_runs_2d_networks_slice_by_slice():
    """Each slice along the first axis is the 2-D network's own output on that slice (one 10x9 tile holds it, no
    mirroring), so the stacked result equals the network applied slice by slice."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 3, 3, padding=1).eval()
    x = torch.randn(1, 1, 5, 10, 9)
    with torch.no_grad():
        out = NnUNetInferer(roi_size=[10, 9], mirror_axes=[], two_d=True)(x, net)
        for z in range(5):
            torch.testing.assert_close(out[:, :, z], net(x[:, :, z]), rtol=1e-5, atol=1e-5)
        mirrored = NnUNetInferer(roi_size=[10, 9], mirror_axes=[0, 1], two_d=True)(x, net)
        expected = sum(torch.flip(net(torch.flip(x[:, :, 2], dims)), dims) if dims else net(x[:, :, 2])
                       for dims in [(), (2,), (3,), (2, 3)]) / 4
        torch.testing.assert_close(mirrored[:, :, 2], expected, rtol=1e-5, atol=1e-5)
    assert out.shape == (1, 3, 5, 10, 9)


MALLOC_PROBE = """
import ctypes, os, sys
sys.path.insert(0, {root!r})
from bundles.scripts.inference import keep_freed_memory, release_freed_memory

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info

def kept(size=48 << 20):  # is a freed 48 MiB block still the process's free memory?
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    before = libc.mallinfo2().fordblks
    libc.free(block)
    return libc.mallinfo2().fordblks - before >= size

os.environ["MALLOC_TRIM_THRESHOLD_"] = "131072"
first = keep_freed_memory()
del os.environ["MALLOC_TRIM_THRESHOLD_"]
print(kept(), first, keep_freed_memory(), kept())
before = libc.mallinfo2().fordblks
release_freed_memory()
print(before - libc.mallinfo2().fordblks >= 48 << 20)
"""


@pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"), reason="glibc's malloc only")
def test_cpu_inference_keeps_freed_blocks_for_reuse_unless_the_user_set_malloc():
    """glibc hands a freed 48 MiB block back to the kernel; after keep_freed_memory (which the CPU sliding window
    calls) the process keeps it for the next pass, until release_freed_memory (at the window's end) hands it back. A
    malloc setting in the environment is left alone."""
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE.format(root=str(ROOT))], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "True", "True", "True"]


EXIT_PROBE = """
import gc, sys
sys.path.insert(0, {root!r})
from bundles.scripts.inference import skip_collection_at_exit

gc.disable()
class Loud:
    def __del__(self):
        print("collected", flush=True)
cycle = Loud()
cycle.self = cycle
del cycle
if {skip}:
    skip_collection_at_exit()
    skip_collection_at_exit()
print("end", flush=True)
"""


@pytest.mark.parametrize("skip", [False, True])
def test_inference_finalize_skips_the_exit_collection(skip):
    """Garbage left at exit is collected by the interpreter (its finalizer runs) unless the inference config's
    finalize has called skip_collection_at_exit; calling it twice is harmless."""
    assert "$scripts.inference.skip_collection_at_exit()" in json.loads(
        (ROOT / "bundles/templates/inference.json").read_text())["finalize"]
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE.format(root=str(ROOT), skip=skip)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == (["end"] if skip else ["end", "collected"])


def test_pseudo_dice_sums_counts_and_keeps_an_ema():
    metric = PseudoDice(num_classes=3)
    pred = torch.zeros(1, 3, 4, 4)
    pred[0, 1, :2] = 5
    pred[0, 2, 2:] = 5
    label = torch.zeros(1, 1, 4, 4)
    label[0, 0, :2] = 1
    label[0, 0, 2:3] = 2
    metric.reset()
    metric.update((pred, label))
    first = metric.compute()
    assert metric.last_per_class == pytest.approx([1.0, 2 * 4 / (2 * 4 + 4)])
    assert first == pytest.approx((1.0 + 2 / 3) / 2)
    metric.reset()
    metric.update((pred, torch.zeros(1, 1, 4, 4) + 1))  # class 2 absent from the reference: Dice 0
    second = metric.compute()
    assert second == pytest.approx(0.9 * first + 0.1 * np.mean([2 * 8 / (16 + 8), 0.0]))
    metric.reset()  # counts are summed over the batches of an epoch (TP 16/4, FP 0/12, FN 8/0), not averaged
    metric.update((pred, label))
    metric.update((pred, torch.zeros(1, 1, 4, 4) + 1))
    third = metric.compute()
    assert metric.last_per_class == pytest.approx([2 * 16 / (2 * 16 + 8), 2 * 4 / (2 * 4 + 12)])
    assert third == pytest.approx(0.9 * second + 0.1 * np.mean([0.8, 0.4]))
    metric.reset()  # an epoch without batches leaves the EMA alone
    assert metric.compute() == pytest.approx(third) and np.isnan(metric.last_mean)


def test_preprocessing_cache_is_the_same_with_a_worker_pool(synthetic_mr, tmp_path, monkeypatch):
    """The cache build times a few cases in-process and hands the rest to a spawn pool only when that pays off;
    either way every case is cached with identical arrays."""
    from autoplan.fingerprint import extract_fingerprint
    from autoplan.planner import plan as make_plans
    from bundles.scripts import data

    dataset_json = json.loads((synthetic_mr / "dataset.json").read_text())
    plans = make_plans(dataset_json, extract_fingerprint(synthetic_mr, processes=1)[0])
    cases = data.list_cases(synthetic_mr / "imagesTr", ".nii.gz", 2, synthetic_mr / "labelsTr")
    serial = data.preprocess_to_cache(cases, plans, "3d_fullres", tmp_path / "serial", [1, 2], None, 0)
    monkeypatch.setattr(data, "POOL_WORTH_SECONDS", 0.0)
    monkeypatch.setattr(data, "PROBE_SECONDS", 0.0)  # 3 cases in-process, the other 3 in the pool
    pooled = data.preprocess_to_cache(cases, plans, "3d_fullres", tmp_path / "pooled", [1, 2], None, 2)
    assert serial.name == pooled.name
    for item in cases:
        for suffix in ("_data.npy", "_seg.npy"):
            np.testing.assert_array_equal(np.load(serial / (item["case"] + suffix)),
                                          np.load(pooled / (item["case"] + suffix)))
        assert json.loads((serial / f"{item['case']}.json").read_text()) == \
            json.loads((pooled / f"{item['case']}.json").read_text())
    assert not list(pooled.glob(".*"))  # no temporary file left behind


def test_spatial_augmentation_resamples_labels_through_their_one_hot_form():
    """Like nnU-Net: each label's indicator is interpolated linearly and the strongest wins (not nearest-neighbour);
    an identity transform still returns the exact centre crop."""
    from monai.transforms import Affine

    from bundles.scripts.augmentation import NnUNetSpatiald, resample_labels

    zz, yy, xx = np.mgrid[:24, :24, :24]
    label = np.zeros((1, 24, 24, 24), np.float32)
    label[0][(zz - 12) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 < 49] = 1
    label[0][(zz - 12) ** 2 + (yy - 11) ** 2 + (xx - 13) ** 2 < 9] = 2
    label = torch.from_numpy(label)
    identity = Affine(rotate_params=[0.0] * 3, scale_params=[1.0] * 3, spatial_size=[16] * 3, image_only=True)
    torch.testing.assert_close(torch.as_tensor(resample_labels(identity, label)).as_subclass(torch.Tensor),
                               label[:, 4:20, 4:20, 4:20])

    spatial = NnUNetSpatiald(["image", "label"], [16] * 3, p_rotation=1.0, p_scaling=1.0)
    spatial.set_random_state(3)
    out = spatial({"image": label.clone(), "label": label.clone()})
    spatial.set_random_state(3)
    spatial.randomize()
    scale = spatial.scale
    affine = Affine(rotate_params=spatial.angles, scale_params=[scale] * 3, spatial_size=[16] * 3, image_only=True)
    indicators = torch.stack([torch.as_tensor(affine((label == v).float(), mode="bilinear")).as_subclass(torch.Tensor)
                              for v in (0.0, 1.0, 2.0)])
    got = torch.as_tensor(out["label"]).as_subclass(torch.Tensor).long()
    assert set(got.unique().tolist()) <= {0, 1, 2}
    chosen = indicators.gather(0, got[None])[0]
    assert torch.all(chosen >= indicators.max(0).values - 1e-6)  # the label with the largest indicator everywhere
    nearest = torch.as_tensor(affine(label, mode="nearest")).as_subclass(torch.Tensor).long()
    assert (nearest != got).any()  # and that is not what nearest-neighbour gives


def test_per_channel_augmentation_draws_each_channel_on_its_own():
    """nnU-Net's blur and low-resolution simulation: p for the sample, then p_per_channel for each channel."""
    from monai.transforms import Randomizable, RandGaussianSmooth

    from bundles.scripts.augmentation import RandPerChanneld

    class AddOne(Randomizable):
        def __call__(self, x):
            return x + 1

    t = RandPerChanneld("image", AddOne(), prob=0.5, p_per_channel=0.5)
    t.set_random_state(0)
    hits = np.array([[float(t({"image": torch.zeros(2, 4, 4)})["image"][c].max()) for c in range(2)]
                     for _ in range(4000)])
    assert hits[:, 0].mean() == pytest.approx(0.25, abs=0.03) and hits[:, 1].mean() == pytest.approx(0.25, abs=0.03)
    assert hits.all(1).mean() == pytest.approx(0.0625, abs=0.015)  # independent channels
    blur = RandPerChanneld("image", RandGaussianSmooth(prob=1.0, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                                       sigma_z=(0.5, 1.0)), prob=1.0, p_per_channel=1.0)
    image = torch.rand(2, 8, 8, 8)
    out = blur({"image": image})["image"]
    assert out.shape == image.shape and out.dtype == image.dtype and not torch.allclose(out, image)


def test_dummy_2d_low_resolution_leaves_the_first_axis_alone():
    """nnU-Net ignores axis 0 when dummy-2D plans simulate low resolution; slices that are constant in-plane but differ
    along z come back unchanged in-plane, while the 3-D transform mixes them."""
    from monai.transforms import RandSimulateLowResolution

    from bundles.scripts.augmentation import InPlane

    image = torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1).expand(1, 8, 12, 12).clone()
    in_plane = InPlane(RandSimulateLowResolution(prob=1.0, zoom_range=(0.5, 0.5), upsample_mode="bilinear"))
    in_plane.set_random_state(0)
    torch.testing.assert_close(torch.as_tensor(in_plane(image)).as_subclass(torch.Tensor), image)
    volume = RandSimulateLowResolution(prob=1.0, zoom_range=(0.5, 0.5), upsample_mode="trilinear")
    assert not torch.allclose(torch.as_tensor(volume(image)).as_subclass(torch.Tensor), image)


def test_cascade_morphology_perturbs_the_previous_stage_channels():
    """Ball-shaped binary operators and connected-component removal on the one-hot channels; the image channels are
    untouched and no voxel ends up in two channels."""
    from bundles.scripts.augmentation import CascadeMorphologyd

    cube = np.zeros((21, 21, 21), bool)
    cube[6:15, 6:15, 6:15] = True
    op = CascadeMorphologyd.operate
    assert op(cube, "dilation", 2.0).sum() > cube.sum() and op(cube, "erosion", 2.0).sum() < cube.sum()
    assert not op(cube, "dilation", 2.0)[0, 0, 0] and op(cube, "dilation", 2.0)[4, 10, 10]  # a ball, 2 voxels out
    assert (op(cube, "opening", 2.0) <= cube).all() and (op(cube, "closing", 2.0) >= cube).all()
    two_blobs = np.zeros((20, 20, 20), bool)
    two_blobs[2:5, 2:5, 2:5] = two_blobs[12:16, 12:16, 12:16] = True
    morph = CascadeMorphologyd("image", 2, p_binary=1.0, p_remove=1.0, p_per_label=1.0)
    morph.set_random_state(0)
    kept = morph.remove_component(two_blobs)
    assert kept.sum() in (27, 64)  # exactly one of the two components is gone
    big = np.ones((10, 10, 10), bool)
    assert morph.remove_component(big).all()  # a component over 15 % of the patch stays

    image = torch.zeros(3, 20, 20, 20)
    image[0] = torch.randn(20, 20, 20)
    image[1, 2:8, 2:8, 2:8] = 1
    image[2, 8:14, 8:14, 8:14] = 1
    out = morph({"image": image.clone()})["image"]
    torch.testing.assert_close(out[0], image[0])
    assert not torch.equal(out[1:], image[1:])
    assert set(out[1:].unique().tolist()) <= {0.0, 1.0} and (out[1:].sum(0) <= 1).all()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_poly_learning_rate_follows_nnunets_formula_and_the_configured_epochs_on_resume():
    """Epoch e trains with 0.01 * (1 - e / 1000) ** 0.9 (spec 5.1: 0.01, 0.00536 at 500, 2.0e-5 at 999); a schedule
    restored from a 2-epoch run continues on the new run's 4 epochs."""
    from bundles.scripts.handlers import PolyLR

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = PolyLR(optimizer, 1000, 0.9)
    rates = []
    for _ in range(1000):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert rates == pytest.approx([0.01 * (1 - e / 1000) ** 0.9 for e in range(1000)], rel=1e-12)
    assert (rates[0], round(rates[500], 5), float(f"{rates[999]:.2g}")) == (0.01, 0.00536, 2.0e-5)
    assert optimizer.param_groups[0]["lr"] == 0.0  # after the last epoch
    short_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    short = PolyLR(short_optimizer, 2, 0.9)
    short.step()
    resumed_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    resumed = PolyLR(resumed_optimizer, 4, 0.9)
    resumed_optimizer.load_state_dict(short_optimizer.state_dict())
    resumed.load_state_dict(short.state_dict())
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.75 ** 0.9)
    resumed.step()
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)


def test_model_best_holds_the_weights_of_the_epoch_whose_ema_strictly_improved(tmp_path):
    """Pseudo-Dice EMAs 0.3, 0.5, 0.5, 0.4, 0.45: model_best.pt is epoch 2's weights (a tie does not replace it);
    resume/checkpoint_latest.pt and model.pt are the last epoch's."""
    from ignite.engine import Engine, Events

    from bundles.scripts.handlers import PolyLR, TrainingProgress

    class Metric:
        ema, last_mean, last_per_class = None, float("nan"), []

    network = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    metric = Metric()
    emas = [0.3, 0.5, 0.5, 0.4, 0.45]
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})

    @engine.on(Events.EPOCH_COMPLETED)
    def validate(engine):  # registered first, like the ValidationHandler
        network.weight.data.fill_(engine.state.epoch)
        metric.ema = emas[engine.state.epoch - 1]

    TrainingProgress(network, optimizer, PolyLR(optimizer, 5), metric, tmp_path / "models",
                     tmp_path / "eval").attach(engine)
    engine.run([0], max_epochs=5)
    weight = lambda name: float(torch.load(tmp_path / "models" / name)["weight"])  # noqa: E731
    assert weight("model_best.pt") == 2.0 and weight("model.pt") == 5.0
    latest = torch.load(tmp_path / "models" / "resume" / "checkpoint_latest.pt", weights_only=True)
    assert latest["best_ema"] == 0.5 and latest["epoch"] == 5 and float(latest["network"]["weight"]) == 5.0
    assert latest["history"]["val_ema"] == emas and latest["history"]["epoch"] == [1, 2, 3, 4, 5]


def test_cache_folder_name_changes_with_every_setting_that_changes_the_arrays(tmp_path):
    """Same settings, same folder (folds share it); any change to spacing, transpose, normalisation, mask, intensity
    statistics or resampling orders gives a new folder, so stale arrays are never reused."""
    from dataclasses import replace

    from bundles.scripts.data import cache_folder

    base = plan([1.0, 1.0, 1.0])
    name = cache_folder(tmp_path, "nnUNetPlans_3d_fullres", base)
    assert name == cache_folder(tmp_path, "nnUNetPlans_3d_fullres", plan([1.0, 1.0, 1.0]))
    assert name.parent == tmp_path and name.name.startswith("nnUNetPlans_3d_fullres_")
    changes = [replace(base, spacing=[1.0, 1.0, 1.5]), plan([1.0, 1.0, 1.0], transpose=(2, 0, 1)),
               replace(base, normalization_schemes=["CTNormalization"]), replace(base, use_mask_for_norm=[True]),
               replace(base, intensity_properties={"0": {**base.intensity_properties["0"], "mean": 11.0}}),
               replace(base, data_kwargs={**base.data_kwargs, "order": 1}),
               replace(base, seg_kwargs={**base.seg_kwargs, "order": 0}),
               replace(base, probabilities_kwargs={**base.probabilities_kwargs, "force_separate_z": True})]
    names = {cache_folder(tmp_path, "nnUNetPlans_3d_fullres", changed).name for changed in changes}
    assert len(names) == len(changes) and name.name not in names


def test_torchres_plans_resample_with_torch_in_and_out():
    """Plans of nnU-Net's *_torchres planners name ``resample_torch_fornnunet``: preprocessing and the export use it."""
    from pathlib import Path

    from bundles.scripts.resampling import resample_torch

    fixture = Path(__file__).parent / "fixtures" / "nnunet_torchres_plans" / "prostate_like"
    for name, separate in (("nnUNetPlans_torchres.json", False), ("nnUNetResEncUNetLPlans_torchres_sepz.json", True)):
        plans = json.loads((fixture / name).read_text())
        p = PlanSettings.from_plans(plans, "3d_fullres")
        assert p.data_fn == p.seg_fn == p.probabilities_fn == "resample_torch_fornnunet"
        assert p.seg_kwargs["is_seg"] and p.data_kwargs["force_separate_z"] is (None if separate else False)
        rng = np.random.default_rng(3)
        data = rng.normal(100, 5, (len(p.normalization_schemes), 9, 30, 26)).astype(np.float32)  # nothing to crop
        spacing = [p.spacing[0] * 1.3, p.spacing[1] * 0.8, p.spacing[2] * 0.8]
        pre, _, props = preprocess_case(data, spacing, p)
        normalized = normalize(data, np.zeros((1,) + data.shape[1:], np.int8), p)
        expected = resample_torch(normalized, props["shape_after_resampling"], spacing, p.spacing, **p.data_kwargs)
        np.testing.assert_array_equal(pre, expected)
        logits = rng.normal(size=(3, *pre.shape[1:])).astype(np.float32)
        labels, _ = logits_to_original(logits, props, p)
        back = resample_torch(logits, props["shape_after_cropping_and_before_resampling"], p.spacing, spacing,
                              **p.probabilities_kwargs)
        np.testing.assert_array_equal(labels, np.argmax(back, 0))
