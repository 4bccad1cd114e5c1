"""Inference throughput of the exported artifacts (resnet_jax.export) vs torchvision, same batch, one process.

    python -m benchmarks.export_inference                 # ResNet-50 b32 224 px, ResNet-18-CIFAR b128 32 px
    python -m benchmarks.export_inference --quick         # smoke test: one block per stage, batch 2, 32 px

"stablehlo" is the folded ``jax.export`` artifact loaded back with ``load_exported`` (deserialized, jitted, as a
serving process would run it), "onnxruntime" the ONNX artifact in an onnxruntime session (default threads);
torch runs the torchvision model in eval mode under ``inference_mode``, NCHW and channels_last. All are timed
interleaved. The artifacts take uint8 images and normalise inside, torch takes float32 already normalised: the
artifacts do a little more work. Ratios compare each with torch's faster layout.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc

CASES = ("resnet50_cpu", "resnet18_cifar_cpu")


def parse_args(argv=None):
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--case", action="append", choices=CASES, help="default: both")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=3, help="timed batches per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2)
    return p.parse_args(argv)


def artifact_runners(case: common.Case, directory: Path) -> dict:
    """name -> zero-argument runner of each exported artifact of the case's model (random weights)."""
    import jax
    import numpy as np

    from resnet_jax.export import Preprocessing, export_model, load_exported

    model = common.jax_model(case)
    shape = (case.batch, case.image, case.image, case.channels)
    variables = jax.jit(lambda k: model.init(k, np.zeros((1, *shape[1:]), np.float32), train=False))(
        jax.random.key(0))
    batch = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    prep = Preprocessing(case.image, (0.45,), (0.25,))
    runners = {}
    for fmt, name in (("stablehlo", "stablehlo artifact"), ("onnx", "onnxruntime")):
        exported = load_exported(export_model(model, variables, directory / f"{case.name}.{fmt}",
                                              preprocessing=prep))
        runners[name] = lambda exported=exported: exported.run(batch)
    return runners


def main(argv=None):
    args = parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.quick:
        args.steps, args.rounds, args.warmup = 1, 1, 1
    results = []
    with tempfile.TemporaryDirectory(prefix="export_inference_") as tmp:
        for name in args.case or CASES:
            case = common.quick(common.CASES[name]) if args.quick else common.CASES[name]
            case = dataclasses.replace(case, batch=args.batch or case.batch)
            print(f"\n== {name}: {case.model} batch {case.batch} {case.image}px float32 cpu", flush=True)
            runners = artifact_runners(case, Path(tmp))
            for layout, channels_last in (("NCHW", False), ("channels_last", True)):
                runners[f"torch {layout}"] = common.torch_runner(case, False, channels_last, compile=False)
            times = common.time_interleaved(runners, args.warmup, args.steps, args.rounds)
            theirs = max(case.batch / t["median_s"] for n, t in times.items() if n.startswith("torch"))
            for variant, t in times.items():
                rate = case.batch / t["median_s"]
                results.append(dict(case=name, variant=variant, **dataclasses.asdict(case), images_per_s=rate,
                                    ratio_to_torch_best=rate / theirs, **t))
    rows = [[r["case"], r["variant"], r["images_per_s"], f"{r['ratio_to_torch_best']:.2f}"] for r in results]
    common.print_table(f"inference images/s (median of {args.rounds} interleaved rounds x {args.steps} batches; "
                       f"allocator {allocator})", ["case", "variant", "images/s", "x torch best"], rows)
    import onnxruntime

    environment = {**common.environment(allocator), "onnxruntime": onnxruntime.__version__}
    common.write_json(args.json, f"export_inference_cpu{'_quick' if args.quick else ''}.json",
                      {"environment": environment, "results": results})


if __name__ == "__main__":
    main()
