"""tools/export.py: reproducible bundle zips in MONAI's convention, safe installation, and a zipped, moved and
installed bundle predicting exactly as the original."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoplan.pipeline import run
from autoplan.synthetic import make_synthetic_dataset
from tools import export as tool

ROOT = Path(__file__).resolve().parents[1]
NAME = "Dataset962_Zip_3d_fullres_fold0"


def _purge_scripts():
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An emitted bundle with freshly initialised weights (no training), plus the clutter export must leave out."""
    import torch
    from monai.bundle import ConfigParser

    root = tmp_path_factory.mktemp("export")
    raw = make_synthetic_dataset(root / "raw" / "Dataset962_Zip", cases=5, shape=(24, 24, 12), spacing=(1, 1, 2),
                                 labels=2, test_cases=1, seed=3)
    run(raw, root / "work", processes=1, configurations=["3d_fullres"], folds=[0])
    bundle = root / "work" / "bundles" / NAME
    sys.path.insert(0, str(bundle))
    try:
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        torch.manual_seed(0)
        torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    finally:
        sys.path.remove(str(bundle))
        _purge_scripts()
    (bundle / "eval" / "predictions").mkdir(parents=True)
    (bundle / "eval" / "predictions" / "case_000.nii.gz").write_bytes(b"prediction")
    (bundle / "models" / "resume").mkdir()
    (bundle / "models" / "resume" / "checkpoint_latest.pt").write_bytes(b"resume state")
    (bundle / "scripts" / "__pycache__").mkdir(exist_ok=True)
    (bundle / "scripts" / "__pycache__" / "data.cpython-311.pyc").write_bytes(b"cache")
    return raw, bundle


def shipped_files(folder: Path) -> dict:
    """Relative path -> bytes of what an export without --include-* keeps."""
    files = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith("eval/") and "__pycache__" not in rel and rel != tool.CHECKPOINT:
            files[rel] = p.read_bytes()
    return files


def test_export_is_monai_shaped_reproducible_and_readable_in_place(bundle, tmp_path):
    from monai.bundle import load_bundle_config

    _, folder = bundle
    first = tool.export_bundle(folder, tmp_path / "a" / f"{NAME}.zip")
    second = tool.export_bundle(folder, tmp_path / "b" / f"{NAME}.zip")
    assert first.read_bytes() == second.read_bytes()  # reproducible
    with zipfile.ZipFile(first) as archive:
        infos = archive.infolist()
    names = [i.filename for i in infos]
    assert names == sorted(names) and all(n.startswith(f"{NAME}/") for n in names)
    files = {n[len(NAME) + 1:] for n in names if not n.endswith("/")}
    assert files == set(shipped_files(folder)) | {tool.MANIFEST}
    with zipfile.ZipFile(first) as archive:  # the manifest: sha256sum's format, every other file, its own hash
        manifest = archive.read(f"{NAME}/{tool.MANIFEST}").decode().splitlines()
    assert sorted(line.split("  ", 1)[1] for line in manifest) == sorted(shipped_files(folder))
    for line in manifest:
        digest, rel = line.split("  ", 1)
        assert digest == hashlib.sha256((folder / rel).read_bytes()).hexdigest(), rel
    assert {"configs/inference.json", "configs/metadata.json", "models/model.pt", "scripts/data.py"} <= files
    assert not any(n.startswith("eval/") or n.endswith(".pyc") or "__pycache__" in n for n in files)
    assert tool.CHECKPOINT not in files
    assert all(i.date_time == tool.FIXED_DATE for i in infos)
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos if not i.is_dir())
    parser = load_bundle_config(str(first), "inference.json")  # read from the zip, nothing extracted
    assert parser["configuration"] == "3d_fullres" and parser["_meta_"]["version"]

    # another name: the top folder follows the zip's name, so load_bundle_config still finds it
    renamed = tool.export_bundle(folder, tmp_path / "Renamed.zip", include_eval=True, include_checkpoint=True)
    with zipfile.ZipFile(renamed) as archive:
        names = archive.namelist()
    assert all(n.startswith("Renamed/") for n in names)
    assert {"Renamed/eval/predictions/case_000.nii.gz", f"Renamed/{tool.CHECKPOINT}"} <= set(names)
    assert load_bundle_config(str(renamed), "inference.json", "train.json")["_meta_"]["version"]


