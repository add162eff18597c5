"""Our plans equal, byte for byte, what nnU-Net 2.8.1's own planners wrote for many synthetic fingerprints.

The fixtures (tests/fixtures/nnunet_reference_plans, made by benchmarks/make_reference_plans.py) cover anisotropic
CT and MR, a non-leading coarse axis, lowres + cascade, regions, ignore labels, several channels, 2-D, tiny images,
spacing ties and memory targets.
"""

import json
from pathlib import Path

import pytest

from autoplan.planner import plan

FIXTURES = Path(__file__).parent / "fixtures" / "nnunet_reference_plans"
TORCHRES_FIXTURES = Path(__file__).parent / "fixtures" / "nnunet_torchres_plans"  # make_reference_plans.py --torchres
PLANNERS = {"ExperimentPlanner": "default", "nnUNetPlannerResEncM": "resenc-m", "nnUNetPlannerResEncL": "resenc-l",
            "nnUNetPlannerResEncXL": "resenc-xl"}
TORCHRES_PLANNERS = {"nnUNetPlanner_torchres": "torchres", "nnUNetPlannerResEncL_torchres": "resenc-l-torchres",
                     "nnUNetPlannerResEncL_torchres_sepz": "resenc-l-torchres-sepz"}


def runs(root=FIXTURES):
    for scenario in sorted(p for p in root.iterdir() if p.is_dir()):
        for run in json.loads((scenario / "runs.json").read_text()):
            if run.get("plans_file"):
                yield pytest.param(scenario, run, id=f"{scenario.name}-{run['plans_name']}")


@pytest.mark.parametrize("scenario,run", list(runs()) + list(runs(TORCHRES_FIXTURES)))
def test_plans_identical_to_nnunet(scenario, run):
    dataset_json = json.loads((scenario / "dataset.json").read_text())
    fingerprint = json.loads((scenario / "dataset_fingerprint.json").read_text())
    reference_text = (scenario / run["plans_file"]).read_text()
    reference = json.loads(reference_text)
    ours = plan(dataset_json, fingerprint, {**PLANNERS, **TORCHRES_PLANNERS}[run["planner"]], run["gpu_memory_target"],
                plans_name=run["plans_name"], dataset_name=reference["dataset_name"])
    assert ours == reference
    assert json.dumps(ours, indent=4) == json.dumps(reference, indent=4)  # key order and int/float types too


def test_fixtures_cover_every_planner_and_cascade():
    collected = list(runs())
    assert len(collected) >= 60
    assert {p.values[1]["planner"] for p in collected} == set(PLANNERS)
    cascades = [p for p in collected
                if "3d_cascade_fullres" in json.loads((p.values[0] / p.values[1]["plans_file"]).read_text())
                ["configurations"]]
    assert cascades


def test_torchres_fixtures_cover_every_torchres_planner():
    collected = list(runs(TORCHRES_FIXTURES))
    assert {p.values[1]["planner"] for p in collected} == set(TORCHRES_PLANNERS)
    assert len(collected) >= 18
