"""The research knobs together (output_stride, drop_path_rate, attn_layer) and with the older ones (ResNet-D
stem and shortcuts, groups, pre-activation): every JAX transformation, BatchNorm folding, the ONNX export (in
onnxruntime), the NNX face and a training run. Whole-model transformations and runs: all marked long (the
outside references, torchvision and timm, are checked quickly in test_dilation.py and test_timm.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx as flax_nnx

from conftest import assert_close, random_batch_stats
from resnet_jax import create_model, nnx
from resnet_jax.export import Preprocessing, export_model, load_exported
from resnet_jax.ops import fold_batchnorm
from resnet_jax.training import train
from training_helpers import tiny_config

pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def dilated_se():
    """SE-ResNeXt-26d at one block per stage, output stride 8 (grouped dilated 3x3s, timm's stride-1 average-pool
    shortcuts), drop_path_rate 0.2, random BatchNorm statistics; a 24x32 batch of 2."""
    model = create_model("seresnext26d_32x4d", stage_sizes=(1, 1, 1, 1), num_classes=5, output_stride=8,
                         drop_path_rate=0.2)
    variables = random_batch_stats(model.init(jax.random.key(0), jnp.zeros((1, 24, 32, 3))), 1)
    return model, variables, jax.random.normal(jax.random.key(1), (2, 24, 32, 3))


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def test_jvp_hvp_and_vmap_agree_with_reverse_mode(dilated_se):
    """Train mode with drop path (a fixed "dropout" key): jvp equals the gradient's inner product with the
    tangent; forward-over-reverse HVP equals reverse-over-reverse; per-example gradients by vmap equal one
    gradient per example."""
    model, variables, x = dilated_se
    probe = jax.random.normal(jax.random.key(2), (x.shape[0], 5))

    def loss(params, images=x):
        v = {**variables, "params": params}
        logits = model.apply(v, images, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(4)})[0]
        return jnp.sum(logits * probe[: images.shape[0]])

    params, tangent = variables["params"], random_like(variables["params"], 3)

    @jax.jit
    def modes(params, tangent):
        forward = jax.jvp(loss, (params,), (tangent,))[1]
        reverse = tree_vdot(jax.grad(loss)(params), tangent)
        hvp_fwd = jax.jvp(jax.grad(loss), (params,), (tangent,))[1]
        hvp_rev = jax.grad(lambda p: tree_vdot(jax.grad(loss)(p), tangent))(params)
        return forward, reverse, hvp_fwd, hvp_rev

    forward, reverse, hvp_fwd, hvp_rev = modes(params, tangent)
    assert abs(float(forward) - float(reverse)) <= 2e-4 * abs(float(reverse))
    for a, b in zip(jax.tree.leaves(hvp_fwd), jax.tree.leaves(hvp_rev)):
        assert_close(a, b, "hvp", rtol_of_scale=1e-3)

    def per_example(params, image):  # eval mode: examples independent of each other
        return jnp.sum(model.apply({**variables, "params": params}, image[None]) * probe[0])

    batched = jax.jit(jax.vmap(jax.grad(per_example), in_axes=(None, 0)))(params, x)
    one = jax.jit(jax.grad(per_example))(params, x[1])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
        assert_close(a[1], b, "vmap", rtol_of_scale=1e-4)


def test_folding_and_onnx_of_the_composed_knobs(dilated_se, tmp_path):
    model, variables, x = dilated_se
    want = jax.jit(model.apply)(variables, x)
    folded = jax.jit(lambda v: fold_batchnorm(model, v)[1])(variables)
    assert_close(jax.jit(model.with_batchnorm_folded().apply)(folded, x), want, "folded")
    preact = create_model("preact_resnet50", stage_sizes=(1, 1, 1, 1), stem="deep", attn_layer="eca",
                          output_stride=16, num_classes=5)
    preact_vars = random_batch_stats(preact.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))), 2)
    prep = Preprocessing(32, (0.5,) * 3, (0.25,) * 3)
    batch = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    for name, (m, v) in {"seresnext": (model, variables), "preact_eca": (preact, preact_vars)}.items():
        exported = load_exported(export_model(m, v, tmp_path / f"{name}.onnx", preprocessing=prep))
        expected = jax.jit(m.apply)(v, jnp.asarray((batch / 255.0 - 0.5) / 0.25, jnp.float32))
        assert_close(exported.run(batch).astype(np.float32), np.asarray(expected), name)


def test_nnx_face_takes_the_knobs():
    model = nnx.create_model("ecaresnet26t", rngs=flax_nnx.Rngs(0), stage_sizes=(1, 1, 1, 1), output_stride=16,
                             features_only=True)
    model.set_view(use_running_average=True)
    linen_module, variables = nnx.to_linen(model)
    x = jax.random.normal(jax.random.key(1), (1, 32, 48, 3))
    feats = model(x)
    assert [f.shape[1:3] for f in feats] == [(8, 12), (4, 6), (2, 3), (2, 3)]
    for a, b in zip(feats, linen_module.apply(variables, x)):
        assert_close(a, b, "nnx")


def test_training_run_with_drop_path_and_se(tmp_path):
    """The training loop passes the "dropout" rng (the run would raise without it), deterministically: the
    same seed gives the same parameters."""
    config = tiny_config(max_steps=3, drop_path_rate=0.3)
    config.model_overrides.attn_layer = "se"
    runs = [train(config, tmp_path / f"run{i}") for i in range(2)]
    assert runs[0].model.drop_path_rate == 0.3 and runs[0].model.attn_layer == "se"
    for a, b in zip(jax.tree.leaves(runs[0].variables), jax.tree.leaves(runs[1].variables)):
        np.testing.assert_array_equal(a, b)
