"""Emitted bundles end to end on a tiny synthetic dataset: layout, MONAI checks, training, resume, inference,
export, relocation and DDP. Trainings are a few iterations long; the point is that every path runs and writes the
right files with the right geometry."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, sklearn_splits, with_lowres_and_cascade
from autoplan.emit import emit
from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset

FAST = ["--epochs", "1", "--iterations_per_epoch", "2", "--val_iterations", "1", "--num_workers", "0"]


@contextmanager
def bundle_on_path(bundle: Path):
    """Import a bundle's ``scripts`` package in this process, and forget it afterwards (each bundle has its own)."""
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]


def bundle_cmd(bundle: Path, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=bundle,
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    raw = make_synthetic_dataset(root / "raw" / "Dataset960_Tiny", cases=5, shape=(24, 24, 12), spacing=(1, 1, 2),
                                 labels=2, test_cases=1, seed=3)
    plans_path = run(raw, root / "work", processes=1, configurations=["3d_fullres", "2d"], folds=[0])
    bundles = root / "work" / "bundles"
    return raw, plans_path, {c: bundles / f"Dataset960_Tiny_{c}_fold0" for c in ("3d_fullres", "2d")}


@pytest.fixture(scope="module")
def trained_3d(emitted):
    raw, _, bundles = emitted
    bundle = bundles["3d_fullres"]
    bundle_cmd(bundle, "run", "training", "--config_file", "configs/train.json", *FAST)
    return raw, bundle


def test_layout_metadata_and_splits(emitted):
    raw, plans_path, bundles = emitted
    bundle = bundles["3d_fullres"]
    for f in ("configs/train.json", "configs/inference.json", "configs/evaluate.json", "configs/multi_gpu_train.json",
              "configs/metadata.json", "configs/logging.conf", "configs/plans.json", "docs/README.md", "LICENSE",
              "scripts/__init__.py", "scripts/preprocessing.py", "models"):
        assert (bundle / f).exists(), f
    for script in (bundle / "scripts").glob("*.py"):
        text = script.read_text()
        assert "import autoplan" not in text and "from autoplan" not in text, script  # self-contained
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    for key in ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                "required_packages_version", "task", "description", "authors", "copyright", "network_data_format"):
        assert key in meta, key
    assert meta["version"] in meta["changelog"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "structure_1", "2": "structure_2"}
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    train = json.loads((bundle / "configs/train.json").read_text())
    plans = json.loads(plans_path.read_text())
    assert train["patch_size"] == plans["configurations"]["3d_fullres"]["patch_size"]
    assert train["batch_size"] == plans["configurations"]["3d_fullres"]["batch_size"]
    assert (train["epochs"], train["iterations_per_epoch"], train["val_iterations"]) == (1000, 250, 50)
    cases = sorted(p.name[:-7] for p in (raw / "labelsTr").iterdir())
    assert train["val_cases"] == sklearn_splits(cases)[0]["val"]
    assert json.loads((bundle.parent / "splits_final.json").read_text()) == sklearn_splits(cases)
    assert json.loads((bundles["2d"] / "configs/train.json").read_text())["two_d"] is True


