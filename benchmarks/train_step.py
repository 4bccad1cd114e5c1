"""Training-step and inference throughput, this project vs torchvision, same model/batch/precision, interleaved.

    python -m benchmarks.train_step                      # the CPU cases (ResNet-18 CIFAR b128, ResNet-50 b32,
                                                         # the digits ResNet-20 b64 16 px)
    python -m benchmarks.train_step --device gpu         # ResNet-50 224px batch 256 bf16 (torch: AMP + channels_last)
    python -m benchmarks.train_step --quick              # smoke test: batch 2, 32px, 1 step
    python -m benchmarks.train_step --dtype bfloat16     # the CPU cases in bf16 only
    python -m benchmarks.train_step --dtype float32 --dtype bfloat16   # both, their ratios side by side

On a CPU with bfloat16 instructions (AVX-512 BF16 or AMX) the CPU cases run in float32 and in bfloat16 (ours
``dtype=bfloat16``, torch ``autocast(bfloat16)``) by default, and a last table puts the two ratios side by side.

Ours runs with each ``conv_impl`` (default: "auto", and "jax": the pure-JAX algorithms, i.e. without the
optional CPU extension); torch runs NCHW, channels_last and (unless --no-compile) torch.compile of the faster
layout. Ratios compare each of ours with torch's best variant. Where ``openvino`` is installed, CPU inference
also times OpenVINO on torchvision's same model (float32 pinned for float32 cases, its default precision for
bfloat16 ones) in a child process under glibc's malloc, as an anchor for what an inference engine reaches; it
is not interleaved and not part of the ratios.

torch runs in a process of its own (``benchmarks/torch_child.py``: in ours, it had shared our extension's OpenMP
runtime and its sleep policy), stepped in turn with ours. For inference both sides fold BatchNorm into the
convolutions: ours by ``fold_batchnorm``, torch's eager models by fx's conv-BN fusion and its compiled one by
inductor's freezing (before, torch's inference ran BatchNorm as its own pass).
"""

from __future__ import annotations

import dataclasses
import os

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--case", action="append", choices=sorted(common.CASES), help="default: all for --device")
    p.add_argument("--mode", action="append", choices=["train", "inference"], help="default: both")
    p.add_argument("--conv-impl", action="append", help="ours' conv_impl values (default: auto, jax)")
    p.add_argument("--batch", type=int), p.add_argument("--image-size", type=int)
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16"],
                   help="compute precision, repeatable (bfloat16: ours dtype=bfloat16, torch autocast bf16; "
                   "parameters stay float32 on both sides). Default: the case's, and on a CPU with bfloat16 "
                   "instructions both")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action=argparse_bool(), default=True, help="also time torch.compile")
    p.add_argument("--torch", action=argparse_bool(), default=True, help="time the torch side")
    p.add_argument("--openvino", action=argparse_bool(), default=True,
                   help="also time OpenVINO's inference of the same torchvision model on CPU where openvino is "
                   "installed (float32 cases: pinned to f32; bfloat16: its default precision), in a process of its "
                   "own: an anchor, not in the ratios")
    return p.parse_args(argv)


def argparse_bool():
    import argparse
    return argparse.BooleanOptionalAction


def variants(case, mode, args, torch_side):
    """name -> zero-argument step runner, ours first; torch's run in ``torch_side`` (a ``common.TorchProcess``)."""
    train = mode == "train"
    runners = {}
    for impl in args.conv_impl or ["auto", "jax"]:
        runners[f"jax conv_impl={impl}"] = common.jax_runner(common.jax_model(case, conv_impl=impl), case, train)
    if torch_side is not None:
        runners["torch NCHW"] = torch_side.runner(case, train, channels_last=False, compile=False)
        runners["torch channels_last"] = torch_side.runner(case, train, channels_last=True, compile=False)
        if args.compile:
            try:
                run = torch_side.runner(case, train, channels_last=True, compile=True)
                run()  # compiles here, so a failure is caught and reported, not fatal
                runners["torch channels_last+compile"] = run
            except Exception as e:  # inductor needs a C++ toolchain; report and go on without it
                print(f"torch.compile unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return runners


def default_dtypes(device: str) -> list[str | None]:
    """None: the case's own precision. A CPU with bfloat16 instructions also runs bfloat16: there it is a real
    choice for a user, and its ratio to torch's autocast belongs next to float32's."""
    from resnet_jax.ops import cpu

    if device == "cpu" and cpu.native_bfloat16():
        return ["float32", "bfloat16"]
    return [None]


def main(argv=None):
    args = parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc and args.device == "cpu")
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        common.check_device(args.device, torch_too=args.torch)
        os.environ["JAX_PLATFORMS"] = common.JAX_PLATFORMS[args.device]
    names = args.case or [n for n, c in common.CASES.items() if c.device == args.device]
    if args.quick:
        args.steps, args.rounds, args.warmup = 1, 1, 1
    results = []
    torch_side = common.TorchProcess() if args.torch else None
    try:
        run_cases(args, names, results, torch_side)
    finally:
        if torch_side is not None:
            torch_side.close()
    report(args, allocator, results, torch_side)


