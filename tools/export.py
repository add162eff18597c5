"""Export a MONAI Bundle folder to a reproducible zip, and install such a zip safely.

Usage (``python tools/export.py`` takes the same arguments)::

    autoplan export BUNDLE --out NAME.zip [--include-eval] [--include-checkpoint] [--onnx]
    autoplan export BUNDLE --onnx
    autoplan export install NAME.zip --out DIR [--overwrite]

Running a bundle executes its configs (``$`` expressions are Python, ``_target_`` names any callable, ``scripts/``
is imported): run only bundles from people you trust. Installing runs nothing of the bundle.

**Export** writes MONAI's zip convention: ``NAME.zip`` holds ``NAME/configs/...``, ``NAME/models/...`` and so on
(the zip stem *is* the top folder, which ``monai.bundle.load_bundle_config`` relies on; when NAME differs from the
bundle folder's name, the top folder inside is called NAME). Entries are ZIP_DEFLATED, in sorted order, with a fixed
timestamp (1980-01-01) and fixed permissions (0644, 0755 for executables), so the same folder always gives the same
bytes. Left out: ``__pycache__/`` and ``*.pyc``/``*.pyo``; ``eval/`` (predictions, logs, TensorBoard) unless
``--include-eval``; ``models/resume/checkpoint_latest.pt`` (the resume state) unless ``--include-checkpoint``. Empty
folders are kept as folder entries. Symlinks are stored as the files they point to. ``NAME/SHA256SUMS`` lists the SHA-256 of
every file (``sha256sum -c SHA256SUMS`` in the installed folder rechecks it). The zip is written to a temporary name,
then checked: every CRC, and ``load_bundle_config(zip, "inference.json")`` (plus every other ``configs/*.json``)
reading the configs straight from the zip; only then is it moved to NAME.zip.

**--onnx** writes ``models/model.onnx`` from ``network_def`` and ``models/model.pt`` first (dynamic batch and
spatial axes) and checks that onnxruntime's logits equal PyTorch's within 1e-4 on one input of the metadata's
``spatial_shape`` (n = 1); the bundle then also runs with ``--network_backend onnxruntime``. This builds the
bundle's network, i.e. runs its config: your own bundles only.

**Install** extracts into ``DIR/<top folder>`` after validating every member: absolute paths, ``..`` components,
backslashes, symlinks and other special files, encrypted or duplicate members, members outside a single top folder,
and anything whose resolved path would leave DIR are refused before anything is written, and so is a file whose
SHA-256 differs from the zip's ``SHA256SUMS`` (or that the manifest does not list; a zip without a manifest is only
warned about). Extraction goes to a temporary folder inside DIR, where the bundle is checked **without evaluating
anything of it** (MONAI's ``check_properties`` would evaluate ``$`` expressions, i.e. run the bundle's code):
``configs/metadata.json`` and ``configs/inference.json`` parse as JSON objects and hold every id that MONAI's
inference and metadata properties require; ``models/model.pt`` missing is only a warning. The folder is renamed
into place only if every check passes.

Any problem prints ``error: <file>: <problem>`` on stderr and exits with status 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path

from tools.cli import fire_as

EXIT_BAD_INPUT = 2
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
CACHE_DIRS = {"__pycache__"}
CACHE_SUFFIXES = (".pyc", ".pyo")
CHECKPOINT = "models/resume/checkpoint_latest.pt"
MANIFEST = "SHA256SUMS"


class BundleError(Exception):
    """Bad input or a failed check; ``problems`` holds one message per problem, each naming its file."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -------------------------------------------------------------------------------------------------------- export

def bundle_members(bundle, include_eval: bool = False, include_checkpoint: bool = False) -> list[tuple[str, Path]]:
    """(relative posix path, source) of what goes into the zip, sorted; folders end with ``/`` (empty ones only)."""
    bundle = Path(bundle)
    members, seen = [], set()
    for folder, dirs, files in os.walk(bundle, followlinks=True):
        folder = Path(folder)
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add(real)
        rel_folder = folder.relative_to(bundle)
        dirs[:] = sorted(d for d in dirs if d not in CACHE_DIRS
                         and not (rel_folder == Path(".") and d == "eval" and not include_eval))
        kept_files = []
        for name in sorted(files):
            rel = (rel_folder / name).as_posix()
            if name.endswith(CACHE_SUFFIXES) or (rel == CHECKPOINT and not include_checkpoint) or rel == MANIFEST:
                continue
            if not (folder / name).is_file():
                _warn(f"{folder / name}: not a regular file (dangling link?), left out")
                continue
            kept_files.append(name)
            members.append((rel, folder / name))
        if not kept_files and not dirs and rel_folder != Path("."):
            members.append((rel_folder.as_posix() + "/", folder))
    return sorted(members)


