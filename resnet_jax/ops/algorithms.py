"""The convolution algorithms by name, what each can compute, and the per-shape choice behind "auto".

Every algorithm computes exactly ``lax.conv_general_dilated`` (NHWC input, HWIO kernel, explicit padding,
stride, groups) in three passes: the forward, the input gradient and the kernel gradient. They differ only in
speed, which depends on the layer's shape, the pass, the dtype and the backend, so a choice is a triple: one
algorithm per pass (``conv.py`` joins them through the linear primitives of ``linear.py``). ``choose`` is deterministic: rules from the
per-layer measurements on CPUs (BENCHMARKS.md, "Per-layer algorithms"), XLA's own convolutions on GPU/TPU,
whose libraries pick their own algorithms.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A convolution's static shape: what an algorithm choice may depend on."""

    batch: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    groups: int
    dtype: str

    @classmethod
    def of(cls, x, kernel, strides, padding, groups) -> "Geometry":
        n, h, w, cin = x.shape
        kh, kw, _, cout = kernel.shape
        return cls(n, h, w, cin, cout, (kh, kw), tuple(strides), tuple(padding), groups, jnp.dtype(x.dtype).name)

    def describe(self) -> str:
        (kh, kw), (sh, sw) = self.kernel, self.strides
        groups = f", groups {self.groups}" if self.groups != 1 else ""
        return f"{kh}x{kw} stride {sh}x{sw}{groups} on {self.height}x{self.width}x{self.in_channels}"


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One way to compute a convolution: its three passes and the shapes it can compute.

    forward(x, kernel, strides, padding, groups) -> y
    input_grad(dy, kernel, x_shape, strides, padding, groups) -> dx
    kernel_grad(x, dy, kernel_shape, kernel_dtype, strides, padding, groups) -> dkernel
    fused_forward(x, kernel, bias, residual, relu, strides, padding, groups) -> relu(y + bias + residual), for
      algorithms that apply that epilogue inside their kernel (saving a pass over y); None for the others.
    """

    name: str
    forward: Callable
    input_grad: Callable
    kernel_grad: Callable
    limits: Callable[[Geometry], str | None]  # None when it computes this geometry, else what it cannot do
    cpu_only: bool = False
    fused_forward: Callable | None = None

    def refusal(self, g: Geometry, backend: str) -> str | None:
        if self.cpu_only and backend != "cpu":
            return f"algorithm {self.name!r} runs on CPU only (this backend is {backend})"
        reason = self.limits(g)
        return None if reason is None else f"algorithm {self.name!r} {reason}; this convolution is {g.describe()}"


def _any(g: Geometry) -> str | None:
    return None


def _extension_limits(float32_only: bool):
    def limits(g: Geometry) -> str | None:
        from resnet_jax.ops import onednn

        allowed = ("float32",) if float32_only or not onednn.native_bfloat16() else ("float32", "bfloat16")
        if g.dtype not in allowed:
            return f"computes {' and '.join(allowed)} only, not {g.dtype}"
        reason = onednn.unavailable_reason()
        return None if reason is None else f"is unavailable ({reason})"
    return limits


def _both(*checks):
    return lambda g: next((r for r in (c(g) for c in checks) if r is not None), None)


def _autodiff(name, forward, limits) -> Algorithm:
    """An algorithm written as a differentiable forward: its gradients are autodiff's."""
    from resnet_jax.ops import xla

    return Algorithm(name, forward, xla.input_grad_by_autodiff(forward), xla.kernel_grad_by_autodiff(forward), limits)


def _extension() -> list[Algorithm]:
    from resnet_jax.ops import onednn

    def unfused(fused):
        return lambda x, kernel, strides, padding, groups: fused(x, kernel, None, None, False, strides, padding,
                                                                 groups)

    def direct(x, kernel, bias, residual, relu, strides, padding, groups):
        return onednn.forward(x, kernel, strides, padding, groups, bias, residual, relu)

    from resnet_jax.ops import gemm, winograd

    table = [Algorithm("onednn", unfused(direct), onednn.backward_data, onednn.backward_weights,
                       _extension_limits(False), True, direct),
             Algorithm("onednn_gemm", *gemm.extension_passes(), _both(gemm.limits, _extension_limits(True)), True)]

    for m in (2, 4):
        def fused(x, kernel, bias, residual, relu, strides, padding, groups, m=m):
            return onednn.winograd_forward(x, kernel, padding, m, bias, residual, relu)

        table.append(Algorithm(
            f"onednn_winograd_f{m}", unfused(fused),
            lambda dy, kernel, x_shape, strides, padding, groups, m=m: onednn.winograd_backward_data(
                dy, kernel, padding, m),
            lambda x, dy, kernel_shape, kernel_dtype, strides, padding, groups, m=m:
                onednn.winograd_backward_weights(x, dy, padding, m, kernel_dtype),
            _both(winograd.limits, _extension_limits(True)), True, fused))
    return table


