"""The max-pool's tangent map as two primitives, each the other's transpose, so that its backward can run in C++.

Why primitives: ``pool.py``'s ``custom_jvp`` keeps forward mode, and reverse mode transposes its tangent map.
Written in jnp, XLA derives that transpose as one padded, strided term per window tap summed into the input's
shape: 69 ms of a ResNet-50 float32 training step for the stem's pool on AVX2 (BENCHMARKS.md). As a primitive,
the tangent map declares its transpose (``unroute_p``), which with the extension lowers to one C++ pass
(``onednn/csrc/maxpool.cc``).

    route_p(dx, first)   -> t:  each window's tangent, that of its first maximum (tap ``first``, row-major)
    unroute_p(ct, first) -> dx: each window's cotangent added onto that tap's input pixel

Both are linear in their first operand; ``first`` (int8) comes from the primal. Both evaluate, differentiate and
``vmap`` through their jnp references, as ``batchnorm_grad.py``'s primitives do; only ``unroute_p``'s lowering
with ``extension=True`` runs the C++ pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from resnet_jax.ops.jax_compat import (Primitive, ShapedArray, instantiate_zeros, lower_fun, primitive_batchers,
                                      primitive_jvps, primitive_transposes, prims_requiring_devices,
                                      register_lowering)
from resnet_jax.ops.onednn import calls
from resnet_jax.ops.reference_rules import batch_by_reference
from resnet_jax.ops.spec import output_size

route_p = Primitive("resnet_jax_max_pool_route")
unroute_p = Primitive("resnet_jax_max_pool_unroute")


def taps(x, window, strides, padding, fill):
    """The strided views of ``x`` padded with ``fill``, one per window position (row-major), each (N, Ho, Wo, C)."""
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, padding
    ho, wo = output_size(x.shape[1], kh, sh, top, bottom), output_size(x.shape[2], kw, sw, left, right)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    return [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]


# --------------------------------------------------------------------------------------- jnp references
def _route(dx, first, *, window, strides, padding, x_shape, extension):
    del x_shape, extension
    t = None
    for k, dtap in enumerate(taps(dx, window, strides, padding, 0)):
        term = jnp.where(first == k, dtap, jnp.zeros_like(dtap))
        t = term if t is None else t + term
    return t


def _unroute(ct, first, *, window, strides, padding, x_shape, extension):
    route = functools.partial(_route, first=first, window=window, strides=strides, padding=padding,
                              x_shape=x_shape, extension=extension)
    return jax.linear_transpose(route, jax.ShapeDtypeStruct(x_shape, ct.dtype))(ct)[0]


def _lower_unroute(ct, first, *, extension, **params):
    if extension and ct.dtype == jnp.float32:
        return calls.max_pool_grad(ct, first, params["x_shape"], params["window"], params["strides"],
                                   params["padding"])
    return _unroute(ct, first, extension=extension, **params)


# ------------------------------------------------------------------------------------------- the rules
def pooled_shape(shape, window, strides, padding):
    """The pool's output shape for an NHWC input of ``shape``."""
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, padding
    n, h, w, c = shape
    return (n, output_size(h, kh, sh, top, bottom), output_size(w, kw, sw, left, right), c)


def _abstract_route(dx, first, *, window, strides, padding, **_):
    return ShapedArray(pooled_shape(dx.shape, window, strides, padding), dx.dtype)


def _abstract_unroute(ct, first, *, x_shape, **_):
    return ShapedArray(x_shape, ct.dtype)


def _transpose_to(other):
    """The transpose of one primitive: the other, on the cotangent (``first`` is never differentiated)."""
    def rule(ct, linear, first, **params):
        return [other.bind(instantiate_zeros(ct), first, **params), None]
    return rule


def _jvp(prim):
    """Linear in the first operand, constant in ``first``: the tangent is the primitive of the tangent."""
    def rule(primals, tangents, **params):
        (a, first), (da, _) = primals, tangents
        return prim.bind(a, first, **params), prim.bind(instantiate_zeros(da), first, **params)
    return rule


for _prim, _reference, _abstract, _other in ((route_p, _route, _abstract_route, unroute_p),
                                             (unroute_p, _unroute, _abstract_unroute, route_p)):
    _prim.def_impl(_reference)
    _prim.def_abstract_eval(_abstract)
    primitive_jvps[_prim] = _jvp(_prim)
    primitive_batchers[_prim] = batch_by_reference(_reference, multiple_results=False)
    primitive_transposes[_prim] = _transpose_to(_other)
register_lowering(route_p, lower_fun(_route, multiple_results=False))
register_lowering(unroute_p, lower_fun(_lower_unroute, multiple_results=False))
prims_requiring_devices.add(unroute_p)  # its C++ call carries a sharding rule (see linear.py)


def route(dx, first, window, strides, padding, extension: bool):
    """Each window's tangent from ``dx``: that of the tap ``first`` names. Reverse mode transposes this to
    ``unroute_p``, which runs in C++ when ``extension`` (and the tangent is float32)."""
    return route_p.bind(dx, first, window=tuple(window), strides=tuple(strides),
                        padding=tuple(tuple(p) for p in padding), x_shape=tuple(dx.shape), extension=bool(extension))
