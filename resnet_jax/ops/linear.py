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
algorithm's pass (``algorithms.REGISTRY``: jnp code or an FFI call). ``vmap`` over the images merges the
mapped axis into the batch; any other ``vmap`` (per-example kernels or kernel gradients) runs XLA's convolution,
which vmaps natively.

Every primitive carries the same static parameters: ``passes`` (forward, input-gradient and kernel-gradient
algorithm names), ``strides``, ``padding``, ``groups``, and the forward's ``x_shape``, ``kernel_shape`` and
``kernel_dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from resnet_jax.ops.algorithms import REGISTRY

conv_p = Primitive("resnet_jax_conv")
input_grad_p = Primitive("resnet_jax_conv_input_grad")
kernel_grad_p = Primitive("resnet_jax_conv_kernel_grad")


def output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, ...]:
    n, h, w, _ = x_shape
    kh, kw, _, cout = kernel_shape
    (top, bottom), (left, right) = padding
    return n, (h + top + bottom - kh) // strides[0] + 1, (w + left + right - kw) // strides[1] + 1, cout


# ------------------------------------------------------------------------------------------------ evaluation
def _conv(x, k, *, passes, strides, padding, groups, x_shape, kernel_shape, kernel_dtype):
    return REGISTRY[passes[0]].forward(x, k, strides, padding, groups).astype(x.dtype)


def _input_grad(dy, k, *, passes, strides, padding, groups, x_shape, kernel_shape, kernel_dtype):
    return REGISTRY[passes[1]].input_grad(dy, k, x_shape, strides, padding, groups).astype(dy.dtype)


def _kernel_grad(x, dy, *, passes, strides, padding, groups, x_shape, kernel_shape, kernel_dtype):
    return REGISTRY[passes[2]].kernel_grad(x, dy, kernel_shape, kernel_dtype, strides, padding, groups).astype(
        kernel_dtype)


conv_p.def_abstract_eval(lambda x, k, **p: ShapedArray(
    output_shape(x.shape, k.shape, p["strides"], p["padding"]), x.dtype))
input_grad_p.def_abstract_eval(lambda dy, k, **p: ShapedArray(p["x_shape"], dy.dtype))
kernel_grad_p.def_abstract_eval(lambda x, dy, **p: ShapedArray(p["kernel_shape"], p["kernel_dtype"]))
for _prim, _impl in ((conv_p, _conv), (input_grad_p, _input_grad), (kernel_grad_p, _kernel_grad)):
    _prim.def_impl(_impl)
    mlir.register_lowering(_prim, mlir.lower_fun(_impl, multiple_results=False))

# ------------------------------------------------------------------------------------------- transposition
ad.defbilinear(conv_p,
               lambda ct, x, k, **p: input_grad_p.bind(ct, k, **p),
               lambda ct, x, k, **p: kernel_grad_p.bind(x, ct, **p))
ad.defbilinear(input_grad_p,
               lambda ct, dy, k, **p: conv_p.bind(ct, k, **p),
               lambda ct, dy, k, **p: kernel_grad_p.bind(ct, dy, **p))
ad.defbilinear(kernel_grad_p,
               lambda ct, x, dy, **p: input_grad_p.bind(dy, ct, **p),
               lambda ct, x, dy, **p: conv_p.bind(x, ct, **p))


# ---------------------------------------------------------------------------------------------- batching
def _merged(prim, args, dims, p):
    """Images (x or dy) mapped, kernel not: the mapped axis joins the batch axis, one call of the same pass."""
    image, kernel = args
    image = jnp.moveaxis(image, dims[0], 0)
    b, n = image.shape[:2]
    x_shape = (b * n, *p["x_shape"][1:])
    out = prim.bind(image.reshape(b * n, *image.shape[2:]), kernel, **{**p, "x_shape": x_shape})
    return out.reshape(b, n, *out.shape[1:]), 0


def _xla_vmap(pass_name, args, dims, p):
    """Anything else (a mapped kernel, per-example kernel gradients): XLA's pass, which vmaps natively."""
    xla = REGISTRY["xla"]
    fn = {"conv": lambda x, k: xla.forward(x, k, p["strides"], p["padding"], p["groups"]),
          "input_grad": lambda dy, k: xla.input_grad(dy, k, p["x_shape"], p["strides"], p["padding"], p["groups"]),
          "kernel_grad": lambda x, dy: xla.kernel_grad(x, dy, p["kernel_shape"], p["kernel_dtype"], p["strides"],
                                                       p["padding"], p["groups"])}[pass_name]
    return jax.vmap(fn, in_axes=dims)(*args), 0


def _batch_rule(prim, pass_name):
    def rule(args, dims, **p):
        if pass_name != "kernel_grad" and dims[1] is None:
            return _merged(prim, args, dims, p)
        return _xla_vmap(pass_name, args, dims, p)
    return rule


batching.primitive_batchers[conv_p] = _batch_rule(conv_p, "conv")
batching.primitive_batchers[input_grad_p] = _batch_rule(input_grad_p, "input_grad")
batching.primitive_batchers[kernel_grad_p] = _batch_rule(kernel_grad_p, "kernel_grad")


def params(passes, strides, padding, groups, x, kernel) -> dict:
    """The static parameters every primitive carries, from the forward's operands."""
    return dict(passes=tuple(passes), strides=tuple(strides), padding=tuple(map(tuple, padding)), groups=groups,
                x_shape=tuple(x.shape), kernel_shape=tuple(kernel.shape), kernel_dtype=np.dtype(kernel.dtype))
