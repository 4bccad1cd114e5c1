"""Measured per-layer choices: time every algorithm on this machine, remember the fastest per pass on disk.

The rules in ``rules.choose`` were measured on a few CPUs; another CPU (more cores, other vector units, a
different cache) can rank the algorithms differently. ``tune(model, input_shape)`` times, for every
convolution shape of a model and each of its three passes, every algorithm that computes it (like cuDNN's
benchmark mode, but explicit: never inside a jitted step), and writes the winners to a cache file that
"auto" and "jax" consult before the rules (``tuning_cache.py``). Given the file, the choice is deterministic.

Any flax model built of ``ops.Conv`` layers can be tuned; the command line builds it by a factory the caller
names (ops/ knows no model), e.g. this package's ``create_model``:

    python -m resnet_jax.ops.tuning resnet_jax:create_model resnet50 --batch 32 --image-size 224
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from resnet_jax.ops import rules, tuning_cache
from resnet_jax.ops.conv import Conv
from resnet_jax.ops.registry import REGISTRY
from resnet_jax.ops.spec import ConvSpec
from resnet_jax.ops.trace import module_calls


def model_specs(model, input_shape: tuple[int, ...], dtype=jnp.float32) -> list[ConvSpec]:
    """Every distinct convolution ``model`` computes on inputs of ``input_shape`` (traced for shapes only)."""
    found: dict[str, ConvSpec] = {}
    for call in module_calls(model, input_shape, dtype):
        if isinstance(call.module, Conv):
            m, x = call.module, call.args[0]
            # the dtype the convolution computes in: bfloat16 is float32 on CPUs without its instructions
            computed = rules.compute_dtype(jnp.dtype(m.dtype or x.dtype).name, "auto", jax.default_backend())
            x = jax.ShapeDtypeStruct(x.shape, computed)
            kernel = jax.ShapeDtypeStruct((*m.kernel_size, x.shape[-1] // m.feature_group_count, m.features), x.dtype)
            spec = ConvSpec.of(x, kernel, m.strides, m.padding, m.feature_group_count, m.kernel_dilation)
            found.setdefault(spec.key(), spec)
    return list(found.values())


def _pass_runner(name: str, pass_name: str, spec: ConvSpec) -> Callable[[], Any]:
    algorithm = REGISTRY[name]
    keys = jax.random.split(jax.random.key(0), 3)
    x, kernel, dy = (jax.random.normal(k, shape).astype(spec.dtype)
                     for k, shape in zip(keys, (spec.x_shape, spec.kernel_shape, spec.y_shape)))
    fn = jax.jit(lambda a, b: getattr(algorithm, pass_name)(a, b, spec))
    args = {"forward": (x, kernel), "input_grad": (dy, kernel), "kernel_grad": (x, dy)}[pass_name]
    return lambda: jax.block_until_ready(fn(*args))


def measure(spec: ConvSpec, repeats: int = 3, candidates=None) -> dict[str, dict[str, float]]:
    """Median seconds of each pass of each algorithm (of ``candidates``, default all) that computes ``spec``
    here: {pass: {algorithm: seconds}}."""
    names = [n for n in candidates or REGISTRY if REGISTRY[n].refusal(spec, jax.default_backend()) is None]
    seconds: dict[str, dict[str, float]] = {p: {} for p in rules.PASSES}
    for pass_name in rules.PASSES:
        for name in names:
            run = _pass_runner(name, pass_name, spec)
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
    this machine in the tuning file (merged with what is there) and return {spec key: choice}. ``candidates``
    limits the algorithms timed (default: all of ``ops.ALGORITHMS``); "xla" is always one of them."""
    path = tuning_cache.cache_file()
    if path is None:
        raise ValueError(f"{tuning_cache.ENV_VAR}=0 turns tuning off; unset it to tune")
    if len(input_shape) != 4 or min(input_shape) < 1:  # a batch of 0 divided by zero in the measuring
        raise ValueError(f"input_shape must be (batch, height, width, channels), each 1 or more (--batch, "
                         f"--image-size and the input channels on the command line), got {tuple(input_shape)}")
    if repeats < 1:
        raise ValueError(f"repeats must be 1 or more (each time is the median of that many runs), got {repeats}")
    if path.is_dir():
        raise ValueError(f"{tuning_cache.ENV_VAR} names the directory {path}; name the file to write in it, e.g. "
                         f"{path / 'tuning.json'}")
    try:  # before measuring: the measurements were taken, then lost to a file that could not be written
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} is not writable")
    except OSError as err:
        raise ValueError(f"cannot write the tuning file {path} ({err}); point {tuning_cache.ENV_VAR} at a file in a "
                         f"writable directory") from None
    if candidates is not None:
        unknown = sorted(set(candidates) - set(REGISTRY))
        if unknown:
            raise ValueError(f"unknown convolution algorithm(s) {unknown}; choose from {list(REGISTRY)}")
        candidates = ["xla", *candidates]
    start = time.perf_counter()
    chosen = {}
    for spec in model_specs(model, input_shape, dtype):
        seconds = measure(spec, repeats, candidates)
        pure = {p: {n: t for n, t in by.items() if not REGISTRY[n].cpu_only} for p, by in seconds.items()}
        entry = {"auto": [min(seconds[p], key=seconds[p].get) for p in rules.PASSES],
                 "jax": [min(pure[p], key=pure[p].get) for p in rules.PASSES], "seconds": seconds}
        chosen[spec.key()] = entry
        by_rules = rules.choose(spec, jax.default_backend(), measured=False)
        log(f"{spec.describe()} batch {spec.batch}: auto {'/'.join(entry['auto'])} (rules: {'/'.join(by_rules)}), "
            f"jax {'/'.join(entry['jax'])}")
    path = tuning_cache.store(rules.machine_key(), chosen)
    log(f"tuned {len(chosen)} convolution shapes in {time.perf_counter() - start:.1f} s; choices in {path}")
    return chosen


def factory(path: str) -> Callable[..., Any]:
    """The function ``"module:name"`` names, or ``ValueError`` saying what was wrong."""
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"cannot import the model factory {path!r}; name it as module:function, e.g. "
                         "resnet_jax:create_model") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("factory", help="module:function that builds a flax model from its name, e.g. "
                                   "resnet_jax:create_model")
    p.add_argument("model", help="the model's name for that factory, e.g. resnet50")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--in-channels", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    overrides = {} if args.in_channels is None else {"in_channels": args.in_channels}
    try:
        model = factory(args.factory)(args.model, dtype=jnp.dtype(args.dtype), **overrides)
    except ValueError as err:
        p.error(str(err))
    channels = args.in_channels or getattr(model, "in_channels", 3)
    try:
        tune(model, (args.batch, args.image_size, args.image_size, channels), jnp.dtype(args.dtype), args.repeats)
    except ValueError as err:  # what tune refuses before measuring: one line, as the factory's errors
        p.error(str(err))


if __name__ == "__main__":
    main()
