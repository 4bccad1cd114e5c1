"""The extension's C++ entry points as JAX functions: one ``jax.ffi`` call each, named after its target.

Every call is data parallel over the batch, and XLA must know it. The C++ code sees one buffer; without a
sharding rule, XLA would all-gather a sharded batch into every device's call, and every device would compute the
whole batch. So each call is a ``custom_partitioning``: its rule says which operands are split with the batch
(axis 0: images, or the pixel rows of a GEMM) and which are needed whole (kernels, bias), and whether the result
is split the same way or is a sum over the batch (a kernel gradient), which the per-device results then
``psum``. The shapes inside come from the operands each device holds, so one rule serves any mesh; on one
device the rule is not used at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from resnet_jax.ops.jax_compat import custom_partitioning, sequential_vmap
from resnet_jax.ops.onednn.library import load
from resnet_jax.ops.spec import output_size

SPLIT, WHOLE = "split", "whole"  # an operand split along axis 0 with the batch, or one every device needs whole


def _call(target: str, result, dtype, operands, layout, attrs: dict, summed: bool = False,
          in_place: int | None = None):
    """Call ``target`` on ``operands`` (one ``layout`` entry each; ``operands[0]`` is split).

    ``result`` is the result's shape without its leading batch axis (its whole shape when ``summed``);
    ``in_place`` names an operand whose buffer becomes the result (XLA copies it first only where it is still
    needed elsewhere); ``attrs`` are the call's integer attributes (tuples become int64 arrays)."""
    return _call_results(target, [(result, dtype, summed, in_place)], operands, layout, attrs)[0]


def _call_results(target: str, results, operands, layout, attrs: dict):
    """``_call`` of a target with several results, each ``(result, dtype, summed, in_place)`` as there."""
    results = tuple((tuple(shape), jnp.dtype(dtype).name, bool(summed), in_place)
                    for shape, dtype, summed, in_place in results)
    static = (target, results, tuple(layout), tuple(sorted((k, v) for k, v in attrs.items())),
              tuple(len(o.shape) for o in operands))
    return _partitioned(*static)(*operands)


def _ffi(target, results, attrs, operands):
    load()  # registers the targets (once); raises OnednnUnavailable where it cannot
    shapes = [jax.ShapeDtypeStruct(shape if summed else (operands[0].shape[0], *shape), dtype)
              for shape, dtype, summed, _ in results]
    aliases = {in_place: i for i, (_, _, _, in_place) in enumerate(results) if in_place is not None}
    values = {k: np.asarray(v, np.int64) if isinstance(v, tuple) else np.int64(v) for k, v in attrs}
    return jax.ffi.ffi_call(target, shapes, vmap_method="sequential", input_output_aliases=aliases)(
        *operands, **values)


@functools.cache
def _partitioned(target, results, layout, attrs, ranks):
    """The call of ``target`` with this static signature as a batch-parallel ``custom_partitioning``."""
    def body(*operands):
        return tuple(_ffi(target, results, attrs, operands))

    def shardings(mesh, arg_shapes):
        spec = arg_shapes[0].sharding.spec
        batch_axes = spec[0] if len(spec) else None
        split = NamedSharding(mesh, PartitionSpec(batch_axes))
        whole = NamedSharding(mesh, PartitionSpec())
        outs = tuple(whole if summed else split for _, _, summed, _ in results)
        return batch_axes, tuple(split if kind == SPLIT else whole for kind in layout), outs

    def partition(mesh, arg_shapes, result_shape):
        batch_axes, args, outs = shardings(mesh, arg_shapes)

        def per_device(*operands):
            ys = body(*operands)
            return tuple(jax.lax.psum(y, batch_axes) if summed and batch_axes is not None else y
                         for y, (_, _, summed, _) in zip(ys, results))
        return mesh, per_device, outs, args

    # Shardy's rule: factor "b" is the batch axis of every split operand (and of a split result); every other
    # dimension is a factor of its own, which the partition above keeps whole
    names = [[f"o{i}d{d}" for d in range(rank)] for i, rank in enumerate(ranks)]
    for i, kind in enumerate(layout):
        if kind == SPLIT:
            names[i][0] = "b"
    outs = []
    for r, (shape, _, summed, _) in enumerate(results):
        out = [f"r{r}d{d}" for d in range(len(shape) + (0 if summed else 1))]
        if not summed:
            out[0] = "b"
        outs.append(" ".join(out))
    rule = ", ".join(" ".join(n) for n in names) + " -> " + ", ".join(outs)
    call = custom_partitioning(body)
    # "b" is summed over where no result keeps it (Shardy refuses a reduction factor that a result maps; where one
    # result is summed and another split, the partition above still adds the shards of the summed one)
    reduced = all(summed for _, _, summed, _ in results)
    call.def_partition(partition=partition, infer_sharding_from_operands=lambda m, a, r: shardings(m, a)[2],
                       sharding_rule=rule, **({"reduction_factors": ("b",)} if reduced else {}))
    return sequential_vmap(call)  # vmap: one call per mapped element, as the FFI call itself would


