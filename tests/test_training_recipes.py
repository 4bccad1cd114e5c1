"""The V2/RSB recipe parts in the training step, checked against their references: ``optimizer`` "lamb"/"lars"
against timm's ``Lamb``/``Lars`` with the project's weight-decay mask, ``loss="bce"`` against timm's
``BinaryCrossEntropy``, ``grad_accum_steps`` against the mean of the micro-batch gradients, and the loop's EMA
schedule against torchvision's train.py driving torch's ``AveragedModel``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from timm.loss import BinaryCrossEntropy
from timm.optim import Lamb, Lars
from torch.optim.swa_utils import AveragedModel

from resnet_jax.parallel import make_mesh, replicated
from resnet_jax.training import base_config, create_train_state, make_optimizer, make_train_step, validate
from resnet_jax.training.ema import adjusted_decay, make_ema_update


def config(**kw):
    c = base_config()
    c.update({"batch_size": 256, "learning_rate": 0.1, "schedule": "constant", **kw})
    return validate(c)


PARAMS = {"conv": {"kernel": (3, 3, 2, 4)}, "bn": {"scale": (4,), "bias": (4,)}, "fc": {"kernel": (4, 3)}}


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_config_optimizer_is_timms_with_norms_and_biases_in_the_no_decay_group(name):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), PARAMS,
                          is_leaf=lambda x: isinstance(x, tuple))
    tensors = {k: {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in d.items()} for k, d in params.items()}
    decayed = [tensors["conv"]["kernel"], tensors["fc"]["kernel"]]
    groups = [{"params": decayed}, {"params": list(tensors["bn"].values()), "weight_decay": 0.0}]
    if name == "lamb":
        tx = make_optimizer(config(optimizer="lamb", weight_decay=0.05), 1)
        theirs = Lamb(groups, lr=0.1, weight_decay=0.05)
    else:
        tx = make_optimizer(config(optimizer="lars", weight_decay=1e-4, momentum=0.9, lars_trust_coefficient=0.02),
                            1)
        theirs = Lars(groups, lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coeff=0.02)
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(2):  # two steps from the same weights
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        for k, d in tensors.items():
            for n, t in d.items():
                t.grad = torch.from_numpy(grads[k][n].copy())
        theirs.step()
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    for k, d in tensors.items():
        for n, t in d.items():
            np.testing.assert_allclose(np.asarray(params[k][n]), t.detach().numpy(), rtol=2e-5, atol=2e-6)


class Tiny(nn.Module):
    """Conv, BatchNorm, pooling and a dense head: enough for gradients and batch statistics to matter."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(5)(jnp.mean(nn.relu(x), axis=(1, 2)))


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, 6, 6, 2)).astype(np.float32),
            "label": rng.integers(0, 5, n).astype(np.int32)}


def initial_state(c):
    return create_train_state(Tiny(), make_optimizer(c, 1), 0, (1, 6, 6, 2), ema=c.model_ema)


@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_bce_loss_of_the_train_step_is_timms_with_its_smoothing_and_threshold(threshold):
    """The step's loss sum against timm's BinaryCrossEntropy given the same logits and the integer labels, which
    it smooths itself (0.1). Mixed targets against timm: test_training_bce.py (the step mixes before the loss)."""
    c = config(loss="bce", bce_target_threshold=threshold, label_smoothing=0.1)
    state, b = initial_state(c), batch()
    logits = jax.jit(lambda s, x: s.apply_fn(s.variables, x, train=True, mutable=["batch_stats"])[0])(state,
                                                                                                      b["image"])
    _, sums = make_train_step(c, 5, make_mesh())(state, b)
    reference = BinaryCrossEntropy(smoothing=0.1, target_threshold=threshold or None)
    expected = float(reference(torch.from_numpy(np.array(logits)), torch.from_numpy(b["label"]).long()))
    np.testing.assert_allclose(float(sums["loss"]) / 8, expected, rtol=1e-5)


