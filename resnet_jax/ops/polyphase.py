"""Algorithm "polyphase": a stride-2 convolution as four stride-1 convolutions, one per input phase.

XLA:CPU runs stride-2 convolutions well below the rate of stride-1 ones (docs/cpu-convolution.md). Splitting
the padded input into its four (row parity, column parity) phases turns ``y = conv_s2(x, w)`` into the sum of
four stride-1 convolutions of the phases with the matching taps of the kernel: a 3x3 kernel gives sub-kernels
of 2x2, 2x1, 1x2 and 1x1 taps, 9 in all, so no multiply is wasted. Autodiff through slices and stride-1
convolutions gives both gradients in the same stride-1 form.
"""

from __future__ import annotations

import jax.numpy as jnp

from resnet_jax.ops.spec import Algorithm
from resnet_jax.ops.xla import lax_conv


def forward(x, kernel, spec):
    kh, kw = spec.kernel
    _, ho, wo, _ = spec.y_shape
    # pad so every phase has ho + (taps - 1) rows: phase p holds rows p, p + 2, ... of the padded input
    rows, cols = 2 * (ho + (kh - 1) // 2) + 1, 2 * (wo + (kw - 1) // 2) + 1
    (top, _), (left, _) = spec.padding
    xp = jnp.pad(x, ((0, 0), (top, max(0, rows - x.shape[1] - top)), (left, max(0, cols - x.shape[2] - left)),
                     (0, 0)))
    y = None
    for p in range(min(2, kh)):
        for q in range(min(2, kw)):
            phase = xp[:, p::2, q::2, :]
            sub = kernel[p::2, q::2]  # taps p, p + 2, ... of the kernel
            part = lax_conv(phase, sub, (1, 1), ((0, 0), (0, 0)), spec.groups)[:, :ho, :wo, :]
            y = part if y is None else y + part
    return y


def limits(spec) -> str | None:
    if spec.strides != (2, 2) or spec.kernel[0] < 2 or spec.kernel[1] < 2:
        return "computes stride-2 convolutions with kernels of 2x2 or larger only"
    return None


POLYPHASE = Algorithm.from_forward("polyphase", forward, limits=limits)
ALGORITHMS = (POLYPHASE,)
