"""The demo end to end at a tiny budget: every stage runs and leaves its files; the Dice itself is not checked here."""

import json
import re
import subprocess
import sys

import numpy as np

from conftest import ROOT


def autoplan(*args):
    return subprocess.run([sys.executable, "-m", "autoplan", *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT))


def test_demo_at_a_tiny_budget(tmp_path):
    from matplotlib.image import imread

    from autoplan.image_io import read_array

    out = tmp_path / "demo"
    result = autoplan("demo", "--out", out, "--epochs", 1, "--iterations", 2, "--processes", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    raw = out / "raw" / "Dataset900_Synthetic"
    bundle = out / "work" / "bundles" / "Dataset900_Synthetic_3d_fullres_fold0"
    labels = json.loads((raw / "dataset.json").read_text())["labels"]
    summary = json.loads((bundle / "eval" / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {str(v) for v in labels.values() if v > 0}

    # the table has a row per label, and the verdict agrees with it
    rows = re.findall(r"^(structure_\d+)\s+([\d.]+)\s+(pass|FAIL)$", result.stdout, re.MULTILINE)
    assert sorted(name for name, _, _ in rows) == sorted(k for k in labels if k != "background")
    assert ("NOT LEARNED" in result.stdout) == any(verdict == "FAIL" for _, _, verdict in rows)

    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    predictions = sorted((bundle / "eval" / "test_predictions").glob("*.nii.gz"))
    assert [p.name for p in predictions] == [i.name.replace("_0000", "") for i in images] and images
    for image, prediction in zip(images, predictions):
        assert read_array(prediction)[0].shape == read_array(image)[0].shape

    progress = bundle / "eval" / "progress.png"
    overview = out / "overview.png"
    assert str(progress) in result.stdout and str(overview) in result.stdout
    assert progress.stat().st_size > 0
    picture = imread(overview)
    assert picture.ndim == 3 and 200 <= picture.shape[0] <= 2000 and 400 <= picture.shape[1] <= 4000
    assert np.ptp(picture[..., :3]) > 0.5  # not a blank canvas
    assert re.search(r"total wall time: \d+ s", result.stdout)


def test_demo_refuses_a_zero_budget_with_exit_2(tmp_path):
    result = autoplan("demo", "--out", tmp_path / "demo", "--epochs", 0)
    assert result.returncode == 2
    assert "--epochs must be a positive integer" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "demo").exists()
