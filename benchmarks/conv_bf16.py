"""bfloat16 against float32 on 3x3 stride-1 layers: speed and error of each precision's best algorithms.

The question it answers: on a CPU with AVX-512 BF16, is bf16 compute worth its error? Each variant runs the
convolution through ``conv2d(..., algorithm=NAME)`` in the given dtype (float32 accumulation inside oneDNN's and
the jnp Winograd's products); the error is the largest deviation from float32 ``lax.conv_general_dilated`` at
HIGHEST precision, relative to the output's largest value. Rates count direct-convolution FLOPs; "train" is
the forward plus both gradients. Timed interleaved in one process.

    python -m benchmarks.conv_bf16 [--batch 128] [--rounds 3]
"""

from __future__ import annotations

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc

LAYERS = [(32, 64), (16, 128), (8, 256), (4, 512)]  # (H=W, channels): ResNet-18-CIFAR's 3x3 stride-1 layers
VARIANTS = [("float32", "onednn"), ("float32", "onednn_winograd_f4"), ("bfloat16", "onednn"),
            ("float32", "winograd_f2"), ("bfloat16", "winograd_f2")]


def layer_runners(h, c, batch):
    """{variant: run} for the forward and for forward + both gradients, and each variant's relative error."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from resnet_jax.ops import ConvSpec, conv2d
    from resnet_jax.ops.registry import REGISTRY

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, h, h, c)), jnp.float32)
    pad = ((1, 1), (1, 1))
    want = lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)
    forward, train, error = {}, {}, {}
    for dtype, name in VARIANTS:
        args = (x.astype(dtype), w.astype(dtype), dy.astype(dtype))
        if REGISTRY[name].refusal(ConvSpec.of(args[0], args[1], (1, 1), pad, 1), "cpu"):
            continue  # e.g. the extension is not built here
        conv = lambda a, b, name=name: conv2d(a, b, (1, 1), pad, algorithm=name)  # noqa: E731
        fwd = jax.jit(conv)
        grads = jax.jit(lambda a, b, d, conv=conv: jax.vjp(conv, a, b)[1](d))
        label = f"{dtype} {name}"
        y = fwd(*args[:2]).astype(jnp.float32)
        error[label] = float(jnp.abs(y - want).max() / jnp.abs(want).max())
        forward[label] = lambda f=fwd, a=args: f(*a[:2]).block_until_ready()
        train[label] = lambda f=fwd, g=grads, a=args: (f(*a[:2]).block_until_ready(),
                                                       jax.block_until_ready(g(*a)))
    return forward, train, error, 2 * batch * h * h * c * c * 9


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc)
    batch, rounds, layers = (2, 1, LAYERS[:1]) if args.quick else (args.batch, args.rounds, LAYERS)
    rows, results = [], []
    for h, c in layers:
        forward, train, error, flops = layer_runners(h, c, batch)
        fwd_t = common.time_interleaved(forward, warmup=1, steps=2, rounds=rounds)
        train_t = common.time_interleaved(train, warmup=1, steps=2, rounds=rounds)
        for label in forward:
            r = {"layer": f"{h}x{h}x{c}", "variant": label, "batch": batch, "relative_error": error[label],
                 "forward_gflops": flops / fwd_t[label]["median_s"] / 1e9,
                 "train_gflops": 3 * flops / train_t[label]["median_s"] / 1e9}
            results.append(r)
            rows.append([r["layer"], label, f"{r['forward_gflops']:.0f}", f"{r['train_gflops']:.0f}",
                         f"{r['relative_error']:.1e}"])
    common.print_table(f"3x3 stride-1 convolutions, batch {batch}, allocator {allocator} (GFLOP/s)",
                       ["layer", "dtype algorithm", "forward", "forward + both gradients", "error"], rows)
    common.write_json(args.json, "conv_bf16.json", {"environment": common.environment(allocator), "results": results})


if __name__ == "__main__":
    main()
