"""Training-mode BatchNorm, the residual add and the ReLU as one function with a hand-written gradient.

Why: differentiated automatically, ``relu(batchnorm(x) + residual)`` makes XLA save ``x - mean`` for the backward
pass (a full extra write and read of every activation) and reduce the gradient in three separate passes. On CPU
these passes, not arithmetic, are what BatchNorm costs: a ResNet-50 training step spent ~0.9 s of thread time in
them against ~1.7 s in all its convolutions (BENCHMARKS.md). Here the forward pass reduces ``x`` once (mean and
mean of squares, as flax's ``use_fast_variance``) and writes the output once; the backward pass reduces once
(two per-channel sums) and writes ``dx`` (and the residual's gradient) once, keeping only ``x`` and the output,
both of which exist anyway.

The forward values are computed with the same operations in the same order as ``flax.linen.BatchNorm`` followed
by the add and ReLU. The gradient is the exact derivative of that function (per-channel statistics included,
so a loss on the returned mean/variance differentiates correctly too); it equals automatic differentiation
within float32 rounding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _bn_act(x, scale, bias, residual, relu, epsilon, out_dtype):
    return _forward(x, scale, bias, residual, relu, epsilon, out_dtype)


def _bn_act_fwd(x, scale, bias, residual, relu, epsilon, out_dtype):
    y, mean, var = _forward(x, scale, bias, residual, relu, epsilon, out_dtype)
    return (y, mean, var), (x, scale, bias, residual, y, mean, var)


def _bn_act_bwd(relu, epsilon, out_dtype, saved, cotangents):
    x, scale, bias, residual, y, mean, var = saved
    dy, dmean, dvar = cotangents
    axes = tuple(range(x.ndim - 1))
    count = x.size // x.shape[-1]
    g = jnp.where(y > 0, dy, jnp.zeros_like(dy)) if relu else dy
    gf = g.astype(jnp.float32)
    xc = x.astype(jnp.float32) - mean
    r = lax.rsqrt(var + epsilon)
    mul = r * scale.astype(jnp.float32)
    dbias = jnp.sum(gf, axes)
    g_xc = jnp.sum(gf * xc, axes)
    # var = E[x^2] - mean^2 and x - mean both depend on the mean; d(rsqrt(v + eps))/dv = -r^3 / 2
    dvar_total = dvar - 0.5 * g_xc * scale.astype(jnp.float32) * r * r * r
    b = 2.0 * dvar_total / count
    c = (dmean - mul * dbias) / count
    dx = (gf * mul + xc * b + c).astype(x.dtype)
    dresidual = None if residual is None else g.astype(residual.dtype)
    return dx, (g_xc * r).astype(scale.dtype), dbias.astype(bias.dtype), dresidual


_bn_act.defvjp(_bn_act_fwd, _bn_act_bwd)


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