WEIGHTS = (0.5, 2.0, 1.0, 3.0, 0.25)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_class_weights_in_the_train_step_are_the_references(loss):
    """The step's logged loss, the one it minimises, with class weights and label smoothing: torch's
    CrossEntropyLoss(weight=, label_smoothing=), or timm's BinaryCrossEntropy(weight=), on the same logits."""
    c = config(loss=loss, label_smoothing=0.1, class_weights=WEIGHTS)
    state, b = initial_state(c), batch()
    logits = jax.jit(lambda s, x: s.apply_fn(s.variables, x, train=True, mutable=["batch_stats"])[0])(state,
                                                                                                      b["image"])
    _, sums = make_train_step(c, 5, make_mesh())(state, b)
    logits, labels, w = torch.from_numpy(np.array(logits)), torch.from_numpy(b["label"]).long(), torch.tensor(WEIGHTS)
    if loss == "ce":
        expected = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(logits, labels)
    else:
        expected = BinaryCrossEntropy(smoothing=0.1, weight=w)(logits, labels)
    np.testing.assert_allclose(float(sums["loss"]) / float(sums["count"]), float(expected), rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_a_batch_whose_labels_all_weigh_zero_teaches_nothing(smoothing):
    """Zero class weights are allowed; a batch of only such labels had a loss of 0/0 (NaN; torch's mean too) or,
    smoothed, x/0 = inf, and its NaN gradient ended the run as diverged. Now its loss and gradient are 0: from a
    fresh state without weight decay the weights stay as they were (momentum and weight decay still apply, as in
    torch's optimizer step on a zero gradient)."""
    c = config(label_smoothing=smoothing, class_weights=(0.0, 1.0, 1.0, 1.0, 1.0), weight_decay=0.0)
    state, b = initial_state(c), batch()
    b["label"][:] = 0
    before = [np.array(p) for p in jax.tree.leaves(state.params)]  # the step donates the state's buffers
    new, sums = make_train_step(c, 5, make_mesh())(state, b)
    assert float(sums["loss"]) == 0.0
    for was, now in zip(before, jax.tree.leaves(new.params), strict=True):
        np.testing.assert_array_equal(np.asarray(now), was)
    b["label"][0] = 1  # one weighed label: an ordinary step again
    _, sums = make_train_step(c, 5, make_mesh())(initial_state(c), b)
    assert np.isfinite(float(sums["loss"])) and float(sums["loss"]) > 0


@pytest.mark.parametrize("mixing", [dict(mixup_alpha=0.8), dict(cutmix_alpha=1.0)])
def test_class_weights_with_mixed_targets_are_torchs(mixing):
    """Mixup and CutMix make the targets probabilities, for which torch's ``CrossEntropyLoss(weight=,
    label_smoothing=)`` divides the weighted sum by the batch size; the step divided by the summed weights of the
    unmixed labels (0.82x torch's loss on one batch). Same logits, the step's own mixing (its key, its lambda)."""
    from resnet_jax.training.losses import mix_batch

    c = config(label_smoothing=0.1, class_weights=WEIGHTS, **mixing)
    state, b = initial_state(c), batch()
    rng = jax.random.fold_in(state.rng, state.step)  # as the step draws its mixing
    images, targets = mix_batch(rng, jnp.asarray(b["image"]), jax.nn.one_hot(b["label"], 5), c.mixup_alpha,
                                c.cutmix_alpha)
    logits = jax.jit(lambda s, x: s.apply_fn(s.variables, x, train=True, mutable=["batch_stats"])[0])(state, images)
    _, sums = make_train_step(c, 5, make_mesh())(state, b)
    expected = torch.nn.CrossEntropyLoss(weight=torch.tensor(WEIGHTS), label_smoothing=0.1)(
        torch.from_numpy(np.array(logits)), torch.from_numpy(np.array(targets)))
    np.testing.assert_allclose(float(sums["loss"]) / float(sums["count"]), float(expected), rtol=1e-5)


def test_gradient_accumulation_is_one_step_on_the_mean_of_the_micro_batch_gradients():
    """k = 2 micro-batches (examples 0, 2, 4, ... and 1, 3, 5, ...): the update is the optimizer's step on the
    mean of their gradients, each computed with that micro-batch's BatchNorm statistics, and the running
    statistics take both micro-batches' updates in turn."""
    c = config(grad_accum_steps=2, optimizer="sgd", momentum=0.9, weight_decay=1e-4)
    state, b = initial_state(c), batch()
    micro = [{k: v[j::2] for k, v in b.items()} for j in range(2)]

    def loss(params, batch_stats, m):
        logits, new = state.apply_fn({"params": params, "batch_stats": batch_stats}, m["image"], train=True,
                                     mutable=["batch_stats"])
        targets = jax.nn.one_hot(m["label"], 5)
        return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), -1)), new["batch_stats"]

    @jax.jit
    def reference(state):
        grads, stats = [], state.batch_stats
        for m in micro:
            g, stats = jax.grad(loss, has_aux=True)(state.params, stats, m)
            grads.append(g)
        mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
        updates, _ = state.tx.update(mean, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), stats

    expected, stats = reference(state)

    new, sums = make_train_step(c, 5, make_mesh())(jax.tree.map(jnp.copy, state), b)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7), new.params, expected)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7), new.batch_stats, stats)
    one_pass, _ = make_train_step(config(optimizer="sgd", momentum=0.9, weight_decay=1e-4), 5, make_mesh())(
        jax.tree.map(jnp.copy, state), b)
    assert not np.allclose(one_pass.batch_stats["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"])
    assert float(sums["count"]) == 8


