"""Create (once) a separate virtual environment holding nnU-Net 2.8.1, for benchmarks and reference fixtures.

nnU-Net is never imported by autoplan itself; benchmark scripts only *call* its command-line tools from this venv.

Steps (each skipped when already done, so calling it again is cheap):

1. ``python -m venv PATH`` (default ``~/.cache/autoplan/nnunet-2.8.1-venv``, or ``$NNUNET_VENV``);
2. ``pip install torch==2.13.0`` first (the local CPU build; any other torch would pull GBs of CUDA wheels);
3. ``pip install nnunetv2==2.8.1``;
4. uninstall ``timm`` and ``torchvision`` if present and delete ``nnunetv2/training/nnUNetTrainer/primus/``:
   PyPI's torchvision does not import beside the CPU torch build, and the Primus trainers import timm -> torchvision,
   which breaks nnU-Net's trainer look-up.

Usage::

    python benchmarks/nnunet_venv.py            # create / check, print the venv's python
    python benchmarks/nnunet_venv.py --path DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

TORCH_SPEC = "torch==2.13.0"
NNUNET_SPEC = "nnunetv2==2.8.1"
NNUNET_VERSION = "2.8.1"
DEFAULT_VENV = Path.home() / ".cache" / "autoplan" / "nnunet-2.8.1-venv"
_MARKER = ".autoplan-nnunet-ready"


def default_venv_path() -> Path:
    """The venv folder: ``$NNUNET_VENV`` when set, else ``~/.cache/autoplan/nnunet-2.8.1-venv``."""
    env = os.environ.get("NNUNET_VENV")
    return Path(env).expanduser() if env else DEFAULT_VENV


def venv_python(path: Path) -> Path:
    """Path of the venv's python interpreter."""
    return path / "bin" / "python"


def venv_bin(path: Path, tool: str) -> Path:
    """Path of a console script (e.g. ``nnUNetv2_plan_experiment``) inside the venv."""
    return path / "bin" / tool


def _run(cmd: list[str], quiet: bool = False) -> None:
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True,
                   stdout=subprocess.DEVNULL if quiet else None)


def _installed_version(py: Path, dist: str) -> str | None:
    code = ("import importlib.metadata as m, sys\n"
            "try: print(m.version(sys.argv[1]))\n"
            "except m.PackageNotFoundError: pass\n")
    out = subprocess.run([str(py), "-c", code, dist], capture_output=True, text=True)
    v = out.stdout.strip()
    return v or None


def _site_packages(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def ensure_nnunet_venv(path: str | os.PathLike | None = None) -> Path:
    """Make sure a venv with nnU-Net 2.8.1 (CPU torch 2.13.0) exists at ``path``; return its python.

    Idempotent: a venv already prepared (marker file present and versions right) is returned at once.
    """
    path = Path(path).expanduser() if path else default_venv_path()
    py = venv_python(path)
    marker = path / _MARKER
    if marker.exists() and py.exists() and _installed_version(py, "nnunetv2") == NNUNET_VERSION:
        return py

    if not py.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(path)])
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]

    torch_v = _installed_version(py, "torch") or ""
    if not torch_v.startswith("2.13.0"):
        _run(pip + [TORCH_SPEC])
    if _installed_version(py, "nnunetv2") != NNUNET_VERSION:
        # torch pinned again so that the resolver cannot swap it for a CUDA build
        _run(pip + [TORCH_SPEC, NNUNET_SPEC])

    for dist in ("timm", "torchvision"):
        if _installed_version(py, dist) is not None:
            _run([str(py), "-m", "pip", "uninstall", "-y", dist])
    primus = _site_packages(py) / "nnunetv2" / "training" / "nnUNetTrainer" / "primus"
    if primus.exists():
        shutil.rmtree(primus)

    # smoke test: the planners must import
    _run([str(py), "-c", "import nnunetv2, torch; "
          "from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner; "
          "print('nnunetv2 ok, torch', torch.__version__)"])
    marker.write_text(f"{TORCH_SPEC} {NNUNET_SPEC}\n")
    return py



def fixture_venv_python(doc: str, argv=None) -> Path:
    """The fixture generators' command line (``--venv DIR``): returns the venv's python, prepared when needed."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--venv", default=None, help="nnU-Net venv folder (default $NNUNET_VENV or ~/.cache/...)")
    return ensure_nnunet_venv(ap.parse_args(argv).venv)


def write_fixture(python: Path, fixture: Path, script: str, *args) -> None:
    """Runs ``script`` with the venv's ``python`` (arguments: ``args``, then the file to write) and moves the file
    it wrote to ``fixture`` atomically."""
    fixture.parent.mkdir(parents=True, exist_ok=True)
    tmp = fixture.with_name(f".{fixture.name}.tmp")
    subprocess.run([str(python), "-c", script, *map(str, args), str(tmp)], check=True)
    tmp.replace(fixture)
    print(f"wrote {fixture} ({fixture.stat().st_size} bytes)")

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", default=None,
                    help=f"venv folder (default $NNUNET_VENV or {DEFAULT_VENV})")
    args = ap.parse_args(argv)
    print(ensure_nnunet_venv(args.path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
