"""The extension's algorithms: oneDNN's direct convolutions ("onednn"), oneDNN's GEMM for 1x1 convolutions
("onednn_gemm"), and Winograd F(2,3)/F(4,3) tiles around oneDNN's matmul ("onednn_winograd_f2"/"_f4"). The
forward of "onednn" and of the Winograd ones applies the epilogue (bias, residual, ReLU) inside the kernel.
"""

from __future__ import annotations

import jax.numpy as jnp

from resnet_jax.ops import cpu, gemm, winograd
from resnet_jax.ops.onednn import calls
from resnet_jax.ops.onednn.library import unavailable_reason
from resnet_jax.ops.spec import Algorithm


def _extension_limits(float32_only: bool, shape_limits=None):
    """Shapes and dtypes only (the CPU's flags, never the extension itself): whether the library is there is
    ``unavailable``'s question, asked after these (``Algorithm.refusal``)."""
    def limits(spec) -> str | None:
        reason = None if shape_limits is None else shape_limits(spec)
        if reason is not None:
            return reason
        allowed = ("float32",) if float32_only or not cpu.native_bfloat16() else ("float32", "bfloat16")
        if spec.dtype not in allowed:
            return f"computes {' and '.join(allowed)} only, not {spec.dtype}"
        return None
    return limits


def _direct() -> Algorithm:
    return Algorithm(
        name="onednn", cpu_only=True, dilated=True, unavailable=unavailable_reason,
        limits=_extension_limits(False),
        forward=lambda x, kernel, spec: calls.conv_forward(x, kernel, spec),
        fused_forward=calls.conv_forward,
        input_grad=calls.conv_backward_data,
        kernel_grad=calls.conv_backward_weights)


def _gemm() -> Algorithm:
    """Forward ``x @ W``, input gradient ``dy @ W^T`` put back on the kept pixels, kernel gradient ``x^T @ dy``,
    each reading its operands where they lie."""
    def forward(x, kernel, spec):
        xs = gemm.kept_pixels(x, spec)
        y = calls.matmul(xs.reshape(-1, xs.shape[-1]).astype(jnp.float32), kernel.reshape(kernel.shape[2:]))
        return y.reshape(*xs.shape[:3], -1).astype(x.dtype)

    def input_grad(dy, kernel, spec):
        dxs = calls.matmul(dy.reshape(-1, dy.shape[-1]), kernel.reshape(kernel.shape[2:]), transpose_b=True)
        dxs = dxs.reshape(*dy.shape[:3], -1)
        if spec.strides == (1, 1) and not any(spec.padding[0] + spec.padding[1]):
            return dxs
        # the forward kept pixels (pad, then every stride-th): put the gradient back there, zeros elsewhere
        (top, bottom), (left, right) = spec.padding
        n, h, w, c = spec.x_shape
        full = jnp.zeros((n, h + top + bottom, w + left + right, c), dy.dtype)
        full = full.at[:, ::spec.strides[0], ::spec.strides[1], :].set(dxs)
        return full[:, top:top + h, left:left + w, :]

    def kernel_grad(x, dy, spec):
        xs = gemm.kept_pixels(x, spec)
        dk = calls.matmul(xs.reshape(-1, xs.shape[-1]), dy.reshape(-1, dy.shape[-1]), transpose_a=True)
        return dk.reshape(spec.kernel_shape)

    return Algorithm(name="onednn_gemm", cpu_only=True, unavailable=unavailable_reason,
                     limits=_extension_limits(True, gemm.limits),
                     forward=forward, input_grad=input_grad, kernel_grad=kernel_grad)


def _winograd(m: int) -> Algorithm:
    def fused_forward(x, kernel, spec, bias=None, residual=None, relu=False):
        return calls.winograd_forward(x, kernel, spec.padding, m, bias, residual, relu)

    return Algorithm(
        name=f"onednn_winograd_f{m}", cpu_only=True, unavailable=unavailable_reason,
        limits=_extension_limits(True, winograd.limits),
        forward=lambda x, kernel, spec: fused_forward(x, kernel, spec), fused_forward=fused_forward,
        input_grad=lambda dy, kernel, spec: calls.winograd_forward(
            dy, *winograd.input_grad_as_forward(kernel, spec.padding), m),
        kernel_grad=lambda x, dy, spec: calls.winograd_backward_weights(x, dy, spec.padding, m))


ALGORITHMS = (_direct(), _gemm(), _winograd(2), _winograd(4))
