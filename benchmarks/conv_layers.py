"""Convolution GFLOP/s per layer shape, forward and backward, XLA (NHWC) vs PyTorch/oneDNN (channels_last).

The whole-model ratios come down to these: every convolution shape of ResNet-18 with the CIFAR stem at batch
128, timed interleaved on both sides after checking both compute the same values. Forward: the convolution.
Backward: both gradients (input and kernel) from a given output gradient, through XLA's own gradient
(``conv_impl="xla"``), through ours with the kernel gradient as one matmul (``matmul_grad``) and through
``aten.convolution_backward`` (the kernel torch's autograd calls). The per-network sums (each shape times the
number of times ResNet-18-CIFAR uses it) say how much of a model step is convolution. Also times one large
matmul on each side: the rate any "convolution as matmul" rewrite inside XLA could reach at best.

    python -m benchmarks.conv_layers [--batch 128] [--rounds 5]
"""

from __future__ import annotations

import functools

from benchmarks import common
from train.allocator import preload_tcmalloc

# ((H=W of the input, Cin, Cout, kernel, stride), uses in ResNet-18 with the CIFAR stem at 32x32): 20 convolutions
LAYERS = [((32, 3, 64, 3, 1), 1), ((32, 64, 64, 3, 1), 4), ((32, 64, 128, 3, 2), 1), ((32, 64, 128, 1, 2), 1),
          ((16, 128, 128, 3, 1), 3), ((16, 128, 256, 3, 2), 1), ((16, 128, 256, 1, 2), 1), ((8, 256, 256, 3, 1), 3),
          ((8, 256, 512, 3, 2), 1), ((8, 256, 512, 1, 2), 1), ((4, 512, 512, 3, 1), 3)]


def layer_runners(h, cin, cout, k, s, batch):
    """({"forward": {side: run}, "backward": {side: run}}, forward flops) for one layer, values cross-checked."""
    import jax
    import numpy as np
    import torch
    from jax import lax

    from resnet_jax.ops.conv import conv2d

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, h, h, cin), np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    pad = ((k // 2, k // 2),) * 2
    xla_conv = functools.partial(lax.conv_general_dilated, window_strides=(s, s), padding=pad,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours_conv = functools.partial(conv2d, strides=(s, s), padding=pad)
    forward = jax.jit(xla_conv)
    grads = {name: jax.jit(lambda x_, w_, dy_, f=f: jax.vjp(f, x_, w_)[1](dy_))
             for name, f in (("xla", xla_conv), ("matmul_grad", ours_conv))}
    xj, wj = jax.device_put(x), jax.device_put(w)
    dy = rng.standard_normal(forward(xj, wj).shape, np.float32)
    dyj = jax.device_put(dy)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    xt, dyt = nchw(x), nchw(dy)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)

    def torch_forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, stride=s, padding=k // 2)

    def torch_backward():
        with torch.no_grad():
            return torch.ops.aten.convolution_backward(dyt, xt, wt, None, [s, s], [k // 2, k // 2], [1, 1], False,
                                                      [0, 0], 1, [True, True, False])[:2]

    y = forward(xj, wj)
    np.testing.assert_allclose(np.asarray(y), torch_forward().permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-3)
    dxt, dwt = torch_backward()
    for name, g in grads.items():
        dx, dw = g(xj, wj, dyj)
        np.testing.assert_allclose(np.asarray(dx), dxt.permute(0, 2, 3, 1).numpy(), rtol=1e-3, atol=1e-2)
        np.testing.assert_allclose(np.asarray(dw), dwt.permute(2, 3, 1, 0).numpy(), rtol=1e-3, atol=1e-1)
    runners = {
        "forward": {"xla": lambda: forward(xj, wj).block_until_ready(), "torch": torch_forward},
        "backward": {**{name: (lambda g=g: jax.block_until_ready(g(xj, wj, dyj))) for name, g in grads.items()},
                     "torch": torch_backward},
    }
    return runners, 2 * y.size * k * k * cin


def matmul_runners(n):
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a, b = (np.random.default_rng(i).standard_normal((n, n), np.float32) for i in (0, 1))
    dot, aj, bj = jax.jit(jnp.dot), jax.device_put(a), jax.device_put(b)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    return {"xla": lambda: dot(aj, bj).block_until_ready(), "torch": lambda: at @ bt}, 2 * n ** 3


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc)
    batch, rounds, layers, n = args.batch, args.rounds, LAYERS, 2048
    if args.quick:
        batch, rounds, layers, n = 2, 1, LAYERS[:2], 256
    results, rows, totals = [], [], {}
    for (h, cin, cout, k, s), uses in layers:
        runners, flops = layer_runners(h, cin, cout, k, s, batch)
        r = {"layer": f"{h}x{h} {cin}->{cout} k{k} s{s}", "uses": uses, "batch": batch}
        for pass_name, pass_flops in (("forward", flops), ("backward", 2 * flops)):  # backward: dx and dw
            for side, t in common.time_interleaved(runners[pass_name], warmup=1, steps=3, rounds=rounds).items():
                r[f"{pass_name}_{side}_gflops"] = pass_flops / t["median_s"] / 1e9
                totals[f"{pass_name} {side}"] = totals.get(f"{pass_name} {side}", 0.0) + uses * t["median_s"]
        results.append(r)
        rows.append([r["layer"], uses, *(f"{r[c]:.0f}" for c in ("forward_xla_gflops", "forward_torch_gflops")),
                     r["forward_xla_gflops"] / r["forward_torch_gflops"],
                     *(f"{r[c]:.0f}" for c in ("backward_xla_gflops", "backward_matmul_grad_gflops",
                                               "backward_torch_gflops")),
                     r["backward_matmul_grad_gflops"] / r["backward_torch_gflops"]])
    mm, flops = matmul_runners(n)
    t = common.time_interleaved(mm, warmup=1, steps=3, rounds=rounds)
    mm_rates = {side: flops / v["median_s"] / 1e9 for side, v in t.items()}
    rows.append([f"matmul {n}x{n}x{n}", "", f"{mm_rates['xla']:.0f}", f"{mm_rates['torch']:.0f}",
                 mm_rates["xla"] / mm_rates["torch"], "", "", "", ""])
    common.print_table(f"convolutions, batch {batch}, float32, allocator {allocator} (GFLOP/s; backward = input "
                       "and kernel gradients)",
                       ["layer", "uses", "fwd XLA", "fwd torch", "fwd XLA/torch", "bwd xla", "bwd matmul_grad",
                        "bwd torch", "bwd matmul_grad/torch"], rows)
    common.print_table("seconds per batch summed over the network's convolutions (shape time x uses)",
                       ["pass", "seconds"], [[key, f"{v:.3f}"] for key, v in totals.items()])
    common.write_json(args.json, "conv_layers.json", {
        "environment": common.environment(allocator), "results": results, "network_seconds": totals,
        "matmul": {"n": n, **{f"{side}_gflops": v for side, v in mm_rates.items()}}})


if __name__ == "__main__":
    main()