def predict(bundle_dir: Path, images: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
         str(images), "--output_dir", str(out), "--use_tta", "False"],
        cwd=bundle_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_zipped_moved_installed_bundle_is_identical_and_predicts_the_same(bundle, tmp_path):
    raw, folder = bundle
    archive = tool.export_bundle(folder, tmp_path / "out" / f"{NAME}.zip")
    moved = tmp_path / "elsewhere" / archive.name
    moved.parent.mkdir()
    shutil.move(archive, moved)
    installed = tool.install_bundle(moved, tmp_path / "installed")
    assert installed == tmp_path / "installed" / NAME
    assert shipped_files(installed) == shipped_files(folder) | {tool.MANIFEST: (installed / tool.MANIFEST).read_bytes()}
    check = subprocess.run(["sha256sum", "-c", "--quiet", tool.MANIFEST], cwd=installed, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sorted(p.name for p in (tmp_path / "installed").iterdir()) == [NAME]  # no scratch left behind
    with pytest.raises(tool.BundleError, match="already exists"):
        tool.install_bundle(moved, tmp_path / "installed")

    jobs = [predict(b, raw / "imagesTs", tmp_path / f"pred_{i}") for i, b in enumerate((folder, installed))]
    for job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, output[-3000:]
    a, b = (sitk.ReadImage(str(tmp_path / f"pred_{i}" / "case_005.nii.gz")) for i in (0, 1))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()


def malicious_zip(path: Path, kind: str, outside: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{path.stem}/configs/metadata.json", "{}")
        if kind == "dotdot":
            archive.writestr(f"{path.stem}/../../{outside.name}", "evil")
        elif kind == "absolute":
            archive.writestr(zipfile.ZipInfo(str(outside)), "evil")
        else:
            link = zipfile.ZipInfo(f"{path.stem}/models/model.pt")
            link.create_system = 3
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(link, str(outside))
    return path


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_malicious_zips_are_refused_and_nothing_is_written(tmp_path, kind):
    outside = tmp_path / "evil.txt"
    zip_path = malicious_zip(tmp_path / "Bad.zip", kind, outside)
    dest = tmp_path / "dest" / "bundles"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), "install", str(zip_path),
                             "--out", str(dest)], capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    expected = {"dotdot": "'..' in the path", "absolute": "absolute path", "symlink": "symbolic link"}[kind]
    assert f"error: {zip_path}: member " in result.stderr and expected in result.stderr
    assert not outside.exists() and not (tmp_path / "dest").exists()


def rewrite_member(archive: Path, rel: str, data: bytes, manifest: bool = False) -> None:
    """Replace one member of a bundle zip (and, with ``manifest``, its line in SHA256SUMS) as an attacker would."""
    with zipfile.ZipFile(archive) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    top = archive.stem
    members[f"{top}/{rel}"] = data
    if manifest:
        lines = [line for line in members[f"{top}/{tool.MANIFEST}"].decode().splitlines() if not line.endswith(rel)]
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {rel}")
        members[f"{top}/{tool.MANIFEST}"] = ("\n".join(lines) + "\n").encode()
    with zipfile.ZipFile(archive, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)


def test_install_runs_nothing_of_a_hostile_bundle(bundle, tmp_path):
    """A zip whose inference.json hides code in a `$` expression (dataset_dir, a property MONAI's check_properties
    evaluates) installs without the code ever running; installing it does not vouch for running it."""
    _, folder = bundle
    archive = tool.export_bundle(folder, tmp_path / f"{NAME}.zip")
    witness = tmp_path / "expression_ran"
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["dataset_dir"] = f"$open({str(witness)!r}, 'w').write('ran') and ''"
    rewrite_member(archive, "configs/inference.json", json.dumps(config).encode(), manifest=True)
    installed = tool.install_bundle(archive, tmp_path / "installed")
    assert json.loads((installed / "configs" / "inference.json").read_text())["dataset_dir"] == config["dataset_dir"]
    assert not witness.exists()
    assert not any(m == "scripts" or m.startswith("scripts.") for m in sys.modules)  # nothing imported either


