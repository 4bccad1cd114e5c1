"""The oneDNN forward of a convolution with a bias (a folded BatchNorm's) keeps its kernel in the layout its
primitive wants between calls (csrc/conv.cc, ``KeptWeights``), and uses a kept layout only while the caller's
weights are byte for byte those it was made from: weights changed in place at the same address, and the same
weights at another address, give the outputs XLA's own convolution gives for them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from conftest import require_onednn
from resnet_jax.ops import conv2d


def aligned(shape, seed):
    """A 64-byte aligned float32 array, which ``jax.device_put`` on CPU uses in place instead of copying."""
    n = int(np.prod(shape))
    buffer = np.empty(n + 16, np.float32)
    start = (-buffer.ctypes.data % 64) // 4
    array = buffer[start:start + n].reshape(shape)
    array[...] = np.random.default_rng(seed).standard_normal(shape) / 10
    return array


BIAS = jnp.linspace(-1, 1, 64)


def xla_conv(x, w):
    return lax.conv_general_dilated(x, jnp.asarray(np.array(w)), (1, 1), "SAME", dimension_numbers=(
        "NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST) + BIAS


def test_weights_changed_in_place_are_reordered_again():
    require_onednn()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 10, 10, 32)), jnp.float32)
    w = aligned((3, 3, 32, 64), seed=1)
    on_device = jax.device_put(w)
    assert on_device.unsafe_buffer_pointer() == w.ctypes.data  # the same bytes: a change of w is a change here
    forward = jax.jit(lambda x, w: conv2d(x, w, padding="SAME", algorithm="onednn", bias=BIAS))
    first = forward(x, on_device)
    np.testing.assert_allclose(first, xla_conv(x, w), rtol=0, atol=1e-4)
    forward(x, on_device)  # kept
    w[...] = aligned(w.shape, seed=2)  # new weights at the same address
    second = forward(x, on_device)
    np.testing.assert_allclose(second, xla_conv(x, w), rtol=0, atol=1e-4)
    assert np.abs(np.asarray(second) - np.asarray(first)).max() > 0.1
    elsewhere = jax.device_put(np.array(w))  # the same weights at another address
    assert elsewhere.unsafe_buffer_pointer() != on_device.unsafe_buffer_pointer()
    np.testing.assert_array_equal(forward(x, elsewhere), second)
