"""Algorithm "xla": ``lax.conv_general_dilated`` itself, the reference every other algorithm must equal, and
the one used on GPU/TPU (cuDNN and the TPU compiler choose their own algorithms, Winograd included).

Also the generic passes: any algorithm written as a differentiable forward gets its input and kernel gradients
from autodiff of that forward (the convolution is linear in each argument, so the point it is taken at does not
matter and XLA drops the unused forward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, kernel, strides, padding, groups=1):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSIONS,
                                    feature_group_count=groups)


def input_grad_by_autodiff(forward):
    def input_grad(dy, kernel, x_shape, strides, padding, groups):
        zeros = jnp.zeros(x_shape, dy.dtype)
        return jax.vjp(lambda x: forward(x, kernel, strides, padding, groups), zeros)[1](dy)[0]
    return input_grad


def kernel_grad_by_autodiff(forward):
    def kernel_grad(x, dy, kernel_shape, kernel_dtype, strides, padding, groups):
        zeros = jnp.zeros(kernel_shape, kernel_dtype)
        return jax.vjp(lambda k: forward(x, k, strides, padding, groups), zeros)[1](dy)[0]
    return kernel_grad


input_grad = input_grad_by_autodiff(xla_conv)
kernel_grad = kernel_grad_by_autodiff(xla_conv)
