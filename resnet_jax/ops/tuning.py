"""Measured per-layer choices: time every algorithm on this machine, remember the fastest per pass on disk.

The rules in ``algorithms.choose`` were measured on two kinds of 2-core EPYC; another CPU (more cores, AVX2
only, a different cache) can rank the algorithms differently. ``tune(model, input_shape)`` times, for every
convolution shape of a model and each of its three passes, every algorithm that computes it (like cuDNN's
benchmark mode, but explicit: never inside a jitted step), and writes the winners to a cache file that
"auto" and "jax" consult before the rules. Given the file, the choice is deterministic. The file is keyed by
the machine (CPU flags), jax's version and the extension's state, so a different machine never reuses it.

    python -m resnet_jax.ops.tuning resnet50 --batch 32 --image-size 224
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from resnet_jax.ops.algorithms import REGISTRY, Geometry

PASSES = ("forward", "input_grad", "kernel_grad")
ENV_VAR = "RESNET_JAX_CONV_TUNING"  # a file to use instead of the default; "0" ignores any tuning
logger = logging.getLogger("resnet_jax")


def cache_file() -> Path | None:
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() in ("0", "off", "false", "no"):
        return None
    if choice:
        return Path(choice)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "resnet_jax" / "conv_tuning.json"


def machine_key() -> str:
    """What the measured ranking depends on: the CPU, jax's version, and whether the extension is there."""
    from resnet_jax.ops import onednn
    from resnet_jax.ops.onednn import _cpu_flags

    parts = [_cpu_flags(), jax.__version__, jax.default_backend(), str(onednn.available()), str(os.cpu_count())]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def geometry_key(g: Geometry) -> str:
    return json.dumps([g.batch, g.height, g.width, g.in_channels, g.out_channels, g.kernel, g.strides, g.padding,
                       g.groups, g.dtype])


@functools.cache
def _table() -> dict[str, Any]:
    """This machine's measured choices ({} when there are none); a damaged file is reported once and ignored."""
    path = cache_file()
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get(machine_key(), {})
    except (OSError, ValueError, AttributeError) as err:
        logger.warning("resnet_jax: ignoring the convolution tuning file %s (%s); delete it or run the tuning "
                       "again (python -m resnet_jax.ops.tuning)", path, err)
        return {}


def tuned_choice(g: Geometry, extension: bool) -> tuple[str, str, str] | None:
    entry = _table().get(geometry_key(g))
    if not entry:
        return None
    passes = tuple(entry["auto" if extension else "jax"])
    return passes if all(name in REGISTRY and REGISTRY[name].refusal(g, "cpu") is None for name in passes) else None


def model_geometries(model, input_shape: tuple[int, ...], dtype=jnp.float32) -> list[Geometry]:
    """Every distinct convolution shape ``model`` computes on inputs of ``input_shape`` (shapes only)."""
    from flax import linen as nn

    from resnet_jax.ops.conv import Conv

    found: dict[str, Geometry] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, Conv):
            m, x = context.module, args[0]
            x = jax.ShapeDtypeStruct(x.shape, m.dtype or x.dtype)  # the dtype the convolution computes in
            strides = (m.strides,) * 2 if isinstance(m.strides, int) else tuple(m.strides)
            kernel = jax.ShapeDtypeStruct((*m.kernel_size, x.shape[-1] // m.feature_group_count, m.features), x.dtype)
            padding = m.padding
            if isinstance(padding, str):
                padding = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
            g = Geometry.of(x, kernel, strides, tuple(tuple(int(v) for v in p) for p in padding),
                            m.feature_group_count)
            found.setdefault(geometry_key(g), g)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, dtype), train=False))
    return list(found.values())