def run_cases(args, names, results, torch_side):
    for name in names:
        for dtype in args.dtype or default_dtypes(args.device):
            case = common.CASES[name]
            case = common.quick(case) if args.quick else case
            case = dataclasses.replace(case, device=args.device, batch=args.batch or case.batch,
                                       image=args.image_size or case.image, dtype=dtype or case.dtype)
            for mode in args.mode or ["train", "inference"]:
                print(f"\n== {name} {mode}: {case.model} batch {case.batch} {case.image}px {case.dtype} "
                      f"{case.device}", flush=True)
                times = common.time_interleaved(variants(case, mode, args, torch_side), args.warmup, args.steps,
                                                args.rounds)
                for variant, t in times.items():
                    results.append(dict(case=name, mode=mode, variant=variant, **dataclasses.asdict(case),
                                        images_per_s=case.batch / t["median_s"], **t))
                # OpenVINO converts torch's model, so it needs the torch side
                if args.openvino and args.torch and mode == "inference" and case.device == "cpu":
                    precision = "f32" if case.dtype == "float32" else "default"  # default: bf16 where it can
                    rate = common.openvino_images_per_s(case, precision, args.steps * args.rounds)
                    if rate is None:
                        print("no OpenVINO anchor (pip install openvino to add one)")
                    else:
                        results.append(dict(case=name, mode=mode, variant=f"openvino {precision} (own process, "
                                            "glibc)", **dataclasses.asdict(case), images_per_s=rate))


def report(args, allocator, results, torch_side):
    rows, ratios = [], {}
    groups = dict.fromkeys((r["case"], r["mode"], r["dtype"]) for r in results)
    for name, mode, dtype in groups:
        rs = [r for r in results if (r["case"], r["mode"], r["dtype"]) == (name, mode, dtype)]
        theirs = max((r["images_per_s"] for r in rs if r["variant"].startswith("torch")), default=None)
        ours = max(r["images_per_s"] for r in rs if r["variant"].startswith("jax"))
        for r in rs:
            r["ratio_to_torch_best"] = r["images_per_s"] / theirs if theirs else None
            rows.append([name, mode, dtype, r["variant"], r["images_per_s"],
                         f"{r['ratio_to_torch_best']:.2f}" if theirs else "-"])
        if theirs:
            rows.append([name, mode, dtype, "=> ours best / torch best", "", f"{ours / theirs:.2f}"])
            ratios.setdefault((name, mode), {})[dtype] = f"{ours / theirs:.2f}"
    common.print_table(f"images/s (median of {args.rounds} interleaved rounds x {args.steps} steps; "
                       f"allocator {allocator})", ["case", "mode", "dtype", "variant", "images/s", "x torch best"],
                       rows)
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    if len(dtypes) > 1 and ratios:
        common.print_table("ours best / torch best, by precision (torch: autocast for bfloat16)",
                           ["case", "mode", *dtypes],
                           [[name, mode, *(by.get(d, "-") for d in dtypes)] for (name, mode), by in ratios.items()])
    common.write_json(args.json, f"train_step_{args.device}{'_quick' if args.quick else ''}.json",
                      {"environment": {**common.environment(allocator), **(torch_side.info if torch_side else {})},
                       "results": results})


if __name__ == "__main__":
    main()