def _zip_info(arcname: str, source: Path) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(arcname, date_time=FIXED_DATE)
    info.create_system = 3  # unix, so that the permission bits below are meaningful
    if arcname.endswith("/"):
        info.external_attr = ((stat.S_IFDIR | 0o755) << 16) | 0x10
        info.compress_type = zipfile.ZIP_STORED
    else:
        in_memory = isinstance(source, bytes)
        mode = 0o755 if not in_memory and os.access(source, os.X_OK) else 0o644
        info.external_attr = (stat.S_IFREG | mode) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        # lets zipfile choose zip64 for huge files up front
        info.file_size = len(source) if in_memory else source.stat().st_size
    return info


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def manifest_text(members) -> str:
    """``sha256sum`` lines (``<hex>  <relative path>``) for the files among ``members``."""
    lines = []
    for rel, source in members:
        if not rel.endswith("/"):
            with open(source, "rb") as f:
                lines.append(f"{_sha256(f)}  {rel}")
    return "\n".join(lines) + "\n"


def _write_zip(path: Path, top: str, members) -> None:
    """The members and ``SHA256SUMS`` over them, in sorted order."""
    entries = sorted([*members, (MANIFEST, manifest_text(members).encode())])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for rel, source in entries:
            info = _zip_info(f"{top}/{rel}", source)
            if isinstance(source, bytes) or rel.endswith("/"):
                archive.writestr(info, source if isinstance(source, bytes) else b"")
                continue
            with open(source, "rb") as src, archive.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def verify_zip(path: Path, expected: list[str] | None = None) -> list[str]:
    """Problems with a bundle zip: bad CRCs, unexpected members, configs that ``load_bundle_config`` cannot read."""
    problems = []
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
        if bad is not None:
            problems.append(f"{path}: member {bad} fails its CRC check")
        names = archive.namelist()
    if expected is not None and names != expected:
        problems.append(f"{path}: members differ from what was written")
    top = Path(path).stem
    configs = sorted(n[len(f"{top}/configs/"):] for n in names
                     if n.startswith(f"{top}/configs/") and n.endswith(".json") and n.count("/") == 2)
    from monai.bundle import load_bundle_config

    for name in ["inference.json"] + [c for c in configs if c not in ("inference.json", "metadata.json")]:
        try:
            parser = load_bundle_config(str(path), name)
            if name == "inference.json":
                if "network_def" not in parser:
                    problems.append(f"{path}: {top}/configs/inference.json has no 'network_def'")
                if not parser.get("_meta_", {}).get("version"):
                    problems.append(f"{path}: {top}/configs/metadata.json has no 'version'")
        except Exception as exc:  # noqa: BLE001 - any failure to read is the problem being reported
            problems.append(f"{path}: load_bundle_config(..., {name!r}) failed: {type(exc).__name__}: {exc}")
    return problems


