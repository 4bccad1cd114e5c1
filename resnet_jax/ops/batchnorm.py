"""Training-mode BatchNorm, the residual add and the ReLU as one function with a hand-written derivative.

Why: differentiated automatically, ``relu(batchnorm(x) + residual)`` makes XLA save ``x - mean`` for the backward
pass (a full extra write and read of every activation) and reduce the gradient in separate passes. On CPU these
passes, not arithmetic, are what BatchNorm costs (BENCHMARKS.md). Here the forward pass reduces ``x`` once (mean
and mean of squares, as flax's ``use_fast_variance``) and writes the output once.

The derivative is a ``custom_jvp`` whose tangent map is linear and written in ``x`` and per-channel vectors
only: forward mode (``jvp``, ``linearize``, Hessian-vector products) uses it directly, and reverse mode is its
transpose, which keeps only ``x`` and the output, both of which exist anyway. (A ``custom_vjp`` would save the
same memory but takes forward mode away on every backend.)

The forward values are computed with the same operations in the same order as ``flax.linen.BatchNorm`` followed
by the add and ReLU. The derivative is exact (per-channel statistics included, so a loss on the returned
mean/variance differentiates correctly too); it equals automatic differentiation within float32 rounding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.ops.jax_compat import SymbolicZero


def batch_norm_act(x, scale, bias, residual=None, *, relu: bool = False, epsilon: float = 1e-5, dtype=None):
    """``(relu(bn(x) + residual), mean, var)`` with batch statistics over every axis but the last (NHWC).

    ``mean``/``var`` are float32 per-channel statistics (for the running averages); ``dtype`` is the output's
    dtype (default ``x.dtype``).
    """
    out_dtype = jnp.dtype(dtype or x.dtype)
    return _bn_act(x, scale, bias, residual, relu, float(epsilon), out_dtype)


def _stats(x):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(0.0, jnp.mean(lax.square(xf), axes) - lax.square(mean))
    return xf, mean, var


def _forward(x, scale, bias, residual, relu, epsilon, out_dtype):
    xf, mean, var = _stats(x)
    mul = lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
    y = ((xf - mean) * mul + bias.astype(jnp.float32)).astype(out_dtype)
    if residual is not None:
        y = y + residual
    if relu:
        y = jax.nn.relu(y)
    return y, mean, var


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _bn_act(x, scale, bias, residual, relu, epsilon, out_dtype):
    return _forward(x, scale, bias, residual, relu, epsilon, out_dtype)


@functools.partial(_bn_act.defjvp, symbolic_zeros=True)
def _bn_act_jvp(relu, epsilon, out_dtype, primals, tangents):
    """The derivative as a tangent map that is linear in ``(dx, dscale, dbias, dresidual)``: forward mode uses
    it as it is, and reverse mode is its transpose, which XLA derives. Written in ``x`` and per-channel vectors
    only (``(x - mean) * s`` as ``x * s - mean * s``), so the transpose keeps ``x`` and the output, which exist
    anyway, and never a saved ``x - mean``."""
    x, scale, bias, residual = primals
    dx, dscale, dbias, dresidual = (None if type(t) is SymbolicZero else t for t in tangents)
    y, mean, var = _bn_act(x, scale, bias, residual, relu, epsilon, out_dtype)  # higher orders: this rule again
    axes = tuple(range(x.ndim - 1))
    xf, scale_f = x.astype(jnp.float32), scale.astype(jnp.float32)
    r = lax.rsqrt(var + epsilon)
    zero = jnp.zeros_like(mean)
    dmean = dvar = per_channel = zero
    t = None
    if dx is not None:
        dxf = dx.astype(jnp.float32)
        dmean = jnp.mean(dxf, axes)
        dvar = 2.0 * (jnp.mean(xf * dxf, axes) - mean * dmean)
        t = dxf * (r * scale_f)
        per_channel = -dmean * r * scale_f
    # d[(x - mean) * r * scale] for the statistics and the scale: (x - mean) * s with one per-channel s
    s = -0.5 * r * r * r * dvar * scale_f + (zero if dscale is None else r * dscale.astype(jnp.float32))
    per_channel = per_channel - mean * s + (zero if dbias is None else dbias.astype(jnp.float32))
    t = xf * s + per_channel if t is None else t + xf * s + per_channel
    t = t.astype(out_dtype)
    if dresidual is not None:
        t = t + dresidual.astype(out_dtype)
    if relu:
        t = jnp.where(y > 0, t, jnp.zeros_like(t))
    return (y, mean, var), (t, dmean, dvar)


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` (same fields, variables and running-average update) that also takes the
    block's epilogue: ``__call__(x, residual=None, relu=False)`` is ``relu(bn(x) + residual)``.

    In training mode over NHWC features the three run as ``batch_norm_act`` (one reduction and one write each
    way). Anything else (evaluation, initialisation, ``axis_name``/``mask`` statistics, a non-last feature axis,
    no scale or bias) runs flax's own BatchNorm, then the add and ReLU.
    """

    @nn.compact
    def __call__(self, x, residual=None, relu: bool = False, use_running_average: bool | None = None, *,
                 mask=None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        fused = (not use_running_average and not self.is_initializing() and mask is None
                 and self.axis_name is None and self.axis in (-1, x.ndim - 1) and self.use_scale
                 and self.use_bias and self.use_fast_variance and self.force_float32_reductions)
        if not fused:
            y = super().__call__(x, mask=mask, **({} if self.use_running_average is not None
                                                  else {"use_running_average": use_running_average}))
            y = y if residual is None else y + residual
            return jax.nn.relu(y) if relu else y
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        y, mean, var = batch_norm_act(x, scale, bias, residual, relu=relu, epsilon=self.epsilon, dtype=dtype)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
