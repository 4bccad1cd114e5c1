"""The extension's algorithms: oneDNN's direct convolutions ("onednn"), the same with the kernel gradient as outer
products over blocks of input patches ("onednn_matmul_grad"), oneDNN's GEMM for 1x1 convolutions ("onednn_gemm"), and
Winograd F(2,3)/F(4,3) tiles around oneDNN's matmul ("onednn_winograd_f2"/"_f4"). The forward of "onednn" (and
"onednn_matmul_grad") and of the Winograd ones applies the epilogue (bias, residual, ReLU) inside the kernel.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from resnet_jax.ops import cpu, gemm, winograd
from resnet_jax.ops.onednn import calls
from resnet_jax.ops.onednn.library import unavailable_reason
from resnet_jax.ops.spec import Algorithm


def _extension_limits(bfloat16: str, shape_limits=None):
    """Shapes and dtypes only (the CPU's flags, never the extension itself): whether the library is there is
    ``unavailable``'s question, asked after these (``Algorithm.refusal``). ``bfloat16``: "never" (float32-only
    kernels), "native" (oneDNN's, which need the CPU's bfloat16 instructions) or "always" (our own loops, which
    widen bfloat16 as they read it)."""
    def limits(spec) -> str | None:
        reason = None if shape_limits is None else shape_limits(spec)
        if reason is not None:
            return reason
        with_bf16 = bfloat16 == "always" or (bfloat16 == "native" and cpu.native_bfloat16())
        allowed = ("float32", "bfloat16") if with_bf16 else ("float32",)
        if spec.dtype not in allowed:
            return f"computes {' and '.join(allowed)} only, not {spec.dtype}"
        return None
    return limits


def _direct() -> Algorithm:
    return Algorithm(
        name="onednn", cpu_only=True, dilated=True, unavailable=unavailable_reason,
        limits=_extension_limits("native"),
        forward=lambda x, kernel, spec: calls.conv_forward(x, kernel, spec),
        fused_forward=calls.conv_forward,
        input_grad=calls.conv_backward_data,
        kernel_grad=calls.conv_backward_weights)


PATCH_BLOCK = 128  # pixels gathered at a time per thread: 64-256 within 3% of each other (BENCHMARKS.md, 2026-12-05)


def own_kernel_built() -> bool:
    """Whether the extension holds its own outer-product kernel (csrc/outer_products.h): AVX2 code (AVX-512 where
    the CPU has it), compiled where the CPU it is built for (``-march=native``) has AVX2 and FMA."""
    return cpu.has("avx2") and cpu.has("fma")


def _outer_products_limits(spec) -> str | None:
    """The extension's own outer-product kernel (csrc/outer_products.h) is AVX2 (or AVX-512) code: ungrouped
    layers, on CPUs with AVX2 and FMA."""
    if spec.groups != 1:
        return "computes ungrouped convolutions only"
    if not own_kernel_built():
        return "needs a CPU with AVX2 and FMA"
    return None


def _matmul_grad() -> Algorithm:
    """oneDNN's direct forward and input gradient; the kernel gradient as ``patches(x)^T @ dy``, each thread
    gathering a block of pixels' patches at a time and summing them by the extension's outer-product kernel
    (csrc/patches.cc), the extension's counterpart of "matmul_grad"."""
    direct = _direct()
    return Algorithm(name="onednn_matmul_grad", cpu_only=True, unavailable=unavailable_reason,
                     limits=_extension_limits("never", _outer_products_limits), forward=direct.forward,
                     fused_forward=direct.fused_forward, input_grad=direct.input_grad,
                     kernel_grad=lambda x, dy, spec: calls.patch_kernel_grad(x, dy, spec, PATCH_BLOCK))


