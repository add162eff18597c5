"""CPU window passes with and without ``keep_freed_memory`` (the bundle runtime's glibc malloc setting).

Ablation for ``bundles/scripts/inference.keep_freed_memory``, which the CPU sliding window calls once per process:
the same forward passes of a real-size network, each setting in its own fresh process, in alternating order. "off"
is glibc's default, which is also what ``nnUNetv2_predict`` runs with (nnU-Net does not touch malloc). Networks:

* ``hippocampus``: Hippocampus' 3d_fullres network from nnU-Net's own plans in ``../shared`` (40 x 56 x 40 window),
  one call = the 8 mirrored passes of TTA (``MirrorTTA``);
* ``large``: the same plan widened to 6 stages of 32-320 features on a 128**3 window, one call = one forward pass.

Reported per setting: seconds per call (median over ``--calls`` calls after one warm-up, best process), the
process's system CPU seconds over those calls (page faults of memory handed back and taken again), and its peak RSS.

Usage::

    python benchmarks/bench_cpu_window.py                      # both networks, 2 repeats
    python benchmarks/bench_cpu_window.py --networks hippocampus --repeats 3 --calls 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import benchutil as bu  # noqa: E402

PLANS = bu.REFERENCE_PLANS_ROOT / "Dataset004_Hippocampus" / "nnUNetPlans.json"


def build(network: str):
    """(network, input shape) from Hippocampus' 3d_fullres plan; the Hippocampus one wrapped in mirroring TTA."""
    from bundles.scripts.networks import MirrorTTA, network_from_plan

    config = json.loads(PLANS.read_text())["configurations"]["3d_fullres"]
    if network == "hippocampus":
        return MirrorTTA(network_from_plan(config, 1, 3, False).eval(), (0, 1, 2)), config["patch_size"]
    config = copy.deepcopy(config)
    arch = config["architecture"]["arch_kwargs"]
    arch.update(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], kernel_sizes=[[3, 3, 3]] * 6,
                strides=[[1, 1, 1]] + [[2, 2, 2]] * 5, n_conv_per_stage=[2] * 6, n_conv_per_stage_decoder=[2] * 5)
    return network_from_plan(config, 1, 3, False).eval(), [128, 128, 128]


def one(args) -> int:
    """One process: warm-up call, then ``--calls`` timed calls, with or without the malloc setting."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bundles.scripts.inference import keep_freed_memory

    kept = keep_freed_memory() if args.keep == "on" else False
    net, shape = build(args.network)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        net(x)
        sys0 = os.times().system
        for _ in range(args.calls):
            t = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t)
        sys_s = os.times().system - sys0
    Path(args.result).write_text(json.dumps({"median_s": statistics.median(times), "times_s": times,
                                             "sys_s": sys_s, "kept": kept, "threads": torch.get_num_threads(),
                                             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command")
    o = sub.add_parser("one", help="(internal) one measured process")
    o.add_argument("--network", required=True)
    o.add_argument("--keep", choices=("on", "off"), required=True)
    o.add_argument("--calls", type=int, required=True)
    o.add_argument("--result", required=True)
    ap.add_argument("--networks", nargs="+", default=["hippocampus", "large"], choices=("hippocampus", "large"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--calls", type=int, default=0, help="timed calls per process (default 5 hippocampus, 2 large)")
    ap.add_argument("--out", type=Path, default=bu.BENCH / "results" / "cpu_window.json")
    args = ap.parse_args(argv)
    if args.command == "one":
        return one(args)
    if not PLANS.is_file():
        print(f"needs nnU-Net's Hippocampus plans at {PLANS} (../shared)", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    result = {"cpu_count": os.cpu_count(), "loadavg_start": bu.loadavg(), "runs": {}}
    rows = []
    for network in args.networks:
        calls = args.calls or (5 if network == "hippocampus" else 2)
        runs = {"on": [], "off": []}
        for rep in range(args.repeats):
            for keep in (("on", "off") if rep % 2 == 0 else ("off", "on")):
                out = bu.BENCH / "results" / f".cpu_window_{network}_{keep}.json"
                cmd = [sys.executable, __file__, "one", "--network", network, "--keep", keep, "--calls", str(calls),
                       "--result", str(out)]
                subprocess.run(cmd, env=env, check=True)
                runs[keep].append(json.loads(out.read_text()))
                out.unlink()
                print(f"{network} {keep} {rep}: {runs[keep][-1]['median_s']:.3f} s per call, "
                      f"sys {runs[keep][-1]['sys_s']:.1f} s", flush=True)
        result["runs"][network] = runs
        best = {k: min(v, key=lambda r: r["median_s"]) for k, v in runs.items()}
        rows += [(f"{network}: s per call (best process, median)", best["on"]["median_s"], best["off"]["median_s"],
                  ".3f"),
                 (f"{network}: system CPU s over the calls", best["on"]["sys_s"], best["off"]["sys_s"], ".2f"),
                 (f"{network}: peak RSS MB (max)", max(r["peak_rss_mb"] for r in runs["on"]),
                  max(r["peak_rss_mb"] for r in runs["off"]), ".0f")]
    bu.print_table(rows, ("", "on", "off (glibc default)"), ratio_title="on/off")
    result["table"] = [{"metric": r[0], "on": r[1], "off": r[2], "ratio_on_over_off": bu.ratio(r[1], r[2])}
                       for r in rows]
    result["loadavg_end"] = bu.loadavg()
    bu.write_result(args.out, result)
    print(f"result written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
