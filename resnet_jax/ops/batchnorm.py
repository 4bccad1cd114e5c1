"""Training-mode BatchNorm, the residual add and the ReLU as one function with a hand-written derivative.

Why: differentiated automatically, ``relu(batchnorm(x) + residual)`` makes XLA save ``x - mean`` for the backward
pass (a full extra write and read of every activation) and reduce the gradient in separate passes. On CPU these
passes, not arithmetic, are what BatchNorm costs (BENCHMARKS.md). Here the forward pass reduces ``x`` once (mean
and mean of squares, as flax's ``use_fast_variance``, but of ``x`` shifted by its first pixel, which keeps the
variance exact where a channel's mean is large against its spread: ``_stats``) and writes the output once.

The derivative is a ``custom_jvp`` whose tangent map is a primitive, linear and written in ``x`` and
per-channel vectors only (``batchnorm_grad.py``): forward mode (``jvp``, ``linearize``, Hessian-vector products)
evaluates it, and reverse mode is its declared transpose, which keeps only ``x`` and the output, both of which
exist anyway. (A ``custom_vjp`` would save the same memory but takes forward mode away on every backend.) On
CPU, where the model's convolutions may use the oneDNN extension, the passes over the tensors (the statistics
and the normalisation forward, the gradient's sums and the input gradient backward) run as its C++ loops:
XLA:CPU ran them 1.3-1.7x slower (BENCHMARKS.md, 2026-12-04).

The forward values are ``flax.linen.BatchNorm``'s followed by the add and ReLU, within float32 rounding (the
statistics' sums shifted; the normalisation in flax's operations and order). The derivative is exact
(per-channel statistics included, so a loss on the returned mean/variance differentiates correctly too); it
equals automatic differentiation within float32 rounding.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.ops import batchnorm_grad
from resnet_jax.ops.jax_compat import SymbolicZero
from resnet_jax.ops.onednn import calls
from resnet_jax.ops.rules import may_use_extension


def batch_norm_act(x, scale, bias, residual=None, *, relu: bool = False, epsilon: float = 1e-5, dtype=None,
                   extension: bool = False):
    """``(relu(bn(x) + residual), mean, var)`` with batch statistics over every axis but the last (NHWC).

    ``mean``/``var`` are float32 per-channel statistics (for the running averages); ``dtype`` is the output's
    dtype (default ``x.dtype``). ``extension``: run the passes over the tensors (forward and backward) as the
    oneDNN extension's C++ loops (CPU only; ``rules.may_use_extension`` says when), where the dtypes allow
    (float32 or bfloat16, input, residual and output alike); the values are the same either way.
    """
    out_dtype = jnp.dtype(dtype or x.dtype)
    fits = (x.dtype == out_dtype and out_dtype in (jnp.float32, jnp.bfloat16)
            and (residual is None or residual.dtype == out_dtype) and x.ndim >= 2)
    return _bn_act(x, scale, bias, residual, relu, float(epsilon), out_dtype, bool(extension and fits))[:3]


def _stats(x, extension):
    """Mean and (biased) variance per channel, from sums of ``d = x - shift`` with ``shift`` the first pixel's
    value: ``E[d^2] - E[d]^2`` is the variance exactly, and keeps float32 precision where a channel's mean is
    large against its spread, which flax's ``E[x^2] - mean^2`` (its fast variance) does not: at a mean 1e4 times
    the spread it gave a variance of 0 (outputs ~100x too large, gradients 1e6x off); torch's two-pass variance
    is the reference. One pass over ``x`` either way."""
    first = x.reshape(-1, x.shape[-1])[0] if x.size else jnp.zeros(x.shape[-1])
    shift = lax.stop_gradient(first.astype(jnp.float32))  # a constant: the sums move by it exactly
    n = x.size // x.shape[-1]
    if extension:
        sums = calls.batch_norm_sums(x, shift)
        mean_d, mean_d2 = sums[0] / n, sums[1] / n
    else:
        d, axes = x.astype(jnp.float32) - shift, tuple(range(x.ndim - 1))
        mean_d, mean_d2 = jnp.mean(d, axes), jnp.mean(lax.square(d), axes)
    return shift + mean_d, jnp.maximum(0.0, mean_d2 - lax.square(mean_d))


def _forward(x, scale, bias, residual, relu, epsilon, out_dtype, extension):
    """``(y, mean, var, coef)``: ``coef = (mean, mul, bias)`` per channel is what the normalisation applied, so the
    backward pass can recompute the ReLU's mask from ``x`` with the very same values instead of reading ``y``."""
    mean, var = _stats(x, extension)
    mul = lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
    coef = jnp.stack([mean, mul, bias.astype(jnp.float32)])
    if extension:
        return calls.batch_norm_apply(x, coef, residual, relu), mean, var, coef
    y = ((x.astype(jnp.float32) - mean) * mul + bias.astype(jnp.float32)).astype(out_dtype)
    if residual is not None:
        y = y + residual
    if relu:
        y = jax.nn.relu(y)
    return y, mean, var, coef


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _bn_act(x, scale, bias, residual, relu, epsilon, out_dtype, extension):
    return _forward(x, scale, bias, residual, relu, epsilon, out_dtype, extension)


