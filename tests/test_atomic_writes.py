"""Atomic writes: a process killed while it writes a fingerprint, a plans file, a checkpoint or a bundle leaves the
old file (or nothing), never a truncated one. The writer runs in a subprocess that pauses at the chosen moment (half
of the text written, or everything written but not yet renamed into place) and is killed there with SIGKILL."""

import signal
import subprocess
import sys

import pytest

from conftest import ROOT, planning_inputs

PAUSES = {
    # the first half of the text reaches the (temporary) file, then the writer stalls
    "mid-write": """
real_fdopen = os.fdopen
class Stalling:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *exc): return self.f.__exit__(*exc)
    def write(self, text):
        self.f.write(text[: len(text) // 2]); self.f.flush(); stall()
os.fdopen = lambda *a, **k: Stalling(real_fdopen(*a, **k))
""",
    # the complete file exists under its temporary name; the rename never happens
    "before-rename": "os.replace = lambda *a, **k: stall()\n",
    # the same for a folder built under a temporary name
    "before-folder-rename": "pathlib.Path.rename = lambda *a, **k: stall()\n",
}
PRELUDE = """
import os, pathlib, sys, time
def stall():
    print("stalled", flush=True)
    time.sleep(120)
"""


def kill_while_writing(pause: str, code: str):
    """Run ``code`` with the pause installed, wait until it stalls, kill it; fails if it never stalls."""
    process = subprocess.Popen([sys.executable, "-c", PRELUDE + PAUSES[pause] + code], cwd=str(ROOT),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line == "stalled\n", line + process.stderr.read()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("pause", ["mid-write", "before-rename"])
@pytest.mark.parametrize("existing", [True, False])
def test_killed_fingerprint_or_plans_writer_leaves_the_old_file_or_none(synthetic_mr, tmp_path, pause, existing):
    planning_inputs(tmp_path)
    writers = {
        "dataset_fingerprint.json": f"from autoplan.fingerprint import write_fingerprint\n"
                                    f"write_fingerprint(r'{synthetic_mr}', r'{tmp_path}/dataset_fingerprint.json', 1)",
        "nnUNetPlans.json": f"from autoplan.pipeline import plan_files\nplan_files(r'{tmp_path}/dataset.json', "
                            f"r'{tmp_path}/fingerprint.json', r'{tmp_path}/nnUNetPlans.json')",
    }
    for name, code in writers.items():
        target = tmp_path / name
        if existing:
            target.write_text('{"old": true}\n')
        kill_while_writing(pause, code)
        if existing:
            assert target.read_text() == '{"old": true}\n', name
        else:
            assert not target.exists(), name
        assert [p.name for p in tmp_path.glob(f".{name}.*.tmp")], name  # the partial file went elsewhere


@pytest.mark.parametrize("existing", [True, False])
def test_killed_checkpoint_writer_leaves_the_old_checkpoint_or_none(tmp_path, existing):
    import torch

    target = tmp_path / "models" / "checkpoint_latest.pt"
    if existing:
        target.parent.mkdir()
        torch.save({"epoch": 1}, target)
    kill_while_writing("before-rename", "import torch\nfrom bundles.scripts.handlers import save_atomic\n"
                                        f"save_atomic({{'epoch': 2, 'w': torch.zeros(1000)}}, pathlib.Path(r'{target}'))")
    if existing:
        assert torch.load(target, weights_only=True) == {"epoch": 1}
    else:
        assert not target.exists()


def test_killed_bundle_emission_leaves_no_bundle_folder(synthetic_mr, tmp_path):
    """A bundle is built in a hidden sibling folder and renamed into place only when complete."""
    from autoplan.pipeline import plan_files

    planning_inputs(tmp_path)
    plans = tmp_path / "plans.json"
    plan_files(synthetic_mr / "dataset.json", tmp_path / "fingerprint.json", plans)
    out = tmp_path / "bundles"
    kill_while_writing("before-folder-rename", f"from autoplan.emit import emit\nemit(r'{plans}', r'{synthetic_mr}', "
                                        f"r'{out}', ['3d_fullres'], [0])")
    assert not (out / f"{synthetic_mr.name}_3d_fullres_fold0").exists()
    (partial,) = [p for p in out.iterdir() if p.name.startswith(f".{synthetic_mr.name}_3d_fullres_fold0.")]
    assert (partial / "configs" / "train.json").is_file()  # it was complete, yet never appeared under its name
