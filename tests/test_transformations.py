"""Every JAX transformation through every convolution path, BatchNorm and the max-pool: forward mode equals
reverse mode, Hessian-vector products equal those of a network built from flax's and lax's own layers, and vmap
and checkpoint compose with them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import create_model
from resnet_jax.ops import BatchNorm, Conv, fold_batchnorm
from resnet_jax.ops.pool import max_pool
from resnet_jax.ops.registry import REGISTRY
from conftest import random_tree_like, random_variables, require_onednn

PATHS = ["xla", "jax", "auto", "onednn_winograd_f4"]


def require_path(conv_impl):
    """The extension's paths skip where it is unusable, except on CI on Linux x86_64, where they fail."""
    if conv_impl in REGISTRY and REGISTRY[conv_impl].cpu_only:
        require_onednn()


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def small_resnet(conv_impl, **kw):
    model = create_model("resnet18", stage_sizes=(1, 1, 1, 1), num_classes=5, conv_impl=conv_impl, **kw)
    variables = random_variables(model, (1, 40, 32, 3))
    x = jax.random.normal(jax.random.key(1), (2, 40, 32, 3))
    return model, variables, x


def loss_fn(model, variables, x, train):
    probe = random_tree_like(jnp.zeros((x.shape[0], model.num_classes)), 2)

    def loss(params):
        v = {**variables, "params": params}
        logits = model.apply(v, x, train=True, mutable=["batch_stats"])[0] if train else model.apply(v, x)
        return jnp.sum(logits * probe)
    return loss


def assert_forward_equals_reverse(loss, params, what):
    """Jitted, as a user's step would be (op by op, the extension's calls each compile a program of their own)."""
    tangent = random_tree_like(params, 3)
    value, forward = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(params, tangent)
    reverse = tree_vdot(jax.jit(jax.grad(loss))(params), tangent)
    linear = jax.jit(lambda p, t: jax.linearize(loss, p)[1](t))
    scale = float(jnp.abs(reverse))
    assert abs(float(forward) - float(reverse)) <= 2e-4 * scale, (what, float(forward), float(reverse))
    # both forward mode; evaluated apart, they differ by rounding (Winograd F(4,3): ~1e-5 of the scale per layer)
    assert abs(float(linear(params, tangent)) - float(forward)) <= 5e-5 * scale, what
    return value


@pytest.mark.long  # forward and reverse mode of a whole model, on every path
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("conv_impl", PATHS)
def test_jvp_and_linearize_equal_reverse_mode(conv_impl, train):
    require_path(conv_impl)
    model, variables, x = small_resnet(conv_impl)
    assert_forward_equals_reverse(loss_fn(model, variables, x, train), variables["params"], (conv_impl, train))


# "xla" is the slowest path (15 s jitted): CI's long step runs it, README's command the "auto" path
@pytest.mark.parametrize("conv_impl", [pytest.param("xla", marks=pytest.mark.long), "auto"])
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


@pytest.mark.long  # forward and reverse mode of a whole model, on every path
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("conv_impl", ["xla", "auto", "onednn"])
def test_hessian_vector_products_equal_flax_and_lax_layers(conv_impl, train):
    require_path(conv_impl)
    x = jax.random.normal(jax.random.key(4), (2, 12, 10, 4))
    ref_model = Tiny(reference=True)
    variables = random_variables(ref_model, x.shape, seed=5, train=False)
    ours, ref = (tiny_loss(m, variables, x, train) for m in (Tiny(conv_impl), ref_model))
    params = variables["params"]
    v = random_tree_like(params, 6)
    hvp = lambda f: jax.jvp(jax.grad(f), (params,), (v,))[1]  # noqa: E731
    for got, want in zip(jax.tree.leaves(hvp(ours)), jax.tree.leaves(hvp(ref))):
        scale = float(jnp.abs(want).max())
        assert float(jnp.abs(got - want).max()) <= 1e-3 * scale + 1e-6, conv_impl
    # the full Hessian of a few parameters (the second BatchNorm's scale) too
    scale_loss = lambda f: lambda s: f({**params, "b2": {**params["b2"], "scale": s}})  # noqa: E731
    h_ours, h_ref = (jax.hessian(scale_loss(f))(params["b2"]["scale"]) for f in (ours, ref))
    np.testing.assert_allclose(h_ours, h_ref, atol=1e-3 * float(jnp.abs(h_ref).max()) + 1e-6)


def test_vmap_of_gradients_gives_per_example_gradients():
    """Per-example gradients (vmap over grad) through the fast path equal one gradient per example."""
    x = jax.random.normal(jax.random.key(7), (3, 12, 10, 4))
    model = Tiny("auto")
    variables = random_variables(model, x.shape, seed=8, train=False)

    def per_example(params, image):
        return jnp.sum(jnp.sin(model.apply({**variables, "params": params}, image[None], train=False)))
    # compiled (each once), so the per-example loop reuses one function instead of running op by op
    batched = jax.jit(jax.vmap(jax.grad(per_example), in_axes=(None, 0)))(variables["params"], x)
    single_grad = jax.jit(jax.grad(per_example))
    for i in range(x.shape[0]):
        single = single_grad(variables["params"], x[i])
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
            np.testing.assert_allclose(got[i], want, atol=1e-5 * float(jnp.abs(want).max()) + 1e-7)