def kernel_grad_own_kernel(rows: int, cols: int) -> bool:
    """Whether the 1x1 kernel gradient ``x^T @ dy`` (``rows`` input, ``cols`` output channels) is summed by the
    extension's own outer-product kernel (csrc/outer_products.h) rather than oneDNN's GEMM reading ``x``
    transposed.

    Measured on AVX2 (no AVX-512), every pair of 64-2048 channels at 6272 pixels and ResNet-50's fifteen 1x1
    shapes at batch 32 (BENCHMARKS.md, 2026-12-05): oneDNN's transposed read ran most mid-sized and lopsided pairs
    at 67-140 GFLOP/s where the own kernel ran 76-170 (ResNet-50's 28x28 128 -> 512: 111 against 145, 14x14
    1024 -> 256: 74 against 156). oneDNN stayed ahead where one side is 64 and the other at most 384 (56x56
    256 -> 64: 137-166 against 130-139), and tied or led where both are large (>= 384 and >= 1024).

    On AVX-512 (its 8 x 32 tile; BENCHMARKS.md, 2026-12-06, eighth session) oneDNN runs the large pairs at
    320-350 GFLOP/s, 3-10% ahead of the own kernel, but the products with one side of at most 128 channels or
    both of at most 512 at 180-280 where the own kernel runs 240-335 (ResNet-50's 56x56 64 -> 256: 182 against
    252, 28x28 128 -> 512: 276 against 311)."""
    if not own_kernel_built():
        return False
    small, large = sorted((rows, cols))
    if cpu.has("avx512f"):
        return small <= 128 or large <= 512
    return not (small <= 64 and large <= 384) and not (small >= 384 and large >= 1024)


def _gemm() -> Algorithm:
    """Forward ``x @ W``, input gradient ``dy @ W^T`` put back on the kept pixels, kernel gradient ``x^T @ dy``,
    each reading its operands where they lie."""
    def forward(x, kernel, spec):
        y = calls.matmul(gemm.kept_pixels(x, spec).astype(jnp.float32), kernel.reshape(kernel.shape[2:]))
        return y.astype(x.dtype)

    def every_pixel(spec):
        return spec.strides == (1, 1) and not any(spec.padding[0] + spec.padding[1])

    def input_grad(dy, kernel, spec):
        return summed_input_grad(dy, kernel, spec, None)

    def summed_input_grad(dy, kernel, spec, acc):
        """``acc + dx`` (``dx`` alone without ``acc``): in the GEMM where the gradient covers every pixel, else
        added to the spread gradient, which XLA fuses with the spreading."""
        dxs = calls.matmul(dy, kernel.reshape(kernel.shape[2:]), transpose_b=True,
                           accumulate=acc if every_pixel(spec) else None)
        if every_pixel(spec):
            return dxs
        # the forward kept pixels (pad, then every stride-th): put the gradient back there, zeros elsewhere, and
        # drop the padding, all as one lax.pad (interior zeros, negative edges crop), which XLA fuses into the
        # add that sums this gradient with the block's other branch; zeros + a strided scatter were two passes
        # over the whole input gradient of their own
        edges = [(0, 0, 0)]
        for size, (low, _), stride, kept in zip(spec.x_shape[1:3], spec.padding, spec.strides, dxs.shape[1:3]):
            spread = (kept - 1) * stride + 1  # from the first kept pixel to the last, zeros between
            edges.append((-low, size + low - spread, stride - 1))
        dx = lax.pad(dxs, jnp.zeros((), dxs.dtype), edges + [(0, 0, 0)])
        return dx if acc is None else acc + dx

    def kernel_grad(x, dy, spec):
        xs = gemm.kept_pixels(x, spec)
        own = kernel_grad_own_kernel(xs.shape[-1], dy.shape[-1])
        dk = calls.matmul(xs.reshape(-1, xs.shape[-1]), dy.reshape(-1, dy.shape[-1]), transpose_a=True,
                          own_kernel=own)
        return dk.reshape(spec.kernel_shape)

    return Algorithm(name="onednn_gemm", cpu_only=True, unavailable=unavailable_reason,
                     limits=_extension_limits("never", gemm.limits),
                     forward=forward, input_grad=input_grad, kernel_grad=kernel_grad,
                     summed_input_grad=summed_input_grad)


def _winograd(m: int) -> Algorithm:
    def fused_forward(x, kernel, spec, bias=None, residual=None, relu=False):
        return calls.winograd_forward(x, kernel, spec.padding, m, bias, residual, relu)

    def input_grad(dy, kernel, spec, acc=None):  # acc, if any, as the residual of the gradient's convolution
        return calls.winograd_forward(dy, kernel, winograd.input_grad_padding(spec.padding), m, residual=acc,
                                      transposed_kernel=True)

    return Algorithm(
        name=f"onednn_winograd_f{m}", cpu_only=True, unavailable=unavailable_reason,
        limits=_extension_limits("always", winograd.limits),
        forward=lambda x, kernel, spec: fused_forward(x, kernel, spec), fused_forward=fused_forward,
        input_grad=input_grad, summed_input_grad=input_grad,
        kernel_grad=lambda x, dy, spec: calls.winograd_backward_weights(x, dy, spec.padding, m))


ALGORITHMS = (_direct(), _matmul_grad(), _gemm(), _winograd(2), _winograd(4))
