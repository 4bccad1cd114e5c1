"""The training-mode BatchNorm + residual + ReLU with its hand-written gradient equals flax's BatchNorm followed
by the add and ReLU, differentiated automatically: values, running averages, and every gradient."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.ops.batchnorm import BatchNorm, batch_norm_act


def reference(x, scale, bias, residual, relu, dtype=None):
    """flax's BatchNorm in training mode, then the add and the ReLU: what the model ran before."""
    bn = nn.BatchNorm(use_running_average=False, dtype=dtype)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    y = y if residual is None else y + residual
    y = jax.nn.relu(y) if relu else y
    # the running averages with momentum 0.99 from (0, 1) give back the batch statistics
    stats = updates["batch_stats"]
    return y, stats["mean"] / 0.01, (stats["var"] - 0.99) / 0.01


def inputs(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = jnp.asarray(rng.normal(1.5, 2.0, shape), dtype)  # a non-zero mean, as convolution outputs have
    residual = jnp.asarray(rng.normal(size=shape), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bias = jnp.asarray(rng.normal(size=c), jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    return x, scale, bias, residual, dy


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("with_residual, relu", [(True, True), (False, True), (False, False), (True, False)])
@pytest.mark.parametrize("shape", [(4, 13, 11, 24), (1, 7, 5, 3)])
def test_values_and_gradients_equal_flax_batchnorm_add_relu(shape, with_residual, relu):
    x, scale, bias, residual, dy = inputs(shape)
    residual = residual if with_residual else None
    dmean, dvar = jnp.linspace(-1, 1, shape[-1]), jnp.linspace(0.5, -0.5, shape[-1])

    def loss(fn):
        def f(x, scale, bias, residual):
            y, mean, var = fn(x, scale, bias, residual)
            # cotangents on the statistics too: the gradient must be right for any use of them
            return jnp.vdot(y, dy) + jnp.vdot(mean, dmean) + jnp.vdot(var, dvar), (y, mean, var)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    (_, got), got_grads = loss(lambda *a: batch_norm_act(*a, relu=relu))(x, scale, bias, residual)
    (_, want), want_grads = loss(lambda *a: reference(*a, relu))(x, scale, bias, residual)
    for part, g, w in zip(("output", "mean", "var"), got, want):
        assert relative(g, w) < 2e-6, part
    names = ("x", "scale", "bias", "residual")
    for name, g, w in zip(names, got_grads, want_grads):
        if w is None:
            assert g is None
            continue
        # float32 rounding: the sums run in another order than autodiff's
        assert relative(g, w) < 1e-5, name


def test_bfloat16_compute_keeps_float32_statistics_and_matches_flax():
    x, scale, bias, residual, dy = inputs((4, 8, 8, 16), jnp.bfloat16)
    y, mean, var = batch_norm_act(x, scale, bias, residual, relu=True, dtype=jnp.bfloat16)
    want, want_mean, want_var = reference(x, scale, bias, residual, True, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    assert relative(mean, want_mean) < 1e-6 and relative(var, want_var) < 1e-5
    assert relative(y, want) < 1e-2  # one bfloat16 rounding of the output
    dx = jax.grad(lambda x: jnp.vdot(batch_norm_act(x, scale, bias, residual, relu=True)[0].astype(jnp.float32),
                                     dy.astype(jnp.float32)))(x)
    want_dx = jax.grad(lambda x: jnp.vdot(reference(x, scale, bias, residual, True, jnp.bfloat16)[0]
                                          .astype(jnp.float32), dy.astype(jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16 and relative(dx, want_dx) < 2e-2


def test_module_has_flax_batchnorms_variables_and_running_average_update():
    x, _, _, residual, _ = inputs((4, 6, 6, 8))
    ours, theirs = BatchNorm(use_running_average=False, momentum=0.9), nn.BatchNorm(use_running_average=False,
                                                                                     momentum=0.9)
    variables = theirs.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x)) == jax.tree_util.tree_structure(variables)
    variables = {"params": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)},
                 "batch_stats": {"mean": jnp.full(8, 0.3), "var": jnp.full(8, 2.0)}}
    got, got_stats = ours.apply(variables, x, residual=residual, relu=True, mutable=["batch_stats"])
    want, want_stats = theirs.apply(variables, x, mutable=["batch_stats"])
    assert relative(got, jax.nn.relu(want + residual)) < 2e-6
    for key in ("mean", "var"):
        assert relative(got_stats["batch_stats"][key], want_stats["batch_stats"][key]) < 2e-6
    # evaluation uses the running averages, as flax does, then the epilogue
    evaluated = BatchNorm(use_running_average=True).apply(variables, x, residual=residual, relu=True)
    expected = jax.nn.relu(nn.BatchNorm(use_running_average=True).apply(variables, x) + residual)
    np.testing.assert_array_equal(evaluated, expected)


def test_models_train_through_the_fused_batchnorm():
    """Every BatchNorm of a training step runs the hand-written gradient (the point of it: fewer passes)."""
    from resnet_jax import create_model

    model = create_model("resnet18", num_classes=10)
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))  # shapes are enough
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables))
    assert jaxpr.count("name=_bn_act") == 20  # the stem's, 2 in each of 8 blocks, 3 shortcut BatchNorms
