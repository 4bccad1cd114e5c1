"""Every JAX transformation through every convolution path, BatchNorm and the max-pool: forward mode equals
reverse mode, Hessian-vector products equal those of a network built from flax's and lax's own layers, and vmap
and checkpoint compose with them."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import create_model
from resnet_jax.ops import BatchNorm, Conv, fold_batchnorm
from resnet_jax.ops.pool import max_pool
from resnet_jax.ops.registry import REGISTRY
from conftest import require_onednn
from training_helpers import trained_like

PATHS = ["xla", "jax", "auto", "onednn_winograd_f4"]


def require_path(conv_impl):
    """The extension's paths skip where it is unusable, except on CI on Linux x86_64, where they fail."""
    if conv_impl in REGISTRY and REGISTRY[conv_impl].cpu_only:
        require_onednn()


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@functools.cache
def small_resnet_variables():
    """ResNet-18's layers with one block per stage, trained-like BatchNorm statistics; the parameters do not
    depend on the convolution algorithm (test_ops_conv), so every path below starts from these."""
    model = create_model("resnet18", stage_sizes=(1, 1, 1, 1), num_classes=5)
    return trained_like(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 40, 32, 3))))


def small_resnet(conv_impl, **kw):
    model = create_model("resnet18", stage_sizes=(1, 1, 1, 1), num_classes=5, conv_impl=conv_impl, **kw)
    return model, small_resnet_variables(), jax.random.normal(jax.random.key(1), (2, 40, 32, 3))


def loss_fn(model, variables, x, train):
    probe = jax.random.normal(jax.random.key(2), (x.shape[0], model.num_classes))

    def loss(params):
        v = {**variables, "params": params}
        logits = model.apply(v, x, train=True, mutable=["batch_stats"])[0] if train else model.apply(v, x)
        return jnp.sum(logits * probe)
    return loss


def assert_forward_equals_reverse(loss, params, what):
    """jvp and linearize (forward mode) against grad (reverse mode) along one random tangent, all three in one
    compiled function."""
    def modes(params):
        tangent = random_like(params, 3)
        forward = jax.jvp(loss, (params,), (tangent,))[1]
        reverse = tree_vdot(jax.grad(loss)(params), tangent)
        return forward, reverse, jax.linearize(loss, params)[1](tangent)

    forward, reverse, linear = map(float, jax.jit(modes)(params))
    scale = abs(reverse)
    assert abs(forward - reverse) <= 2e-4 * scale, (what, forward, reverse)
    # both forward mode; evaluated apart, they differ by rounding (Winograd F(4,3): ~1e-5 of the scale per layer)
    assert abs(linear - forward) <= 5e-5 * scale, what


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("conv_impl", PATHS)
def test_jvp_and_linearize_equal_reverse_mode(conv_impl, train):
    require_path(conv_impl)
    model, variables, x = small_resnet(conv_impl)
    assert_forward_equals_reverse(loss_fn(model, variables, x, train), variables["params"], (conv_impl, train))


@pytest.mark.parametrize("conv_impl", ["xla", "auto"])
def test_folded_model_and_remat_keep_forward_mode(conv_impl):
    model, variables, x = small_resnet(conv_impl)
    folded_model, folded = fold_batchnorm(model, variables)
    assert_forward_equals_reverse(loss_fn(folded_model, folded, x, False), folded["params"], "folded")
    remat = model.clone(remat=True)
    assert_forward_equals_reverse(loss_fn(remat, variables, x, True), variables["params"], "remat")