def _registry() -> dict[str, Algorithm]:
    from resnet_jax.ops import gemm, matmul_grad, polyphase, winograd, xla

    table = [
        Algorithm("xla", xla.xla_conv, xla.input_grad, xla.kernel_grad, _any),
        Algorithm("matmul_grad", xla.xla_conv, xla.input_grad, matmul_grad.kernel_grad, _any),
        Algorithm("im2col", matmul_grad.im2col_forward, xla.input_grad, matmul_grad.kernel_grad,
                  matmul_grad.im2col_limits),
        _autodiff("gemm", gemm.forward, gemm.limits),
        _autodiff("polyphase", polyphase.forward, polyphase.limits),
        *(Algorithm(f"winograd_f{m}", *winograd.passes(m), winograd.limits) for m in (2, 4)),
        # C++ through jax.ffi, the optional CPU extension: oneDNN's direct kernels, and Winograd tiles around
        # oneDNN's matmul (float32), each with the epilogue fused
        *_extension(),
    ]
    return {a.name: a for a in table}


REGISTRY = _registry()
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)
CHOICES = ("auto", "jax")  # chosen per shape and pass: among all algorithms, or among the pure-JAX ones
Passes = tuple[str, str, str]  # the algorithm of the forward, of the input gradient, of the kernel gradient


def _usable(name: str, g: Geometry, backend: str) -> bool:
    return REGISTRY[name].refusal(g, backend) is None


def choose(g: Geometry, backend: str, extension: bool = True, measured: bool = True) -> Passes:
    """The algorithms "auto" runs for this geometry on this backend, per pass ("jax": ``extension=False``).

    With ``measured``, this machine's own measurements (``ops.tuning.tune``) win where they cover the shape.

    Rules read off the quiet per-layer tables (BENCHMARKS.md, "Per-layer algorithms"), float32 on CPU:
    - 3x3 stride 1: the extension's Winograd F(4,3) wins all three passes (1.5-2.7x oneDNN's direct kernels),
      except on small layers (``WINOGRAD_MIN_FLOPS``), where oneDNN's direct kernels win inside the model.
      Without it: XLA's forward and input gradient, and the kernel gradient by jnp Winograd F(4,3) in float32
      (1.4-2.7x the patch matmul on ResNet-50's layers), by the patch matmul otherwise.
    - 1x1: oneDNN's direct kernel forward (1.0-1.2x XLA's dot, and it applies the inference epilogue), oneDNN's
      GEMM for both gradients (1.0-1.3x XLA's dot for the input gradient, 1.1-1.8x for the kernel gradient, a
      reduction over every pixel). Without the extension: XLA's dot, which beats XLA's 1x1 convolution 2-10x.
    - The stems (3 or 1 input channels): oneDNN's direct kernels (1.7-7x XLA's forward, 1.8-3x the patch
      matmul's kernel gradient). Without the extension: XLA's forward and the patch-matmul kernel gradient.
    - Other strided or large kernels: oneDNN's direct kernels; without the extension XLA's with the patch matmul.
    bfloat16 takes oneDNN's direct kernels (AVX-512 BF16) where the float32-only algorithms do not apply. On
    GPU/TPU: XLA's own, whose libraries choose their algorithms themselves.
    """
    if backend != "cpu":
        return ("xla", "xla", "xla")
    if measured:
        from resnet_jax.ops.tuning import tuned_choice

        tuned = tuned_choice(g, extension)
        if tuned:
            return tuned
    ok = lambda *names: all(_usable(n, g, backend) for n in names)  # noqa: E731
    pure_kernel_grad = "matmul_grad" if g.groups == 1 else "xla"
    if g.kernel == (1, 1) and g.groups == 1:
        pure = ("gemm", "gemm", "gemm")
        return ("onednn", "onednn_gemm", "onednn_gemm") if extension and ok("onednn", "onednn_gemm") else pure
    winograd_grad = g.dtype == "float32" and _usable("winograd_f4", g, backend)
    pure = ("xla", "xla", "winograd_f4" if winograd_grad and g.in_channels >= 8 else pure_kernel_grad)
    if not extension:
        return pure
    # Winograd's fixed costs outweigh the multiplies it saves on small layers and on the stems' few channels
    small = _direct_flops(g) < WINOGRAD_MIN_FLOPS or g.in_channels < 8
    for name in ("onednn",) if small else ("onednn_winograd_f4", "onednn"):
        if ok(name):
            return (name, name, name)
    return pure


# Inside whole steps the extension's Winograd lost to oneDNN's direct kernels on layers of <= 0.6 GFLOP
# (ResNet-18-CIFAR at batch 8, the digits ResNet-20) and won from 2.4 GFLOP up (batch 32 and more).
WINOGRAD_MIN_FLOPS = 1e9


def _direct_flops(g: Geometry) -> float:
    """Multiply-adds x 2 of the direct convolution (output size taken as input size / stride)."""
    outputs = g.batch * (g.height // g.strides[0]) * (g.width // g.strides[1]) * g.out_channels
    return 2.0 * outputs * g.kernel[0] * g.kernel[1] * g.in_channels / g.groups