@pytest.mark.parametrize("config", ["3d_fullres", "2d", "dummy_2d"])
def test_every_augmentation_runs_when_it_fires(emitted, config):
    """Each random transform of train.json, forced to fire, accepts the sampled patch of its configuration."""
    import torch
    from monai.bundle import ConfigParser
    from monai.transforms import Randomizable

    bundle = emitted[2]["2d" if config == "2d" else "3d_fullres"]
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/train.json"))
        parser["bundle_root"] = str(bundle)
        if config == "dummy_2d":
            parser["dummy_2d"], parser["rotation"] = True, float(np.pi)
        compose = parser.get_parsed_content("train#preprocessing")
        in_plane = [t for t in compose.transforms if type(getattr(t, "transform", None)).__name__ == "InPlane"]
        assert len(in_plane) == (config == "dummy_2d")  # low-resolution simulation in-plane only for dummy 2-D
        for t in compose.transforms:
            for attribute in ("prob", "p_rotation", "p_scaling", "p_per_channel"):
                if hasattr(t, attribute):
                    setattr(t, attribute, 1.0)
            if hasattr(t, "rand_flip"):
                t.rand_flip.prob = 1.0
            inner = getattr(t, "transform", None)
            while inner is not None:  # a zoom drawn close to 1 resamples to the same grid and changes nothing
                if hasattr(inner, "zoom_range"):
                    inner.zoom_range = (0.5, 0.5)
                inner = getattr(inner, "transform", None)
        compose.set_random_state(seed=0)
        torch.manual_seed(0)
        size = parser.get_parsed_content("initial_patch_size")
        item = {"image": torch.randn(1, *size), "label": torch.randint(-1, 3, (1, *size)).float()}
        random_transforms = 0
        for t in compose.transforms:
            out = t(dict(item))
            if isinstance(t, Randomizable) or type(t).__name__ == "ThresholdIntensityd":
                random_transforms += isinstance(t, Randomizable)
                changed = [out[k].shape != item[k].shape or not torch.equal(torch.as_tensor(out[k]),
                                                                            torch.as_tensor(item[k]))
                           for k in ("image", "label")]
                assert any(changed), type(t).__name__  # forced to fire, it altered the sample
            item = out
        # spatial, noise, blur, 2 intensity scalings, low resolution, 2 gammas, a flip per axis
        assert random_transforms == {"3d_fullres": 11, "2d": 10, "dummy_2d": 11}[config]
        assert list(item["image"].shape[1:]) == parser.get_parsed_content("patch_size")
        assert set(torch.as_tensor(item["label"]).unique().tolist()) == {0.0, 1.0, 2.0}  # -1 became background
        assert torch.isfinite(item["image"]).all()


def test_emit_refuses_to_overwrite(emitted, tmp_path):
    raw, plans_path, bundles = emitted
    with pytest.raises(FileExistsError):
        emit(plans_path, raw, bundles["3d_fullres"].parent, ["3d_fullres"], [0])


@pytest.mark.parametrize("config,workflow_type", [("train.json", "train"), ("inference.json", "infer")])
def test_workflow_properties_are_complete(emitted, config, workflow_type):
    from monai.bundle import ConfigWorkflow

    bundle = emitted[2]["3d_fullres"]
    with bundle_on_path(bundle):
        workflow = ConfigWorkflow(config_file=str(bundle / "configs" / config),
                                  meta_file=str(bundle / "configs/metadata.json"), logging_file=False,
                                  workflow_type=workflow_type, bundle_root=str(bundle), initialize=[])
        workflow.initialize()  # parses the config; the bundle's own initialize (weights, seeds) is skipped
        assert workflow.check_properties() == []


def test_verify_net_in_out(emitted):
    for bundle in emitted[2].values():
        bundle_cmd(bundle, "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
                   "--config_file", "configs/inference.json")  # MONAI's defaults: n = 1, one patch


def test_training_writes_models_progress_and_validation(trained_3d):
    raw, bundle = trained_3d
    for f in ("models/model.pt", "models/model_best.pt", "models/resume/checkpoint_latest.pt", "eval/progress.png",
              "eval/validation/summary.json"):
        assert (bundle / f).is_file(), f
    assert list((bundle / "eval" / "tensorboard").iterdir())
    progress = json.loads((bundle / "eval/progress.json").read_text())
    assert progress["epoch"] == [1] and np.isfinite(progress["train_loss"][0])
    summary = json.loads((bundle / "eval/validation/summary.json").read_text())
    val_cases = json.loads((bundle / "configs/train.json").read_text())["val_cases"]
    assert len(summary["metric_per_case"]) == len(val_cases)
    assert set(summary["mean"]) == {"1", "2"} and "Dice" in summary["foreground_mean"]
    assert (bundle.parent / "preprocessed").is_dir()  # the shared cache


