"""The command line end to end: synthetic -> run, --help everywhere, clean errors."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, planning_inputs, sklearn_splits

# every command, with an option (or subcommand) its help must describe
COMMANDS = {"synthetic": "--spacing_jitter", "convert-msd": "TASK_DIR", "verify": "RAW_DIR",
            "fingerprint": "--processes", "plan": "--gpu_memory_gb", "emit": "--configurations", "run": "--planner",
            "demo": "--epochs", "train": "--gpus_per_task", "predict": "OUTPUT_DIR",
            "import-nnunet": "--checkpoint", "export-nnunet": "--dataset_name", "evaluate": "--nsd_tolerance",
            "ensemble": "make-bundle",
            "select": "--disable-ensembling", "export": "--include_eval"}
# the tools' subcommands, and the tools' own scripts
SUBCOMMANDS = {("ensemble", "average"): "--reference_images", ("ensemble", "make-bundle"): "--postprocessing",
               ("export", "install"): "--overwrite"}
SCRIPTS = {"evaluate": "evaluate.py", "ensemble": "ensemble.py", "select": "find_best.py", "export": "export.py"}


def autoplan(*args):
    return subprocess.run([sys.executable, "-m", "autoplan", *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT))


def test_help_lists_every_command_with_a_summary():
    result = autoplan("--help")
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.stdout.splitlines()
              if line.startswith("  ") and len(line.split()) > 1}
    assert list(listed) == list(COMMANDS)
    assert listed["plan"].startswith("Plan the configurations") and "find_best_configuration" in listed["select"]
    bare = autoplan()  # no command: the same list on stderr, as a usage error
    assert bare.returncode == 2 and "select" in bare.stderr and not bare.stdout
    unknown = autoplan("nope")
    assert unknown.returncode == 2 and "unknown command 'nope'" in unknown.stderr
    assert "Traceback" not in bare.stderr + unknown.stderr


@pytest.mark.parametrize("command", [*COMMANDS, *SUBCOMMANDS])
def test_every_command_has_help(command):
    words = command if isinstance(command, tuple) else (command,)
    result = autoplan(*words, "--help")
    text = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
    assert result.returncode == 0, text
    assert f"autoplan {' '.join(words)}" in text and {**COMMANDS, **SUBCOMMANDS}[command] in text
    assert "Traceback" not in text


@pytest.mark.parametrize("command", SCRIPTS)
def test_the_tools_scripts_take_the_same_arguments(command):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / SCRIPTS[command]), "--help"], capture_output=True,
                            text=True, cwd=str(ROOT))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    assert COMMANDS[command] in text


def test_no_tool_shadows_a_standard_module():
    """``python tools/X.py`` puts tools/ first on sys.path: a tools/select.py would replace ``import select``."""
    assert not {p.stem for p in (ROOT / "tools").glob("*.py")} & set(sys.stdlib_module_names)


@pytest.mark.parametrize("args, named", [
    (["evaluate", "{tmp}/ref", "{tmp}/pred", "--dataset-json", "{tmp}/dataset.json"], "{tmp}/ref"),
    (["evaluate", "{tmp}/ref", "{tmp}/pred", "--dataset-json", "{tmp}/missing.json"], "{tmp}/missing.json"),
    (["ensemble", "{tmp}/missing", "--dataset-dir", "{tmp}", "--output-dir", "{tmp}/out"], "{tmp}/missing"),
    (["ensemble", "average", "{tmp}/missing", "--output-dir", "{tmp}/out"], "{tmp}/missing"),
    (["ensemble", "make-bundle", "{tmp}", "--out", "{tmp}/out"], "{tmp}/configs/inference.json"),
    (["select", "{tmp}"], "{tmp}"),
    (["export", "{tmp}/missing", "--out", "{tmp}/out.zip"], "{tmp}/missing"),
    (["export", "install", "{tmp}/missing.zip", "--out", "{tmp}/out"], "{tmp}/missing.zip"),
])
def test_tool_commands_reject_bad_input_with_exit_2(tmp_path, args, named):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1},
                                                       "file_ending": ".nii.gz"}))
    result = autoplan(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {named.format(tmp=tmp_path)}: " in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.zip").exists()


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


@pytest.fixture
def emit_inputs(dataset_copy, tmp_path):
    """A private synthetic dataset and a plans file for it (planned from a hand-made fingerprint)."""
    from autoplan.pipeline import plan_files

    planning_inputs(tmp_path)
    plan_files(dataset_copy / "dataset.json", tmp_path / "fingerprint.json", tmp_path / "plans.json",
               name=dataset_copy.name)
    return dataset_copy, tmp_path / "plans.json"


def emitted_cases(bundle):
    train = json.loads((bundle / "configs" / "train.json").read_text())
    return train["train_cases"], train["val_cases"]


def test_emit_uses_nnunets_split_a_raw_splits_file_or_splits_and_fold_all(emit_inputs, tmp_path):
    raw, plans = emit_inputs
    cases = sorted(p.name[:-7] for p in (raw / "labelsTr").iterdir())
    result = autoplan("emit", plans, raw, "--out", tmp_path / "a", "--configurations", "3d_fullres", "--folds", "1,all")
    assert result.returncode == 0, result.stderr
    assert emitted_cases(tmp_path / "a" / f"{raw.name}_3d_fullres_fold1") == tuple(sklearn_splits(cases)[1].values())
    assert emitted_cases(tmp_path / "a" / f"{raw.name}_3d_fullres_foldall") == (cases, cases)
    assert json.loads((tmp_path / "a" / "splits_final.json").read_text()) == sklearn_splits(cases)
    custom = [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}]
    (raw / "splits_final.json").write_text(json.dumps(custom))  # nnU-Net's place for a user's splits
    result = autoplan("emit", plans, raw, "--out", tmp_path / "b", "--configurations", "3d_fullres", "--folds", "1")
    assert result.returncode == 0, result.stderr
    assert emitted_cases(tmp_path / "b" / f"{raw.name}_3d_fullres_fold1") == (cases[:2], cases[2:])
    (tmp_path / "mine.json").write_text(json.dumps(custom[::-1]))  # --splits wins over the raw folder's file
    result = autoplan("emit", plans, raw, "--out", tmp_path / "c", "--configurations", "3d_fullres", "--folds", "0",
                      "--splits", tmp_path / "mine.json")
    assert result.returncode == 0, result.stderr
    assert emitted_cases(tmp_path / "c" / f"{raw.name}_3d_fullres_fold0") == (cases[:2], cases[2:])
    assert json.loads((tmp_path / "c" / "splits_final.json").read_text()) == custom[::-1]


@pytest.mark.parametrize("args, message", [
    (["{plans}", "{raw}", "--configurations", "3d_lowres"], "{plans}: has no configuration '3d_lowres'"),
    (["{plans}", "{raw}", "--folds", "7"], "fold 7 does not exist: the splits have 5 folds"),
    (["{plans}", "{raw}", "--splits", "{tmp}/bad.json"], "{tmp}/bad.json: cannot read splits"),
    (["{tmp}/missing.json", "{raw}"], "{tmp}/missing.json"),
    (["{plans}", "{tmp}/no_dataset"], "{tmp}/no_dataset"),
])
def test_emit_rejects_bad_input_with_exit_2(emit_inputs, tmp_path, args, message):
    raw, plans = emit_inputs
    (tmp_path / "bad.json").write_text("[{")
    fill = dict(plans=plans, raw=raw, tmp=tmp_path)
    result = autoplan("emit", *[a.format(**fill) for a in args], "--out", tmp_path / "out")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: " in result.stderr and message.format(**fill) in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out/*_fold*"))  # no bundle written


def test_emit_refuses_to_overwrite_a_bundle_with_exit_2(emit_inputs, tmp_path):
    raw, plans = emit_inputs
    args = ["emit", plans, raw, "--out", tmp_path / "out", "--configurations", "3d_fullres", "--folds", "0"]
    assert autoplan(*args).returncode == 0
    again = autoplan(*args)
    assert again.returncode == 2 and "bundle already exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("args, message", [
    (["synthetic", "{tmp}/full"], "{tmp}/full: already exists and is not empty"),
    (["synthetic", "{tmp}/new", "--shape", "a,b"], "--shape: ('a', 'b') is not a list of numbers"),
    (["synthetic", "{tmp}/new", "--shape", "8,8,8,8"], "must both have 2 or 3 entries"),
    (["synthetic", "{tmp}/new", "--cases", "0"], "cases, channels and labels must be at least 1"),
    (["convert-msd", "{tmp}/missing", "{tmp}/new"], "{tmp}/missing/dataset.json: file not found"),
    (["verify", "{tmp}/missing"], "{tmp}/missing: dataset folder not found"),
    (["fingerprint", "{tmp}/full"], "{tmp}/full/dataset.json: file not found"),
    (["plan", "--dataset-json", "{tmp}/bad.json", "--fingerprint", "{tmp}/bad.json"], "{tmp}/bad.json: not valid JSON"),
    (["emit", "{tmp}/bad.json", "{tmp}/missing", "--folds", "x"], "--folds: 'x' is not a list of fold numbers"),
    (["run", "{tmp}/missing", "--out", "{tmp}/new"], "{tmp}/missing: dataset folder not found"),
    (["run", "{tmp}/missing", "--out", "{tmp}/new", "--folds", "0,x"], "--folds: (0, 'x') is not a list"),
    (["demo", "--out", "{tmp}/file"], "{tmp}/file/raw: Not a directory"),
    (["train", "{tmp}/full"], "{tmp}/full/bundles: no such folder"),
    (["train", "{tmp}/full", "--folds", "one"], "--folds: 'one' is not a list of fold numbers"),
    (["predict", "{tmp}/full", "{tmp}/missing", "{tmp}/new"], "{tmp}/full/bundles/selection/report.json: missing"),
    (["predict", "{tmp}/full", "{tmp}/missing", "{tmp}/new", "--bundle", "{tmp}/full"],
     "{tmp}/full/configs/inference.json: missing (not a bundle)"),
])
def test_every_command_rejects_bad_input_with_one_clear_line_and_exit_2(tmp_path, args, message):
    """Each command's bad input: exit status 2, one ``error:`` line naming the file or option and the problem, no
    traceback, nothing written."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad.json").write_text("{bad")
    result = autoplan(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()
