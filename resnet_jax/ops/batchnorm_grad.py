"""BatchNorm's derivative as two primitives: the tangent map and its transpose, the backward pass.

Why primitives: ``batchnorm.py``'s ``custom_jvp`` keeps forward mode, and reverse mode is the transpose of its
tangent map. Written in jnp, XLA derives that transpose and runs it as its own reductions and elementwise
passes, 1.3-1.7x slower on CPU than plain loops (BENCHMARKS.md, 2026-12-04). As a primitive, the tangent map
declares its transpose (``cotangent_p``), and on CPU with the extension the transpose lowers to two C++ passes:
one for the two per-channel sums, one for the input gradient.

    tangent_p(dx, dscale, dbias, [dresidual], x, y, mean, var, scale, coef) -> (dy, dmean, dvar)
    cotangent_p(ct_y, ct_mean, ct_var, x, y, mean, var, scale, coef)      -> (dx, dscale, dbias, [dresidual])

The first three or four operands are the linear ones; ``x, y, mean, var, scale`` are the primal input, output,
batch statistics and scale, ``coef`` the forward's ``(mean, mul, bias)`` (the C++ passes recompute the ReLU's mask
from ``x`` with them where there is no residual, instead of reading ``y``, and centre ``x`` by its mean). Both
primitives evaluate, differentiate (to any order) and ``vmap`` through their jnp reference (``_tangent``,
``_cotangent``), so every transformation stays exact; only the lowering of ``cotangent_p`` with ``extension=True``
runs the C++ passes.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from resnet_jax.ops.jax_compat import (Primitive, ShapedArray, instantiate_zeros, is_undefined_primal, lower_fun,
                                      primitive_batchers, primitive_jvps, primitive_transposes,
                                      prims_requiring_devices, register_lowering)
from resnet_jax.ops.onednn import calls
from resnet_jax.ops.reference_rules import batch_by_reference, jvp_by_reference

tangent_p = Primitive("resnet_jax_batch_norm_tangent")
cotangent_p = Primitive("resnet_jax_batch_norm_cotangent")
tangent_p.multiple_results = cotangent_p.multiple_results = True


def _linear_count(has_residual):
    return 4 if has_residual else 3


def _axes(x):
    return tuple(range(x.ndim - 1))


# --------------------------------------------------------------------------------------- jnp references
def _tangent(*args, relu, epsilon, has_residual, extension, dtypes):
    """The derivative of ``relu(bn(x) + residual), mean, var``, linear in the tangents, in ``x`` and per-channel
    vectors. ``x`` appears only as ``x - mean``, centred before it multiplies: ``x * s - mean * s`` cancels where a
    channel's mean is large against its spread (torch's backward centres too)."""
    del extension, dtypes
    n = _linear_count(has_residual)
    (dx, dscale, dbias), dres = args[:3], (args[3] if has_residual else None)
    x, y, mean, var, scale, _ = args[n:]
    xf, scale_f = x.astype(jnp.float32), scale.astype(jnp.float32)
    r = lax.rsqrt(var + epsilon)
    dxf = dx.astype(jnp.float32)
    dmean = jnp.mean(dxf, _axes(x))
    centred = xf - mean
    dvar = 2.0 * jnp.mean(centred * dxf, _axes(x))
    s = -0.5 * r * r * r * dvar * scale_f + r * dscale.astype(jnp.float32)
    per_channel = -dmean * r * scale_f + dbias.astype(jnp.float32)
    t = (dxf * (r * scale_f) + centred * s + per_channel).astype(y.dtype)
    if dres is not None:
        t = t + dres.astype(y.dtype)
    if relu:
        t = jnp.where(y > 0, t, jnp.zeros_like(t))
    return [t, dmean, dvar]


def _coefficients(sums, x, mean, var, scale, ct_mean, ct_var, epsilon):
    """From the sums ``(sum g, sum g * (x - mean))``: the scale's gradient and ``dx = g * a + (x - mean) * b + c``
    per channel. (The sums centred as they are taken: ``sum g * x - mean * sum g`` cancels; where a channel's mean
    is 1e4 times its spread the scale's gradient was 5e-3 off that way, 7e-4 centred: tests/test_ops_batchnorm.py)"""
    n = x.size // x.shape[-1]
    sum_g, sum_g_centred = sums[0], sums[1]
    r, scale_f = lax.rsqrt(var + epsilon), scale.astype(jnp.float32)
    dscale = r * sum_g_centred
    b = 2.0 * ct_var / n - r * r * scale_f * dscale / n
    c = (ct_mean - r * scale_f * sum_g) / n
    return dscale, sum_g, jnp.stack([r * scale_f, b, c])


def _masked(ct, y, relu):
    return jnp.where(y > 0, ct, jnp.zeros_like(ct)) if relu else ct


def _cotangent(ct, ct_mean, ct_var, x, y, mean, var, scale, coef, *, relu, epsilon, has_residual, extension,
               dtypes):
    """The transpose of ``_tangent``: the backward pass of BatchNorm + residual + ReLU (jnp)."""
    del extension, coef
    g = _masked(ct, y, relu)
    gf, centred = g.astype(jnp.float32), x.astype(jnp.float32) - mean
    sums = jnp.stack([jnp.sum(gf, _axes(x)), jnp.sum(gf * centred, _axes(x))])
    dscale, dbias, coef = _coefficients(sums, x, mean, var, scale, ct_mean, ct_var, epsilon)
    dx = gf * coef[0] + centred * coef[1] + coef[2]
    return _cast([dx, dscale, dbias] + ([g] if has_residual else []), dtypes)


def _cotangent_extension(ct, ct_mean, ct_var, x, y, mean, var, scale, coef, *, relu, epsilon, has_residual,
                         extension, dtypes):
    """``_cotangent`` with its two passes over the tensors in C++ (onednn/csrc/batchnorm.cc)."""
    ct, y = ct.astype(x.dtype), y.astype(x.dtype)
    if has_residual and relu and x.dtype == jnp.float32:
        # the residual's gradient is the masked cotangent g: the sums' pass writes it (over ct, dead after), so no
        # pass of its own reads ct and y again to mask them, and the input gradient reads g unmasked. Float32 only:
        # there the block's first convolution adds g inside its own kernel (fanout.py; the extension's GEMM and
        # Winograd are float32 algorithms); in bfloat16 XLA's add of the two gradients masks ct as it reads it,
        # and writing g first made a ResNet-18-CIFAR step 1% slower (BENCHMARKS.md, 2026-12-06)
        sums, g = calls.batch_norm_grad_sums_masked(ct, y, x, coef)
        dscale, dbias, grad_coef = _coefficients(sums, x, mean, var, scale, ct_mean, ct_var, epsilon)
        dx = calls.batch_norm_grad_apply(g, y, x, grad_coef, coef, False)
        return _cast([dx, dscale, dbias, g], dtypes)
    # without a residual the ReLU's mask is the sign of the forward's BatchNorm, recomputed from x (read anyway) by
    # the forward's own coefficients: y need not be read (BENCHMARKS.md, 2026-12-06, eighth session)
    from_x = relu and not has_residual
    sums = calls.batch_norm_grad_sums(ct, y, x, coef, relu, from_x)
    dscale, dbias, grad_coef = _coefficients(sums, x, mean, var, scale, ct_mean, ct_var, epsilon)
    dx = calls.batch_norm_grad_apply(ct, y, x, grad_coef, coef, relu, from_x)
    # the residual's gradient is the masked cotangent: XLA fuses it into whatever reads it
    return _cast([dx, dscale, dbias] + ([_masked(ct, y, relu)] if has_residual else []), dtypes)


def _cast(values, dtypes):
    return [v.astype(d) for v, d in zip(values, dtypes)]


# ------------------------------------------------------------------------------------------- the rules
def _abstract_tangent(*args, has_residual, **_):
    x, y, mean, var = args[_linear_count(has_residual):][:4]
    return [ShapedArray(y.shape, y.dtype), ShapedArray(mean.shape, mean.dtype), ShapedArray(var.shape, var.dtype)]


def _abstract_cotangent(ct, ct_mean, ct_var, x, y, mean, var, scale, coef, *, has_residual, dtypes, **_):
    shapes = [x.shape, scale.shape, scale.shape] + ([y.shape] if has_residual else [])
    return [ShapedArray(s, d) for s, d in zip(shapes, dtypes)]


def _tangent_transpose(cts, *args, relu, epsilon, has_residual, extension, dtypes):
    n = _linear_count(has_residual)
    linear, primals = args[:n], args[n:]
    ct, ct_mean, ct_var = (instantiate_zeros(c) for c in cts)
    grads = cotangent_p.bind(ct, ct_mean, ct_var, *primals, relu=relu, epsilon=epsilon,
                             has_residual=has_residual, extension=extension, dtypes=dtypes)
    return [g if is_undefined_primal(a) else None for g, a in zip(grads, linear)] + [None] * len(primals)


def _lower_cotangent(*args, extension, **params):
    impl = _cotangent_extension if extension else _cotangent
    return impl(*args, extension=extension, **params)


for _prim, _reference, _abstract in ((tangent_p, _tangent, _abstract_tangent),
                                     (cotangent_p, _cotangent, _abstract_cotangent)):
    _prim.def_impl(_reference)
    _prim.def_abstract_eval(_abstract)
    primitive_jvps[_prim] = jvp_by_reference(_reference)  # linear in some operands, smooth in the rest
    primitive_batchers[_prim] = batch_by_reference(_reference, multiple_results=True)
register_lowering(tangent_p, lower_fun(_tangent, multiple_results=True))
register_lowering(cotangent_p, lower_fun(_lower_cotangent, multiple_results=True))
primitive_transposes[tangent_p] = _tangent_transpose
prims_requiring_devices.add(cotangent_p)  # its C++ calls carry a sharding rule (see linear.py)


def tangent(dx, dscale, dbias, dres, x, y, mean, var, scale, coef, *, relu, epsilon, extension):
    """``(dy, dmean, dvar)``; ``dres`` None when there is no residual; ``coef`` the forward's ``(mean, mul,
    bias)``. Reverse mode transposes this to ``cotangent_p``, which runs in C++ when ``extension``."""
    has_residual = dres is not None
    linear = [dx, dscale, dbias] + ([dres] if has_residual else [])
    dtypes = tuple(jnp.dtype(a.dtype) for a in linear)
    return tangent_p.bind(*linear, x, y, mean, var, scale, coef, relu=bool(relu), epsilon=float(epsilon),
                          has_residual=has_residual, extension=bool(extension), dtypes=dtypes)
