"""Compile time of the ResNet-50 train step: cold, then from JAX's persistent compilation cache.

    python -m benchmarks.compile_time            # ResNet-50 224px batch 32 train step, each conv_impl
    python -m benchmarks.compile_time --quick    # smoke test: one block per stage, 32px, batch 2

Each measurement is a fresh Python process (nothing in memory survives): run 1 starts from an empty cache
directory (cold compile, then the executable is written), run 2 reuses that directory (warm).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc


def child(args) -> dict:
    """Build the step and time lowering and compilation; the cache keeps every entry (no size/time floor)."""
    import jax
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    case = json.loads(args.case_json)
    case = common.Case(**{**case, "stage_sizes": tuple(case["stage_sizes"]) if case["stage_sizes"] else None})
    start = time.perf_counter()
    step, init = common.jax_train_step(common.jax_model(case, conv_impl=args.conv_impl[0]))
    x, y = common.jax_batch(case)
    state = init(x)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    lowered = step.lower(state, x, y)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    compiled(state, x, y)[1].block_until_ready()
    t3 = time.perf_counter()
    return {"init_s": t0 - start, "lower_s": t1 - t0, "compile_s": t2 - t1, "first_step_s": t3 - t2,
            "process_to_first_step_s": t3 - start}


def main(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--case", default="resnet50_cpu", choices=sorted(common.CASES))
    p.add_argument("--conv-impl", action="append", help="default: xla and matmul_grad")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--case-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    allocator = preload_tcmalloc(args.tcmalloc and args.device == "cpu")
    case = common.CASES[args.case]
    case = dataclasses.replace(common.quick(case) if args.quick else case, device=args.device)
    if args.device != "cpu":
        common.check_device(args.device)
    env = common.device_env(args.device)
    results, rows = [], []
    for impl in args.conv_impl or (["matmul_grad"] if args.quick else ["xla", "matmul_grad"]):
        with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache:
            for run in ("cold", "warm (persistent cache)"):
                cmd = [sys.executable, "-m", "benchmarks.compile_time", "--child", "--no-tcmalloc",
                       "--cache-dir", cache, "--conv-impl", impl, "--case-json", json.dumps(dataclasses.asdict(case))]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"child failed:\n{out.stdout}\n{out.stderr}")
                r = dict(conv_impl=impl, run=run, cache_entries=len(os.listdir(cache)), **json.loads(line[7:]))
                results.append(r)
                rows.append([impl, run, r["lower_s"], r["compile_s"], r["first_step_s"],
                             r["process_to_first_step_s"], r["cache_entries"]])
    common.print_table(f"{case.model} train step, batch {case.batch}, {case.image}px, {case.dtype} (seconds)",
                       ["conv_impl", "run", "lower", "compile", "first step", "start to first step",
                        "cache files"], rows)
    common.write_json(args.json, f"compile_time_{args.device}{'_quick' if args.quick else ''}.json",
                      {"environment": common.environment(allocator), "case": dataclasses.asdict(case),
                       "results": results})


if __name__ == "__main__":
    main()
