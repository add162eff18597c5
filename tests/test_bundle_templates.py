"""The bundle templates as a contract a contributor can change safely: hyperparameters are top-level ids that the
built objects and the bundle's docs follow, the loss component is swappable from a config file, any configuration
nnU-Net allows is emitted (a cascade is recognised by ``previous_stage``), ``multi_gpu_train.json`` depends on no
list position, and a bundle holds no path of the machine that emitted it."""

import json
import os
import re
import shutil

import pytest
import torch

from autoplan.emit import emit
from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset
from conftest import ROOT
from test_bundles import FAST, assert_same_geometry, bundle_cmd, bundle_on_path


def doc_snippet(name: str) -> dict:
    """A JSON example of docs/extending.md, found by the ``<!-- file: NAME -->`` line above its code block."""
    text = (ROOT / "docs" / "extending.md").read_text()
    match = re.search(rf"<!-- file: {re.escape(name)} -->\s*```json\n(.*?)```", text, re.S)
    assert match, f"docs/extending.md has no example {name}"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    raw = make_synthetic_dataset(root / "raw" / "Dataset961_Templates", cases=5, shape=(24, 24, 12),
                                 spacing=(1, 1, 2), labels=2, test_cases=1, seed=4)
    plans_path = run(raw, root / "work", processes=1, configurations=["3d_fullres"], folds=[0])
    return raw, plans_path, root / "work" / "bundles" / "Dataset961_Templates_3d_fullres_fold0"


def parsed(bundle, *extra_files, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / "train.json"), *map(str, extra_files)])
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


def test_hyperparameters_are_top_level_ids_that_the_objects_follow(emitted):
    _, _, bundle = emitted
    train = json.loads((bundle / "configs/train.json").read_text())
    nnunet = {"learning_rate": 0.01, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5, "poly_power": 0.9,
              "grad_clip_norm": 12.0, "oversample_foreground_percent": 0.33, "epochs": 1000,
              "iterations_per_epoch": 250}
    assert {k: train[k] for k in nnunet} == nnunet
    changed = {"learning_rate": 0.02, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "poly_power": 2.0,
               "grad_clip_norm": 0.5, "oversample_foreground_percent": 0.5, "batch_size": 4, "num_workers": 0}
    with bundle_on_path(bundle):
        parser = parsed(bundle, **changed)
        parser.get_parsed_content("initialize")
        optimizer = parser.get_parsed_content("optimizer")
        group = optimizer.param_groups[0]
        assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.02, 0.9, False, 1e-4)
        assert parser.get_parsed_content("lr_scheduler").power == 2.0
        assert parser.get_parsed_content("train#dataset").first_forced == 2  # round(4 * (1 - 0.5))
        network = parser.get_parsed_content("network")
        for p in network.parameters():
            p.grad = torch.full_like(p, 10.0)
        (hook,) = optimizer._optimizer_step_pre_hooks.values()  # the clipping hook that initialize registered
        hook(optimizer, (), {})
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in network.parameters()]))
        assert float(norm) == pytest.approx(0.5, rel=1e-4)


def test_bundle_docs_are_written_from_the_config_values(emitted, tmp_path, monkeypatch):
    """Change a template's value and the emitted docs say the new value (no prose with hard-coded numbers)."""
    import autoplan.emit as emit_module

    raw, plans_path, bundle = emitted
    readme = (bundle / "docs/README.md").read_text()
    assert "lr 0.01" in readme and "momentum 0.99" in readme and "weight decay 3e-05" in readme
    assert "1000 epochs" in readme and "| `grad_clip_norm` | `12.0` |" in readme
    original = emit_module._template

    def edited(name):
        config = original(name)
        if name == "train.json":
            config.update(momentum=0.95, epochs=300, grad_clip_norm=5.0)
        return config

    monkeypatch.setattr(emit_module, "_template", edited)
    (written,) = emit(plans_path, raw, tmp_path / "b", ["3d_fullres"], [0])
    readme = (written / "docs/README.md").read_text()
    assert "momentum 0.95" in readme and "300 epochs" in readme and "clipped at 5.0" in readme
    assert "momentum 0.99" not in readme and "1000 epochs" not in readme


