"""Dilated convolutions by an undilated algorithm: "NAME@atrous" computes a dilated stride-1 convolution as NAME's
undilated one on the input's interleaved sub-grids (space-to-batch, as DeepLab's atrous convolution was first
computed).

Why: with dilation d a kernel tap reads every d-th pixel, so the outputs whose row is r modulo d (and column s
modulo d) read only the input's pixels on that same residue class. Each of the d x d sub-grids is an ordinary
image, and on it the dilated convolution is an undilated one:

    y[n, q*d + r, p*d + s] = conv(xp[n, r::d, s::d], w)[q, p]      (xp: x with the layer's padding)

So the sub-grids go into the batch, one undilated convolution (Winograd F(4,3) for a 3x3) computes all of them,
and the outputs are interleaved back. On a dilated ResNet-50's 64x64 stages oneDNN's direct kernel computed the
3x3 layers at 180-185 GFLOP/s, XLA's at 153-161, Winograd on the same shapes undilated at an equivalent 530-615
(BENCHMARKS.md, 2026-12-04). The two reshuffles are one pass over the input and one over the output each, which
XLA fuses with the padding and with the epilogue.

The batch stays the outermost axis of the sub-grid batch, so a batch sharded over devices stays sharded (no
gather). Every pass is the inner algorithm's own pass on the reshuffled operands: the input gradient is NAME's
input gradient interleaved back (and cropped to the unpadded input), the kernel gradient NAME's kernel gradient
over all sub-grids.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from resnet_jax.ops.onednn import algorithms as onednn_algorithms
from resnet_jax.ops.spec import Algorithm, ConvSpec

SUFFIX = "@atrous"
ATROUS = ("onednn_winograd_f4",)  # undilated algorithms worth the detour (Winograd cannot dilate its tiles)


def _grid(spec: ConvSpec) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Per axis: the padded input's size rounded up to whole sub-grids, each sub-grid's size, and its outputs."""
    sizes, grids, outs = [], [], []
    for size, (lo, hi), k, d in zip((spec.height, spec.width), spec.padding, spec.kernel, spec.dilation):
        grid = -(-(size + lo + hi) // d)
        sizes.append(grid * d)
        grids.append(grid)
        outs.append(grid - k + 1)
    return tuple(sizes), tuple(grids), tuple(outs)


def inner_spec(spec: ConvSpec) -> ConvSpec:
    """The undilated convolution over all sub-grids: d*d times the batch, each sub-grid a VALID image."""
    _, (gh, gw), _ = _grid(spec)
    dh, dw = spec.dilation
    return dataclasses.replace(spec, batch=spec.batch * dh * dw, height=gh, width=gw, strides=(1, 1),
                               padding=((0, 0), (0, 0)), dilation=(1, 1))


def _to_grids(a, spec: ConvSpec, corner: tuple[int, int], sizes: tuple[int, int]) -> jnp.ndarray:
    """(N, H, W, C) placed at ``corner`` in zeros of ``sizes`` (whole sub-grids) -> (N*dh*dw, rows, cols, C), the
    batch outermost."""
    dh, dw = spec.dilation
    (top, left), (hp, wp) = corner, sizes
    a = jnp.pad(a, ((0, 0), (top, hp - a.shape[1] - top), (left, wp - a.shape[2] - left), (0, 0)))
    n, c = a.shape[0], a.shape[-1]
    a = a.reshape(n, hp // dh, dh, wp // dw, dw, c).transpose(0, 2, 4, 1, 3, 5)
    return a.reshape(n * dh * dw, hp // dh, wp // dw, c)


def _from_grids(a, spec: ConvSpec) -> jnp.ndarray:
    """The inverse of ``_to_grids`` without the crop: (N*dh*dw, h, w, C) -> (N, h*dh, w*dw, C)."""
    dh, dw = spec.dilation
    n, h, w, c = a.shape[0] // (dh * dw), a.shape[1], a.shape[2], a.shape[3]
    return a.reshape(n, dh, dw, h, w, c).transpose(0, 3, 1, 4, 2, 5).reshape(n, h * dh, w * dw, c)


def _outputs(spec: ConvSpec) -> tuple[int, int]:
    """The interleaved sub-grid outputs' size: the real output and, past it, outputs no one asked for."""
    _, _, (oh, ow) = _grid(spec)
    return oh * spec.dilation[0], ow * spec.dilation[1]


def atrous(base: Algorithm) -> Algorithm:
    """``base`` (undilated) computing dilated stride-1 convolutions through sub-grids."""
    def limits(spec: ConvSpec) -> str | None:
        if not spec.dilated or spec.strides != (1, 1):
            return "computes dilated stride-1 convolutions only"
        return base.limits(inner_spec(spec))

    def grids_of_x(x, spec):
        (top, _), (left, _) = spec.padding
        return _to_grids(x, spec, (top, left), _grid(spec)[0])

    def forward(x, kernel, spec):
        _, ho, wo, _ = spec.y_shape
        return _from_grids(base.forward(grids_of_x(x, spec), kernel, inner_spec(spec)), spec)[:, :ho, :wo, :]

    def input_grad(dy, kernel, spec):
        # the outputs past the real ones get a zero cotangent; the inner input gradient covers the padded input,
        # of which the real input is the window inside the padding
        dxp = _from_grids(base.input_grad(_to_grids(dy, spec, (0, 0), _outputs(spec)), kernel, inner_spec(spec)),
                          spec)
        (top, _), (left, _) = spec.padding
        return dxp[:, top:top + spec.height, left:left + spec.width, :]

    def kernel_grad(x, dy, spec):
        return base.kernel_grad(grids_of_x(x, spec), _to_grids(dy, spec, (0, 0), _outputs(spec)), inner_spec(spec))

    return Algorithm.wrapping(base, SUFFIX, limits=limits, dilated=True, forward=forward, input_grad=input_grad,
                              kernel_grad=kernel_grad)


ALGORITHMS = tuple(atrous(a) for a in onednn_algorithms.ALGORITHMS if a.name in ATROUS)
