"""``conv2d``: one NHWC convolution, computed by a named algorithm or the one ``choose`` picks for its shape.

The optional epilogue (``bias``, ``residual``, ``relu``) is what BatchNorm folding leaves after a convolution:
``relu(conv(x) + bias + residual)``. An algorithm that can fuse it (oneDNN's post-ops) does so and saves a pass
over the output; for the others it is plain ``jnp``, which XLA fuses into one elementwise pass.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.ops.algorithms import ALGORITHMS, REGISTRY, Geometry, choose

Padding = tuple[tuple[int, int], tuple[int, int]]


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int] = (1, 1),
           padding: str | Sequence[tuple[int, int]] = "SAME", groups: int = 1, *, bias: jnp.ndarray | None = None,
           residual: jnp.ndarray | None = None, relu: bool = False, algorithm: str = "auto",
           fallback: bool = False) -> jnp.ndarray:
    """``relu(conv(x, kernel) + bias + residual)``, NHWC x HWIO -> NHWC; equal to ``lax.conv_general_dilated``
    (values and both gradients) for every algorithm within float32 rounding.

    ``padding`` is "SAME", "VALID" or explicit ``((top, bottom), (left, right))``. ``algorithm`` is one of
    ``ALGORITHMS`` or "auto" (the fastest measured for this shape, dtype and backend). A forced algorithm that
    cannot compute this convolution raises ``ValueError`` saying why, unless ``fallback`` (what a model's
    ``conv_impl`` uses): then "auto" computes it instead.
    """
    strides = tuple(int(s) for s in strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    geometry = Geometry.of(x, kernel, strides, padding, groups)
    backend = jax.default_backend()
    name = choose(geometry, backend) if algorithm == "auto" else algorithm
    if name not in REGISTRY:
        raise ValueError(f"unknown convolution algorithm {algorithm!r}; choose one of {[*ALGORITHMS, 'auto']}")
    refusal = REGISTRY[name].refusal(geometry, backend)
    if refusal and fallback:
        name = choose(geometry, backend)
    elif refusal:
        raise ValueError(f"{refusal}; use algorithm='auto' to pick one that can")
    algo = REGISTRY[name]
    if algo.fused is not None:
        return algo.fused(x, kernel, bias, residual, strides, padding, groups, relu)
    y = algo.conv(x, kernel, strides, padding, groups)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if residual is not None:
        y = y + residual
    return jax.nn.relu(y) if relu else y


class Conv(nn.Module):
    """A bias-optional ``nn.Conv`` replacement whose convolution is ``conv2d`` with a chosen ``algorithm``.

    Same ``kernel`` parameter (HWIO) and output as ``nn.Conv``, so weights and checkpoints do not depend on the
    algorithm. ``__call__(x, residual=None, relu=False)`` applies the fused epilogue. Where ``algorithm`` cannot
    compute this layer (Winograd on a strided layer, say) "auto" does, so one name can serve a whole model.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | Sequence[tuple[int, int]] = "SAME"
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jnp.ndarray] = nn.initializers.lecun_normal()
    bias_init: Callable[..., jnp.ndarray] = nn.initializers.zeros
    algorithm: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, residual: jnp.ndarray | None = None, relu: bool = False) -> jnp.ndarray:
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        shape = (*self.kernel_size, x.shape[-1] // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(x, kernel, strides, self.padding, self.feature_group_count, bias=bias, residual=residual,
                      relu=relu, algorithm=self.algorithm, fallback=True)