@functools.partial(_bn_act.defjvp, symbolic_zeros=True)
def _bn_act_jvp(relu, epsilon, out_dtype, extension, primals, tangents):
    """The derivative is ``batchnorm_grad.tangent``, a primitive linear in ``(dx, dscale, dbias, dresidual)``:
    forward mode evaluates it, and reverse mode is its declared transpose, the backward pass (in C++ with
    ``extension``). It reads ``x``, the output and the forward's per-channel coefficients, which exist anyway,
    and never a saved ``x - mean``. (The coefficients are an output of ``_bn_act`` only so that the backward
    pass gets the forward's own; ``batch_norm_act`` drops them, and their tangent is exact all the same.)"""
    x, scale, bias, residual = primals
    dx, dscale, dbias, dresidual = (None if type(t) is SymbolicZero else t for t in tangents)
    y, mean, var, coef = _bn_act(x, scale, bias, residual, relu, epsilon, out_dtype, extension)  # higher orders
    dx = jnp.zeros_like(x) if dx is None else dx
    dscale = jnp.zeros_like(scale) if dscale is None else dscale
    dbias = jnp.zeros_like(bias) if dbias is None else dbias
    if residual is not None and dresidual is None:
        # a residual that is not differentiated (a frozen branch, a stop_gradient) is still in the forward's sum:
        # the derivative must know it, or the ReLU's mask is rebuilt from bn(x) alone, without the residual
        dresidual = jnp.zeros_like(residual)
    t, dmean, dvar = batchnorm_grad.tangent(dx, dscale, dbias, dresidual, x, y, mean, var, scale, coef, relu=relu,
                                            epsilon=epsilon, extension=extension)
    r = lax.rsqrt(var + epsilon)
    dmul = r * dscale.astype(jnp.float32) - 0.5 * r * r * r * dvar * scale.astype(jnp.float32)
    return (y, mean, var, coef), (t, dmean, dvar, jnp.stack([dmean, dmul, dbias.astype(jnp.float32)]))


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` (same fields and variables) that also takes the block's epilogue:
    ``__call__(x, residual=None, relu=False)`` is ``relu(bn(x) + residual)``.

    The running variance averages in the *unbiased* batch variance (times n / (n - 1), n values per channel),
    as ``torch.nn.BatchNorm2d`` does, where flax averages the biased one: these models' weights go to and come
    from torchvision and timm, and with small batches or feature maps the two drift apart (3% at n = 8). As in
    torch, training on one value per channel is refused: its normalised output is 0 whatever the input. With a
    ``mask`` or an ``axis_name`` (statistics over a masked or a named-axis count, which the models never use) the
    running variance stays flax's biased one.

    In training mode over NHWC features the three run as ``batch_norm_act`` (one reduction and one write each
    way), in C++ where ``rules.may_use_extension(conv_impl, backend)`` allows (the model passes its own
    ``conv_impl``, as it does to the max-pool). Anything else (evaluation, initialisation, ``axis_name``/``mask``
    statistics, a non-last feature axis, no scale or bias) runs flax's own BatchNorm, then the add and ReLU.
    """

    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, residual=None, relu: bool = False, use_running_average: bool | None = None, *,
                 mask=None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        training = not use_running_average and not self.is_initializing()
        # values each channel's statistics reduce over (where it is known here: one feature axis, no mask, no
        # statistics shared over a named axis)
        plain = mask is None and self.axis_name is None and isinstance(self.axis, int) and x.ndim > 0
        per_channel = x.size // x.shape[self.axis] if plain else 0
        if training and per_channel == 1:
            raise ValueError(f"BatchNorm cannot train on one value per channel (input of shape {x.shape}): its "
                             "output would be 0 for any input; use a larger batch or larger images")
        fused = (training and plain and self.axis in (-1, x.ndim - 1) and self.use_scale and self.use_bias
                 and self.use_fast_variance and self.force_float32_reductions)
        if not fused:
            before = self.get_variable("batch_stats", "var") if training else None
            y = super().__call__(x, mask=mask, **({} if self.use_running_average is not None
                                                  else {"use_running_average": use_running_average}))
            if training and plain:
                # flax has averaged in the biased variance v: new = m * before + (1 - m) * v; add torch's
                # correction (1 - m) * v / (n - 1) = (new - m * before) / (n - 1)
                ra_var = self.variable("batch_stats", "var")
                ra_var.value = ra_var.value + (ra_var.value - self.momentum * before) / (per_channel - 1)
            y = y if residual is None else y + residual
            return jax.nn.relu(y) if relu else y
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        extension = may_use_extension(self.conv_impl, jax.default_backend())
        y, mean, var = batch_norm_act(x, scale, bias, residual, relu=relu, epsilon=self.epsilon, dtype=dtype,
                                      extension=extension)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * (per_channel / (per_channel - 1))
        return y
