"""The end-to-end flow: dataset -> verify -> fingerprint -> plans -> bundles (``autoplan.demo`` goes on to train)."""

from __future__ import annotations

from pathlib import Path

from autoplan.dataset import dataset_name, load_json
from autoplan.files import write_json_atomic, write_text_atomic
from autoplan.fingerprint import write_fingerprint
from autoplan.planner import PRESETS, PlanningError, plan


def plan_files(dataset_json, fingerprint, out, planner: str = "default", gpu_memory_gb: float | None = None,
               plans_name: str | None = None, name: str | None = None) -> dict:
    """Plan from a dataset.json and a fingerprint file and write ``out`` (nnU-Net's plans schema)."""
    spec = load_json(Path(dataset_json))
    fingerprint = load_json(Path(fingerprint))
    plans = plan(spec, fingerprint, planner, gpu_memory_gb, plans_name, name or dataset_name(Path(dataset_json), spec))
    write_json_atomic(out, plans)
    return plans


def run(raw_dir, out, planner: str = "default", gpu_memory_gb: float | None = None, processes: int = 2,
        configurations=None, folds=(0, 1, 2, 3, 4), classification_head: str | None = None) -> Path:
    """Verify and fingerprint ``raw_dir``, plan into ``out`` and emit bundles into ``out/bundles`` (multi-task
    bundles with ``classification_head`` when dataset.json has a ``classification`` block).

    Returns the plans path.
    """
    if planner not in PRESETS:
        raise PlanningError(f"unknown planner '{planner}'; choose one of {', '.join(PRESETS)}")
    raw_dir, out = Path(raw_dir), Path(out)
    fingerprint_path = out / "dataset_fingerprint.json"
    _, warnings = write_fingerprint(raw_dir, fingerprint_path, processes)
    for w in warnings:
        print(f"warning: {w}")
    write_text_atomic(out / "dataset.json", (raw_dir / "dataset.json").read_text())
    plans_path = out / f"{PRESETS[planner].plans_name}.json"
    plans = plan_files(raw_dir / "dataset.json", fingerprint_path, plans_path, planner, gpu_memory_gb)
    print(describe_plans(plans))
    print(f"wrote {fingerprint_path} and {plans_path}")
    from autoplan.emit import emit

    bundles = emit(plans_path, raw_dir, out / "bundles", configurations, folds,
                   classification_head=classification_head)
    print(f"wrote {len(bundles)} bundles to {out / 'bundles'}")
    return plans_path


def describe_plans(plans: dict) -> str:
    """A short table of the planned configurations, for people."""
    lines = [f"{plans['dataset_name']} ({plans['plans_name']}, transpose {plans['transpose_forward']})",
             f"{'configuration':<20}{'patch':<18}{'spacing':<26}{'batch':>6}{'stages':>8}"]
    for name, c in plans["configurations"].items():
        if "patch_size" not in c:
            lines.append(f"{name:<20}inherits {c.get('inherits_from')}, previous stage {c.get('previous_stage')}")
            continue
        spacing = "x".join(f"{s:.3g}" for s in c["spacing"])
        patch = "x".join(str(p) for p in c["patch_size"])
        lines.append(f"{name:<20}{patch:<18}{spacing:<26}{c['batch_size']:>6}"
                     f"{c['architecture']['arch_kwargs']['n_stages']:>8}")
    return "\n".join(lines)
