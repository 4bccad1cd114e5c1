"""Algorithms "winograd_f2" and "winograd_f4": Winograd F(m x m, 3 x 3) for 3x3 stride-1 convolutions in jnp.

Lavin & Gray (2016): an m x m output tile needs (m + 2)^2 products per (input, output) channel pair instead of
9 m^2 (F(4,3): 36 instead of 144). Here the input tiles are cut with strided slices and combined with the
transform's constant coefficients (XLA fuses each axis's combination into one pass), the (m + 2)^2 products
become one batched matrix product over all tiles, and the output transform interleaves the tiles back into NHWC.
The three passes of training all take this form:
  forward           Y = A^T [ (G w G^T) . (B^T X B) ] A
  input gradient    the forward of dY with the flipped, transposed kernel (padding 2 - p)
  kernel gradient   dW = G^T [ sum over tiles (B^T X B) . (A dY A^T) ] G   (transposition principle)
Error grows with the tile: about 1e-6 (F(2,3)) and 1e-5 (F(4,3)) of the output's scale in float32. With
bfloat16 inputs F(2,3) multiplies in bfloat16 (float32 sums), which keeps bfloat16's own accuracy; F(4,3)'s
larger coefficients would not (7e-2 measured), so it multiplies in float32.

This is the portable reference of the C++ version in ``onednn/csrc/winograd.cc``. Inside a model on CPU its
forward lost to XLA's own convolution (BENCHMARKS.md), so the rules pick it for kernel gradients only.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.ops.spec import Algorithm, output_size

# Transform matrices for F(m x m, 3 x 3): B^T (input, a x a), G (kernel, a x 3), A^T (output, m x a), a = m + 2.
TABLES = {
    2: dict(BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
            G=[[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
            AT=[[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: dict(BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
            G=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
               [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
            AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


def _matrices(m):
    t = {k: np.asarray(v, np.float64) for k, v in TABLES[m].items()}
    return t["BT"], t["G"], t["AT"]


def _combine(parts, coefficients):
    """sum_k c_k * parts[k], skipping zero coefficients and multiplying only where |c| != 1."""
    total = None
    for c, part in zip(coefficients, parts):
        if c == 0:
            continue
        term = part if c == 1 else -part if c == -1 else part * np.float32(c)
        total = term if total is None else total + term
    return total


def _tile_transform(x, T, size, m, tiles_h, tiles_w):
    """T @ window @ T^T for every size x size window at stride m of x (N, H, W, C), windows (i, j) in
    (tiles_h, tiles_w): returns (rows(T)^2, N, tiles_h, tiles_w, C), transform position major."""
    span_h, span_w = m * (tiles_h - 1) + 1, m * (tiles_w - 1) + 1
    row_parts = [x[:, k:k + span_h:m] for k in range(size)]
    rows = [_combine(row_parts, T[u]) for u in range(T.shape[0])]
    out = []
    for r in rows:
        col_parts = [r[:, :, k:k + span_w:m] for k in range(size)]
        out.extend(_combine(col_parts, T[v]) for v in range(T.shape[0]))
    return jnp.stack(out)


def _tiling(h, w, padding, m):
    (top, bottom), (left, right) = padding
    oh, ow = output_size(h, 3, 1, top, bottom), output_size(w, 3, 1, left, right)
    return oh, ow, -(-oh // m), -(-ow // m)


def _input_tiles(x, padding, m):
    """B^T X B of every (m + 2)^2 input tile, as (a^2, tiles, C)."""
    bt = _matrices(m)[0]
    oh, ow, th, tw = _tiling(x.shape[1], x.shape[2], padding, m)
    (top, _), (left, _) = padding
    rows, cols = th * m + 2, tw * m + 2  # tiles hang over the output's edge: pad with zeros to cover them
    xp = jnp.pad(x, ((0, 0), (top, rows - x.shape[1] - top), (left, cols - x.shape[2] - left), (0, 0)))
    v = _tile_transform(xp, bt, m + 2, m, th, tw)
    return v.reshape(v.shape[0], -1, x.shape[-1]), (oh, ow, th, tw)


def _product_dtype(dtype, m):
    return dtype if m == 2 else jnp.promote_types(dtype, jnp.float32)


def forward(x, kernel, padding, m):
    """Y = A^T [U . V] A with U = G w G^T, V = B^T X B; float32 transforms, products in ``_product_dtype``."""
    _, g, at = _matrices(m)
    a = m + 2
    v, (oh, ow, th, tw) = _input_tiles(x.astype(jnp.float32), padding, m)
    u = jnp.einsum("ik,klco,jl->ijco", g, kernel.astype(jnp.float32), g).reshape(a * a, *kernel.shape[2:])
    dtype = _product_dtype(x.dtype, m)
    mh = lax.dot_general(v.astype(dtype), u.astype(dtype), (((2,), (1,)), ((0,), (0,))),
                         preferred_element_type=jnp.float32)  # (a^2, tiles, O)
    mh = mh.reshape(a, a, x.shape[0], th, tw, -1)
    rows = [_combine([mh[u_] for u_ in range(a)], at[i]) for i in range(m)]
    out = jnp.stack([jnp.stack([_combine([r[v_] for v_ in range(a)], at[j]) for j in range(m)]) for r in rows])
    # (m, m, N, th, tw, O) -> (N, th, m, tw, m, O): interleave the tiles back into rows and columns
    y = out.transpose(2, 3, 0, 4, 1, 5).reshape(x.shape[0], th * m, tw * m, -1)
    return y[:, :oh, :ow].astype(x.dtype)


def input_grad_as_forward(kernel, padding):
    """The input gradient of a 3x3 stride-1 convolution is a 3x3 stride-1 convolution of ``dy`` too: with the
    kernel flipped in space and its input and output channels exchanged, padded by 2 - p on each side. Returns
    that ``(kernel, padding)``; both Winograd implementations (here and the extension's) compute it so, the
    extension reading the forward's kernel that way (``transposed_kernel``) rather than taking a copy."""
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    return flipped, input_grad_padding(padding)


def input_grad_padding(padding):
    """The padding of the convolution of ``dy`` that gives a 3x3 stride-1 layer's input gradient: 2 - p."""
    (top, bottom), (left, right) = padding
    return (2 - top, 2 - bottom), (2 - left, 2 - right)


def backward_data(dy, kernel, padding, m):
    return forward(dy, *input_grad_as_forward(kernel, padding), m)


def backward_weights(x, dy, padding, m, kernel_dtype):
    """dW = G^T [ sum over tiles V . Z ] G with V = B^T X B and Z = A dY A^T."""
    _, g, at = _matrices(m)
    a = m + 2
    v, (oh, ow, th, tw) = _input_tiles(x.astype(jnp.float32), padding, m)
    dyp = jnp.pad(dy.astype(jnp.float32), ((0, 0), (0, th * m - oh), (0, tw * m - ow), (0, 0)))
    z = _tile_transform(dyp, at.T, m, m, th, tw).reshape(a * a, -1, dy.shape[-1])
    dtype = _product_dtype(x.dtype, m)
    dwhat = lax.dot_general(v.astype(dtype), z.astype(dtype), (((1,), (1,)), ((0,), (0,))),
                            preferred_element_type=jnp.float32)  # (a^2, C, O)
    dw = jnp.einsum("ki,ijco,lj->klco", g.T, dwhat.reshape(a, a, *dwhat.shape[1:]), g.T)
    return dw.astype(kernel_dtype)


def limits(spec) -> str | None:
    pads_ok = all(0 <= p <= 2 for side in spec.padding for p in side)
    if spec.kernel != (3, 3) or spec.strides != (1, 1) or spec.groups != 1 or not pads_ok:
        return "computes ungrouped 3x3 stride-1 convolutions (padding 0-2) only"
    return None


def algorithm(m: int) -> Algorithm:
    return Algorithm(name=f"winograd_f{m}", limits=limits,
                     forward=lambda x, kernel, spec: forward(x, kernel, spec.padding, m),
                     input_grad=lambda dy, kernel, spec: backward_data(dy, kernel, spec.padding, m),
                     kernel_grad=lambda x, dy, spec: backward_weights(x, dy, spec.padding, m, x.dtype))


ALGORITHMS = (algorithm(2), algorithm(4))
