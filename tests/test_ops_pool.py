"""The sliced max-pool equals flax's ``max_pool`` exactly: values and gradients, ties included. In bfloat16 the
gradient is the float32 one of the same routing, rounded once (the pool sums in float32: see pool.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import create_model
from resnet_jax.ops.pool import _sliced_max_pool, max_pool
from resnet_jax.ops.rules import max_pool_method
from conftest import require_onednn


STEM = ((3, 3), (2, 2), ((1, 1), (1, 1)))  # window, strides, padding


def reference(x, pool=STEM):
    window, strides, padding = pool
    return nn.max_pool(x, window, strides=strides, padding=padding)


def inputs(shape, dtype, kind, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape)
    if kind == "relu":  # after a ReLU most windows hold several zeros: the ties the gradient must break alike
        x = np.maximum(x, 0)
    elif kind == "coarse":  # few distinct values: ties between non-zero maxima too
        x = np.round(x)
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (3, 5, 6, 4), (1, 1, 1, 1)])
@pytest.mark.parametrize("kind", ["normal", "relu", "coarse"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("extension", [False, True], ids=["xla", "extension"])  # the gradient in C++
def test_values_and_gradients_equal_max_pool(shape, kind, dtype, extension, pool=STEM):
    if extension:
        require_onednn()
    x = inputs(shape, dtype, kind)
    want, want_vjp = jax.vjp(lambda a: reference(a, pool), x)
    got, got_vjp = jax.vjp(jax.jit(lambda a: _sliced_max_pool(a, *pool, extension)), x)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), dtype)
    if dtype != jnp.float32:  # a maximum is exact, so the float32 pool routes alike; it sums in float32
        _, want_vjp = jax.vjp(lambda a: reference(a, pool), x.astype(jnp.float32))
    want_dx = want_vjp(dy.astype(jnp.float32) if dtype != jnp.float32 else dy)[0].astype(dtype)
    np.testing.assert_array_equal(np.asarray(got_vjp(dy)[0], np.float32), np.asarray(want_dx, np.float32))


@pytest.mark.parametrize("pool", [((2, 2), (2, 2), ((0, 0), (0, 0))), ((3, 2), (1, 2), ((1, 1), (0, 1)))])
@pytest.mark.parametrize("kind", ["relu", "coarse"])
@pytest.mark.parametrize("extension", [False, True], ids=["xla", "extension"])
def test_other_windows_equal_max_pool(pool, kind, extension):
    test_values_and_gradients_equal_max_pool((2, 7, 9, 3), kind, jnp.float32, extension, pool)


@pytest.mark.parametrize("algorithm", ["auto", "jax"])
def test_a_window_of_more_than_127_taps_equals_max_pool(algorithm):
    """A global pool over a 12x12 map (144 taps): the strided views record the winning tap in an int8, and
    failed ("max-pool: inconsistent shapes" from the extension, an int8 overflow without it)."""
    x = inputs((2, 12, 12, 3), jnp.float32, "relu")
    pool = ((12, 12), (1, 1), ((0, 0), (0, 0)))
    got, got_vjp = jax.vjp(jax.jit(lambda a: max_pool(a, *pool, algorithm=algorithm)), x)
    want, want_vjp = jax.vjp(lambda a: reference(a, pool), x)
    dy = jnp.ones_like(want)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_vjp(dy)[0], want_vjp(dy)[0])


def test_model_stem_uses_it_on_cpu():
    """ResNet-50's stem pools with the sliced form on CPU: no reduce_window in the gradient of the model."""
    model = create_model("resnet18", num_classes=3)
    x = jnp.ones((2, 32, 32, 3))  # two images: training BatchNorm needs more than one value per channel
    variables = jax.eval_shape(model.init, jax.random.key(0), x)  # the gradient's jaxpr needs only shapes

    def loss(params, batch_stats):
        out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return out.sum()

    text = str(jax.make_jaxpr(jax.grad(loss))(variables["params"], variables["batch_stats"]))
    assert "reduce_window" not in text and "select_and_scatter" not in text
    assert max_pool(x).shape == reference(x).shape
    # the plain-XLA reference keeps XLA's window ops, and so does the jaxpr this test reads
    xla_model = create_model("resnet18", num_classes=3, conv_impl="xla")
    text = str(jax.make_jaxpr(lambda v: xla_model.apply(v, x))(variables))
    assert "reduce_window" in text