def test_resume_continues_from_the_last_epoch(trained_3d, tmp_path):
    """A 2-epoch run interrupted after epoch 1 resumes when rerun with the same length and data: epoch 2 only, on
    the 2-epoch poly schedule (0.01, then 0.01 * 0.5^0.9), from epoch 1's weights; MLflow's metric history is
    progress.json's (the EMA under the key metric's name, the per-iteration losses whose mean is the epoch's
    train_loss)."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    raw, trained = trained_3d
    bundle = shutil.copytree(trained, tmp_path / trained.name, ignore=shutil.ignore_patterns("models", "eval"))
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/train.json"))
        for key, value in {"bundle_root": str(bundle), "dataset_dir": str(raw), "epochs": 2, "num_workers": 0,
                           "iterations_per_epoch": 2, "val_iterations": 1}.items():
            parser[key] = value
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())
        trainer.run()  # interrupted after epoch 1
    assert json.loads((bundle / "eval/progress.json").read_text())["epoch"] == [1]
    first = torch.load(bundle / "models/resume/checkpoint_latest.pt", weights_only=True)
    result = bundle_cmd(bundle, "run", "training", "--config_file", "configs/train.json", "--epochs", "2",
                        *FAST[2:], "--tracking", "mlflow", "--dataset_dir", raw)
    assert "resumed from" in result.stdout + result.stderr and "at epoch 1 of 2" in result.stdout + result.stderr
    progress = json.loads((bundle / "eval/progress.json").read_text())
    assert progress["epoch"] == [1, 2]
    assert progress["lr"] == pytest.approx([0.01, 0.01 * 0.5 ** 0.9], rel=1e-12)
    assert progress["train_loss"][0] == first["history"]["train_loss"][0]  # epoch 1 was not trained again
    latest = torch.load(bundle / "models/resume/checkpoint_latest.pt", weights_only=True)
    assert latest["epoch"] == 2 and latest["lr_scheduler"]["last_epoch"] == 2
    assert any(not torch.equal(latest["network"][k], v) for k, v in first["network"].items())  # it trained on
    import mlflow  # MONAI's --tracking mlflow wrote the run through the standard handler ids

    mlflow.set_tracking_uri(f"sqlite:///{bundle / 'eval' / 'mlruns.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and {"metrics.train_loss", "metrics.val_pseudo_dice"} <= set(runs.columns)
    client = mlflow.MlflowClient()
    key_metric = client.get_metric_history(runs.run_id[0], "val_pseudo_dice")  # the key metric is the EMA
    assert [h.step for h in key_metric] == [2] and [h.value for h in key_metric] == [progress["val_ema"][1]]
    losses = client.get_metric_history(runs.run_id[0], "train_loss")  # per iteration; progress.json has the mean
    assert [h.step for h in losses] == [3, 4]
    assert np.mean([h.value for h in losses]) == pytest.approx(progress["train_loss"][1], rel=1e-6)


def assert_same_state(a, b, where="state"):
    """Nested dicts/lists of tensors and numbers are equal, bit for bit."""
    import torch

    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        same = a.dtype == b.dtype and torch.equal(a, b)
        assert same, where
    else:
        assert a == b or (a != a and b != b), where  # NaN equals NaN here


def test_deterministic_resume_is_bit_exact(emitted, tmp_path):
    """With ``deterministic``, 1 epoch then a resume gives exactly what 2 epochs straight give: weights, optimizer
    state (momentum buffers), LR schedule, EMA, best model and progress.json (all but the epochs' durations). The
    resumed run draws the patches and augmentations of samples 4-7 (2 iterations x batch 2 done), keyed by their
    number, and the validation's second pass, not the first epoch's again."""
    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    raw, _, bundles = emitted
    settings = {"dataset_dir": str(raw), "cache_dir": str(bundles["3d_fullres"].parent / "preprocessed"),
                "epochs": 2, "iterations_per_epoch": 2, "val_iterations": 1, "num_workers": 0, "deterministic": True}

    def train(bundle, stop_after=None):
        with bundle_on_path(bundle):
            parser = ConfigParser()
            parser.read_config(str(bundle / "configs/train.json"))
            for key, value in {"bundle_root": str(bundle), **settings}.items():
                parser[key] = value
            parser.get_parsed_content("initialize")
            trainer = parser.get_parsed_content("train#trainer")
            if stop_after:
                trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda engine: engine.terminate())
            torch.manual_seed(len(str(bundle)))  # the global RNG's state plays no part
            trainer.run()

    straight, resumed = (shutil.copytree(bundles["3d_fullres"], tmp_path / name / bundles["3d_fullres"].name,
                                         ignore=shutil.ignore_patterns("models", "eval"))
                         for name in ("straight", "resumed"))
    train(straight)
    train(resumed, stop_after=1)
    interrupted = torch.load(resumed / "models/resume/checkpoint_latest.pt", weights_only=True)
    assert interrupted["epoch"] == 1
    train(resumed)
    a, b = (torch.load(bundle / "models/resume/checkpoint_latest.pt", weights_only=True)
            for bundle in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 2
    for state in (a, b):
        state["history"].pop("epoch_seconds")
    assert_same_state(a, b, "checkpoint")
    assert a["optimizer"]["state"] and a["history"]["lr"] == [0.01, 0.01 * 0.5 ** 0.9]
    assert any(not torch.equal(a["network"][k], v) for k, v in interrupted["network"].items())  # epoch 2 trained
    for name in ("model.pt", "model_best.pt"):
        assert_same_state(*(torch.load(bundle / "models" / name, weights_only=True) for bundle in (straight, resumed)),
                          name)
    progress = [json.loads((bundle / "eval/progress.json").read_text()) for bundle in (straight, resumed)]
    for p in progress:
        assert len(p.pop("epoch_seconds")) == 2
    assert progress[0] == progress[1] and progress[0]["epoch"] == [1, 2]


def test_training_starts_from_initial_weights(emitted, tmp_path):
    """``--initial_weights`` (nnU-Net's -pretrained_weights) replaces the random initialisation: with a zero learning
    rate the trained weights are exactly the given ones, whatever the seed."""
    import torch
    from monai.bundle import ConfigParser

    bundle = shutil.copytree(emitted[2]["3d_fullres"], tmp_path / "bundle")
    shutil.rmtree(bundle / "models", ignore_errors=True)
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/train.json"))
        parser["bundle_root"] = str(bundle)
        torch.manual_seed(7)
        weights = parser.get_parsed_content("network_def").state_dict()
    torch.save({"network_weights": weights}, tmp_path / "checkpoint_final.pth")
    result = bundle_cmd(bundle, "run", "training", "--config_file", "configs/train.json", *FAST, "--seed", "3",
                        "--initial_weights", tmp_path / "checkpoint_final.pth", "--learning_rate", "0",
                        "--dataset_dir", emitted[0])
    assert "initial weights from" in result.stdout + result.stderr
    trained = torch.load(bundle / "models/model.pt", weights_only=True)
    assert trained.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(trained[key], value), key


def test_worker_processes_persist_across_epochs_and_cudnn_follows_deterministic(emitted, tmp_path):
    """Data-loading workers live for the whole training (validation with half as many), as nnU-Net's augmenters do;
    cuDNN autotunes (nnU-Net's setting) unless ``deterministic`` is set."""
    import torch
    from monai.bundle import ConfigParser

    bundle = shutil.copytree(emitted[2]["3d_fullres"], tmp_path / "bundle")
    shutil.rmtree(bundle / "models", ignore_errors=True)  # a fresh training, whichever tests trained the original
    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    try:
        with bundle_on_path(bundle):
            for deterministic in (False, True):
                parser = ConfigParser()
                parser.read_config(str(bundle / "configs/train.json"))
                parser["bundle_root"], parser["num_workers"] = str(bundle), 2
                parser["dataset_dir"] = str(emitted[0])
                parser["deterministic"] = deterministic
                parser.get_parsed_content("initialize")
                assert torch.backends.cudnn.benchmark is not deterministic
                assert torch.backends.cudnn.deterministic is deterministic
            train, val = (parser.get_parsed_content(f"{k}#dataloader") for k in ("train", "validate"))
            assert (train.num_workers, val.num_workers) == (2, 1)
            assert train.persistent_workers and val.persistent_workers
            # batches in the order the workers finish them unless deterministic (nnU-Net's NonDet augmenter)
            assert train.in_order is True and val.in_order is True
            parser["deterministic"] = False
            parser.parse()
            assert parser.get_parsed_content("train#dataloader").in_order is False
            assert parser.get_parsed_content("train#trainer").non_blocking  # overlaps host-to-GPU copies (pinned)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags
    result = bundle_cmd(bundle, "run", "training", "--config_file", "configs/train.json", "--epochs", "2",
                        "--iterations_per_epoch", "2", "--val_iterations", "1", "--num_workers", "2",
                        "--log_interval", "2", "--dataset_dir", emitted[0])
    assert json.loads((bundle / "eval/progress.json").read_text())["epoch"] == [1, 2]
    log = result.stdout + result.stderr  # the training loss is logged every log_interval iterations
    assert "Epoch: 2/2, Iter: 2/2 -- train_loss" in log and "Iter: 1/2 -- train_loss" not in log


def test_data_workers_live_through_training_and_end_with_it(emitted, tmp_path, monkeypatch):
    """The same worker processes serve every epoch, from the first iteration (the validation worker too, forked
    before training allocates memory that it would otherwise inherit), and none is left once training completes
    (before the final validation), as nnU-Net's augmenters are started before the first epoch and ended in
    on_train_end. Each loader is iterated once for the whole run, so its workers prepare the next epoch's (and the
    next validation's) batches instead of restarting at its start."""
    import multiprocessing

    import torch
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    passes = []
    plain_iter = torch.utils.data.DataLoader.__iter__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__",
                        lambda loader: passes.append(id(loader)) or plain_iter(loader))

    bundle = shutil.copytree(emitted[2]["3d_fullres"], tmp_path / "bundle")
    shutil.rmtree(bundle / "models", ignore_errors=True)  # a fresh training, not a resumed one
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/train.json"))
        for key, value in {"bundle_root": str(bundle), "num_workers": 2, "epochs": 2, "iterations_per_epoch": 2,
                           "val_iterations": 1, "dataset_dir": str(emitted[0])}.items():
            parser[key] = value
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("train#trainer")
        seen = []
        workers = lambda e: seen.append(sorted(p.pid for p in multiprocessing.active_children()))  # noqa: E731
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), workers)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, workers)
        trainer.run()
        loaders = [id(parser.get_parsed_content(f"{k}#dataloader")) for k in ("train", "validate")]
    assert len(seen) == 3 and len(seen[0]) == 3 and seen[0] == seen[1] == seen[2]  # 2 training + 1 validation
    assert sorted(passes) == sorted(loaders)  # one pass each over 2 epochs (2 each if restarted every epoch)
    assert multiprocessing.active_children() == []
    assert (bundle / "models/model.pt").is_file()