def _padding(padding) -> tuple[int, ...]:
    (top, bottom), (left, right) = padding
    return (top, bottom, left, right)


def _geometry(spec) -> dict:
    return dict(strides=tuple(spec.strides), padding=_padding(spec.padding), groups=spec.groups,
                dilation=tuple(spec.dilation))


def _epilogue(bias, residual, shape, dtype) -> tuple[list, list, int | None, dict]:
    """The optional operands after (x, kernel), their layouts, the index of the residual, which is updated in
    place, and the attributes that say which are there. The kernel adds its result to the residual's buffer
    instead of reading it and writing a second buffer (one pass over the output less; a residual is dead after
    the add, so XLA needs no copy)."""
    operands, layout, in_place = [], [], None
    if bias is not None:
        operands.append(bias)
        layout.append(WHOLE)
    if residual is not None:
        if residual.shape != tuple(shape):
            raise ValueError(f"the residual's shape {residual.shape} is not the convolution's output shape "
                             f"{tuple(shape)}")
        operands.append(residual.astype(dtype))
        layout.append(SPLIT)
        in_place = 1 + len(operands)
    return operands, layout, in_place, dict(has_bias=int(bias is not None), has_residual=int(residual is not None))


def conv_forward(x, kernel, spec, bias=None, residual=None, relu=False):
    """``relu(conv(x, kernel) + bias + residual)`` in one oneDNN call (bias, residual, relu optional)."""
    extra, layout, in_place, flags = _epilogue(bias, residual, spec.y_shape, x.dtype)
    return _call("ResnetJaxConvForward", spec.y_shape[1:], x.dtype, (x, kernel, *extra), (SPLIT, WHOLE, *layout),
                 dict(relu=int(bool(relu)), **flags, **_geometry(spec)), in_place=in_place)


def conv_backward_data(dy, kernel, spec):
    return _call("ResnetJaxConvBackwardData", spec.x_shape[1:], dy.dtype, (dy, kernel), (SPLIT, WHOLE),
                 _geometry(spec))


def conv_backward_weights(x, dy, spec):
    return _call("ResnetJaxConvBackwardWeights", spec.kernel_shape, x.dtype, (x, dy), (SPLIT, SPLIT),
                 _geometry(spec), summed=True)


def winograd_forward(x, kernel, padding, m, bias=None, residual=None, relu=False, transposed_kernel=False):
    """A 3x3 stride-1 convolution by Winograd F(m x m, 3 x 3), with the same optional epilogue.

    ``transposed_kernel``: convolve with ``kernel`` flipped in space and its channels exchanged, the kernel of an
    input gradient (``winograd.input_grad_as_forward``), read so by the extension instead of copied.

    ``x`` (and the residual and result) may be bfloat16: the extension reads and writes them so, computing in
    float32, while the kernel and bias, small, are passed in float32."""
    (top, bottom), (left, right) = padding
    shape = (x.shape[0], output_size(x.shape[1], 3, 1, top, bottom), output_size(x.shape[2], 3, 1, left, right),
             kernel.shape[-2] if transposed_kernel else kernel.shape[-1])
    bias = None if bias is None else bias.astype(jnp.float32)
    extra, layout, in_place, flags = _epilogue(bias, residual, shape, x.dtype)
    return _call("ResnetJaxWinogradForward", shape[1:], x.dtype, (x, kernel.astype(jnp.float32), *extra),
                 (SPLIT, WHOLE, *layout),
                 dict(padding=_padding(padding), m=m, relu=int(bool(relu)), transposed_kernel=int(transposed_kernel),
                      **flags), in_place=in_place)


