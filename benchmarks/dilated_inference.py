"""A dilated ResNet-50 backbone's inference (segmentation's setting): ours with conv_impl "auto" and "xla", and
torchvision's ``resnet50(replace_stride_with_dilation=...)``, side by side, images/s on this machine.

    python -m benchmarks.dilated_inference                      # output stride 8, 512x512, batch 4
    python -m benchmarks.dilated_inference --output_stride 16
    python -m benchmarks.dilated_inference --quick              # smoke test: one block per stage, 64 px

Why: at output stride 8 the last two stages run at 1/8 of the image instead of 1/32, so they hold most of the
work, half of it in dilated 3x3 convolutions: "auto" computes the large ones by Winograd F(4,3) on the input's
sub-grids ("onednn_winograd_f4@atrous", ``resnet_jax/ops/atrous.py``), the small ones by oneDNN's direct kernels,
"xla" all of them by XLA's. Both sides run the feature backbone and the classifier head
(float32, BatchNorm folded on ours as evaluation runs it; torch in inference mode, its best of NCHW and
channels_last). Runners alternate within each round; the median is reported. Writes
benchmarks/results/dilated_inference_cpu.json.
"""

from __future__ import annotations

import argparse
import functools
import os

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc

DILATIONS = {16: [False, False, True], 8: [False, True, True]}  # torchvision's replace_stride_with_dilation


def parse_args(argv=None) -> argparse.Namespace:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--output_stride", type=int, choices=sorted(DILATIONS), default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed batches per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def ours(args, conv_impl: str, stage_sizes):
    """Our folded, jitted inference of resnet50 at the output stride, as a no-argument runner."""
    import jax
    import jax.numpy as jnp

    from resnet_jax import create_model
    from resnet_jax.ops import fold_batchnorm

    model = create_model("resnet50", output_stride=args.output_stride, conv_impl=conv_impl,
                         **({"stage_sizes": stage_sizes} if stage_sizes else {}))
    x = jax.random.normal(jax.random.key(0), (args.batch, args.image, args.image, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x[:1])
    folded_model, folded = fold_batchnorm(model, variables)
    infer = jax.jit(functools.partial(folded_model.apply, train=False))
    return lambda: infer(folded, x).block_until_ready()


def theirs(args, channels_last: bool, stage_sizes):
    import torch
    import torchvision

    block = torchvision.models.resnet.Bottleneck
    model = torchvision.models.resnet.ResNet(block, list(stage_sizes or (3, 4, 6, 3)),
                                             replace_stride_with_dilation=DILATIONS[args.output_stride]).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.image, args.image).to(memory_format=fmt)

    def infer():
        with torch.inference_mode():
            model(x)
    return infer


def main(argv=None):
    args = parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    stage_sizes = None
    if args.quick:
        args.steps, args.rounds, args.warmup, args.batch, args.image = 1, 1, 1, 1, 64
        stage_sizes = (1, 1, 1, 1)
    runners = {"ours auto": ours(args, "auto", stage_sizes), "ours xla": ours(args, "xla", stage_sizes),
               "torch NCHW": theirs(args, False, stage_sizes), "torch channels_last": theirs(args, True, stage_sizes)}
    timings = common.time_interleaved(runners, args.warmup, args.steps, args.rounds)
    rate = {name: args.batch / t["median_s"] for name, t in timings.items()}
    torch_best = max(rate["torch NCHW"], rate["torch channels_last"])
    rows = [[name, rate[name], rate[name] / rate["ours xla"], rate[name] / torch_best] for name in runners]
    common.print_table(f"resnet50, output stride {args.output_stride}, {args.image}x{args.image}, batch "
                       f"{args.batch}, float32 inference (allocator {allocator})",
                       ["variant", "images/s", "x ours xla", "x torch best"], rows)
    results = [{"variant": name, "images_per_s": rate[name], "ratio_to_ours_xla": rate[name] / rate["ours xla"],
                "ratio_to_torch_best": rate[name] / torch_best, **timings[name]} for name in runners]
    common.write_json(args.json, f"dilated_inference_cpu{'_quick' if args.quick else ''}.json",
                      {"environment": common.environment(allocator), "output_stride": args.output_stride,
                       "batch": args.batch, "image": args.image, "results": results})


if __name__ == "__main__":
    main()