def test_engine_defaults_twelve_workers_and_compile_on_request(emitted):
    """nnU-Net's 12 data-augmentation workers, capped at the usable cores, and its validation share of them
    (``max(1, W // 2)``; none when the training loads in-process). ``torch.compile`` is off by default (it
    did not speed up Hippocampus on an H100, see docs/benchmarks.md); ``--compile True`` hands the network to both engines
    compiled, and the state dict stays the plain module's."""
    import torch
    from monai.bundle import ConfigParser

    bundle = emitted[2]["3d_fullres"]
    with bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/train.json"))
        parser["bundle_root"] = str(bundle)
        assert parser.get_parsed_content("num_workers") == min(12, len(os.sched_getaffinity(0)))
        for workers, validation in ((0, 0), (1, 1), (2, 1), (3, 1), (5, 2), (12, 6)):
            parser["num_workers"] = workers
            parser.parse()
            assert parser.get_parsed_content("validate#dataloader#num_workers") == validation
        assert parser.get_parsed_content("compile") is False
        plain = parser.get_parsed_content("train#trainer").network
        assert not isinstance(plain, torch._dynamo.eval_frame.OptimizedModule)
        parser["compile"] = True
        parser.parse()
        trainer, evaluator = (parser.get_parsed_content(k) for k in ("train#trainer", "validate#evaluator"))
        for engine in (trainer, evaluator):
            assert isinstance(engine.network, torch._dynamo.eval_frame.OptimizedModule)
            assert engine.network._orig_mod is parser.get_parsed_content("network")
        assert list(parser.get_parsed_content("network").state_dict()) == list(plain.state_dict())


