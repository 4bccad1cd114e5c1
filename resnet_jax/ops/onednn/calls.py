"""The extension's C++ entry points as JAX functions: one ``jax.ffi`` call each, named after its target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.ops.onednn.library import load


def _call(target: str, shape, dtype, *operands, in_place: int | None = None, **attrs):
    """One FFI call; ``in_place`` names an operand whose buffer becomes the result (XLA copies it first only
    where it is still needed elsewhere)."""
    load()  # registers the targets (once); raises OnednnUnavailable where it cannot
    aliases = {} if in_place is None else {in_place: 0}
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential",
                            input_output_aliases=aliases)(*operands, **attrs)


def _padding(padding) -> np.ndarray:
    (top, bottom), (left, right) = padding
    return np.asarray([top, bottom, left, right], np.int64)


def _geometry(spec) -> dict:
    return dict(strides=np.asarray(spec.strides, np.int64), padding=_padding(spec.padding),
                groups=np.int64(spec.groups))


def _epilogue(bias, residual, shape, dtype) -> tuple[list, int | None, dict]:
    """The optional operands after (x, kernel), the index of the residual, which is updated in place, and the
    attributes that say which are there. The kernel adds its result to the residual's buffer instead of reading
    it and writing a second buffer (one pass over the output less; a residual is dead after the add, so XLA
    needs no copy)."""
    operands = [] if bias is None else [bias]
    in_place = None
    if residual is not None:
        if residual.shape != tuple(shape):
            raise ValueError(f"the residual's shape {residual.shape} is not the convolution's output shape "
                             f"{tuple(shape)}")
        operands.append(residual.astype(dtype))
        in_place = 1 + len(operands)
    return operands, in_place, dict(has_bias=np.int64(bias is not None), has_residual=np.int64(residual is not None))


def conv_forward(x, kernel, spec, bias=None, residual=None, relu=False):
    """``relu(conv(x, kernel) + bias + residual)`` in one oneDNN call (bias, residual, relu optional)."""
    extra, in_place, flags = _epilogue(bias, residual, spec.y_shape, x.dtype)
    return _call("ResnetJaxConvForward", spec.y_shape, x.dtype, x, kernel, *extra, in_place=in_place,
                 relu=np.int64(bool(relu)), **flags, **_geometry(spec))


def conv_backward_data(dy, kernel, spec):
    return _call("ResnetJaxConvBackwardData", spec.x_shape, dy.dtype, dy, kernel, **_geometry(spec))


def conv_backward_weights(x, dy, spec):
    return _call("ResnetJaxConvBackwardWeights", spec.kernel_shape, x.dtype, x, dy, **_geometry(spec))


def winograd_forward(x, kernel, padding, m, bias=None, residual=None, relu=False):
    """A 3x3 stride-1 convolution by Winograd F(m x m, 3 x 3), with the same optional epilogue."""
    (top, bottom), (left, right) = padding
    shape = (x.shape[0], x.shape[1] + top + bottom - 2, x.shape[2] + left + right - 2, kernel.shape[-1])
    extra, in_place, flags = _epilogue(bias, residual, shape, x.dtype)
    return _call("ResnetJaxWinogradForward", shape, x.dtype, x, kernel, *extra, in_place=in_place,
                 padding=_padding(padding), m=np.int64(m), relu=np.int64(bool(relu)), **flags)


def winograd_backward_data(dy, kernel, padding, m):
    """The input gradient of a 3x3 stride-1 convolution is one too: the flipped kernel with in/out exchanged,
    padded by 2 - p on each side."""
    (top, bottom), (left, right) = padding
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return winograd_forward(dy, flipped, ((2 - top, 2 - bottom), (2 - left, 2 - right)), m)


def winograd_backward_weights(x, dy, padding, m):
    return _call("ResnetJaxWinogradBackwardWeights", (3, 3, x.shape[-1], dy.shape[-1]), x.dtype, x, dy,
                 padding=_padding(padding), m=np.int64(m))


def matmul(a, b, transpose_a=False, transpose_b=False):
    """``a @ b`` (float32) by oneDNN's GEMM; ``transpose_a``/``transpose_b`` read an operand stored transposed."""
    rows = a.shape[1] if transpose_a else a.shape[0]
    cols = b.shape[0] if transpose_b else b.shape[1]
    return _call("ResnetJaxMatmul", (rows, cols), jnp.float32, a, b, transpose_lhs=np.int64(transpose_a),
                 transpose_rhs=np.int64(transpose_b))
