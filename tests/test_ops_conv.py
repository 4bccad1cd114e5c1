"""ops.conv2d equals lax.conv_general_dilated in value and in both gradients; MatmulGradConv is a drop-in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax import create_model
from resnet_jax.ops import MatmulGradConv, conv2d

CASES = [  # (kernel, stride, groups, height, width, cin, cout, padding)
    (1, 1, 1, 7, 9, 8, 16, ((0, 0), (0, 0))),
    (1, 2, 1, 9, 7, 8, 16, ((0, 0), (0, 0))),
    (3, 1, 1, 9, 11, 5, 6, ((1, 1), (1, 1))),
    (3, 2, 1, 9, 11, 5, 6, ((1, 1), (1, 1))),
    (3, 2, 1, 8, 8, 4, 4, ((0, 2), (1, 0))),  # asymmetric padding
    (7, 2, 1, 15, 13, 3, 8, ((3, 3), (3, 3))),  # ImageNet stem
    (7, 1, 1, 11, 10, 3, 4, "SAME"),
    (3, 2, 4, 9, 9, 8, 12, ((1, 1), (1, 1))),  # ResNeXt grouped
    (1, 1, 2, 5, 5, 4, 6, "VALID"),
]


def reference(x, k, stride, padding, groups):
    return lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups, precision=lax.Precision.HIGHEST)


def value_and_grads(fn, x, k, cotangent):
    y, vjp = jax.vjp(fn, x, k)
    return (y, *vjp(cotangent))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[0]}s{c[1]}g{c[2]}_{c[3]}x{c[4]}")
def test_values_and_both_gradients_match_lax(case, dtype, tol):
    ksize, stride, groups, h, w, cin, cout, padding = case
    kx, kk, ky = jax.random.split(jax.random.key(ksize * 10 + stride), 3)
    x = jax.random.normal(kx, (2, h, w, cin)).astype(dtype)
    k = jax.random.normal(kk, (ksize, ksize, cin // groups, cout)).astype(dtype)
    y_shape = jax.eval_shape(lambda: reference(x, k, stride, padding, groups)).shape
    dy = jax.random.normal(ky, y_shape).astype(dtype)
    ours = value_and_grads(jax.jit(lambda a, b: conv2d(a, b, (stride, stride), padding, groups)), x, k, dy)
    want = value_and_grads(lambda a, b: reference(a, b, stride, padding, groups), x, k, dy)
    for name, got, exp in zip(("output", "d/dinput", "d/dkernel"), ours, want):
        assert got.shape == exp.shape and got.dtype == exp.dtype, name
        got, exp = np.asarray(got, np.float32), np.asarray(exp, np.float32)
        scale = max(1.0, float(np.abs(exp).max()))
        np.testing.assert_allclose(got / scale, exp / scale, atol=tol, err_msg=name)


def test_grad_under_jit_of_scalar_loss_matches():
    x = jax.random.normal(jax.random.key(1), (3, 6, 6, 4))
    k = jax.random.normal(jax.random.key(2), (3, 3, 4, 5))
    loss = lambda f: (lambda a, b: jnp.sum(jnp.tanh(f(a, b))))
    ours = jax.jit(jax.grad(loss(lambda a, b: conv2d(a, b, (2, 2), ((1, 1), (1, 1)))), (0, 1)))(x, k)
    want = jax.grad(loss(lambda a, b: reference(a, b, 2, ((1, 1), (1, 1)), 1)), (0, 1))(x, k)
    for got, exp in zip(ours, want):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_module_is_a_drop_in_for_nn_conv():
    import flax.linen as nn
    x = jnp.ones((2, 8, 8, 3))
    args = dict(features=4, kernel_size=(3, 3), strides=2, padding=[(1, 1), (1, 1)], use_bias=False)
    ref = nn.Conv(**args)
    params = ref.init(jax.random.key(0), x)
    ours = MatmulGradConv(**args)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnext50_32x4d"])
def test_model_params_outputs_and_grads_identical_across_conv_impls(name):
    size = 32 if name.endswith("cifar") else 64
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    models = [create_model(name, num_classes=5, conv_impl=impl) for impl in ("xla", "matmul_grad")]
    variables = [m.init(jax.random.key(0), x) for m in models]
    assert jax.tree.map(jnp.shape, variables[0]) == jax.tree.map(jnp.shape, variables[1])
    for a, b in zip(jax.tree.leaves(variables[0]), jax.tree.leaves(variables[1])):
        np.testing.assert_array_equal(a, b)

    def grads(model):
        def loss(params):
            logits, _ = model.apply({**variables[0], "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(logits ** 2)
        return jax.jit(jax.value_and_grad(loss))(variables[0]["params"])

    (la, ga), (lb, gb) = grads(models[0]), grads(models[1])
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * float(jnp.abs(b).max()))


def test_unknown_conv_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="conv_impl"):
        create_model("resnet18", conv_impl="cudnn")