class Tiny(nn.Module):
    """conv-BN-ReLU, the stem max-pool, conv-BN + residual-ReLU, a 3x3 stride-2 conv, pool, dense: every piece of
    the fast path, in this project's layers or, with ``reference``, in flax's and lax's own."""

    conv_impl: str = "xla"
    reference: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        def conv(features, strides=1, name=None):
            if self.reference:
                return nn.Conv(features, (3, 3), strides, padding=((1, 1), (1, 1)), use_bias=False, name=name)
            return Conv(features, (3, 3), strides, padding=((1, 1), (1, 1)), algorithm=self.conv_impl, name=name)

        def norm(y, residual=None, name=None):
            if self.reference:
                y = nn.BatchNorm(use_running_average=not train, name=name)(y)
                return nn.relu(y if residual is None else y + residual)
            return BatchNorm(use_running_average=not train, name=name)(y, residual=residual, relu=True)

        y = norm(conv(8, name="c1")(x), name="b1")
        y = nn.max_pool(y, (3, 3), (2, 2), ((1, 1), (1, 1))) if self.reference else max_pool(y)
        y = norm(conv(8, name="c2")(y), residual=y, name="b2")
        y = conv(16, strides=2, name="c3")(y)
        return nn.Dense(3, name="fc")(jnp.mean(y, axis=(1, 2)))


def tiny_loss(model, variables, x, train):
    def loss(params):
        v = {**variables, "params": params}
        out = model.apply(v, x, train=train, mutable=["batch_stats"])[0] if train else model.apply(v, x, train=False)
        return jnp.sum(jnp.sin(out))
    return loss


TINY_INPUT = jax.ShapeDtypeStruct((2, 12, 10, 4), jnp.float32)


@functools.cache
def tiny_variables():
    x = jnp.zeros(TINY_INPUT.shape)
    return trained_like(jax.jit(lambda key: Tiny(reference=True).init(key, x, train=False))(jax.random.key(5)))


def second_order(model, train):
    """Hessian-vector product of all parameters, and the full Hessian of the second BatchNorm's scale, in one
    compiled function."""
    x = jax.random.normal(jax.random.key(4), TINY_INPUT.shape)
    variables = tiny_variables()
    params = variables["params"]
    loss = tiny_loss(model, variables, x, train)

    def both(params):
        hvp = jax.jvp(jax.grad(loss), (params,), (random_like(params, 6),))[1]
        scale_loss = lambda s: loss({**params, "b2": {**params["b2"], "scale": s}})  # noqa: E731
        return hvp, jax.hessian(scale_loss)(params["b2"]["scale"])
    return jax.jit(both)(params)


@functools.cache
def reference_second_order(train):
    return second_order(Tiny(reference=True), train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("conv_impl", ["xla", "auto", "onednn"])
def test_hessian_vector_products_equal_flax_and_lax_layers(conv_impl, train):
    require_path(conv_impl)
    (hvp, hessian), (hvp_ref, hessian_ref) = second_order(Tiny(conv_impl), train), reference_second_order(train)
    for got, want in zip(jax.tree.leaves(hvp), jax.tree.leaves(hvp_ref)):
        scale = float(jnp.abs(want).max())
        assert float(jnp.abs(got - want).max()) <= 1e-3 * scale + 1e-6, conv_impl
    np.testing.assert_allclose(hessian, hessian_ref, atol=1e-3 * float(jnp.abs(hessian_ref).max()) + 1e-6)


def test_vmap_of_gradients_gives_per_example_gradients():
    """Per-example gradients (vmap over grad) through the fast path equal one gradient per example."""
    x = jax.random.normal(jax.random.key(7), (3, 12, 10, 4))
    model = Tiny("auto")
    variables = jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(8))

    def per_example(params, image):
        return jnp.sum(jnp.sin(model.apply({**variables, "params": params}, image[None], train=False)))

    def both(params):
        batched = jax.vmap(jax.grad(per_example), in_axes=(None, 0))(params, x)
        return batched, [jax.grad(per_example)(params, x[i]) for i in range(x.shape[0])]
    batched, singles = jax.jit(both)(variables["params"])
    for i, single in enumerate(singles):
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(got[i], want, atol=1e-5 * float(jnp.abs(want).max()) + 1e-7)