def test_install_refuses_files_that_differ_from_the_manifest(bundle, tmp_path, capsys):
    _, folder = bundle
    archive = tool.export_bundle(folder, tmp_path / f"{NAME}.zip")
    rewrite_member(archive, "scripts/data.py", b"import os\nos.system('echo pwned')\n")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["install", str(archive), "--out", str(tmp_path / "dest")])
    assert exit_info.value.code == 2
    assert "scripts/data.py: SHA-256 differs from SHA256SUMS" in capsys.readouterr().err
    assert list((tmp_path / "dest").iterdir()) == []
    rewrite_member(archive, "scripts/extra.py", b"print('unlisted')\n")
    with pytest.raises(tool.BundleError, match="scripts/extra.py: not in SHA256SUMS"):
        tool.install_bundle(archive, tmp_path / "dest")


def test_onnx_export_writes_a_model_equal_to_pytorch(bundle, tmp_path, capsys):
    """``export --onnx`` writes models/model.onnx; onnxruntime's logits on a patch equal the eager network's."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the project's onnx/test extras")
    import onnxruntime
    import torch
    from monai.bundle import ConfigParser

    _, folder = bundle
    copy = shutil.copytree(folder, tmp_path / NAME, ignore=shutil.ignore_patterns("eval"))
    tool.main([str(copy), "--onnx"])
    assert "max abs difference" in capsys.readouterr().out
    inference = json.loads((copy / "configs" / "inference.json").read_text())
    x = torch.randn(3, 1, *inference["patch_size"])  # another batch size than the export's
    sys.path.insert(0, str(copy))
    try:
        parser = ConfigParser(inference)
        parser["bundle_root"] = str(copy)
        network = parser.get_parsed_content("network_def").eval()
        network.load_state_dict(torch.load(copy / "models" / "model.pt", weights_only=True))
        with torch.no_grad():
            expected = network(x).numpy()
    finally:
        sys.path.remove(str(copy))
        _purge_scripts()
    session = onnxruntime.InferenceSession(str(copy / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    assert got.shape == expected.shape == (3, 3, *inference["patch_size"])
    assert np.abs(got - expected).max() <= 1e-4


def test_failed_bundle_check_leaves_nothing_behind(bundle, tmp_path, capsys):
    _, folder = bundle
    broken = tmp_path / "src" / NAME
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("eval", "model.pt", "checkpoint_latest.pt"))
    config = json.loads((broken / "configs" / "inference.json").read_text())
    del config["inferer"]  # a required property of MONAI's inference workflow
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    archive = tool.export_bundle(broken, tmp_path / f"{NAME}.zip")
    dest = tmp_path / "dest"
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["install", str(archive), "--out", str(dest)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "inferer" in err and "configs/inference.json" in err
    assert "models/model.pt: missing" in err  # a warning only
    assert list(dest.iterdir()) == []
    assert not any(m == "scripts" or m.startswith("scripts.") for m in sys.modules)


def test_export_refuses_bad_input(bundle, tmp_path, capsys):
    _, folder = bundle
    for args, message in (([str(tmp_path / "nope"), "--out", str(tmp_path / "x.zip")], "bundle folder not found"),
                          ([str(folder), "--out", str(tmp_path / "x.tar")], "the output must be NAME.zip"),
                          ([str(folder), "--out", str(folder / "models" / "x.zip")], "inside the bundle")):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    not_a_zip = tmp_path / "fake.zip"
    not_a_zip.write_bytes(b"not a zip")
    with pytest.raises(tool.BundleError, match="not a zip file"):
        tool.install_bundle(not_a_zip, tmp_path / "dest")
