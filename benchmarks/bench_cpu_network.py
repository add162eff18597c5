"""One CPU forward pass of nnU-Net's networks: PyTorch's own convolution dispatch against ``CpuInferenceConv3d``.

The baseline is the same network with plain ``nn.Conv3d`` modules, which is what nnU-Net's networks
(dynamic_network_architectures) run; both variants share weights and alternate in one process, batch 1, float32,
``torch.no_grad``, torch's default thread count. Networks: nnU-Net's own 3d_fullres plans for Hippocampus (from
``../shared/reference/nnunet_plans``; skipped when absent) and a plan of the default planner's typical large 3-D
shape (6 stages, 32-320 features, a 128**3 window). Writes ``benchmarks/results/cpu_network.json``.

Usage::

    python benchmarks/bench_cpu_network.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu  # noqa: E402

LARGE = {"network_class_name": "PlainConvUNet", "arch_kwargs": {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "kernel_sizes": [[3, 3, 3]] * 6,
    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5,
    "conv_bias": True}, "patch_size": [128, 128, 128]}


def cases() -> dict:
    out = {}
    plans = bu.REFERENCE_PLANS_ROOT / "Dataset004_Hippocampus" / "nnUNetPlans.json"
    if plans.is_file():
        config = json.loads(plans.read_text())["configurations"]["3d_fullres"]
        out["hippocampus_3d_fullres"] = ({"network_class_name": config["architecture"]["network_class_name"],
                                          "arch_kwargs": config["architecture"]["arch_kwargs"]},
                                         config["patch_size"], 3)
    else:
        print(f"skipping Hippocampus: {plans} is absent")
    out["large_3d_fullres_128"] = ({k: LARGE[k] for k in ("network_class_name", "arch_kwargs")},
                                   LARGE["patch_size"], 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds per network (median reported)")
    ap.add_argument("--out", type=Path, default=bu.BENCH / "results" / "cpu_network.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(bu.REPO))
    import torch
    from torch import nn

    from bundles.scripts.networks import CpuInferenceConv3d, network_from_plan

    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "loadavg_start": bu.loadavg(), "networks": {}}
    rows = []
    for name, (plan, patch, passes) in cases().items():
        torch.manual_seed(0)
        net = network_from_plan(plan, 1, 3).eval()
        x = torch.randn(1, 1, *patch)
        times = {"torch": [], "ours": []}
        with torch.no_grad():
            for repeat in range(args.repeats):
                for variant in ("torch", "ours"):
                    for m in net.modules():
                        if isinstance(m, nn.Conv3d):
                            m.__class__ = CpuInferenceConv3d if variant == "ours" else nn.Conv3d
                    if repeat == 0:
                        net(x)  # warm-up
                    t = time.perf_counter()
                    for _ in range(passes):
                        out = net(x)
                    times[variant].append((time.perf_counter() - t) / passes)
                    if variant == "torch":
                        reference = out
                    else:
                        diff = float((out - reference).abs().max())
        med = {k: statistics.median(v) for k, v in times.items()}
        result["networks"][name] = {"patch_size": patch, "seconds": times, "median_s": med,
                                    "max_abs_logit_difference": diff}
        rows.append((f"{name}: forward s (median)", med["ours"], med["torch"], ".3f"))
        print(f"{name}: ours {med['ours']:.3f} s, torch's dispatch {med['torch']:.3f} s, max |diff| {diff:.1e}",
              flush=True)
    print()
    bu.print_table(rows, ("", "ours", "nn.Conv3d"))
    result["loadavg_end"] = bu.loadavg()
    bu.write_result(args.out, result)
    print(f"result written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
