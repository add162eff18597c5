"""The command line end to end: synthetic -> run, --help everywhere, clean errors."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

COMMANDS = ["synthetic", "convert-msd", "verify", "fingerprint", "plan", "run", "demo"]


def autoplan(*args):
    return subprocess.run([sys.executable, "-m", "autoplan", *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = autoplan(command, "--help")
    text = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    assert result.returncode == 0
    assert f"autoplan {command}" in text and ("FLAGS" in text or "POSITIONAL ARGUMENTS" in text)


def test_synthetic_then_run(tmp_path):
    raw = tmp_path / "Dataset910_Aniso"
    result = autoplan("synthetic", raw, "--cases", 5, "--shape", "40,40,10", "--spacing", "0.8,0.8,4",
                      "--channels", 2, "--modality", "CT", "--labels", 3)
    assert result.returncode == 0, result.stderr
    spec = json.loads((raw / "dataset.json").read_text())
    assert spec["numTraining"] == 5 and len(spec["labels"]) == 4 and len(spec["channel_names"]) == 2
    result = autoplan("run", raw, "--out", tmp_path / "work", "--planner", "resenc-m", "--processes", 1)
    assert result.returncode == 0, result.stderr
    plans = json.loads((tmp_path / "work" / "nnUNetResEncUNetMPlans.json").read_text())
    assert plans["dataset_name"] == "Dataset910_Aniso"
    assert plans["experiment_planner_used"] == "nnUNetPlannerResEncM"
    fullres = plans["configurations"]["3d_fullres"]
    assert fullres["spacing"] == pytest.approx([4.0, 0.8, 0.8])
    assert fullres["normalization_schemes"][0] == "CTNormalization"
    assert fullres["architecture"]["arch_kwargs"]["kernel_sizes"][0] == [1, 3, 3]
    assert "3d_fullres" in result.stdout  # the summary table
    fingerprint = json.loads((tmp_path / "work" / "dataset_fingerprint.json").read_text())
    assert plans["foreground_intensity_properties_per_channel"] == fingerprint[
        "foreground_intensity_properties_per_channel"]


def test_run_refuses_a_broken_dataset_with_exit_2(dataset_copy, tmp_path):
    (dataset_copy / "labelsTr" / "case_000.nii.gz").unlink()
    result = autoplan("run", dataset_copy, "--out", tmp_path / "work")
    assert result.returncode == 2
    assert "case_000.nii.gz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "work" / "dataset_fingerprint.json").exists()


def test_plan_reports_a_missing_fingerprint(tmp_path):
    (tmp_path / "dataset.json").write_text("{}")
    result = autoplan("plan", "--dataset-json", tmp_path / "dataset.json", "--fingerprint", tmp_path / "nope.json",
                      "--out", tmp_path / "plans.json")
    assert result.returncode == 2 and "nope.json" in result.stderr and "Traceback" not in result.stderr


def test_unknown_planner_is_refused(tmp_path, synthetic_mr):
    result = autoplan("run", synthetic_mr, "--out", tmp_path / "w", "--planner", "nope", "--processes", 1)
    assert result.returncode == 2 and "unknown planner 'nope'" in result.stderr
