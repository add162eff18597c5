"""``autoplan train`` on a local 2-CPU Ray instance and ``autoplan predict``: tiny trainings of a synthetic dataset's
2d and 3d_fullres folds (a failure reported while the others finish, a rerun that retrains nothing and resumes an
interrupted run), and a lowres/cascade plan whose cascade waits for every lowres fold."""

import json
import os
import shutil

import pytest

from autoplan.cli import main
from autoplan.emit import emit
from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset
from autoplan.train import REPORT_FILE
from conftest import with_lowres_and_cascade

ray = pytest.importorskip("ray")

TINY = ["--epochs", "1", "--iterations", "2", "--override", "val_iterations=1 num_workers=0", "--no-select"]
NAME = "Dataset961_Train"


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local instance for the module (``autoplan train`` joins an initialised Ray instead of starting one)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    raw = make_synthetic_dataset(root / "raw" / NAME, cases=5, shape=(24, 24, 12), spacing=(1, 1, 2), labels=2,
                                 test_cases=1, seed=3)
    run(raw, root / "work", processes=1, configurations=["2d", "3d_fullres"], folds=[0, 1])
    return raw, root / "work"


def train(work_dir, *args) -> int:
    try:
        main(["train", str(work_dir), *map(str, args)])
    except SystemExit as exc:
        return exc.code
    return 0


def report(work_dir) -> dict:
    return {os.path.basename(r["bundle"]): r for r in json.loads((work_dir / "bundles" / REPORT_FILE).read_text())}


def test_failure_rerun_resume_and_predict(work, tmp_path, capsys):
    import torch

    raw, work_dir = work
    bundles = work_dir / "bundles"
    broken = bundles / f"{NAME}_2d_fold1" / "configs" / "train.json"
    original = broken.read_text()
    broken.write_text("{ not json")
    assert train(work_dir, *TINY) == 1  # the failure is reported, the three others finish
    out = capsys.readouterr()
    first = report(work_dir)
    assert first[f"{NAME}_2d_fold1"]["status"] == "failed" and os.path.isfile(first[f"{NAME}_2d_fold1"]["log"])
    assert first[f"{NAME}_2d_fold1"]["log"] in out.out and "selection skipped" in out.err
    assert [r["status"] for n, r in first.items() if n != f"{NAME}_2d_fold1"] == ["trained"] * 3
    assert "validation Dice" in out.out
    assert all(r["dice"] is not None for r in first.values() if r["status"] == "trained")

    broken.write_text(original)
    interrupted = bundles / f"{NAME}_3d_fullres_fold1"  # as if stopped after epoch 1 of 2
    checkpoint = interrupted / "models" / "resume" / "checkpoint_latest.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["max_epochs"] = 2
    torch.save(state, checkpoint)
    (interrupted / "models" / "model.pt").unlink()
    (interrupted / "eval" / "validation" / "summary.json").unlink()
    kept = [bundles / f"{NAME}_{c}_fold0" / "models" / "model.pt" for c in ("2d", "3d_fullres")]
    mtimes = [p.stat().st_mtime_ns for p in kept]
    assert train(work_dir, "--epochs", "2", *TINY[2:]) == 0
    second = report(work_dir)
    assert [second[p.parents[1].name]["status"] for p in kept] == ["done before"] * 2
    assert [p.stat().st_mtime_ns for p in kept] == mtimes  # nothing retrained
    assert second[f"{NAME}_2d_fold1"]["status"] == second[interrupted.name]["status"] == "trained"
    assert "at epoch 1 of 2" in (interrupted / "eval" / "train.log").read_text()
    assert json.loads((interrupted / "eval" / "progress.json").read_text())["epoch"] == [1, 2]
    capsys.readouterr()

    assert train(work_dir, *TINY) == 0  # all done: no task at all
    assert "0 to train, 4 done before" in capsys.readouterr().out

    bundle = bundles / f"{NAME}_2d_fold0"
    main(["predict", str(work_dir), str(raw / "imagesTs"), str(tmp_path / "pred"), "--bundle", str(bundle),
          "--override", "use_tta=False"])
    assert (tmp_path / "pred" / "case_005.nii.gz").is_file()


def test_cascade_starts_after_every_lowres_fold(work, tmp_path):
    """A lowres/cascade plan on a 2-fold split: choosing the cascade brings its lowres folds along, and Ray starts
    the cascade only once both lowres folds have finished."""
    raw, work_dir = work
    plans = json.loads((work_dir / "nnUNetPlans.json").read_text())
    plans = with_lowres_and_cascade(plans)
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    cases = sorted(p.name[:-7] for p in (raw / "labelsTr").iterdir())
    (tmp_path / "splits.json").write_text(json.dumps([{"train": cases[2:], "val": cases[:2]},
                                                       {"train": cases[:2], "val": cases[2:]}]))
    emit(tmp_path / "plans.json", raw, tmp_path / "bundles", ["3d_lowres", "3d_cascade_fullres"], [0, 1],
         tmp_path / "splits.json")
    shutil.rmtree(tmp_path / "bundles" / f"{NAME}_3d_cascade_fullres_fold1")  # one cascade fold is enough here
    assert train(tmp_path, "--configurations", "3d_cascade_fullres", *TINY) == 0
    result = report(tmp_path)
    assert list(result) == [f"{NAME}_3d_lowres_fold0", f"{NAME}_3d_lowres_fold1", f"{NAME}_3d_cascade_fullres_fold0"]
    assert all(r["status"] == "trained" for r in result.values())
    cascade = result[f"{NAME}_3d_cascade_fullres_fold0"]
    assert cascade["start"] >= max(result[f"{NAME}_3d_lowres_fold{k}"]["end"] for k in (0, 1))
