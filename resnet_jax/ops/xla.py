"""Algorithm "xla": ``lax.conv_general_dilated`` itself, the reference every other algorithm must equal, and
the one used on GPU/TPU (cuDNN and the TPU compiler choose their own algorithms, Winograd included). Its
gradients are autodiff's, which lax writes as convolutions too.
"""

from __future__ import annotations

from jax import lax

from resnet_jax.ops.spec import Algorithm

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, kernel, strides, padding, groups=1, dilation=(1, 1)):
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=DIMENSIONS, feature_group_count=groups)


def forward(x, kernel, spec):
    return lax_conv(x, kernel, spec.strides, spec.padding, spec.groups, spec.dilation)


XLA = Algorithm.from_forward("xla", forward, xla_ops_only=True, dilated=True)
ALGORITHMS = (XLA,)
