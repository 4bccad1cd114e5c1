"""Algorithm "polyphase": a stride-2 convolution as four stride-1 convolutions, one per input phase.

XLA:CPU runs stride-2 convolutions at about half the rate of stride-1 ones (docs/cpu-convolution.md). Splitting
the padded input into its four (row parity, column parity) phases turns ``y = conv_s2(x, w)`` into the sum of
four stride-1 convolutions of the phases with the matching taps of the kernel: a 3x3 kernel gives sub-kernels
of 2x2, 2x1, 1x2 and 1x1 taps, 9 in all, so no multiply is wasted. Autodiff through slices and stride-1
convolutions gives both gradients in the same stride-1 form.
"""

from __future__ import annotations

import jax.numpy as jnp

from resnet_jax.ops.xla import xla_conv


def forward(x, kernel, strides, padding, groups):
    kh, kw = kernel.shape[:2]
    ho = (x.shape[1] + sum(padding[0]) - kh) // 2 + 1
    wo = (x.shape[2] + sum(padding[1]) - kw) // 2 + 1
    # pad so every phase has ho + (taps - 1) rows: phase p holds rows p, p + 2, ... of the padded input
    rows, cols = 2 * (ho + (kh - 1) // 2) + 1, 2 * (wo + (kw - 1) // 2) + 1
    (top, _), (left, _) = padding
    xp = jnp.pad(x, ((0, 0), (top, max(0, rows - x.shape[1] - top)), (left, max(0, cols - x.shape[2] - left)),
                     (0, 0)))
    y = None
    for p in range(min(2, kh)):
        for q in range(min(2, kw)):
            phase = xp[:, p::2, q::2, :]
            sub = kernel[p::2, q::2]  # taps p, p + 2, ... of the kernel
            part = xla_conv(phase, sub, (1, 1), ((0, 0), (0, 0)), groups)[:, :ho, :wo, :]
            y = part if y is None else y + part
    return y


def limits(g) -> str | None:
    if g.strides != (2, 2) or g.kernel[0] < 2 or g.kernel[1] < 2:
        return "computes stride-2 convolutions with kernels of 2x2 or larger only"
    return None
