"""fold_batchnorm: inference with every BatchNorm that follows a convolution folded into it equals the unfolded
model, for every block kind, under jit, and is refused where it does not apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_variables
from resnet_jax import create_model
from resnet_jax.ops import fold_batchnorm


def count(tree, name):
    return sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0] if any(
        getattr(k, "key", None) == name for k in path))


# (name, stages, input shape, BatchNorms left unfolded: pre-activation blocks normalise their input, not a conv
# output). One block per stage: which BatchNorm follows which convolution is decided per block kind (basic,
# bottleneck, ResNet-D's deep stem and pooled shortcut, grouped, pre-activation), not by depth.
# A pre-activation model with the CIFAR stem (a bare convolution, no max-pool) was refused: its first block's
# BatchNorm reads the stem's output, which the identity shortcut also takes, and was paired with the stem.
MODELS = [("resnet18", (1, 1, 1, 1), (2, 40, 56, 3), 0, {}), ("resnet20", (1, 1, 1), (2, 16, 16, 1), 0, {}),
          ("resnet50d", (1, 1, 1, 1), (1, 40, 56, 3), 0, {}), ("resnext50_32x4d", (1, 1, 1, 1), (1, 40, 56, 3), 0, {}),
          ("preact_resnet18", (1, 1, 1, 1), (2, 40, 56, 3), 5, {}),
          ("preact_resnet18", (1, 1, 1, 1), (2, 16, 16, 3), 5, {"stem": "cifar"})]


@pytest.mark.parametrize("name,stages,shape,kept,extra", MODELS, ids=[m[0] + "".join(m[4].values()) for m in MODELS])
def test_folded_model_equals_unfolded(name, stages, shape, kept, extra):
    model = create_model(name, num_classes=7, in_channels=shape[-1], stage_sizes=stages, **extra)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = random_variables(model, shape)
    want = model.apply(variables, x)  # eager: one block per stage runs faster than it compiles
    folded = jax.jit(lambda v: fold_batchnorm(model, v)[1])(variables)  # folding runs under jit too
    folded_model = fold_batchnorm(model, variables)[0]
    got = jax.jit(folded_model.apply)(folded, x)
    # float32 rounding, plus Winograd F(4,3)'s where "auto" picks it: ~1e-5 of the logits' scale
    np.testing.assert_allclose(got, want, atol=5e-5 * float(jnp.abs(want).max()))
    assert count(folded["batch_stats"], "mean") == kept
    assert count(folded["params"], "bias") == count(variables["params"], "bias")  # every folded BN became one bias
    assert folded_model.folded and not model.folded


@pytest.mark.parametrize("conv_impl", ["auto", "xla"])
def test_folded_weights_come_in_the_compute_dtype(conv_impl):
    """A bfloat16 model's convolutions cast their parameters to bfloat16 on every call; the fold stores them so
    (float32 where "auto" computes the model in float32, on a CPU without bfloat16 instructions), with the same
    outputs as the float32 fold cast per call, and the unfolded model's within bfloat16 rounding."""
    model = create_model("resnet18", num_classes=7, stage_sizes=(1, 1, 1, 1), dtype=jnp.bfloat16,
                         conv_impl=conv_impl)
    shape = (2, 40, 56, 3)
    x = jax.random.normal(jax.random.key(1), shape)
    variables = random_variables(model, shape)
    folded_model, folded = fold_batchnorm(model, variables)
    compute = model.layer_dtype()
    conv_leaves = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(folded["params"])[0]
                   if path[-1].key in ("kernel", "bias") and "fc" not in str(path[0])]
    assert conv_leaves and {leaf.dtype for leaf in conv_leaves} == {compute}
    apply = jax.jit(folded_model.apply)
    cast_per_call = jax.tree.map(lambda a: a.astype(jnp.float32), folded)
    got = apply(folded, x)
    np.testing.assert_array_equal(got, apply(cast_per_call, x))
    want = model.apply(variables, x)
    np.testing.assert_allclose(got, want, atol=3e-2 * float(jnp.abs(want).max()))


def test_folded_features_equal_unfolded():
    model = create_model("resnet18", features_only=True, stage_sizes=(1, 1, 1, 1))
    x = jax.random.normal(jax.random.key(1), (1, 40, 56, 3))
    variables = random_variables(model, x.shape)
    folded_model, folded = fold_batchnorm(model, variables)
    for got, want in zip(folded_model.apply(folded, x), model.apply(variables, x)):
        np.testing.assert_allclose(got, want, atol=5e-5 * float(jnp.abs(want).max()))


def test_folding_is_for_inference_and_for_unfolded_resnets():
    model = create_model("resnet20", num_classes=3)
    x = jnp.ones((1, 16, 16, 3))
    folded_model, folded = fold_batchnorm(model, model.init(jax.random.key(0), x))
    with pytest.raises(ValueError, match="folded into the convolutions .* inference only"):
        folded_model.apply(folded, x, train=True)
    with pytest.raises(ValueError, match="already folded"):
        fold_batchnorm(folded_model, folded)
    import flax.linen as nn
    with pytest.raises(ValueError, match=r"Dense does not say how it is built with its BatchNorm folded; .*"
                                         r"with_batchnorm_folded\(\)"):
        fold_batchnorm(nn.Dense(3), {"params": {}})


def test_folding_learns_the_structure_of_any_model_from_its_module_tree():
    """No ResNet field is read: a small network of its own shape folds, given an input shape to trace and the
    protocol's one method; its BatchNorms are found by tracing, not by name (they are named unlike ResNet's)."""
    import flax.linen as nn

    from resnet_jax.ops import BatchNorm, Conv

    class Small(nn.Module):
        folded: bool = False

        def with_batchnorm_folded(self):
            return self.clone(folded=True)

        @nn.compact
        def __call__(self, x, train=False):
            def conv_norm(features, name, residual=None):
                conv = Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=self.folded, name=f"conv_{name}")
                if self.folded:
                    return conv(x, residual=residual, relu=True)
                return BatchNorm(use_running_average=not train, name=f"bn_{name}")(conv(x), residual, relu=True)

            x = conv_norm(6, "a")
            x = conv_norm(6, "b", residual=x)
            return jnp.mean(x, axis=(1, 2))

    model = Small()
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 4))
    variables = random_variables(model, x.shape)
    with pytest.raises(ValueError, match="does not say what input it takes; pass input_shape="):
        fold_batchnorm(model, variables)
    folded_model, folded = fold_batchnorm(model, variables, input_shape=(1, 8, 8, 4))
    assert "batch_stats" not in folded or not folded["batch_stats"]
    want = model.apply(variables, x)
    np.testing.assert_allclose(folded_model.apply(folded, x), want, atol=5e-5 * float(jnp.abs(want).max()))
