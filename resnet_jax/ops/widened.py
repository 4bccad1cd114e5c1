"""Algorithms computed in float32 inside a bfloat16 model: "NAME@float32" upcasts the operands, runs NAME's pass
in float32 and rounds the result back once.

Why: some passes of a bfloat16 model run faster in float32 than in bfloat16. oneDNN's bfloat16 kernel gradient
reduces over batch x pixels, few of them on small images, and there it runs at half its forward's rate, while
the float32-only Winograd F(4,3) kernel gradient does fewer multiplies: on ResNet-18-CIFAR's 4x4x512 layers
(batch 128) 10-15 ms against 19-31 ms, upcast included (BENCHMARKS.md, issue 33). A choice names one algorithm
per pass, so "auto" (or a caller: ``"onednn/onednn/onednn_winograd_f4@float32"``) can take the float32 pass
where it wins and keep bfloat16 elsewhere. The activations between layers stay bfloat16; only this pass's
operands are widened, and its result is as accurate as the float32 algorithm's, rounded once.

On float32 inputs "NAME@float32" is NAME itself. Only algorithms that compute in float32 are widened. The
extension's Winograd has since learnt to read and write bfloat16 activations itself (the same arithmetic without
the three conversion passes, bit for bit the detour's result; an input gradient summed into another rounds once
where the detour rounds twice), so "auto" takes it directly; its "@float32" forms stay for tuning files and
callers that name them.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from resnet_jax.ops.onednn import algorithms as onednn_algorithms
from resnet_jax.ops.spec import Algorithm, ConvSpec

SUFFIX = "@float32"
WIDENED = ("onednn_gemm", "onednn_winograd_f2", "onednn_winograd_f4")  # they compute in float32 only


def _float32(spec: ConvSpec) -> ConvSpec:
    return dataclasses.replace(spec, dtype="float32")


def widened(base: Algorithm) -> Algorithm:
    """``base`` computed in float32 for any floating dtype: every pass upcasts its two operands and rounds its
    result to the operands' dtype."""
    def up(a):
        return None if a is None else a.astype(jnp.float32)

    def pass_of(fn):
        return lambda a, b, spec: fn(up(a), up(b), _float32(spec)).astype(spec.dtype)

    def limits(spec: ConvSpec) -> str | None:
        if not jnp.issubdtype(jnp.dtype(spec.dtype), jnp.floating):
            return f"computes floating-point convolutions only, not {spec.dtype}"
        return base.limits(_float32(spec))

    fused = None
    if base.fused_forward is not None:
        def fused(x, kernel, spec, bias=None, residual=None, relu=False):
            y = base.fused_forward(up(x), up(kernel), _float32(spec), up(bias), up(residual), relu)
            return y.astype(spec.dtype)

    # no in-kernel sum: the base's would sum in float32 what this pass rounds to bfloat16 first
    return Algorithm.wrapping(base, SUFFIX, forward=pass_of(base.forward), input_grad=pass_of(base.input_grad),
                              kernel_grad=pass_of(base.kernel_grad), limits=limits, dilated=base.dilated,
                              fused_forward=fused)


ALGORITHMS = tuple(widened(a) for a in onednn_algorithms.ALGORITHMS if a.name in WIDENED)
