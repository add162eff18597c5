"""Shared fixtures: small synthetic datasets and the (optional) shared reference data."""

import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; AUTOPLAN_SHARED points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("AUTOPLAN_SHARED") or ROOT.parent / "shared")
HIPPOCAMPUS = SHARED / "data" / "Dataset004_Hippocampus"
HIPPOCAMPUS_PLANS = SHARED / "reference" / "nnunet_plans" / "Dataset004_Hippocampus"

sys.path.insert(0, str(ROOT))
# subprocesses (``python tools/X.py``, ``python -m autoplan`` from a bundle folder) import this checkout too, whether
# or not the project is installed
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

requires_shared = pytest.mark.skipif(
    not (HIPPOCAMPUS.is_dir() and HIPPOCAMPUS_PLANS.is_dir()),
    reason="../shared (Dataset004_Hippocampus and nnU-Net's reference plans) is not present beside the repo",
)


def planning_inputs(folder: Path) -> None:
    """A 1-channel dataset.json and a hand-made fingerprint (20 Hippocampus-like cases) in ``folder``: enough to plan
    without reading images."""
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "numTraining": 20,
                                                     "labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    stats = {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0,
             "std": 1.0}
    (folder / "fingerprint.json").write_text(json.dumps({
        "spacings": [[1.0, 1.0, 1.0]] * 20, "shapes_after_crop": [[36, 50, 35]] * 20,
        "foreground_intensity_properties_per_channel": {"0": stats}, "median_relative_size_after_cropping": 1.0}))


def folder_digest(folder: Path) -> str:
    """Hash of every file's relative path and bytes: proves a folder was left untouched."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def synthetic_mr(tmp_path_factory):
    """Six small 2-channel MR cases with 2 structures, anisotropic spacing; never modified by tests."""
    from autoplan.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("raw") / "Dataset901_MR", cases=6, shape=(32, 28, 12),
                                  spacing=(0.8, 0.8, 3.0), channels=2, labels=2, test_cases=1, seed=1)


@pytest.fixture
def dataset_copy(synthetic_mr, tmp_path):
    """A private copy of the synthetic dataset that a test may break."""
    dst = tmp_path / synthetic_mr.name
    shutil.copytree(synthetic_mr, dst)
    return dst


def sklearn_splits(case_ids) -> list[dict]:
    """nnU-Net's 5-fold splits computed by scikit-learn itself: ``KFold(5, shuffle=True, random_state=12345)`` over
    the sorted case ids, the oracle for ``autoplan.splits.kfold_splits``."""
    from sklearn.model_selection import KFold

    cases = sorted(case_ids)
    return [{"train": [cases[i] for i in train], "val": [cases[i] for i in val]}
            for train, val in KFold(5, shuffle=True, random_state=12345).split(cases)]


def with_lowres_and_cascade(plans: dict) -> dict:
    """``plans`` plus a stand-in ``3d_lowres`` (3d_fullres at 1.5 x its spacing) and the ``3d_cascade_fullres`` that
    takes it as previous stage, as nnU-Net plans a large dataset; the tiny synthetic datasets get no lowres stage."""
    plans = json.loads(json.dumps(plans))
    lowres = json.loads(json.dumps(plans["configurations"]["3d_fullres"]))
    lowres.update(data_identifier="nnUNetPlans_3d_lowres", spacing=[s * 1.5 for s in lowres["spacing"]],
                  next_stage="3d_cascade_fullres")
    plans["configurations"]["3d_lowres"] = lowres
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    return plans


@contextmanager
def process_group_of_one(folder: Path):
    """A torch.distributed (gloo) group of this process alone: code that adds over DDP ranks takes its DDP path, whose
    result must then be the single-process one (tests/test_ddp.py runs 2 ranks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder / 'ddp_store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors gain nothing from threads, and OpenMP threads crawl (x100) when other processes load the CPUs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
