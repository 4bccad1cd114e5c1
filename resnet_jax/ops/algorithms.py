"""The convolution algorithms by name, what each can compute, and the per-shape choice behind "auto".

Every algorithm computes exactly ``lax.conv_general_dilated`` (NHWC input, HWIO kernel, explicit padding,
stride, groups) with its own custom VJP; they differ only in speed, which depends on the layer's shape, the
dtype and the backend. ``choose`` is deterministic: a rule table measured on CPUs (BENCHMARKS.md, "Per-layer
algorithms"), and XLA's own convolutions on GPU/TPU, whose libraries pick their own algorithms.
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
    name: str
    conv: Callable  # (x, kernel, strides, padding, groups) -> y, differentiable
    limits: Callable[[Geometry], str | None]  # None when it computes this geometry, else what it cannot do
    cpu_only: bool = False
    # (x, kernel, bias, residual, strides, padding, groups, relu) -> y with the epilogue fused in, or None
    fused: Callable | None = None

    def refusal(self, g: Geometry, backend: str) -> str | None:
        if self.cpu_only and backend != "cpu":
            return f"algorithm {self.name!r} runs on CPU only (this backend is {backend})"
        reason = self.limits(g)
        return None if reason is None else f"algorithm {self.name!r} {reason}; this convolution is {g.describe()}"


def _any(g: Geometry) -> str | None:
    return None


def _ungrouped(g: Geometry) -> str | None:
    return "computes ungrouped convolutions only" if g.groups != 1 else None


def _extension_limits(float32_only: bool):
    def limits(g: Geometry) -> str | None:
        from resnet_jax.ops import onednn

        allowed = ("float32",) if float32_only else ("float32", "bfloat16")
        if g.dtype not in allowed:
            return f"computes {' and '.join(allowed)} only, not {g.dtype}"
        reason = onednn.unavailable_reason()
        return None if reason is None else f"is unavailable ({reason})"
    return limits


def _both(*checks):
    return lambda g: next((r for r in (c(g) for c in checks) if r is not None), None)


def _registry() -> dict[str, Algorithm]:
    from resnet_jax.ops import gemm, matmul_grad, onednn, polyphase, winograd
    from resnet_jax.ops.xla import xla_conv

    def extension(kind):
        def fused(x, kernel, bias, residual, strides, padding, groups, relu):
            return onednn.conv(x, kernel, bias, residual, strides, padding, groups, relu, kind)
        return fused

    def unfused(fused):
        return lambda x, kernel, strides, padding, groups: fused(x, kernel, None, None, strides, padding, groups,
                                                                 False)

    table = [
        Algorithm("xla", xla_conv, _any),
        Algorithm("matmul_grad", matmul_grad.conv, _any),
        Algorithm("im2col", matmul_grad.im2col, matmul_grad.im2col_limits),
        Algorithm("gemm", gemm.conv, gemm.limits),
        Algorithm("polyphase", polyphase.conv, polyphase.limits),
        *(Algorithm(f"winograd_f{m}", winograd.algorithm(m), winograd.limits) for m in (2, 4)),
        # C++ through jax.ffi, the optional CPU extension: oneDNN's direct kernels, and Winograd tiles around
        # oneDNN's matmul (float32), each with the epilogue fused
        Algorithm("onednn", unfused(extension("direct")), _extension_limits(False), True, extension("direct")),
        *(Algorithm(f"onednn_winograd_f{m}", unfused(extension(m)), _both(winograd.limits, _extension_limits(True)),
                    True, extension(m)) for m in (2, 4)),
    ]
    return {a.name: a for a in table}


REGISTRY = _registry()
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)


def choose(g: Geometry, backend: str) -> str:
    """The algorithm "auto" runs for this geometry on this backend."""
    if backend != "cpu":
        return "xla"
    for name in ("onednn_winograd_f4", "onednn"):
        if REGISTRY[name].refusal(g, backend) is None:
            return name
    return "matmul_grad"
