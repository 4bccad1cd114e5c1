"""The 1x1 kernel gradient ``x^T @ dy``: oneDNN's GEMM reading its left operand transposed, as XLA hands it,
against the extension's own outer-product kernel (``calls.matmul(own_kernel=True)``, csrc/outer_products.h),
for every pair of channel counts (median GFLOP/s), with numpy's (OpenBLAS) product as the outside reference and
the rule's choice (``onednn.algorithms.kernel_grad_own_kernel``) marked. What the rule was read off
(BENCHMARKS.md, 2026-12-05); run it on a new kind of CPU before trusting the rule there.

    python -m benchmarks.kernel_grad_1x1 [--pixels 6272] [--channels 64,128,256,384,512,1024,2048] [--rounds 4]
"""

from __future__ import annotations

from benchmarks import common
from resnet_jax.allocator import preload_tcmalloc


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--pixels", type=int, default=6272, help="rows of x and dy (ResNet-50's 14x14 at batch 32)")
    p.add_argument("--channels", default="64,128,256,384,512,1024,2048")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    allocator = preload_tcmalloc(args.tcmalloc)
    import jax
    import numpy as np

    from resnet_jax.ops.onednn import algorithms, calls

    pixels, channels, rounds = args.pixels, [int(c) for c in args.channels.split(",")], args.rounds
    if args.quick:
        pixels, channels, rounds = 100, [8, 24], 1

    def operands(cin, cout):
        rng = np.random.default_rng((cin, cout))
        return rng.standard_normal((pixels, cin), np.float32), rng.standard_normal((pixels, cout), np.float32)

    results = []
    for cin in channels:
        for cout in channels:
            x, dy = operands(cin, cout)
            xj, dyj = jax.device_put(x), jax.device_put(dy)
            want = x.T @ dy
            runners = {}
            for name, own in (("oneDNN", False), ("own kernel", True)):
                product = jax.jit(lambda a, b, own=own: calls.matmul(a, b, transpose_a=True, own_kernel=own))
                np.testing.assert_allclose(np.asarray(product(xj, dyj)), want, rtol=1e-4,
                                           atol=1e-4 * float(np.abs(want).max()))
                runners[name] = lambda f=product: f(xj, dyj).block_until_ready()
            timed = common.time_interleaved(runners, warmup=1, steps=2, rounds=rounds)
            results.append({"pixels": pixels, "in": cin, "out": cout, "seconds": timed,
                            "rule_takes_own": algorithms.kernel_grad_own_kernel(cin, cout)})
    # numpy last: OpenBLAS's threads spin after each call and slowed oneDNN calls timed after them 1.5x
    for r in results:
        x, dy = operands(r["in"], r["out"])
        r["seconds"] |= common.time_interleaved({"numpy": lambda: x.T @ dy}, warmup=1, steps=2, rounds=rounds)
        r["gflops"] = {side: 2 * pixels * r["in"] * r["out"] / t["median_s"] / 1e9 for side, t in r["seconds"].items()}
    rows = []
    for i, cin in enumerate(channels):
        row = [str(cin)]
        for r in results[i * len(channels):(i + 1) * len(channels)]:
            g = r["gflops"]
            cell = f"{g['oneDNN']:.0f}/{g['own kernel']:.0f} ({g['numpy']:.0f})"
            row.append(f"**{cell}**" if r["rule_takes_own"] else cell)
        rows.append(row)
    common.print_table(f"x^T @ dy GFLOP/s at {pixels} pixels: oneDNN / own kernel (numpy); bold: the rule takes the "
                       f"own kernel; rows: input channels; allocator {allocator}",
                       ["in \\ out", *map(str, channels)], rows)
    common.write_json(args.json, "kernel_grad_1x1.json", {"environment": common.environment(allocator),
                                                        "results": results})


if __name__ == "__main__":
    main()
