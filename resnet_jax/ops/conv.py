"""``conv2d``: one NHWC convolution, each pass (forward, input gradient, kernel gradient) computed by a named
algorithm or by the one ``choose`` picks for its shape, joined through the linear primitives of ``linear.py``
(so every JAX transformation works, forward mode included).

The optional epilogue (``bias``, ``residual``, ``relu``) is what BatchNorm folding leaves after a convolution:
``relu(conv(x) + bias + residual)``. An algorithm that can fuse it (oneDNN's post-ops) does so and saves a pass
over the output; for the others it is plain ``jnp``, which XLA fuses into one elementwise pass.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.ops import fanout, linear
from resnet_jax.ops.jax_compat import SymbolicZero
from resnet_jax.ops.registry import REGISTRY
from resnet_jax.ops.rules import compute_dtype, resolve
from resnet_jax.ops.spec import ConvSpec, geometry
from resnet_jax.ops.xla import lax_conv


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides: int | Sequence[int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "SAME", groups: int = 1, *, bias: jnp.ndarray | None = None,
           residual: jnp.ndarray | None = None, relu: bool = False, algorithm: str = "auto",
           fallback: bool = False, dilation: int | Sequence[int] = 1, fan_out: bool = False):
    """``relu(conv(x, kernel) + bias + residual)``, NHWC x HWIO -> NHWC; equal to ``lax.conv_general_dilated``
    (values and both gradients) for every algorithm within float32 rounding.

    ``padding`` is "SAME", "VALID" or explicit ``((top, bottom), (left, right))``; ``dilation`` spaces the
    kernel's taps (``rhs_dilation``, the atrous convolution of dilated backbones), which only the algorithms
    marked ``dilated`` compute ("auto" picks one). ``algorithm`` is one of
    ``ALGORITHMS`` (all three passes by that algorithm), three of them joined by "/" (forward/input
    gradient/kernel gradient, e.g. "xla/xla/winograd_f4"), "auto" (per pass, the fastest measured for this
    shape, dtype and backend) or "jax" (the same among the pure-JAX algorithms: what "auto" does without the
    CPU extension). A forced algorithm that cannot compute this convolution raises ``ValueError`` saying why,
    unless ``fallback`` (what a model's ``conv_impl`` uses): then "auto" computes it instead. "auto" and "jax"
    compute bfloat16 in float32 on CPUs without bfloat16 instructions (``rules.compute_dtype``).

    ``fan_out``: return ``(y, x)``, ``x`` passed through for the caller's other use of it (a block's
    shortcut): the gradient reaching ``x`` by both outputs is then summed inside the input gradient's pass
    where the algorithm can (``fanout.py``), not by a pass of its own; where it cannot, autodiff adds them, as
    without ``fan_out`` (the fan-out primitive then cost bfloat16 ResNet-18-CIFAR 3% of a step).
    """
    if x.dtype != kernel.dtype:
        raise ValueError(f"conv2d computes in one dtype, but x is {x.dtype} and the kernel {kernel.dtype}; cast "
                         "one of them (as lax.conv_general_dilated requires too)")
    _check_shapes(x.shape, kernel.shape, groups)
    strides, padding = geometry(x.shape[1:3], kernel.shape[:2], strides, padding, dilation)
    dtype = compute_dtype(jnp.dtype(x.dtype).name, algorithm, jax.default_backend())
    if dtype != jnp.dtype(x.dtype).name:
        cast = lambda a: None if a is None else a.astype(dtype)  # noqa: E731
        out = conv2d(cast(x), cast(kernel), strides, padding, groups, bias=cast(bias), residual=cast(residual),
                     relu=relu, algorithm=algorithm, fallback=fallback, dilation=dilation, fan_out=fan_out)
        return tuple(o.astype(x.dtype) for o in out) if fan_out else out.astype(x.dtype)
    spec = ConvSpec.of(x, kernel, strides, padding, groups, dilation)
    if residual is not None and residual.shape != spec.y_shape:  # broadcast as lax's add would, on every path
        residual = jnp.broadcast_to(residual, spec.y_shape)
    passes = resolve(algorithm, spec, jax.default_backend(), fallback)
    # plain lax, which every transformation knows; and a convolution of nothing (no images, no input channels, an
    # empty output: what lax gives), which the extension's kernels and the pure-JAX algorithms' tilings cannot
    # be built for (a batch of 0 divided by zero in them; an empty output's gradient failed in oneDNN)
    if (all(REGISTRY[name].xla_ops_only for name in passes) or 0 in x.shape or 0 in kernel.shape
            or 0 in spec.y_shape):
        y = _epilogue(lax_conv(x, kernel, spec.strides, spec.padding, groups, spec.dilation), bias, residual, relu)
        return (y, x) if fan_out else y
    if bias is None and residual is None and not relu and not fan_out:
        # no epilogue: the bilinear primitive itself, which jax.linear_transpose can transpose too (the
        # custom_jvp around a fused epilogue cannot be); it runs the same forward pass
        return linear.conv(x, kernel, passes, spec)
    if fan_out and REGISTRY[passes[1]].summed_input_grad is None:  # nothing to fuse: autodiff's add, as before
        return _composed(x, kernel, bias, residual, spec, relu, passes), x
    return _composed(x, kernel, bias, residual, spec, relu, passes, bool(fan_out))


def _check_shapes(x_shape, kernel_shape, groups) -> None:
    """One sentence for a call that cannot be a convolution, whichever algorithm would run it (the extension's
    kernels said "inconsistent channel counts or groups" from inside the compiled program, a rank-3 image
    "not enough values to unpack")."""
    if len(x_shape) != 4 or len(kernel_shape) != 4:
        raise ValueError(f"conv2d takes NHWC images (rank 4) and an HWIO kernel (rank 4), got shapes {x_shape} and "
                         f"{kernel_shape}; a single image needs a batch axis: x[None]")
    if groups < 1 or x_shape[3] % groups:
        raise ValueError(f"conv2d: groups={groups} does not divide the image's {x_shape[3]} channels")
    if x_shape[3] // groups != kernel_shape[2] or kernel_shape[3] % groups:
        raise ValueError(f"conv2d: {x_shape[3]} input channels in {groups} group(s) need a kernel (HWIO) of "
                         f"{x_shape[3] // groups} input channels and output channels divisible by {groups}, got "
                         f"{kernel_shape}")


def _epilogue(y, bias, residual, relu):
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if residual is not None:
        y = y + residual.astype(y.dtype)
    return jax.nn.relu(y) if relu else y


def _forward(x, kernel, bias, residual, spec, relu, name):
    algorithm = REGISTRY[name]
    if algorithm.fused_forward is not None:
        bias = None if bias is None else bias.astype(x.dtype)
        return algorithm.fused_forward(x, kernel, spec, bias, residual, relu)
    return _epilogue(algorithm.forward(x, kernel, spec), bias, residual, relu)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _composed(x, kernel, bias, residual, spec, relu, passes, fan_out=False):
    """The convolution with its epilogue, each pass computed by the algorithm ``passes`` names for it (and with
    ``fan_out``, ``x`` itself as a second output)."""
    y = _forward(x, kernel, bias, residual, spec, relu, passes[0])
    return (y, x) if fan_out else y


@functools.partial(_composed.defjvp, symbolic_zeros=True)
def _composed_jvp(spec, relu, passes, fan_out, primals, tangents):
    """The primal is the fused forward; the tangent ``mask * (conv(dx, k) + conv(x, dk) + dbias + dresidual)``
    is built from ``linear.conv_p``, whose transposes are the input- and kernel-gradient passes: reverse mode
    (the transpose of this map) runs the algorithms ``passes`` names, and forward mode works as it is. With
    ``fan_out`` the ``dx`` term and ``dx`` itself come from ``fanout.fanout_p``, whose transpose sums both
    outputs' cotangents in the input gradient's pass."""
    x, kernel, bias, residual = primals
    dx, dkernel, dbias, dresidual = (None if type(t) is SymbolicZero else t for t in tangents)
    y = _composed(x, kernel, bias, residual, spec, relu, passes, False)  # higher orders: this rule again
    terms, tx = [], None
    if dx is not None and fan_out:
        ty, tx = fanout.conv_fanout(dx.astype(x.dtype), kernel, passes, spec)
        terms.append(ty)
    elif dx is not None:
        terms.append(linear.conv(dx.astype(x.dtype), kernel, passes, spec))
    if dkernel is not None:
        terms.append(linear.conv(x, dkernel.astype(kernel.dtype), passes, spec))
    if dbias is not None:
        terms.append(jnp.broadcast_to(dbias.astype(y.dtype), y.shape))
    if dresidual is not None:
        terms.append(dresidual.astype(y.dtype))
    t = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
    if relu:
        t = jnp.where(y > 0, t, jnp.zeros_like(t))
    if not fan_out:
        return y, t
    return (y, x), (t, jnp.zeros_like(x) if tx is None else tx)


class Conv(nn.Module):
    """A bias-optional ``nn.Conv`` replacement whose convolution is ``conv2d`` with a chosen ``algorithm``.

    Same ``kernel`` parameter (HWIO) and output as ``nn.Conv``, so weights and checkpoints do not depend on the
    algorithm. ``__call__(x, residual=None, relu=False, fan_out=False)`` applies the fused epilogue (and with
    ``fan_out`` returns ``(y, x)``, see ``conv2d``). Where ``algorithm`` cannot compute this layer (Winograd on a
    strided layer, say) "auto" does, so one name can serve a whole model.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    feature_group_count: int = 1
    kernel_dilation: int | Sequence[int] = 1
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jnp.ndarray] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jnp.ndarray] = nn.initializers.zeros
    algorithm: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, residual: jnp.ndarray | None = None, relu: bool = False,
                 fan_out: bool = False):
        shape = (*self.kernel_size, x.shape[-1] // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(x, kernel, self.strides, self.padding, self.feature_group_count, bias=bias, residual=residual,
                      relu=relu, algorithm=self.algorithm, fallback=True, dilation=self.kernel_dilation,
                      fan_out=fan_out)