def test_the_loss_component_is_swapped_through_a_config_file(emitted, tmp_path):
    """docs/extending.md: MONAI's DiceCELoss replaces nnU-Net's Dice+CE inside the deep-supervision wrapper."""
    from monai.losses import DiceCELoss

    raw, _, original = emitted
    bundle = shutil.copytree(original, tmp_path / original.name, ignore=shutil.ignore_patterns("models", "eval"))
    (bundle / "models").mkdir()
    (bundle / "configs/loss_dicece.json").write_text(json.dumps(doc_snippet("configs/loss_dicece.json")))
    with bundle_on_path(bundle):
        loss = parsed(bundle, bundle / "configs/loss_dicece.json").get_parsed_content("loss")
        assert type(loss).__name__ == "DeepSupervisedLoss" and isinstance(loss.loss, DiceCELoss)
        label = torch.randint(0, 3, (2, 1, 16, 16, 8)).float()
        outputs = torch.stack([torch.randn(2, 3, 16, 16, 8)] * 3, dim=1)  # deep supervision, stacked
        value = loss(outputs, label)
        assert value.ndim == 0 and torch.isfinite(value)
    bundle_cmd(bundle, "run", "training", "--config_file", "['configs/train.json','configs/loss_dicece.json']",
               *FAST, "--dataset_dir", raw)
    assert (bundle / "models/model.pt").is_file() and (bundle / "eval/validation/summary.json").is_file()


def test_a_custom_configuration_inheriting_from_3d_fullres_is_emitted(emitted, tmp_path):
    """docs/extending.md: a configuration with another patch size, as nnU-Net documents custom configurations."""
    raw, plans_path, _ = emitted
    plans = json.loads(plans_path.read_text())
    plans["configurations"].update(doc_snippet("plans_custom_configuration.json")["configurations"])
    patch = plans["configurations"]["3d_fullres_smallpatch"]["patch_size"]
    assert patch != plans["configurations"]["3d_fullres"]["patch_size"]
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    written = emit(tmp_path / "plans.json", raw, tmp_path / "b", None, [0])
    names = sorted(p.name for p in written)
    assert names == sorted(f"Dataset961_Templates_{c}_fold0" for c in plans["configurations"])  # all, by default
    assert "Dataset961_Templates_3d_fullres_smallpatch_fold0" in names
    bundle = tmp_path / "b" / "Dataset961_Templates_3d_fullres_smallpatch_fold0"
    train = json.loads((bundle / "configs/train.json").read_text())
    assert (train["configuration"], train["patch_size"], train["batch_size"]) == ("3d_fullres_smallpatch", patch, 3)
    assert train["previous_stage"] is None and train["in_channels"] == 1
    with bundle_on_path(bundle):
        parser = parsed(bundle, num_workers=0)
        sample = parser.get_parsed_content("train#dataset")[0]
        assert list(sample["image"].shape) == [1, *patch] and list(sample["label"].shape) == [1, *patch]
        names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
        assert "CascadeMorphologyd" not in names  # only a configuration with a previous stage perturbs one


def test_a_cascade_is_recognised_by_previous_stage_not_by_name(emitted, tmp_path):
    raw, plans_path, _ = emitted
    plans = json.loads(plans_path.read_text())
    coarse = json.loads(json.dumps(plans["configurations"]["3d_fullres"]))
    coarse.update(data_identifier="custom_coarse", spacing=[s * 1.5 for s in coarse["spacing"]])
    plans["configurations"]["coarse"] = coarse
    plans["configurations"]["refine"] = {"inherits_from": "3d_fullres", "previous_stage": "coarse"}
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    emit(tmp_path / "plans.json", raw, tmp_path / "b", ["coarse", "refine"], [0])
    bundle = tmp_path / "b" / "Dataset961_Templates_refine_fold0"
    train = json.loads((bundle / "configs/train.json").read_text())
    assert train["previous_stage"] == "coarse" and train["in_channels"] == 3
    with bundle_on_path(bundle):
        parser = parsed(bundle)
        dirs = parser.get_parsed_content("previous_stage_dirs")
        assert [os.path.basename(os.path.dirname(os.path.dirname(d))) for d in dirs] == [
            f"Dataset961_Templates_coarse_fold{k}" for k in range(5)]
        names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
        assert names[-3:] == ["PreviousStageToChannelsd", "CascadeMorphologyd", "EnsureTyped"]
        with pytest.raises(Exception) as error:  # the coarse folds are not trained
            parser.get_parsed_content("train#datalist")
        assert "no previous-stage prediction" in str(error.value.__cause__)