def test_the_pool_follows_its_own_rule_not_the_algorithm_name():
    """XLA's window op where the model's convolutions are XLA's own (however the name is written) or off CPU;
    the strided views for every other choice on CPU."""
    for algorithm in ("xla", "xla/xla/xla"):
        assert max_pool_method(algorithm, "cpu") == "reduce_window"
    for algorithm in ("auto", "jax", "winograd_f4", "xla/xla/winograd_f4", "matmul_grad"):
        assert max_pool_method(algorithm, "cpu") == "sliced"
        assert max_pool_method(algorithm, "gpu") == max_pool_method(algorithm, "tpu") == "reduce_window"


@pytest.mark.parametrize("extension", [False, True], ids=["xla", "extension"])
def test_nested_forward_mode_routes_ties_like_flax(extension):
    """jvp of jvp: the outer derivative of the pooled values is the first-maximum rule again, as flax's pool's,
    not ``maximum``'s, which splits ties (the "coarse" inputs tie non-zero maxima)."""
    if extension:
        require_onednn()
    x = inputs((2, 8, 8, 3), jnp.float32, "coarse")
    v = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)

    def outer_tangent(pool):
        return jax.jit(lambda x: jax.jvp(lambda a: jax.jvp(pool, (a,), (v,))[0], (x,), (v,))[1])(x)

    got = outer_tangent(lambda a: _sliced_max_pool(a, *STEM, extension))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(outer_tangent(reference)))


@pytest.mark.parametrize("extension", [False, True], ids=["xla", "extension"])
def test_gradient_runs_in_cpp_with_the_extension_and_transforms_like_flax(extension):
    """With the extension the pool's backward is one C++ call (csrc/maxpool.cc), without it XLA's own; either
    way per-example gradients (vmap of grad), forward-over-reverse and the gradient itself equal flax's."""
    if extension:
        require_onednn()
    x = inputs((3, 9, 8, 4), jnp.float32, "relu")
    w = jnp.asarray(np.random.default_rng(3).standard_normal((5, 4, 4)), jnp.float32)

    def loss(pool):
        return lambda a: jnp.sum(jnp.sin(pool(a[None])[0]) * w)

    ours = loss(lambda a: _sliced_max_pool(a, *STEM, extension))
    flax = loss(lambda a: reference(a, STEM))
    text = jax.jit(jax.grad(ours)).lower(x[0]).as_text()
    assert text.count("ResnetJaxMaxPoolGrad") == (1 if extension else 0)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(jax.grad(ours)))(x)),
                                  np.asarray(jax.vmap(jax.grad(flax))(x)))
    v = jnp.ones_like(x[0])
    hvp = lambda f: jax.jvp(jax.grad(f), (x[0],), (v,))[1]  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.jit(lambda: hvp(ours))()), np.asarray(hvp(flax)), rtol=1e-6, atol=1e-6)


def test_the_forward_runs_in_one_cpp_pass_and_keeps_nan_and_inf_as_the_jnp_pool():
    """With the extension (float32) the pool and each window's first maximum are one C++ call (csrc/maxpool.cc):
    the maxima equal flax's, NaN and -inf windows included, and its routing of the gradient equals the jnp
    pool's (where a NaN is the maximum no tap equals it, and the last tap takes the gradient)."""
    require_onednn()
    x = np.array(inputs((2, 9, 8, 5), jnp.float32, "coarse"))
    x[0, 3, 4, 1] = np.nan
    x[1, :3, :3, 2] = -np.inf  # the top-left window and its neighbours' parts: -inf everywhere
    x[1, 5, 5, 3] = np.inf
    x = jnp.asarray(x)
    dy = jnp.asarray(np.random.default_rng(2).standard_normal(reference(x).shape), jnp.float32)
    results = {}
    for extension in (False, True):
        pool = jax.jit(lambda a, e=extension: _sliced_max_pool(a, *STEM, e))
        text = pool.lower(x).as_text()
        assert ("@ResnetJaxMaxPool(" in text) == extension, extension
        y, vjp = jax.vjp(pool, x)
        results[extension] = (np.asarray(y), np.asarray(vjp(dy)[0]))
    np.testing.assert_array_equal(results[True][0], np.asarray(reference(x)))
    assert np.isnan(results[True][0]).sum() == 2  # the windows holding it: two rows of windows, one column
    for got, want in zip(results[True], results[False]):
        np.testing.assert_array_equal(got, want)
