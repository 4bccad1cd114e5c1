"""Convolution GFLOP/s per layer shape and algorithm, forward / input gradient / kernel gradient, vs PyTorch.

Every convolution shape of a model (ResNet-18 with the CIFAR stem at batch 128, ResNet-50 at 224 px batch 32,
or the digits ResNet-20 at 16 px batch 64), each pass timed for every algorithm in ``resnet_jax.ops.ALGORITHMS``
that computes the shape and for torch's oneDNN kernels (``conv2d`` and ``aten.convolution_backward``, which
torch's autograd calls), interleaved in one process after checking that all compute the same values. Rates
count direct-convolution FLOPs, so an algorithm that does fewer multiplies (Winograd) can exceed the machine's
FMA peak. Also reported: which algorithm "auto" and "jax" (auto without the extension) pick for each pass, and
the seconds per batch summed over the network (shape time x uses) for each algorithm that computes every layer,
for those choices and for torch.

    python -m benchmarks.conv_layers [--model resnet18_cifar|resnet50|resnet20_digits] [--rounds 3]
"""

from __future__ import annotations

import functools

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc

# ((H=W of the input, Cin, Cout, kernel, stride), uses in the model)
MODELS = {
    "resnet18_cifar": (128, [((32, 3, 64, 3, 1), 1), ((32, 64, 64, 3, 1), 4), ((32, 64, 128, 3, 2), 1),
                             ((32, 64, 128, 1, 2), 1), ((16, 128, 128, 3, 1), 3), ((16, 128, 256, 3, 2), 1),
                             ((16, 128, 256, 1, 2), 1), ((8, 256, 256, 3, 1), 3), ((8, 256, 512, 3, 2), 1),
                             ((8, 256, 512, 1, 2), 1), ((4, 512, 512, 3, 1), 3)]),
    "resnet50": (32, [((224, 3, 64, 7, 2), 1), ((56, 64, 64, 1, 1), 1), ((56, 64, 64, 3, 1), 3),
                      ((56, 64, 256, 1, 1), 4), ((56, 256, 64, 1, 1), 2), ((56, 256, 128, 1, 1), 1),
                      ((56, 128, 128, 3, 2), 1), ((28, 128, 512, 1, 1), 4), ((56, 256, 512, 1, 2), 1),
                      ((28, 512, 128, 1, 1), 3), ((28, 128, 128, 3, 1), 3), ((28, 512, 256, 1, 1), 1),
                      ((28, 256, 256, 3, 2), 1), ((14, 256, 1024, 1, 1), 6), ((28, 512, 1024, 1, 2), 1),
                      ((14, 1024, 256, 1, 1), 5), ((14, 256, 256, 3, 1), 5), ((14, 1024, 512, 1, 1), 1),
                      ((14, 512, 512, 3, 2), 1), ((7, 512, 2048, 1, 1), 3), ((14, 1024, 2048, 1, 2), 1),
                      ((7, 2048, 512, 1, 1), 2), ((7, 512, 512, 3, 1), 2)]),
    "resnet20_digits": (64, [((16, 1, 16, 3, 1), 1), ((16, 16, 16, 3, 1), 6), ((16, 16, 32, 3, 2), 1),
                             ((8, 32, 32, 3, 1), 5), ((8, 32, 64, 3, 2), 1), ((4, 64, 64, 3, 1), 5)]),
}
PASSES = ("forward", "input_grad", "kernel_grad")