def _pass_runner(name: str, pass_name: str, g: Geometry) -> Callable[[], Any]:
    algorithm = REGISTRY[name]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (g.batch, g.height, g.width, g.in_channels)).astype(g.dtype)
    kernel = jax.random.normal(keys[1], (*g.kernel, g.in_channels // g.groups, g.out_channels)).astype(g.dtype)
    static = (g.strides, g.padding, g.groups)
    y_shape = jax.eval_shape(lambda: algorithm.forward(x, kernel, *static)).shape
    dy = jax.random.normal(keys[2], y_shape).astype(g.dtype)
    if pass_name == "forward":
        fn, args = jax.jit(lambda a, b: algorithm.forward(a, b, *static)), (x, kernel)
    elif pass_name == "input_grad":
        fn, args = jax.jit(lambda d, b: algorithm.input_grad(d, b, x.shape, *static)), (dy, kernel)
    else:
        fn, args = jax.jit(lambda a, d: algorithm.kernel_grad(a, d, kernel.shape, kernel.dtype, *static)), (x, dy)
    return lambda: jax.block_until_ready(fn(*args))


def measure(g: Geometry, repeats: int = 3, candidates=None) -> dict[str, dict[str, float]]:
    """Median seconds of each pass of each algorithm (of ``candidates``, default all) that computes ``g`` here:
    {pass: {algorithm: seconds}}."""
    names = [n for n in candidates or REGISTRY if REGISTRY[n].refusal(g, jax.default_backend()) is None]
    seconds: dict[str, dict[str, float]] = {p: {} for p in PASSES}
    for pass_name in PASSES:
        for name in names:
            run = _pass_runner(name, pass_name, g)
            run()  # compile and warm up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            seconds[pass_name][name] = statistics.median(times)
    return seconds


def tune(model, input_shape: tuple[int, ...], dtype=jnp.float32, repeats: int = 3, candidates=None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every convolution of ``model`` at ``input_shape``, store the fastest algorithms per pass for
    this machine in ``cache_file()`` (merged with what is there) and return {geometry: choice}. ``candidates``
    limits the algorithms timed (default: all of ``ops.ALGORITHMS``); "xla" is always one of them."""
    from resnet_jax.ops import algorithms

    path = cache_file()
    if path is None:
        raise ValueError(f"{ENV_VAR}=0 turns tuning off; unset it to tune")
    start = time.perf_counter()
    chosen = {}
    if candidates is not None:
        unknown = sorted(set(candidates) - set(REGISTRY))
        if unknown:
            raise ValueError(f"unknown convolution algorithm(s) {unknown}; choose from {list(REGISTRY)}")
        candidates = ["xla", *candidates]
    for g in model_geometries(model, input_shape, dtype):
        seconds = measure(g, repeats, candidates)
        pure = {p: {n: t for n, t in by.items() if not REGISTRY[n].cpu_only} for p, by in seconds.items()}
        entry = {"auto": [min(seconds[p], key=seconds[p].get) for p in PASSES],
                 "jax": [min(pure[p], key=pure[p].get) for p in PASSES], "seconds": seconds}
        chosen[geometry_key(g)] = entry
        rules = algorithms.choose(g, jax.default_backend(), measured=False)
        log(f"{g.describe()} batch {g.batch}: auto {'/'.join(entry['auto'])} (rules: {'/'.join(rules)}), "
            f"jax {'/'.join(entry['jax'])}")
    everything = {}
    if path.exists():
        try:
            everything = json.loads(path.read_text())
        except ValueError:
            everything = {}  # a damaged file is replaced by the new measurements
    everything.setdefault(machine_key(), {}).update(chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(everything, indent=1))
    os.replace(partial, path)
    _table.cache_clear()
    log(f"tuned {len(chosen)} convolution shapes in {time.perf_counter() - start:.1f} s; choices in {path}")
    return chosen


def main(argv=None) -> None:
    import argparse

    from resnet_jax import create_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a create_model name, e.g. resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    overrides = {} if args.in_channels is None else {"in_channels": args.in_channels}
    model = create_model(args.model, dtype=jnp.dtype(args.dtype), **overrides)
    channels = model.in_channels
    tune(model, (args.batch, args.image_size, args.image_size, channels), jnp.dtype(args.dtype), args.repeats)


if __name__ == "__main__":
    main()
