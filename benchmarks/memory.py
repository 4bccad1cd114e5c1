"""Peak memory of a ResNet-50 train step with and without ``remat``: XLA's plan and the process's max RSS.

    python -m benchmarks.memory                  # ResNet-50 224px batch 8 (CPU)
    python -m benchmarks.memory --quick          # smoke test: one block per stage, 32px, batch 2

``compiled.memory_analysis()`` gives the buffers XLA plans (temporaries = activations kept for the backward
pass plus scratch); max RSS is what the process really touched, measured in a fresh process per setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc

MB = 2 ** 20


def child(args) -> dict:
    case = json.loads(args.case_json)
    case = common.Case(**{**case, "stage_sizes": tuple(case["stage_sizes"]) if case["stage_sizes"] else None})
    step, init = common.jax_train_step(common.jax_model(case, remat=args.remat, conv_impl=args.conv_impl))
    x, y = common.jax_batch(case)
    state = init(x)
    compiled = step.lower(state, x, y).compile()
    mem = compiled.memory_analysis()
    state, loss = compiled(state, x, y)
    loss.block_until_ready()
    planned = {k: getattr(mem, f"{k}_size_in_bytes", None) for k in ("temp", "argument", "output", "alias")}
    return {**{f"{k}_mb": v / MB for k, v in planned.items() if v is not None},
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--case", default="resnet50_cpu", choices=sorted(common.CASES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--conv-impl", default="xla")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    allocator = preload_tcmalloc(args.tcmalloc and args.device == "cpu")
    case = common.CASES[args.case]
    case = common.quick(case) if args.quick else dataclasses.replace(case, batch=args.batch)
    case = dataclasses.replace(case, device=args.device)
    if args.device != "cpu":
        common.check_device(args.device)
    env = common.device_env(args.device)
    results, rows = [], []
    for remat in (False, True):
        cmd = [sys.executable, "-m", "benchmarks.memory", "--child", "--conv-impl", args.conv_impl,
               "--case-json", json.dumps(dataclasses.asdict(case))] + (["--remat"] if remat else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"child failed:\n{out.stdout}\n{out.stderr}")
        r = dict(remat=remat, **json.loads(line[7:]))
        results.append(r)
        rows.append([str(remat), r.get("temp_mb", "-"), r.get("argument_mb", "-"), r["max_rss_mb"]])
    common.print_table(f"{case.model} train step memory, batch {case.batch}, {case.image}px, {case.dtype}, "
                       f"conv_impl={args.conv_impl} (MiB)", ["remat", "XLA temp", "arguments", "process max RSS"],
                       rows)
    common.write_json(args.json, f"memory_{args.device}{'_quick' if args.quick else ''}.json",
                      {"environment": common.environment(allocator), "case": dataclasses.asdict(case),
                       "results": results})


if __name__ == "__main__":
    main()
