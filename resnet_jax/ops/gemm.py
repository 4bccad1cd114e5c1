"""Algorithm "gemm": a 1x1 convolution is a matrix product over pixels (strided: subsample first).

``(N*H*W, Cin) @ (Cin, Cout)`` is the shape XLA's dot runs fastest; autodiff gives the two gradients as the two
other products (``dy @ W^T`` scattered back to the kept pixels, and ``x^T @ dy``).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def forward(x, kernel, strides, padding, groups):
    sh, sw = strides
    if any(padding[0]) or any(padding[1]):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    x = x[:, ::sh, ::sw, :]
    n, h, w, cin = x.shape
    y = lax.dot_general(x.reshape(-1, cin), kernel.reshape(cin, -1), (((1,), (0,)), ((), ())),
                        preferred_element_type=jnp.float32)
    return y.reshape(n, h, w, -1).astype(x.dtype)


def limits(g) -> str | None:
    if g.kernel != (1, 1) or g.groups != 1:
        return "computes ungrouped 1x1 convolutions only"
    return None


def extension_passes():
    """The three passes as oneDNN GEMMs (the CPU extension): forward ``x @ W``, input gradient ``dy @ W^T`` put
    back on the kept pixels, kernel gradient ``x^T @ dy``, each reading its operands where they lie."""
    from resnet_jax.ops import onednn

    def kept(x, strides, padding):
        if any(padding[0]) or any(padding[1]):
            x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
        return x[:, ::strides[0], ::strides[1], :]

    def fwd(x, kernel, strides, padding, groups):
        xs = kept(x, strides, padding)
        y = onednn.matmul(xs.reshape(-1, xs.shape[-1]).astype(jnp.float32), kernel.reshape(kernel.shape[2:]))
        return y.reshape(*xs.shape[:3], -1).astype(x.dtype)

    def input_grad(dy, kernel, x_shape, strides, padding, groups):
        dxs = onednn.matmul(dy.reshape(-1, dy.shape[-1]), kernel.reshape(kernel.shape[2:]), transpose_b=True)
        dxs = dxs.reshape(*dy.shape[:3], -1)
        if strides == (1, 1) and not any(padding[0] + padding[1]):
            return dxs
        # the forward kept pixels (pad, then every stride-th): put the gradient back there, zeros elsewhere
        (top, bottom), (left, right) = padding
        rows, cols = x_shape[1] + top + bottom, x_shape[2] + left + right
        full = jnp.zeros((x_shape[0], rows, cols, x_shape[3]), dy.dtype).at[:, ::strides[0], ::strides[1], :].set(
            dxs)
        return full[:, top:top + x_shape[1], left:left + x_shape[2], :]

    def kernel_grad(x, dy, kernel_shape, kernel_dtype, strides, padding, groups):
        xs = kept(x, strides, padding)
        dk = onednn.matmul(xs.reshape(-1, xs.shape[-1]), dy.reshape(-1, dy.shape[-1]), transpose_a=True)
        return dk.reshape(kernel_shape).astype(kernel_dtype)

    return fwd, input_grad, kernel_grad
