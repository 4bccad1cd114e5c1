"""Algorithm "xla": ``lax.conv_general_dilated`` itself, the reference every other algorithm must equal, and
the one used on GPU/TPU (cuDNN and the TPU compiler choose their own algorithms, Winograd included)."""

from __future__ import annotations

from jax import lax

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, kernel, strides, padding, groups=1):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS,
                                    feature_group_count=groups)
