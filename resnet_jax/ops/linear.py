"""The three passes of a convolution as JAX primitives, each linear in each of its two operands.

Why primitives: a ``custom_vjp`` (and an FFI call) takes forward-mode autodiff away, so ``jax.jvp``,
``jax.linearize``, ``jax.hessian`` and Hessian-vector products failed on every fast algorithm. A convolution
``y = conv(x, k)`` is bilinear, and so are its two gradients: ``dx = input_grad(dy, k)`` and
``dk = kernel_grad(x, dy)``. Declared bilinear (``ad.defbilinear``, as lax declares its own convolution), each
primitive gets its forward-mode rule for free, and its transposes are the other two primitives:

    conv(x, k)           transposes to  input_grad(ct, k)  and  kernel_grad(x, ct)
    input_grad(dy, k)    transposes to  conv(ct, k)        and  kernel_grad(ct, dy)
    kernel_grad(x, dy)   transposes to  input_grad(dy, ct) and  conv(x, ct)

Reverse mode is the transpose of forward mode, so it runs exactly the algorithms ``passes`` names (the fast
kernels), and every higher order closes over the same three primitives. Each primitive lowers to its
algorithm's pass (``registry.REGISTRY``: jnp code or an FFI call). ``vmap`` over the images merges the
mapped axis into the batch; any other ``vmap`` (per-example kernels or kernel gradients) runs XLA's convolution,
which vmaps natively.

Every primitive carries the same two static parameters: ``passes`` (the forward, input-gradient and
kernel-gradient algorithm names) and ``spec``, the forward convolution's ``ConvSpec``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from resnet_jax.ops.jax_compat import (Primitive, ShapedArray, defbilinear, lower_fun, primitive_batchers,
                                      prims_requiring_devices, register_lowering)
from resnet_jax.ops.registry import REGISTRY
from resnet_jax.ops.xla import XLA

conv_p = Primitive("resnet_jax_conv")
input_grad_p = Primitive("resnet_jax_conv_input_grad")
kernel_grad_p = Primitive("resnet_jax_conv_kernel_grad")


# ------------------------------------------------------------------------------------------------ evaluation
def _conv(x, k, *, passes, spec):
    return REGISTRY[passes[0]].forward(x, k, spec).astype(x.dtype)


def _input_grad(dy, k, *, passes, spec):
    return REGISTRY[passes[1]].input_grad(dy, k, spec).astype(dy.dtype)


def _kernel_grad(x, dy, *, passes, spec):
    return REGISTRY[passes[2]].kernel_grad(x, dy, spec).astype(spec.dtype)


conv_p.def_abstract_eval(lambda x, k, *, passes, spec: ShapedArray(spec.y_shape, x.dtype))
input_grad_p.def_abstract_eval(lambda dy, k, *, passes, spec: ShapedArray(spec.x_shape, dy.dtype))
kernel_grad_p.def_abstract_eval(lambda x, dy, *, passes, spec: ShapedArray(spec.kernel_shape, spec.dtype))
for _prim, _impl in ((conv_p, _conv), (input_grad_p, _input_grad), (kernel_grad_p, _kernel_grad)):
    _prim.def_impl(_impl)
    register_lowering(_prim, lower_fun(_impl, multiple_results=False))
# The extension's calls inside these lowerings carry a sharding rule (custom_partitioning), which needs the
# devices while lowering; jax lowers device-agnostically unless the jaxpr shows a primitive that needs them, and
# the calls are hidden inside ours, so declare it (jax keeps this registry in a private module: jax_compat.py).
prims_requiring_devices.update((conv_p, input_grad_p, kernel_grad_p))

# ------------------------------------------------------------------------------------------- transposition
defbilinear(conv_p,
               lambda ct, x, k, **p: input_grad_p.bind(ct, k, **p),
               lambda ct, x, k, **p: kernel_grad_p.bind(x, ct, **p))
defbilinear(input_grad_p,
               lambda ct, dy, k, **p: conv_p.bind(ct, k, **p),
               lambda ct, dy, k, **p: kernel_grad_p.bind(ct, dy, **p))
defbilinear(kernel_grad_p,
               lambda ct, x, dy, **p: input_grad_p.bind(dy, ct, **p),
               lambda ct, x, dy, **p: conv_p.bind(x, ct, **p))


# ---------------------------------------------------------------------------------------------- batching
def _merged(prim, args, dims, passes, spec):
    """Images (x or dy) mapped, kernel not: the mapped axis joins the batch axis, one call of the same pass."""
    image, kernel = args
    image = jnp.moveaxis(image, dims[0], 0)
    b, n = image.shape[:2]
    out = prim.bind(image.reshape(b * n, *image.shape[2:]), kernel, passes=passes,
                    spec=dataclasses.replace(spec, batch=b * n))
    return out.reshape(b, n, *out.shape[1:]), 0


_XLA_PASSES = {"conv": XLA.forward, "input_grad": XLA.input_grad, "kernel_grad": XLA.kernel_grad}


def _batch_rule(prim, pass_name):
    def rule(args, dims, *, passes, spec):
        if pass_name != "kernel_grad" and dims[1] is None:
            return _merged(prim, args, dims, passes, spec)
        # anything else (a mapped kernel, per-example kernel gradients): XLA's pass, which vmaps natively
        fn = _XLA_PASSES[pass_name]
        return jax.vmap(lambda a, b: fn(a, b, spec), in_axes=dims)(*args), 0
    return rule


primitive_batchers[conv_p] = _batch_rule(conv_p, "conv")
primitive_batchers[input_grad_p] = _batch_rule(input_grad_p, "input_grad")
primitive_batchers[kernel_grad_p] = _batch_rule(kernel_grad_p, "kernel_grad")


def conv(x, kernel, passes, spec):
    """``conv(x, kernel)`` as the primitive: every derivative of it runs the algorithms ``passes`` names."""
    return conv_p.bind(x, kernel, passes=tuple(passes), spec=spec)