def winograd_backward_weights(x, dy, padding, m):
    """The kernel gradient, summed in float32 and returned in ``x``'s dtype (``x`` and ``dy`` float32 or both
    bfloat16, read as they are)."""
    dw = _call("ResnetJaxWinogradBackwardWeights", (3, 3, x.shape[-1], dy.shape[-1]), jnp.float32, (x, dy),
               (SPLIT, SPLIT), dict(padding=_padding(padding), m=m), summed=True)
    return dw.astype(x.dtype)


def patch_kernel_grad(x, dy, spec, pixel_block):
    """The kernel gradient as ``patches(x)^T @ dy`` by oneDNN's GEMM, ``pixel_block`` output pixels at a time,
    each block's patches gathered into a buffer of the block's size (csrc/patches.cc); float32, ungrouped,
    undilated."""
    attrs = dict(strides=tuple(spec.strides), padding=_padding(spec.padding), pixel_block=int(pixel_block))
    return _call("ResnetJaxPatchKernelGrad", spec.kernel_shape, jnp.float32, (x, dy), (SPLIT, SPLIT), attrs,
                 summed=True)


def matmul(a, b, transpose_a=False, transpose_b=False, own_kernel=False, accumulate=None):
    """``a @ b`` (float32) by oneDNN's GEMM; ``transpose_a``/``transpose_b`` read an operand stored transposed.
    The rows of ``a`` are pixels, split with the batch: with ``transpose_a`` they are summed over, and
    ``own_kernel`` sums them as outer products by the extension's own kernel (AVX2 or AVX-512) instead of oneDNN's GEMM
    (csrc/outer_products.h says why). ``accumulate`` (the product's shape, float32) is added to the product in
    its own buffer, which becomes the result: ``accumulate + a @ b`` without a pass of its own. Unless summed
    over, ``a`` may be an image (N, H, W, C), one row per pixel, and the product is one too (N, H, W, cols): no
    reshape between calls, which would make XLA copy a buffer that a later call updates in place."""
    cols = b.shape[0] if transpose_b else b.shape[1]
    if accumulate is not None:
        if transpose_a or own_kernel:
            raise ValueError("matmul accumulates into a product over the batch's rows only, not a sum over them")
        attrs = dict(transpose_rhs=int(transpose_b))
        return _call("ResnetJaxMatmulAccumulate", accumulate.shape[1:], jnp.float32,
                     (a, b, accumulate.astype(jnp.float32)), (SPLIT, WHOLE, SPLIT), attrs, in_place=2)
    attrs = dict(transpose_lhs=int(transpose_a), transpose_rhs=int(transpose_b), own_kernel=int(own_kernel))
    if transpose_a:
        return _call("ResnetJaxMatmul", (a.shape[1], cols), jnp.float32, (a, b), (SPLIT, SPLIT), attrs, summed=True)
    return _call("ResnetJaxMatmul", (*a.shape[1:-1], cols), jnp.float32, (a, b), (SPLIT, WHOLE), attrs)


def max_pool(x, y_shape, window, strides, padding):
    """``(y, first)`` of the max-pool over float32 NHWC ``x`` (padding -inf): each window's maximum and which of
    its taps, row-major, held it first (int8), in one pass (csrc/maxpool.cc)."""
    attrs = dict(window=tuple(window), strides=tuple(strides), padding=_padding(padding))
    return _call_results("ResnetJaxMaxPool", [(y_shape[1:], jnp.float32, False, None),
                                              (y_shape[1:], jnp.int8, False, None)], (x,), (SPLIT,), attrs)


def max_pool_grad(ct, first, x_shape, window, strides, padding):
    """The max-pool's input gradient (float32): each window's cotangent ``ct`` added onto the input pixel of its
    first maximum, ``first`` (int8) the tap's index in the window, row-major (csrc/maxpool.cc)."""
    attrs = dict(window=tuple(window), strides=tuple(strides), padding=_padding(padding))
    return _call("ResnetJaxMaxPoolGrad", x_shape[1:], jnp.float32, (ct, first), (SPLIT, SPLIT), attrs)


