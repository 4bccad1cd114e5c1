"""A convolution whose input also goes elsewhere, as primitives whose backward sums the two gradients in one pass.

Why: in a residual block the input ``x`` feeds the first convolution and the shortcut (``x`` itself, or its
downsampling). Autodiff sums the two cotangents at ``x`` (``dx = input_grad(ct_y, k) + ct_shortcut``) as a
separate elementwise pass, which reads both and writes the sum: on CPU, where these passes cost bandwidth and not
arithmetic, that pass over every block's input was ~2% of a float32 ResNet-50 step (BENCHMARKS.md, issue 33).
An algorithm that can add into its input gradient's output as it writes it (oneDNN's GEMM with a ``sum``
post-op, the extension's Winograd with its residual) makes the sum free, but only a primitive that sees both
cotangents can ask for it, so:

    fanout_p(x, k)                    -> (conv(x, k), x)           the convolution, and x passed through
    input_grad_sum_p(dy, k, acc)      -> input_grad(dy, k) + acc   its transpose in x, both cotangents at once

``conv.conv2d(..., fan_out=True)`` puts ``fanout_p`` in the tangent map (so it is in every derivative) and the
block takes its shortcut from the pass-through output. Both primitives are linear in their image operands (``x``;
``dy`` and ``acc``) for a fixed kernel; the kernel's own derivative terms are ``linear.py``'s primitives, so
forward mode, every higher order and the kernel gradient stay exactly what they were. ``vmap`` runs them through
their definition by ``linear.py``'s primitives (no sum fused, the same values).
"""

from __future__ import annotations

import functools
import operator

import jax

from resnet_jax.ops import linear
from resnet_jax.ops.jax_compat import (Primitive, ShapedArray, Zero, is_undefined_primal, lower_fun,
                                      primitive_batchers, primitive_jvps, primitive_transposes,
                                      prims_requiring_devices, register_lowering)
from resnet_jax.ops.reference_rules import batch_by_reference
from resnet_jax.ops.registry import REGISTRY

fanout_p = Primitive("resnet_jax_conv_fanout")
fanout_p.multiple_results = True
input_grad_sum_p = Primitive("resnet_jax_conv_input_grad_sum")


def _fanout(x, k, *, passes, spec):
    return [REGISTRY[passes[0]].forward(x, k, spec).astype(x.dtype), x]


def _input_grad_sum(dy, k, acc, *, passes, spec):
    return REGISTRY[passes[1]].input_grad_plus(dy, k, spec, acc).astype(acc.dtype)


fanout_p.def_abstract_eval(lambda x, k, *, passes, spec: [ShapedArray(spec.y_shape, x.dtype),
                                                          ShapedArray(x.shape, x.dtype)])
input_grad_sum_p.def_abstract_eval(lambda dy, k, acc, *, passes, spec: ShapedArray(acc.shape, acc.dtype))
fanout_p.def_impl(_fanout)
input_grad_sum_p.def_impl(_input_grad_sum)
register_lowering(fanout_p, lower_fun(_fanout, multiple_results=True))
register_lowering(input_grad_sum_p, lower_fun(_input_grad_sum, multiple_results=False))
prims_requiring_devices.update((fanout_p, input_grad_sum_p))  # the extension's sharding rules, as linear.py


# ------------------------------------------------------------------------------------------------ forward mode
def _absent(t) -> bool:
    return type(t) is Zero


def _fanout_jvp(primals, tangents, *, passes, spec):
    """``(conv(dx, k) + conv(x, dk), dx)``: the x-part is this primitive again, the k-part ``linear.conv_p``."""
    (x, k), (dx, dk) = primals, tangents
    out = fanout_p.bind(x, k, passes=passes, spec=spec)
    if _absent(dx):
        ty, tx = None, Zero(jax.core.get_aval(x).to_tangent_aval())
    else:
        ty, tx = fanout_p.bind(dx, k, passes=passes, spec=spec)
    if not _absent(dk):
        tk = linear.conv_p.bind(x, dk, passes=passes, spec=spec)
        ty = tk if ty is None else ty + tk
    if ty is None:
        ty = Zero(jax.core.get_aval(out[0]).to_tangent_aval())
    return out, [ty, tx]


