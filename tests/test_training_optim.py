"""Schedules, optimizers and losses: the numbers the recipes promise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.training import base_config, make_optimizer, make_schedule
from resnet_jax.training.losses import cross_entropy, mix_batch, soft_targets, topk_correct
from resnet_jax.training.optim import decay_mask, peak_learning_rate


def config(**kw):
    c = base_config()
    c.update(kw)
    return c


def test_seed_step_schedule_decays_tenfold_every_30_epochs():
    c = config(batch_size=256, learning_rate=0.1, schedule="step", step_epochs=30, num_epochs=90)
    s = make_schedule(c, steps_per_epoch=100)
    np.testing.assert_allclose([s(0), s(2999), s(3000), s(5999), s(6000), s(8999)],
                               [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_multistep_linear_scaling_and_warmup():
    c = config(batch_size=512, learning_rate=0.1, schedule="multistep", milestones=(30, 60), num_epochs=90,
               warmup_epochs=5)
    assert peak_learning_rate(c) == pytest.approx(0.2)
    s = make_schedule(c, steps_per_epoch=10)
    np.testing.assert_allclose([s(0), s(25), s(50), s(299), s(300), s(600)], [0.0, 0.1, 0.2, 0.2, 0.02, 0.002],
                               rtol=1e-5, atol=1e-9)


def test_cosine_ends_at_zero_and_max_steps_shortens_it():
    c = config(batch_size=256, schedule="cosine", num_epochs=10, max_steps=50)
    s = make_schedule(c, steps_per_epoch=100)
    assert float(s(0)) == pytest.approx(0.1) and float(s(25)) == pytest.approx(0.05, rel=1e-4)
    assert float(s(50)) == pytest.approx(0.0, abs=1e-8)


def test_weight_decay_skips_batchnorm_and_biases():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    assert decay_mask(params) == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False}}
    tx = make_optimizer(config(batch_size=256, learning_rate=0.1, weight_decay=0.5, momentum=0.0,
                               schedule="constant"), steps_per_epoch=1)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.05)  # -lr * wd * w, as torch SGD
    np.testing.assert_allclose(updates["bn"]["scale"], 0.0)


def test_sgd_momentum_matches_torch_formula():
    """torch.optim.SGD: v = mu * v + (g + wd * w); w -= lr * v (checked over three steps by hand)."""
    c = config(batch_size=256, learning_rate=0.1, momentum=0.9, weight_decay=0.01, schedule="constant",
               decay_norm_and_bias=True)
    tx = make_optimizer(c, 1)
    w, v = np.array([1.0, -2.0]), np.zeros(2)
    params, state = {"w": jnp.array(w, jnp.float32)}, None
    state = tx.init(params)
    for g in ([0.5, 0.1], [0.2, -0.3], [-0.1, 0.4]):
        v = 0.9 * v + (np.array(g) + 0.01 * w)
        w = w - 0.1 * v
        updates, state = tx.update({"w": jnp.array(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], w, rtol=1e-6)


def test_adamw_is_selectable():
    tx = make_optimizer(config(optimizer="adamw", learning_rate=1e-3, schedule="constant"), 1)
    params = {"w": jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
    assert float(jnp.abs(updates["w"]).max()) > 0


def test_label_smoothing_and_class_weights():
    t = soft_targets(jnp.array([1]), 4, 0.2)
    np.testing.assert_allclose(t, [[0.05, 0.85, 0.05, 0.05]], rtol=1e-6)
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(cross_entropy(logits, t), [np.log(4)], rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(logits, t, jnp.array([3.0])), [3 * np.log(4)], rtol=1e-6)


def test_topk_correct():
    logits = jnp.array([[0.1, 0.9, 0.3, 0.2, 0.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    labels = jnp.array([2, 5])
    np.testing.assert_array_equal(topk_correct(logits, labels, 1), [0, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 2), [1, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 5), [1, 0])


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mix_batch_keeps_target_mass(mixup, cutmix):
    images = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
    targets = soft_targets(jnp.arange(6) % 3, 3)
    mixed, mixed_targets = mix_batch(jax.random.PRNGKey(1), images, targets, mixup, cutmix)
    assert mixed.shape == images.shape
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    assert not np.allclose(mixed, images)
