"""bfloat16 against float32 on 3x3 stride-1 layers: speed and error of each precision's best algorithms.

The question it answers: on a CPU with AVX-512 BF16, is bf16 compute worth its error? Each variant runs the
convolution through ``conv2d(..., algorithm=NAME)`` in the given dtype (float32 accumulation inside oneDNN's and
the jnp Winograd's products); the error is the largest deviation from float32 ``lax.conv_general_dilated`` at
HIGHEST precision, relative to the output's largest value. Rates count direct-convolution FLOPs; "train" is
the forward plus both gradients. Timed interleaved in one process.

    python -m benchmarks.conv_bf16 [--batch 128] [--rounds 3]
    python -m benchmarks.conv_bf16 --model resnet50 [--rounds 2]

``--model`` instead times every convolution shape of that model (``conv_layers.MODELS``), each pass on its own,
in float32 "auto", bfloat16 "auto", bfloat16 forced to oneDNN (and on 1x1 layers to the GEMM), on 3x3 stride-1
layers bfloat16 by the extension's Winograd, directly and through the float32 detour ("@float32"), and torch's
bfloat16 channels_last kernels (what ``torch.autocast`` calls), and sums seconds per batch (time x uses) per layer
group: where a bfloat16 model loses against autocast, convolution by convolution, and whether the per-pass
Winograd rule (``rules.bfloat16_passes``) holds on this CPU. Variants this machine cannot run (no extension, no
bfloat16 kernels) are left out.
"""

from __future__ import annotations

from benchmarks import common
from benchmarks.conv_layers import MODELS, layer_group, output_size
from resnet_jax.allocator import preload_tcmalloc

LAYERS = [(32, 64), (16, 128), (8, 256), (4, 512)]  # (H=W, channels): ResNet-18-CIFAR's 3x3 stride-1 layers
# a bfloat16 3x3 stride-1 layer's pass by the extension's Winograd, reading and writing bfloat16 itself (what
# ``rules.bfloat16_passes`` takes where it pays), and the same arithmetic on upcast operands rounded once: timed on
# every such layer so the rule can be checked on each CPU
WINOGRAD = "bfloat16 winograd_f4"
WIDENED = "bfloat16 winograd_f4@float32"
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


def model_runners(h, cin, cout, k, s, batch):
    """{pass: {variant: run}} for one layer of a model, ours in both dtypes and torch in bfloat16."""
    import functools

    import jax
    import numpy as np
    import torch

    from resnet_jax.ops import ConvSpec, conv2d
    from resnet_jax.ops.registry import REGISTRY

    rng = np.random.default_rng(0)
    pad, out = ((k // 2, k // 2),) * 2, output_size(h, k, s)
    x = rng.standard_normal((batch, h, h, cin), np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    dy = rng.standard_normal((batch, out, out, cout), np.float32)
    variants = {"float32 auto": ("float32", "auto"), "bfloat16 auto": ("bfloat16", "auto"),
                "bfloat16 onednn": ("bfloat16", "onednn"),
                **({"bfloat16 gemm": ("bfloat16", "gemm")} if k == 1 else {}),
                **({WINOGRAD: ("bfloat16", "onednn_winograd_f4"), WIDENED: ("bfloat16", "onednn_winograd_f4@float32")}
                   if (k, s) == (3, 1) else {})}
    def refused(dtype, name):  # e.g. the extension is not built, or oneDNN has no bfloat16 kernels on this CPU
        spec = ConvSpec.of(*(jax.ShapeDtypeStruct(a.shape, dtype) for a in (x, w)), (s, s), pad, 1)
        return name != "auto" and REGISTRY[name].refusal(spec, "cpu") is not None

    variants = {label: v for label, v in variants.items() if not refused(*v)}
    runners = {"forward": {}, "input_grad": {}, "kernel_grad": {}}
    for label, (dtype, name) in variants.items():
        xj, wj, dyj = (jax.device_put(a).astype(dtype) for a in (x, w, dy))
        conv = functools.partial(conv2d, strides=(s, s), padding=pad, algorithm=name)
        fwd = jax.jit(conv)
        dx = jax.jit(lambda a, b, d, f=conv: jax.vjp(lambda a_: f(a_, b), a)[1](d)[0])
        dw = jax.jit(lambda a, b, d, f=conv: jax.vjp(lambda b_: f(a, b_), b)[1](d)[0])
        runners["forward"][label] = lambda f=fwd, a=(xj, wj): f(*a).block_until_ready()
        runners["input_grad"][label] = lambda f=dx, a=(xj, wj, dyj): f(*a).block_until_ready()
        runners["kernel_grad"][label] = lambda f=dw, a=(xj, wj, dyj): f(*a).block_until_ready()
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous(  # noqa: E731
        memory_format=torch.channels_last).bfloat16()
    xt, dyt, wt = nchw(x), nchw(dy), nchw(np.ascontiguousarray(w.transpose(3, 0, 1, 2)))

    def torch_pass(mask):
        with torch.no_grad():
            if mask is None:
                return torch.nn.functional.conv2d(xt, wt, stride=s, padding=k // 2)
            return torch.ops.aten.convolution_backward(dyt, xt, wt, None, [s, s], [k // 2] * 2, [1, 1], False,
                                                      [0, 0], 1, mask)
    for pass_name, mask in zip(runners, (None, [True, False, False], [False, True, False])):
        runners[pass_name]["torch bfloat16"] = functools.partial(torch_pass, mask)
    return runners, 2 * batch * out * out * cout * k * k * cin


def model_main(model, rounds, quick, allocator, json_path) -> None:
    batch, layers = MODELS[model]
    if quick:
        batch, rounds, layers = 2, 1, layers[1:2]
    rows, sums, results = [], {}, []
    for (h, cin, cout, k, s), uses in layers:
        group = layer_group(k, s)
        runners, flops = model_runners(h, cin, cout, k, s, batch)
        for pass_name, variants in runners.items():
            timed = common.time_interleaved(variants, warmup=1, steps=2, rounds=rounds)
            rates = {n: flops / t["median_s"] / 1e9 for n, t in timed.items()}
            layer = f"{h} {cin}->{cout} k{k} s{s}"
            results.append({"layer": layer, "uses": uses, "batch": batch, "pass": pass_name, "gflops": rates})
            rows.append([f"{layer} x{uses}", pass_name, " | ".join(f"{n} {r:.0f}" for n, r in rates.items())])
            for n, t in timed.items():
                sums.setdefault((group, pass_name), {}).setdefault(n, 0.0)
                sums[(group, pass_name)][n] += uses * t["median_s"]
    common.print_table(f"{model}: convolution GFLOP/s per pass, batch {batch}, allocator {allocator}",
                       ["layer", "pass", "variants"], rows)
    common.print_table("seconds per batch (time x uses), per layer group and pass", ["group", "pass", "variants"],
                       [[g, p, " | ".join(f"{n} {v:.3f}" for n, v in by.items())] for (g, p), by in sums.items()])
    common.write_json(json_path, f"conv_bf16_{model}.json", {
        "environment": common.environment(allocator), "results": results,
        "seconds": [{"group": g, "pass": p, **by} for (g, p), by in sums.items()]})


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", choices=["resnet50", "resnet18_cifar", "resnet20_digits"],
                   help="every convolution of this model, per pass, bfloat16 against float32 and torch's bfloat16")
    args = p.parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc)
    if args.model:
        return model_main(args.model, args.rounds, args.quick, allocator, args.json)
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
