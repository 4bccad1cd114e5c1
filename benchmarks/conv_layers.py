"""Forward convolution GFLOP/s per layer shape, XLA (NHWC) vs PyTorch/oneDNN (channels_last), one process.

The whole-model inference ratio comes down to these: every convolution shape of ResNet-18 with the CIFAR stem
at batch 128, timed interleaved on both sides after checking both compute the same output. Also times one
large matmul on each side: the rate any "convolution as matmul" rewrite inside XLA could reach at best.

    python -m benchmarks.conv_layers [--batch 128] [--rounds 5]
"""

from __future__ import annotations

import functools

from benchmarks import common

# (H=W of the input, Cin, Cout, kernel, stride): ResNet-18 with the CIFAR stem at 32x32
LAYERS = [(32, 3, 64, 3, 1), (32, 64, 64, 3, 1), (32, 64, 128, 3, 2), (32, 64, 128, 1, 2), (16, 128, 128, 3, 1),
          (16, 128, 256, 3, 2), (8, 256, 256, 3, 1), (8, 256, 512, 3, 2), (4, 512, 512, 3, 1)]


def layer_runners(h, cin, cout, k, s, batch):
    """(ours, torch, flops) for one layer, after asserting both give the same output."""
    import jax
    import numpy as np
    import torch
    from jax import lax

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, h, h, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32)
    conv = jax.jit(functools.partial(lax.conv_general_dilated, window_strides=(s, s),
                                     padding=((k // 2, k // 2),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")))
    xj, wj = jax.device_put(x), jax.device_put(w)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)

    def ours():
        return conv(xj, wj).block_until_ready()

    def theirs():
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, stride=s, padding=k // 2)

    y = ours()
    np.testing.assert_allclose(np.asarray(y), theirs().permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-2)
    return ours, theirs, 2 * y.size * k * k * cin


def matmul_runners(n):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a, b = (np.random.default_rng(i).standard_normal((n, n), np.float32) for i in (0, 1))
    dot, aj, bj = jax.jit(jnp.dot), jax.device_put(a), jax.device_put(b)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    return (lambda: dot(aj, bj).block_until_ready()), (lambda: at @ bt), 2 * n ** 3


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    allocator = common.maybe_use_tcmalloc(args.tcmalloc)
    batch, rounds, layers, n = args.batch, args.rounds, LAYERS, 2048
    if args.quick:
        batch, rounds, layers, n = 2, 1, LAYERS[:2], 256
    cases = [(f"{h}x{h} {cin}->{cout} k{k} s{s}", layer_runners(h, cin, cout, k, s, batch))
             for h, cin, cout, k, s in layers]
    cases.append((f"matmul {n}x{n}x{n}", matmul_runners(n)))
    results, rows = [], []
    for name, (ours, theirs, flops) in cases:
        t = common.time_interleaved({"xla": ours, "torch": theirs}, warmup=1, steps=3, rounds=rounds)
        gx, gt = (flops / t[side]["median_s"] / 1e9 for side in ("xla", "torch"))
        results.append({"layer": name, "batch": batch, "xla_gflops": gx, "torch_gflops": gt, "ratio": gx / gt})
        rows.append([name, f"{gx:.0f}", f"{gt:.0f}", gx / gt])
    common.print_table(f"forward convolution, batch {batch}, float32, allocator {allocator} (GFLOP/s)",
                       ["layer", "XLA", "torch (oneDNN)", "XLA / torch"], rows)
    common.write_json(args.json, "conv_layers.json", {"environment": common.environment(allocator),
                                                      "results": results})


if __name__ == "__main__":
    main()
