"""The two types every part of ops/ shares: ``ConvSpec``, what a convolution is, and ``Algorithm``, one way to
compute it.

Every algorithm computes exactly ``lax.conv_general_dilated`` (NHWC input, HWIO kernel, explicit padding,
stride, groups) in three passes, the forward, the input gradient and the kernel gradient, and every pass has the
same signature: two arrays and the ``ConvSpec`` of the forward convolution. Algorithms differ only in speed and
in which convolutions they can compute (``limits``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]


def accumulation_dtype(dtype) -> jnp.dtype:
    """What the matmul-based algorithms accumulate in: float32 for float32 and narrower inputs, float64 for float64
    (a float32 product there silently dropped a float64 model's convolutions to float32's precision)."""
    return jnp.promote_types(dtype, jnp.float32)


def output_size(size: int, window: int, stride: int, low: int, high: int) -> int:
    """Outputs along one axis of a window (convolution kernel, pool window) sliding at ``stride`` over ``size``
    inputs padded by ``low`` and ``high``: the one copy of this arithmetic in ops/."""
    return (size + low + high - window) // stride + 1


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """One int for both axes, or two."""
    value = (value,) * 2 if isinstance(value, int) else tuple(value)
    return int(value[0]), int(value[1])


def dilated_window(window_hw: Sequence[int], dilation: int | Sequence[int] = 1) -> tuple[int, int]:
    """The extent a window covers with ``dilation - 1`` gaps between its taps: ``(k - 1) * d + 1``."""
    return tuple((int(k) - 1) * d + 1 for k, d in zip(window_hw, pair(dilation)))


def geometry(in_hw: Sequence[int], window_hw: Sequence[int], strides: int | Sequence[int],
             padding: str | Sequence[Sequence[int]], dilation: int | Sequence[int] = 1
             ) -> tuple[tuple[int, int], Padding]:
    """``(strides, padding)`` as int pairs: one stride for both axes or two, "SAME"/"VALID" (as lax pads them,
    for the dilated window) or explicit ``((top, bottom), (left, right))``. The one place a layer's or a
    caller's geometry is read."""
    strides = positive_pair("strides", strides)
    positive_pair("dilation", dilation)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"padding {padding!r} is not 'SAME', 'VALID' or ((top, bottom), (left, right))")
        padding = lax.padtype_to_pads(tuple(in_hw), dilated_window(window_hw, dilation), strides, padding.upper())
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    except (TypeError, ValueError):
        pads = ()
    if len(pads) != 2:
        raise ValueError(f"padding must be 'SAME', 'VALID' or two (low, high) pairs, ((top, bottom), (left, "
                         f"right)), got {padding!r}")
    return strides, pads