def export_bundle(bundle, out, include_eval: bool = False, include_checkpoint: bool = False) -> Path:
    """Write ``out`` (``NAME.zip`` holding ``NAME/...``) from the bundle folder and verify it; returns its path."""
    bundle, out = Path(bundle), Path(out)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: bundle folder not found")
    problems = [f"{bundle / 'configs' / f}: missing" for f in ("metadata.json", "inference.json")
                if not (bundle / "configs" / f).is_file()]
    for f in ("metadata.json", "inference.json"):
        config = bundle / "configs" / f
        if config.is_file():
            try:
                json.loads(config.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                problems.append(f"{config}: not valid JSON ({exc})")
    if out.suffix != ".zip" or not out.stem:
        problems.append(f"{out}: the output must be NAME.zip")
    elif out.resolve().is_relative_to(bundle.resolve()):
        problems.append(f"{out}: the zip cannot be written inside the bundle it archives")
    if out.is_dir():
        problems.append(f"{out}: is a folder")
    if problems:
        raise BundleError(problems)
    if not (bundle / "models" / "model.pt").is_file():
        _warn(f"{bundle / 'models' / 'model.pt'}: missing (the bundle has no trained weights)")
    top = out.stem
    if top != bundle.resolve().name:
        print(f"note: top folder inside the zip is {top}/ (the zip's name), not {bundle.resolve().name}/")
    members = bundle_members(bundle, include_eval, include_checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        staged = scratch / out.name  # same name as the result: load_bundle_config needs stem == top folder
        _write_zip(staged, top, members)
        problems = verify_zip(staged, sorted(f"{top}/{rel}" for rel in [MANIFEST, *(rel for rel, _ in members)]))
        if problems:
            raise BundleError(problems)
        os.chmod(staged, 0o644)
        os.replace(staged, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _patch_input_shape(meta: dict, path: Path) -> list[int]:
    """(1, channels, *patch) from metadata's input: ``spatial_shape`` entries are ints or ``"P*n"`` (n = 1)."""
    image = meta.get("network_data_format", {}).get("inputs", {}).get("image", {})
    shape = [1, int(image.get("num_channels", 1))]
    for size in image.get("spatial_shape", []):
        match = re.fullmatch(r"\s*(\d+)\s*(\*\s*n\s*)?", str(size))
        if not match:
            raise BundleError(f"{path}: spatial_shape entry {size!r} gives no input size for the ONNX export (an "
                              "ensemble of several configurations has no single-tensor network)")
        shape.append(int(match.group(1)))
    return shape


def write_onnx(bundle) -> tuple[Path, float]:
    """``models/model.onnx`` from the bundle's ``network_def`` and ``models/model.pt`` (with the bundle's own
    ``scripts``, forgotten afterwards); returns its path and the max abs logits difference to PyTorch."""
    import torch
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    paths = {name: bundle / rel for name, rel in (("meta", "configs/metadata.json"),
                                                  ("inference", "configs/inference.json"),
                                                  ("weights", "models/model.pt"))}
    missing = [f"{p}: missing" for p in paths.values() if not p.is_file()]
    if missing:
        raise BundleError(missing)
    try:
        shape = _patch_input_shape(json.loads(paths["meta"].read_text()), paths["meta"])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{paths['meta']}: not valid JSON ({exc})") from None
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m == "scripts" or m.startswith("scripts.")}
    sys.path.insert(0, str(bundle))
    try:
        parser = ConfigParser()
        parser.read_config(str(paths["inference"]))
        parser["bundle_root"] = str(bundle)
        network = parser.get_parsed_content("network_def")
        try:
            network.load_state_dict(torch.load(paths["weights"], map_location="cpu", weights_only=True))
        except RuntimeError as exc:
            raise BundleError(f"{paths['weights']}: does not fit network_def ({str(exc).splitlines()[0]})") from None
        from scripts.backends import export_onnx

        target = bundle / "models" / "model.onnx"
        try:
            return target, export_onnx(network, target, shape)
        except ValueError as exc:
            raise BundleError(str(exc)) from None
    finally:
        sys.path.remove(str(bundle))
        for m in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[m]
        sys.modules.update(saved)


# ------------------------------------------------------------------------------------------------------- install

def _member_problems(zip_path: Path, infos: list[zipfile.ZipInfo], dest: Path) -> tuple[str | None, list[str]]:
    """(top folder, problems) of a zip's members; nothing is read from or written to disk."""
    problems, tops, names = [], set(), set()
    dest_real = os.path.realpath(dest)
    for info in infos:
        name = info.filename
        where = f"{zip_path}: member {name!r}"
        if name in names:
            problems.append(f"{where} appears twice")
        names.add(name)
        if "\\" in name or "\x00" in name:
            problems.append(f"{where}: backslash or NUL in the name")
            continue
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            problems.append(f"{where}: absolute path")
            continue
        parts = name.rstrip("/").split("/")
        if any(p == ".." for p in parts):
            problems.append(f"{where}: '..' in the path")
            continue
        if any(p in ("", ".") for p in parts):
            problems.append(f"{where}: empty or '.' path component")
            continue
        mode = info.external_attr >> 16
        if stat.S_IFMT(mode):  # zips made on unix store the file type; others leave it 0
            if stat.S_ISLNK(mode):
                problems.append(f"{where}: symbolic link")
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                problems.append(f"{where}: not a regular file or folder")
                continue
        if info.flag_bits & 0x1:
            problems.append(f"{where}: encrypted")
        target = os.path.realpath(os.path.join(dest_real, name))
        if os.path.commonpath([dest_real, target]) != dest_real or target == dest_real:
            problems.append(f"{where}: resolves outside {dest}")
            continue
        if len(parts) == 1 and not info.is_dir():
            problems.append(f"{where}: not inside a top folder (a bundle zip holds NAME/...)")
            continue
        tops.add(parts[0])
    if len(tops) > 1:
        problems.append(f"{zip_path}: more than one top folder ({', '.join(sorted(tops))})")
    if not infos:
        problems.append(f"{zip_path}: empty zip")
    return (next(iter(tops)) if len(tops) == 1 else None), problems


def _extract(archive: zipfile.ZipFile, infos, root: Path) -> None:
    """Write the (already validated) members under ``root``, never following a link, never overwriting."""
    for info in infos:
        target = root / info.filename
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        with os.fdopen(fd, "wb") as dst, archive.open(info) as src:
            shutil.copyfileobj(src, dst, 1 << 20)


def manifest_problems(root: Path) -> tuple[list[str], list[str]]:
    """(problems, warnings) of an extracted bundle against its ``SHA256SUMS``: every file listed, every hash equal."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return [], [f"{root}: no {MANIFEST} manifest, the files' integrity is not checked"]
    listed = {}
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            return [f"{manifest}: line {number} is not '<sha256>  <path>'"], []
        listed[rel] = digest
    problems = []
    present = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and p != manifest}
    for rel, path in sorted(present.items()):
        if rel not in listed:
            problems.append(f"{root / rel}: not in {MANIFEST}")
        else:
            with open(path, "rb") as f:
                if _sha256(f) != listed[rel]:
                    problems.append(f"{root / rel}: SHA-256 differs from {MANIFEST}")
    problems += [f"{root / rel}: listed in {MANIFEST} but missing" for rel in sorted(set(listed) - set(present))]
    return problems, []


def _config_ids(config: dict, config_id: str):
    """Whether ``config_id`` (``a::b`` or ``a#b``, list indices as numbers) exists in the raw JSON; nothing is
    evaluated."""
    node = config
    for part in config_id.replace("#", "::").split("::"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def check_bundle(root) -> tuple[list[str], list[str]]:
    """(problems, warnings) of an extracted bundle folder, found without evaluating anything of it: the configs
    parse, and every id that MONAI's inference and metadata properties require is present."""
    from monai.bundle.properties import InferProperties, MetaProperties
    from monai.utils import BundleProperty, BundlePropertyConfig

    root = Path(root)
    problems, warnings = [], []
    configs = {}
    for name in ("metadata.json", "inference.json"):
        path = root / "configs" / name
        try:
            configs[name] = json.loads(path.read_text())
            if not isinstance(configs[name], dict):
                problems.append(f"{path}: not a JSON object")
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{path}: not valid JSON ({exc})")
    if not problems:
        for name, properties, prefix in (("inference.json", InferProperties, ""),
                                         ("metadata.json", MetaProperties, "_meta_::")):
            missing = [p for p, spec in properties.items() if spec[BundleProperty.REQUIRED]
                       and not _config_ids(configs[name], spec[BundlePropertyConfig.ID].removeprefix(prefix))]
            if missing:
                problems.append(f"{root / 'configs' / name}: MONAI's required properties missing: "
                                f"{', '.join(missing)}")
    if not (root / "models" / "model.pt").is_file():
        warnings.append(f"{root / 'models' / 'model.pt'}: missing (the bundle has no trained weights)")
    return problems, warnings


def install_bundle(zip_path, out, overwrite: bool = False) -> Path:
    """Validate, extract and check a bundle zip; returns ``out/<top folder>``. Nothing is left behind on failure."""
    zip_path, out = Path(zip_path), Path(out)
    if not zip_path.is_file():
        raise BundleError(f"{zip_path}: zip not found")
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{zip_path}: not a zip file ({exc})") from None
    with archive:
        infos = archive.infolist()
        top, problems = _member_problems(zip_path, infos, out)
        if problems:
            raise BundleError(problems)
        if top != zip_path.stem:
            _warn(f"{zip_path}: top folder {top}/ differs from the zip's name; load_bundle_config cannot read this "
                  f"zip directly (installing to {out / top})")
        final = out / top
        if (final.exists() or final.is_symlink()) and not overwrite:
            raise BundleError(f"{final}: already exists (pass --overwrite to replace it)")
        if out.exists() and not out.is_dir():
            raise BundleError(f"{out}: exists and is not a folder")
        needed = sum(i.file_size for i in infos)
        out.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out).free
        if needed > free:
            raise BundleError(f"{zip_path}: needs {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB free in {out}")
        scratch = Path(tempfile.mkdtemp(dir=out, prefix=f".{top}.install-"))
        try:
            try:
                _extract(archive, infos, scratch)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise BundleError(f"{zip_path}: extraction failed ({exc})") from None
            problems, warnings = manifest_problems(scratch / top)
            if not problems:
                problems, more = check_bundle(scratch / top)
                warnings += more
            for w in warnings:
                _warn(w.replace(str(scratch / top), str(final)))
            if problems:
                raise BundleError([p.replace(str(scratch / top), f"{zip_path}:{top}") for p in problems])
            if final.exists() or final.is_symlink():
                old = scratch / ".replaced"
                os.rename(final, old)
            os.rename(scratch / top, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------------------------- CLI

def _guarded(fn, *args):
    try:
        return fn(*args)
    except BundleError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) found", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


def export(bundle, out=None, include_eval: bool = False, include_checkpoint: bool = False, onnx: bool = False):
    """Zip a bundle folder in MONAI's convention (NAME.zip holds NAME/...), reproducibly, and verify it.

    The other command, `install NAME.zip --out DIR`, extracts such a zip safely and checks it without running it.
    Running a bundle executes its configs: run only bundles from people you trust.

    Args:
        bundle: the bundle folder (with configs/metadata.json and configs/inference.json).
        out: the zip to write, NAME.zip; its top folder is NAME (optional with --onnx).
        include_eval: also archive eval/ (predictions, logs, TensorBoard).
        include_checkpoint: also archive models/resume/checkpoint_latest.pt (resume state).
        onnx: first write models/model.onnx (checked against PyTorch with onnxruntime, max abs diff <= 1e-4).
    """
    if out is None and not onnx:
        print("error: --out NAME.zip is required (or --onnx to write models/model.onnx only)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    if onnx:
        target, difference = _guarded(write_onnx, str(bundle))
        print(f"wrote {target} (onnxruntime vs PyTorch logits: max abs difference {difference:.2e})")
    if out is None:
        return
    path = _guarded(export_bundle, str(bundle), str(out), bool(include_eval), bool(include_checkpoint))
    with zipfile.ZipFile(path) as archive:
        n, size = len(archive.namelist()), sum(i.compress_size for i in archive.infolist())
    print(f"wrote {path}: {n} entries, {size / 1e6:.2f} MB, top folder {path.stem}/ "
          f"(read back with monai.bundle.load_bundle_config)")


def install(zip_file, out, overwrite: bool = False):
    """Extract a bundle zip into OUT/<top folder> safely, then run MONAI's bundle checks on it.

    Args:
        zip_file: the bundle zip (NAME.zip holding NAME/...).
        out: the folder to install into.
        overwrite: replace an existing OUT/<top folder>.
    """
    final = _guarded(install_bundle, str(zip_file), str(out), bool(overwrite))
    print(f"installed {final} (SHA-256 manifest and MONAI's required ids checked; nothing of the bundle was run)")


def main(argv=None, prog="export.py"):
    argv = list(sys.argv[1:] if argv is None else argv)
    fire_as(prog, {"install": install} if argv and argv[0] == "install" else export, argv)


if __name__ == "__main__":
    main()