def output_size(h: int, k: int, s: int) -> int:
    """The output's height (= width) of a layer in MODELS: "same" padding of k // 2 on each side."""
    return (h + 2 * (k // 2) - k) // s + 1


def layer_group(k: int, s: int) -> str:
    """The group a layer's time is summed in: the 1x1 layers, the 3x3 stride-1 ones, and the rest."""
    return "1x1" if k == 1 else "3x3 stride 1" if (k, s) == (3, 1) else "stem and strided"


def layer_runners(h, cin, cout, k, s, batch):
    """{pass: {side: run}} for one layer (every algorithm that computes it, and torch), values cross-checked."""
    import jax
    import numpy as np
    import torch
    from jax import lax

    from resnet_jax.ops import ALGORITHMS, ConvSpec, conv2d
    from resnet_jax.ops.registry import REGISTRY

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, h, h, cin), np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    pad = ((k // 2, k // 2),) * 2
    xj, wj = jax.device_put(x), jax.device_put(w)
    geometry = ConvSpec.of(xj, wj, (s, s), pad, 1)
    names = [n for n in ALGORITHMS if REGISTRY[n].refusal(geometry, "cpu") is None]
    reference = functools.partial(lax.conv_general_dilated, window_strides=(s, s), padding=pad,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
    y = reference(xj, wj)
    dy = jax.device_put(rng.standard_normal(y.shape, np.float32))
    want = (y, *jax.vjp(reference, xj, wj)[1](dy))
    runners = {p: {} for p in PASSES}
    for name in names:
        conv = functools.partial(conv2d, strides=(s, s), padding=pad, algorithm=name)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda x_, w_, dy_, f=conv: jax.vjp(lambda a: f(a, w_), x_)[1](dy_)[0])
        dw = jax.jit(lambda x_, w_, dy_, f=conv: jax.vjp(lambda b: f(x_, b), w_)[1](dy_)[0])
        for got, exp, what in zip((fwd(xj, wj), dx(xj, wj, dy), dw(xj, wj, dy)), want, PASSES):
            scale = float(np.abs(np.asarray(exp)).max())
            np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(exp) / scale, atol=2e-4,
                                       err_msg=f"{name} {what}")
        runners["forward"][name] = lambda f=fwd: f(xj, wj).block_until_ready()
        runners["input_grad"][name] = lambda f=dx: f(xj, wj, dy).block_until_ready()
        runners["kernel_grad"][name] = lambda f=dw: f(xj, wj, dy).block_until_ready()

    channels_last = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    xt, dyt = channels_last(x), channels_last(np.asarray(dy))
    wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)

    def torch_forward():
        with torch.no_grad():
            return torch.nn.functional.conv2d(xt, wt, stride=s, padding=k // 2)

    def torch_backward(mask):
        with torch.no_grad():
            return torch.ops.aten.convolution_backward(dyt, xt, wt, None, [s, s], [k // 2, k // 2], [1, 1], False,
                                                      [0, 0], 1, mask)

    np.testing.assert_allclose(torch_forward().permute(0, 2, 3, 1).numpy(), np.asarray(y), rtol=1e-3, atol=1e-3)
    runners["forward"]["torch"] = torch_forward
    runners["input_grad"]["torch"] = lambda: torch_backward([True, False, False])
    runners["kernel_grad"]["torch"] = lambda: torch_backward([False, True, False])
    return runners, 2 * y.size * k * k * cin, geometry


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), action="append", help="default: resnet18_cifar")
    p.add_argument("--batch", type=int, help="default: the model's benchmark batch")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc)
    from resnet_jax.ops import choose

    results, totals = [], {}
    for model in args.model or ["resnet18_cifar"]:
        batch, layers = MODELS[model]
        batch = args.batch or batch
        rounds = args.rounds
        if args.quick:
            batch, rounds, layers = 2, 1, layers[:2]
        rows = []
        for (h, cin, cout, k, s), uses in layers:
            runners, flops, geometry = layer_runners(h, cin, cout, k, s, batch)
            r = {"model": model, "layer": f"{h}x{h} {cin}->{cout} k{k} s{s}", "uses": uses, "batch": batch,
                 "auto": choose(geometry, "cpu"), "jax": choose(geometry, "cpu", extension=False), "gflops": {}}
            for i, pass_name in enumerate(PASSES):
                timed = common.time_interleaved(runners[pass_name], warmup=1, steps=2, rounds=rounds)
                r["gflops"][pass_name] = {side: flops / t["median_s"] / 1e9 for side, t in timed.items()}
                seconds = {side: t["median_s"] for side, t in timed.items()}
                for choice in ("auto", "jax"):
                    seconds[f"{choice} (per layer and pass)"] = seconds[r[choice][i]]
                for side, t in seconds.items():
                    totals.setdefault((model, side), {}).setdefault(pass_name, []).append(uses * t)
            results.append(r)
            for i, pass_name in enumerate(PASSES):
                rates = r["gflops"][pass_name]
                best = max((n for n in rates if n != "torch"), key=rates.get)
                auto, pure = r["auto"][i], r["jax"][i]
                rows.append([r["layer"] if pass_name == "forward" else "", uses if pass_name == "forward" else "",
                             pass_name, " ".join(f"{n} {v:.0f}" for n, v in rates.items() if n != "torch"),
                             f"{rates['torch']:.0f}", f"{best}", f"{rates[auto]:.0f} ({auto})",
                             f"{rates[pure]:.0f} ({pure})", rates[auto] / rates["torch"]])
        common.print_table(f"{model}: convolution GFLOP/s, batch {batch}, float32, allocator {allocator}",
                           ["layer", "uses", "pass", "ours (each algorithm)", "torch", "fastest", "auto", "jax",
                            "auto/torch"], rows)
    table = []
    for (model, side), passes in totals.items():
        if len(passes["forward"]) < len(MODELS[model][1]) and not args.quick:
            continue  # an algorithm that computes only some layers has no whole-network time
        seconds = {p: sum(v) for p, v in passes.items()}
        table.append([model, side, *(f"{seconds[p]:.3f}" for p in PASSES), f"{sum(seconds.values()):.3f}"])
    common.print_table("seconds per batch summed over each model's convolutions (shape time x uses)",
                       ["model", "algorithm", *PASSES, "all three"], table)
    common.write_json(args.json, f"conv_layers{'_quick' if args.quick else ''}.json", {
        "environment": common.environment(allocator), "results": results,
        "network_seconds": [{"model": m, "algorithm": s, **{p: sum(t) for p, t in v.items()}}
                            for (m, s), v in totals.items()]})


if __name__ == "__main__":
    main()