def test_multi_gpu_config_has_no_list_positions_and_survives_an_inserted_handler(emitted, monkeypatch):
    """MONAI Label inserts a CheckpointLoader at the head of train#handlers; the DDP overrides must still reach the
    progress handler (rank > 0 writes nothing) and reuse train.json's setup steps."""
    _, _, bundle = emitted
    multi = json.loads((bundle / "configs/multi_gpu_train.json").read_text())
    assert not [k for k in multi if re.search(r"#\d+(#|$)", k)]
    assert "@setup" in multi["initialize"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with bundle_on_path(bundle):
        parser = parsed(bundle, bundle / "configs/multi_gpu_train.json", network="@network_def")
        parser["train#handlers"] = [{"_target_": "CheckpointLoader", "load_path": "unused.pt",
                                     "load_dict": {"model": "@network"}}] + parser["train#handlers"]
        handlers = parser.get_parsed_content("train#handlers")
        progress = [h for h in handlers if type(h).__name__ == "TrainingProgress"]
        assert len(progress) == 1 and progress[0].enabled is False
        assert parser.get_parsed_content("rank") == 1


@pytest.mark.parametrize("rank, batch, oversample", [(0, 5, 0.0), (1, 4, 0.75)])
def test_multi_gpu_config_splits_the_plans_batch_over_the_ranks(emitted, monkeypatch, rank, batch, oversample):
    """A batch of 9 on 2 ranks is 5 + 4 (not 4 + 4), and only rank 1 holds the 3 forced-foreground samples."""
    _, _, bundle = emitted
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with bundle_on_path(bundle):
        parser = parsed(bundle, bundle / "configs/multi_gpu_train.json", batch_size=9, epochs=3,
                        iterations_per_epoch=2)
        assert parser.get_parsed_content("train#dataloader#batch_size") == batch
        assert parser.get_parsed_content("train#dataset#batch_size") == batch
        assert parser.get_parsed_content("train#dataset#oversample_foreground") == oversample
        assert parser.get_parsed_content("train#dataset#length") == 3 * 2 * batch


def test_bundles_hold_no_path_of_the_emitting_machine(emitted, tmp_path, monkeypatch):
    raw, _, bundle = emitted
    machine_paths = {str(raw.resolve()), str(raw.resolve().parent.parent), str(bundle.resolve().parent)}
    for f in bundle.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".py", ".conf", ".txt"):
            text = f.read_text()
            assert not [p for p in machine_paths if p in text], f
    assert (bundle.parent / "dataset_dir.txt").read_text().strip() == str(raw.resolve())
    moved = shutil.copytree(bundle, tmp_path / "elsewhere" / bundle.name)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with bundle_on_path(moved):
        parser = parsed(moved)
        assert parser.get_parsed_content("dataset_dir") == ""
        with pytest.raises(Exception) as error:
            parser.get_parsed_content("train#datalist")
        assert "--dataset_dir /path/to/DatasetXXX_Name" in "".join(map(str, [error.value, error.value.__cause__]))
        monkeypatch.setenv("nnUNet_raw", str(raw.parent))  # nnU-Net's own variable finds it
        assert parsed(moved).get_parsed_content("dataset_dir") == str(raw)


def test_another_network_trains_and_predicts_through_a_config_file(emitted, tmp_path):
    """docs/extending.md: MONAI's SegResNet (no deep supervision) in place of the plan's U-Net, for both training
    and inference."""
    raw, _, original = emitted
    bundle = shutil.copytree(original, tmp_path / original.name, ignore=shutil.ignore_patterns("models", "eval"))
    (bundle / "models").mkdir()
    (bundle / "configs/network_segresnet.json").write_text(json.dumps(doc_snippet("configs/network_segresnet.json")))
    with bundle_on_path(bundle):
        assert type(parsed(bundle, bundle / "configs/network_segresnet.json").get_parsed_content("network_def")
                    ).__name__ == "SegResNet"
    bundle_cmd(bundle, "run", "training", "--config_file", "['configs/train.json','configs/network_segresnet.json']",
               *FAST, "--dataset_dir", raw)
    bundle_cmd(bundle, "run", "--config_file", "['configs/inference.json','configs/network_segresnet.json']",
               "--dataset_dir", raw / "imagesTs", "--output_dir", tmp_path / "pred", "--use_tta", "False")
    assert_same_geometry(tmp_path / "pred" / "case_005.nii.gz", raw / "imagesTs" / "case_005_0000.nii.gz")


def test_another_optimizer_through_a_config_file(emitted):
    """docs/extending.md: AdamW replaces SGD; the schedule and the clipping hook are attached to it."""
    _, _, bundle = emitted
    (bundle / "configs/optimizer_adamw.json").write_text(json.dumps(doc_snippet("configs/optimizer_adamw.json")))
    try:
        with bundle_on_path(bundle):
            parser = parsed(bundle, bundle / "configs/optimizer_adamw.json", num_workers=0)
            parser.get_parsed_content("initialize")
            optimizer = parser.get_parsed_content("optimizer")
            assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.01
            assert parser.get_parsed_content("lr_scheduler").optimizer is optimizer
            assert len(optimizer._optimizer_step_pre_hooks) == 1
    finally:
        (bundle / "configs/optimizer_adamw.json").unlink()
