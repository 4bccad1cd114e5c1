"""Convolutions and the max-pool at their edges: no images, an empty output, and geometry that is no geometry
(a zero or negative stride, an int for padding). Empty ones equal lax's and flax's (shapes and zero gradients) on
every algorithm; bad geometry is one ValueError saying what was wrong, as lax says it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import create_model
from resnet_jax.ops import ALGORITHMS, conv2d
from resnet_jax.ops.pool import max_pool

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, k, padding):
    return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=DIMENSIONS)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("x_shape,padding", [
    ((0, 8, 8, 8), ((1, 1), (1, 1))),   # no images: a batch of 0 divided by zero in the pure-JAX tilings
    ((2, 2, 6, 8), ((0, 0), (1, 1))),   # no output rows: its gradient failed in oneDNN ("does not follow")
])
def test_an_empty_convolution_and_its_gradients_are_laxs(algorithm, x_shape, padding):
    x, k = jnp.ones(x_shape), jnp.ones((3, 3, 8, 8))
    ours = lambda a, b: conv2d(a, b, 1, padding, algorithm=algorithm, fallback=True)  # noqa: E731
    assert ours(x, k).shape == lax_conv(x, k, padding).shape
    grads = jax.grad(lambda a, b: ours(a, b).sum(), (0, 1))(x, k)
    expected = jax.grad(lambda a, b: lax_conv(a, b, padding).sum(), (0, 1))(x, k)
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("conv_impl", ["auto", "jax"])
def test_a_model_given_no_images_returns_no_rows(conv_impl):
    model = create_model("resnet18", num_classes=5, conv_impl=conv_impl)
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)), train=False)
    assert model.apply(variables, jnp.ones((0, 32, 32, 3)), train=False).shape == (0, 5)


@pytest.mark.parametrize("keys,message", [
    ({"strides": 0}, "strides must be one positive integer or two, got 0"),
    ({"strides": (1, -1)}, r"strides must be one positive integer or two, got \(1, -1\)"),
    ({"dilation": 0}, "dilation must be one positive integer or two"),
    ({"padding": 1}, r"padding must be 'SAME', 'VALID' or two \(low, high\) pairs"),
    ({"padding": ((1, 1),)}, r"padding must be 'SAME', 'VALID' or two \(low, high\) pairs"),
    ({"padding": "FULL"}, "padding 'FULL' is not 'SAME', 'VALID'"),
])
def test_geometry_that_is_no_geometry_is_one_sentence(keys, message):
    """Used to be ZeroDivisionError, an MLIR error from the compiler, or "'int' object is not iterable"."""
    with pytest.raises(ValueError, match=message):
        conv2d(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), **keys)


@pytest.mark.parametrize("algorithm", ["auto", "xla"])
def test_a_pool_window_larger_than_its_input_is_flaxs_empty_result(algorithm):
    """Used to be an MLIR error on the CPU path; flax gives (N, 0, 0, C)."""
    x = jnp.ones((1, 2, 2, 4))
    assert max_pool(x, (5, 5), (1, 1), ((0, 0), (0, 0)), algorithm).shape == \
        nn.max_pool(x, (5, 5), (1, 1), ((0, 0), (0, 0))).shape == (1, 0, 0, 4)
    assert max_pool(jnp.ones((0, 8, 8, 4)), algorithm=algorithm).shape == (0, 4, 4, 4)


def test_the_pool_takes_padding_by_name_as_flax_does():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 9, 9, 4))
    np.testing.assert_array_equal(max_pool(x, (3, 3), (2, 2), "SAME"), nn.max_pool(x, (3, 3), (2, 2), "SAME"))


@pytest.mark.parametrize("keys,message", [
    ({"window": (3, 3), "strides": (0, 0)}, "strides must be one positive integer or two"),
    ({"window": (0, 3), "strides": (1, 1)}, "window must be one positive integer or two"),
    ({"window": (3, 3), "strides": (1, 1), "padding": 1}, "padding must be 'SAME', 'VALID' or two"),
])
def test_bad_pool_geometry_is_one_sentence(keys, message):
    with pytest.raises(ValueError, match=message):
        max_pool(jnp.ones((1, 8, 8, 4)), **keys)