def _input_grad_sum_jvp(primals, tangents, *, passes, spec):
    """``input_grad(ddy, k) + dacc + input_grad(dy, dk)``: again this primitive where both image tangents are
    there, ``linear.input_grad_p`` for the kernel's term."""
    (dy, k, acc), (ddy, dk, dacc) = primals, tangents
    out = input_grad_sum_p.bind(dy, k, acc, passes=passes, spec=spec)
    terms = []
    if not _absent(ddy) and not _absent(dacc):
        terms.append(input_grad_sum_p.bind(ddy, k, dacc, passes=passes, spec=spec))
    elif not _absent(ddy):
        terms.append(linear.input_grad_p.bind(ddy, k, passes=passes, spec=spec).astype(out.dtype))
    elif not _absent(dacc):
        terms.append(dacc)
    if not _absent(dk):
        terms.append(linear.input_grad_p.bind(dy, dk, passes=passes, spec=spec).astype(out.dtype))
    if not terms:
        return out, Zero(jax.core.get_aval(out).to_tangent_aval())
    return out, functools.reduce(operator.add, terms)


primitive_jvps[fanout_p] = _fanout_jvp
primitive_jvps[input_grad_sum_p] = _input_grad_sum_jvp


# -------------------------------------------------------------------------------------------------- transposes
def _fanout_transpose(cts, x, k, *, passes, spec):
    """In ``x`` (the only operand the tangent maps above make it linear in): ``input_grad(ct_y, k) + ct_x``, one
    pass where both cotangents are there."""
    if is_undefined_primal(k) or not is_undefined_primal(x):
        raise NotImplementedError("fanout_p is linear in its input only (its kernel's terms are linear.conv_p)")
    ct_y, ct_x = cts
    if _absent(ct_y):
        return [None if _absent(ct_x) else ct_x, None]
    if _absent(ct_x):
        return [linear.input_grad_p.bind(ct_y, k, passes=passes, spec=spec), None]
    return [input_grad_sum_p.bind(ct_y, k, ct_x, passes=passes, spec=spec), None]


def _input_grad_sum_transpose(ct, dy, k, acc, *, passes, spec):
    """In ``(dy, acc)``: ``(conv(ct, k), ct)``; in ``k`` alone (then the map is ``input_grad(dy, k)``, linear):
    ``kernel_grad(ct, dy)``, as ``linear.input_grad_p``'s transpose."""
    if _absent(ct):
        return [None, None, None]
    if is_undefined_primal(k):
        if is_undefined_primal(dy) or is_undefined_primal(acc):
            raise NotImplementedError("input_grad_sum_p is not linear in its kernel and images together")
        return [None, linear.kernel_grad_p.bind(ct, dy, passes=passes, spec=spec), None]
    ct_dy = linear.conv_p.bind(ct, k, passes=passes, spec=spec) if is_undefined_primal(dy) else None
    return [ct_dy, None, ct if is_undefined_primal(acc) else None]


primitive_transposes[fanout_p] = _fanout_transpose
primitive_transposes[input_grad_sum_p] = _input_grad_sum_transpose


# ---------------------------------------------------------------------------------------------------- batching
def _fanout_reference(x, k, passes, spec):
    return [linear.conv_p.bind(x, k, passes=passes, spec=spec), x]


def _input_grad_sum_reference(dy, k, acc, passes, spec):
    return linear.input_grad_p.bind(dy, k, passes=passes, spec=spec).astype(acc.dtype) + acc


primitive_batchers[fanout_p] = batch_by_reference(_fanout_reference, multiple_results=True)
primitive_batchers[input_grad_sum_p] = batch_by_reference(_input_grad_sum_reference, multiple_results=False)


def conv_fanout(x, kernel, passes, spec):
    """``(conv(x, kernel), x)``; the gradient at ``x`` of both outputs is summed inside the input gradient."""
    return tuple(fanout_p.bind(x, kernel, passes=tuple(passes), spec=spec))