def positive_pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """``value`` as a pair of positive ints, or ``ValueError`` naming it (a 0 divided by zero, a negative one
    reached the compiler as an MLIR error)."""
    try:
        values = pair(value)
    except (TypeError, ValueError, IndexError):
        values = ()
    if len(values) != 2 or min(values) < 1:
        raise ValueError(f"{name} must be one positive integer or two, got {value!r}")
    return values


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A convolution's static description: shapes, stride, padding, groups and the dtype it computes in.

    Hashable, so it is the static parameter of the convolution primitives and the key of every choice.
    """

    batch: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: Padding
    groups: int
    dtype: str
    dilation: tuple[int, int] = (1, 1)  # the kernel's (atrous convolution: DeepLab's dilated stages)

    @classmethod
    def of(cls, x, kernel, strides, padding, groups, dilation: int | Sequence[int] = 1) -> ConvSpec:
        """The spec of ``conv(x, kernel)`` (arrays or shape-dtype structs); ``strides`` and ``padding`` in any
        form ``geometry`` reads. A 1x1 kernel's dilation changes nothing and is recorded as 1."""
        n, h, w, cin = x.shape
        kh, kw, _, cout = kernel.shape
        strides, padding = geometry((h, w), (kh, kw), strides, padding, dilation)
        dilation = tuple(d if k > 1 else 1 for k, d in zip((kh, kw), pair(dilation)))
        return cls(n, h, w, cin, cout, (kh, kw), strides, padding, int(groups), jnp.dtype(x.dtype).name, dilation)

    @property
    def dilated(self) -> bool:
        return self.dilation != (1, 1)

    @property
    def cropped(self) -> bool:
        """Whether some padding is negative: ``lax.conv_general_dilated`` then crops the input, which only XLA's
        own convolution computes (the others pad with ``jnp.pad`` or in their kernels, zeros only)."""
        return any(p < 0 for pair in self.padding for p in pair)

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.height, self.width, self.in_channels)

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (*self.kernel, self.in_channels // self.groups, self.out_channels)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        (kh, kw), (sh, sw), ((top, bottom), (left, right)) = dilated_window(self.kernel, self.dilation), \
            self.strides, self.padding
        ho, wo = output_size(self.height, kh, sh, top, bottom), output_size(self.width, kw, sw, left, right)
        return (self.batch, ho, wo, self.out_channels)

    def direct_flops(self) -> float:
        """Multiply-adds x 2 of the direct convolution."""
        _, ho, wo, cout = self.y_shape
        return 2.0 * self.batch * ho * wo * cout * self.kernel[0] * self.kernel[1] * self.in_channels / self.groups

    @property
    def concrete(self) -> bool:
        """Whether every size is a number: under ``jax.export``'s shape polymorphism the batch (or the image) can
        be a symbol, which no algorithm here but XLA's own can lay out and no measurement can key."""
        return all(isinstance(v, int) for v in (self.batch, self.height, self.width))

    def key(self) -> str:
        """A stable text form (the tuning cache's key; undilated specs keep the key they had before dilation)."""
        dilation = [self.dilation] if self.dilated else []
        return json.dumps([self.batch, self.height, self.width, self.in_channels, self.out_channels, self.kernel,
                           self.strides, self.padding, self.groups, self.dtype, *dilation])

    def describe(self) -> str:
        (kh, kw), (sh, sw) = self.kernel, self.strides
        groups = f", groups {self.groups}" if self.groups != 1 else ""
        groups += f", dilation {self.dilation[0]}x{self.dilation[1]}" if self.dilated else ""
        groups += f", padding {self.padding}" if self.cropped else ""
        return f"{kh}x{kw} stride {sh}x{sw}{groups} on {self.height}x{self.width}x{self.in_channels}"


def any_spec(spec: ConvSpec) -> str | None:
    """The ``limits`` of an algorithm that computes every convolution."""
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm:
    """One way to compute a convolution: its three passes and the convolutions it can compute.

    forward(x, kernel, spec) -> y
    input_grad(dy, kernel, spec) -> dx
    kernel_grad(x, dy, spec) -> dkernel
    fused_forward(x, kernel, spec, bias, residual, relu) -> relu(y + bias + residual), for algorithms that apply
      that epilogue inside their kernel (saving a pass over y); None for the others.
    summed_input_grad(dy, kernel, spec, acc) -> acc + input_grad(dy, kernel, spec) with ``acc``'s buffer as the
      result, for algorithms that add it inside their kernel (saving a pass over dx where the convolution's input
      also went elsewhere, ``fanout.py``); None for the others (``input_grad_plus`` adds it after).
    limits(spec) -> None when it computes ``spec``, else what it cannot do, as the end of a sentence. Shapes and
      dtypes only: asking it never loads or builds anything.
    unavailable() -> None when it can run in this process, else why not (the extension: loaded, and built the
      first time, when asked). ``refusal`` asks it only for a convolution ``limits`` accepts.
    dilated: it computes dilated (atrous) kernels too; the others are refused any convolution with dilation > 1.
    cpu_only: it runs on CPU only (the C++ extension).
    xla_ops_only: it computes with XLA's own convolution only, so a model built with it holds XLA's own
      operations only (the plain reference, the exported artifacts): its max-pool keeps ``reduce_window`` too.
    """

    name: str
    forward: Callable
    input_grad: Callable
    kernel_grad: Callable
    limits: Callable[[ConvSpec], str | None] = any_spec
    dilated: bool = False
    cpu_only: bool = False
    xla_ops_only: bool = False
    fused_forward: Callable | None = None
    summed_input_grad: Callable | None = None
    unavailable: Callable[[], str | None] | None = None

    @classmethod
    def from_forward(cls, name: str, forward: Callable, **fields) -> Algorithm:
        """An algorithm written as a differentiable forward: both gradients are autodiff's. A convolution is
        linear in each operand, so the point the derivative is taken at does not matter (zeros), and XLA drops
        the unused forward."""
        def input_grad(dy, kernel, spec):
            return jax.vjp(lambda x: forward(x, kernel, spec), jnp.zeros(spec.x_shape, dy.dtype))[1](dy)[0]

        def kernel_grad(x, dy, spec):
            return jax.vjp(lambda k: forward(x, k, spec), jnp.zeros(spec.kernel_shape, x.dtype))[1](dy)[0]

        return cls(name=name, forward=forward, input_grad=input_grad, kernel_grad=kernel_grad, **fields)

    @classmethod
    def wrapping(cls, base: Algorithm, suffix: str, **fields) -> Algorithm:
        """An algorithm that computes through ``base`` on operands of its own (``@atrous``: sub-grids,
        ``@float32``: upcast ones), named ``base.name + suffix``. It keeps what says where ``base`` runs
        (``cpu_only``, ``xla_ops_only``, ``unavailable``) and takes every other field from ``fields`` or the
        defaults, never from ``base``: a field that ties an algorithm to its own operands (a fused epilogue, a sum
        inside its kernel) must not reach a wrapper that hands the base other operands (``dataclasses.replace``
        had inherited them, and each new field had to be cleared by hand in every wrapper)."""
        return cls(name=base.name + suffix, cpu_only=base.cpu_only, xla_ops_only=base.xla_ops_only,
                   unavailable=base.unavailable, **fields)

    def input_grad_plus(self, dy, kernel, spec: ConvSpec, acc):
        """``acc + input_grad(dy, kernel, spec)``: inside the kernel where the algorithm can, else added after."""
        if self.summed_input_grad is not None:
            return self.summed_input_grad(dy, kernel, spec, acc)
        return acc + self.input_grad(dy, kernel, spec).astype(acc.dtype)

    def shape_limit(self, spec: ConvSpec) -> str | None:
        """``limits`` and the rules every algorithm shares: None when the shapes and dtype are its to compute, else
        what it cannot do. Like ``limits`` it never loads or builds anything."""
        reason = self.limits(spec)
        if reason is None and spec.dilated and not self.dilated:
            reason = "computes undilated convolutions only"
        if reason is None and spec.cropped and not self.xla_ops_only:
            reason = "computes non-negative padding only"
        return reason

    def refusal(self, spec: ConvSpec, backend: str) -> str | None:
        """None when this algorithm computes ``spec`` on ``backend``, else a sentence saying why not."""
        if self.cpu_only and backend != "cpu":
            return f"algorithm {self.name!r} runs on CPU only (this backend is {backend})"
        reason = self.shape_limit(spec)
        if reason is None and self.unavailable is not None:
            missing = self.unavailable()
            reason = None if missing is None else f"is unavailable ({missing})"
        return None if reason is None else f"algorithm {self.name!r} {reason}; this convolution is {spec.describe()}"