def assert_same_geometry(prediction: Path, image: Path):
    a, b = sitk.ReadImage(str(prediction)), sitk.ReadImage(str(image))
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())
    labels = sitk.GetArrayFromImage(a)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}


def test_inference_keeps_input_geometry_and_moves_with_the_bundle(trained_3d, tmp_path):
    raw, bundle = trained_3d
    out = tmp_path / "pred"
    bundle_cmd(bundle, "run", "--config_file", "configs/inference.json", "--dataset_dir", raw / "imagesTs",
               "--output_dir", out, "--use_tta", "False", "--save_probabilities", "True")
    assert sorted(p.name for p in out.iterdir()) == ["case_005.nii.gz", "case_005.npz"]
    assert_same_geometry(out / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")
    probabilities = np.load(out / "case_005.npz")["probabilities"]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "imagesTs" / "case_005_0000.nii.gz")))
    assert probabilities.shape == (3, *image.shape)
    assert np.allclose(probabilities.sum(0), 1, atol=1e-4)
    # a zipped, moved and extracted copy predicts the same
    archive = tmp_path / f"{bundle.name}.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in bundle.rglob("*"):
            if f.is_file() and "eval" not in f.relative_to(bundle).parts:
                z.write(f, Path(bundle.name) / f.relative_to(bundle))
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "elsewhere")
    moved = tmp_path / "elsewhere" / bundle.name
    out2 = tmp_path / "pred2"
    bundle_cmd(moved, "run", "--config_file", "configs/inference.json", "--dataset_dir",
               raw / "imagesTs" / "case_005_0000.nii.gz", "--output_dir", out2, "--use_tta", "False")
    first = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_005.nii.gz")))
    second = sitk.GetArrayFromImage(sitk.ReadImage(str(out2 / "case_005.nii.gz")))
    np.testing.assert_array_equal(first, second)


