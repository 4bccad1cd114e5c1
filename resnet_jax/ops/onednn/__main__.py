"""``python -m resnet_jax.ops.onednn --build``: build the extension now (not inside the first trace), check each
of its algorithms against XLA's convolution, and say where the binary is. Exit status 1 when it is unusable."""

from __future__ import annotations

import argparse
import logging
import sys


def check() -> list[str]:
    """One small convolution per extension algorithm, all three passes, against XLA's: the failures found."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from resnet_jax.ops import ConvSpec, conv2d
    from resnet_jax.ops.registry import REGISTRY

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (2, 12, 12, 16))
    failures = []
    for name, algorithm in REGISTRY.items():
        if not algorithm.cpu_only:
            continue
        # the algorithm's own kind of layer: a 3x3, a 1x1 or a dilated 3x3 (the first its limits accept)
        kernel = lambda size: jax.ShapeDtypeStruct((*size, 16, 8), x.dtype)  # noqa: E731
        size, dilation = next((s, d) for s, d in (((3, 3), 1), ((1, 1), 1), ((3, 3), 2))
                              if algorithm.limits(ConvSpec.of(x, kernel(s), 1, "SAME", 1, d)) is None)
        k = jax.random.normal(keys[1], (*size, 16, 8))
        f = lambda a, b, impl: conv2d(a, b, (1, 1), "SAME", algorithm=impl, dilation=dilation)  # noqa: E731
        got = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(f(a, b, name) ** 2), (0, 1)))(x, k)
        want = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(f(a, b, "xla") ** 2), (0, 1)))(x, k)
        error = max(float(np.max(np.abs(g - w)) / (np.max(np.abs(w)) + 1e-30))
                    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        if not error < 1e-4:
            failures.append(f"{name}: relative error {error:.1e} against XLA")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build (if needed), load and check the extension")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 2
    logging.basicConfig(format="%(message)s")
    logging.getLogger("resnet_jax").setLevel(logging.INFO)  # the build's own lines, not every library's
    from resnet_jax.ops.onednn import build, library

    try:
        path = build.build()
        library.load()
    except (build.OnednnUnavailable, OSError) as err:
        print(f"the oneDNN extension is unusable here: {err}", file=sys.stderr)
        return 1
    failures = check()
    if failures:
        print("the oneDNN extension was built but computes wrongly:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"oneDNN {library.version()} extension ready and checked against XLA: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