def test_ema_in_the_loop_follows_torchvisions_train_py():
    """Weights that change at every step, 3 epochs of 5 steps, an update every 2 steps of each epoch and a
    warm-up of 1 epoch: our update (with the adjusted decay) against torchvision's loop (``i % model_ema_steps
    == 0``, update, then ``n_averaged`` zeroed while ``epoch < lr_warmup_epochs``) around ``AveragedModel``."""
    c = config(model_ema=True, model_ema_steps=2, model_ema_decay=0.9, warmup_epochs=1, num_epochs=3,
               batch_size=4)
    decay = adjusted_decay(0.9, global_batch=4, update_every=2, epochs=3)
    assert decay == pytest.approx(1 - 0.1 * 4 * 2 / 3)
    spe, rng = 5, np.random.default_rng(0)
    model = torch.nn.Linear(4, 5)
    reference = AveragedModel(model, avg_fn=lambda avg, new, n: decay * avg + (1 - decay) * new, use_buffers=True)
    state = initial_state(c)
    update = make_ema_update(c, spe, replicated(make_mesh()))
    for step in range(3 * spe):
        weights = rng.standard_normal((5, 4)).astype(np.float32)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(weights))
        epoch, i = divmod(step, spe)
        if i % 2 == 0:
            reference.update_parameters(model)
            if epoch < 1:
                reference.n_averaged.fill_(0)
        params = {**state.params, "Dense_0": {**state.params["Dense_0"], "kernel": jnp.asarray(weights.T)}}
        state = update(state.replace(params=params), step)
        np.testing.assert_allclose(np.asarray(state.ema.variables["params"]["Dense_0"]["kernel"]).T,
                                   reference.module.weight.detach().numpy(), rtol=1e-6, atol=1e-6)
        assert int(state.ema.count) == int(reference.n_averaged)


def test_the_ema_copies_the_weights_until_a_fractional_warm_up_ends():
    """warmup_epochs=0.5 of 4 steps: the learning rate's warm-up ends after step 2 (index 1), and the EMA stops
    copying there; it copied to the end of the epoch (``epoch < 0.5``). No reference takes fractions
    (torchvision's is whole epochs, where the two rules agree: the test above)."""
    c = config(model_ema=True, model_ema_steps=1, warmup_epochs=0.5, num_epochs=3, batch_size=4)
    state, update = initial_state(c), make_ema_update(c, 4, replicated(make_mesh()))
    counts = []
    for step in range(5):
        state = update(state, step)
        counts.append(int(state.ema.count))
    assert counts == [0, 0, 1, 2, 3]


@pytest.mark.parametrize("overrides,message", [
    ({"optimizer": "lambs"}, "did you mean 'lamb'"), ({"loss": "bc"}, "config.loss='bc' is not one of"),
    ({"grad_accum_steps": 3}, "does not split into config.grad_accum_steps=3"),
    ({"auto_augment": "trivial"}, "auto_augment 'trivial' is not one of"), ({"model_ema_decay": 2.0}, "\\[0, 1\\]"),
    ({"ra_reps": 0}, "at least 1")])
def test_bad_recipe_keys_are_one_sentence(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)