# BatchNorm's passes over (N, H, W, C) tensors (csrc/batchnorm.cc); the per-channel work between them is jnp.
# The sums are over the batch, so on a mesh each device sums its shard and the rule adds the shards: the
# statistics are the global batch's, as XLA's own reduction of a sharded batch gives.
def batch_norm_sums(x, shift):
    """``(2, C)`` float32: the per-channel sum of ``d`` and of ``d**2``, ``d = x - shift`` with ``shift`` float32
    ``(C,)``, the same on every shard (a value of the whole batch, which a shard could not pick by itself)."""
    return _call("ResnetJaxBatchNormSums", (2, x.shape[-1]), jnp.float32, (x, shift), (SPLIT, WHOLE), {},
                 summed=True)


def batch_norm_apply(x, coef, residual=None, relu=False):
    """``relu(round((x - mean) * mul + bias) + residual)`` in ``x``'s dtype, ``coef = (mean, mul, bias)``
    float32 ``(3, C)``."""
    operand = residual if residual is not None else jnp.zeros((1,), x.dtype)  # a placeholder the call ignores
    return _call("ResnetJaxBatchNormApply", x.shape[1:], x.dtype, (x, coef, operand),
                 (SPLIT, WHOLE, SPLIT if residual is not None else WHOLE),
                 dict(relu=int(bool(relu)), has_residual=int(residual is not None)))


def _mask_operands(y, x, mask_from_x):
    """The gradient passes' ReLU mask: ``y`` (``y > 0``), or with ``mask_from_x`` (no residual) the sign of the
    BatchNorm recomputed from ``x`` by the forward's coefficients, ``y`` then a placeholder the call ignores."""
    return (jnp.zeros((1,), x.dtype), WHOLE) if mask_from_x else (y, SPLIT)


def batch_norm_grad_sums(ct, y, x, forward, relu, mask_from_x=False):
    """``(2, C)`` float32: the per-channel sums of ``g`` and ``g * (x - mean)``, ``g = ct`` where ``y > 0`` (with
    ``relu``; with ``mask_from_x``, where ``x``'s BatchNorm by ``forward`` is positive, as ``batch_norm_apply``
    wrote it). ``forward`` is the forward's ``(mean, mul, bias)``, float32 ``(3, C)``: ``x`` is centred by its mean
    as it is read, which keeps the second sum exact where a channel's mean is large against its spread."""
    mask, layout = _mask_operands(y, x, mask_from_x)
    return _call("ResnetJaxBatchNormGradSums", (2, x.shape[-1]), jnp.float32, (ct, mask, x, forward),
                 (SPLIT, layout, SPLIT, WHOLE), dict(relu=int(bool(relu)), mask_from_x=int(bool(mask_from_x))),
                 summed=True)


def batch_norm_grad_sums_masked(ct, y, x, forward):
    """``(sums, g)``: ``batch_norm_grad_sums`` with the ReLU, and the masked cotangent ``g`` itself, written over
    ``ct``'s buffer (XLA copies ``ct`` first only where it is still needed)."""
    return _call_results("ResnetJaxBatchNormGradSumsMasked", [((2, x.shape[-1]), jnp.float32, True, None),
                                                              (x.shape[1:], x.dtype, False, 0)],
                         (ct, y, x, forward), (SPLIT, SPLIT, SPLIT, WHOLE), {})


def batch_norm_grad_apply(ct, y, x, coef, forward, relu, mask_from_x=False):
    """``g * coef[0] + (x - mean) * coef[1] + coef[2]`` in ``x``'s dtype, ``g``, ``mean`` and ``forward`` as in
    ``batch_norm_grad_sums``."""
    mask, layout = _mask_operands(y, x, mask_from_x)
    return _call("ResnetJaxBatchNormGradApply", x.shape[1:], x.dtype, (ct, mask, x, coef, forward),
                 (SPLIT, layout, SPLIT, WHOLE, WHOLE), dict(relu=int(bool(relu)), mask_from_x=int(bool(mask_from_x))))