def _requirement_names(path: Path) -> set:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {re.split(r"[<>=!~\[; ]", line)[0].lower() for line in lines if line}


# what the packages outside requirements-inference.txt are imported as (the test extra's too)
IMPORT_NAMES = {"simpleitk": "SimpleITK", "pyyaml": "yaml", "ray": "ray", "mlflow": "mlflow",
                "matplotlib": "matplotlib", "tensorboard": "tensorboard", "scikit-image": "skimage",
                "scikit-learn": "sklearn", "onnx": "onnx", "onnxruntime": "onnxruntime", "pandas": "pandas"}
BLOCKED_RUN = """import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not in requirements-inference.txt: " + name)
sys.meta_path.insert(0, Block())
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_inference_needs_only_requirements_inference(trained_3d, tmp_path):
    """A machine that only predicts installs requirements-inference.txt: inference runs with nothing else."""
    inference, full = _requirement_names(ROOT / "requirements-inference.txt"), _requirement_names(
        ROOT / "requirements.txt")
    assert inference < full
    assert full - inference <= set(IMPORT_NAMES), "a new package in requirements.txt needs its import name here"
    blocked = sorted(IMPORT_NAMES[n] for n in set(IMPORT_NAMES) - inference)
    assert {"mlflow", "matplotlib", "SimpleITK", "ray", "tensorboard"} <= set(blocked)
    raw, bundle = trained_3d
    args = ["run", "--config_file", "configs/inference.json", "--dataset_dir", raw / "imagesTs", "--use_tta", "False"]
    bundle_cmd(bundle, *args, "--output_dir", tmp_path / "full")
    result = subprocess.run([sys.executable, "-c", BLOCKED_RUN.format(blocked=blocked), *map(str, args),
                             "--output_dir", str(tmp_path / "lean")], cwd=bundle, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "lean" / "case_005.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "full" / "case_005.nii.gz"))))


def test_ckpt_export_gives_the_same_output(trained_3d):
    import torch

    raw, bundle = trained_3d
    patch = json.loads((bundle / "configs/inference.json").read_text())["patch_size"]
    bundle_cmd(bundle, "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
               "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--use_trace", "True",
               "--input_shape", json.dumps([1, 1, *patch]))
    traced = torch.jit.load(str(bundle / "models/model.ts"))
    with bundle_on_path(bundle):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(bundle / "configs/inference.json"))
        parser["bundle_root"] = str(bundle)
        network = parser.get_parsed_content("network_def")
        network.load_state_dict(torch.load(bundle / "models/model.pt", map_location="cpu", weights_only=True))
        network.eval()
        x = torch.randn(1, 1, *patch)
        with torch.no_grad():
            np.testing.assert_allclose(traced(x).numpy(), network(x).numpy(), rtol=1e-4, atol=1e-4)


def test_2d_configuration_trains_and_predicts_slice_by_slice(emitted, tmp_path):
    raw, _, bundles = emitted
    bundle = bundles["2d"]
    bundle_cmd(bundle, "run", "training", "--config_file", "configs/train.json", *FAST)
    assert (bundle / "models/model.pt").is_file()
    bundle_cmd(bundle, "run", "--config_file", "configs/inference.json", "--dataset_dir", raw / "imagesTs",
               "--output_dir", tmp_path, "--use_tta", "False")
    assert_same_geometry(tmp_path / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")


def test_multi_process_training_on_gloo(emitted, tmp_path):
    raw, _, bundles = emitted
    copy = tmp_path / "ddp" / bundles["3d_fullres"].name
    shutil.copytree(bundles["3d_fullres"], copy, ignore=shutil.ignore_patterns("models", "eval"))
    (copy / "models").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "monai.bundle",
         "run", "training", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
         "--cache_dir", str(bundles["3d_fullres"].parent / "preprocessed"), "--dataset_dir", str(raw), *FAST],
        cwd=copy, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (copy / "models/model.pt").is_file()
    assert (copy / "eval/validation/summary.json").is_file()


def test_cascade_uses_the_previous_stage_as_extra_channels(emitted, tmp_path):
    """3d_cascade_fullres trains on the 3d_lowres folds' validation predictions and predicts from a lowres output."""
    raw, plans_path, _ = emitted
    plans = json.loads(plans_path.read_text())
    plans = with_lowres_and_cascade(plans)
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    out = tmp_path / "bundles"
    written = emit(tmp_path / "plans.json", raw, out, ["3d_lowres", "3d_cascade_fullres"], [0, 1, 2, 3, 4])
    assert len(written) == 10
    splits = json.loads((out / "splits_final.json").read_text())
    for k, split in enumerate(splits):  # stand-in for trained lowres folds: their validation "predictions"
        folder = out / f"Dataset960_Tiny_3d_lowres_fold{k}" / "eval" / "validation"
        folder.mkdir(parents=True)
        for case in split["val"]:
            shutil.copyfile(raw / "labelsTr" / f"{case}.nii.gz", folder / f"{case}.nii.gz")
    cascade = out / "Dataset960_Tiny_3d_cascade_fullres_fold0"
    train = json.loads((cascade / "configs/train.json").read_text())
    assert train["in_channels"] == 3  # 1 image channel + 2 foreground labels
    bundle_cmd(cascade, "run", "training", "--config_file", "configs/train.json", *FAST)
    assert (cascade / "eval/validation/summary.json").is_file()
    from monai.bundle import ConfigParser

    with bundle_on_path(cascade):  # the random perturbation of the previous-stage channels, forced to fire
        parser = ConfigParser()
        parser.read_config(str(cascade / "configs/train.json"))
        parser["bundle_root"] = str(cascade)
        dataset = parser.get_parsed_content("train#dataset")
        morph = [t for t in dataset.transform.transforms if type(t).__name__ == "CascadeMorphologyd"]
        assert len(morph) == 1 and morph[0].num_channels == 2
        morph[0].p_binary = morph[0].p_remove = morph[0].p_per_label = 1.0
        sample = dataset[0]
        assert sample["image"].shape[0] == 3 and (sample["image"][1:].sum(0) <= 1).all()
    previous = cascade / "eval" / "previous_stage"
    previous.mkdir()
    shutil.copyfile(raw / "labelsTr" / "case_000.nii.gz", previous / "case_005.nii.gz")  # any label map will do
    label = sitk.ReadImage(str(raw / "labelsTr" / "case_000.nii.gz"))
    image = sitk.ReadImage(str(raw / "imagesTs" / "case_005_0000.nii.gz"))
    if label.GetSize() != image.GetSize():  # the stand-in must match the test image's grid
        sitk.WriteImage(sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor), str(previous / "case_005.nii.gz"))
    bundle_cmd(cascade, "run", "--config_file", "configs/inference.json", "--dataset_dir", raw / "imagesTs",
               "--output_dir", tmp_path / "pred", "--use_tta", "False")
    assert_same_geometry(tmp_path / "pred" / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")
