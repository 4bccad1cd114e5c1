"""Schedules, optimizers and losses: the numbers the recipes promise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from resnet_jax.training import base_config, make_optimizer, make_schedule
from resnet_jax.training.losses import cross_entropy, loss_normaliser, mix_batch, soft_targets, topk_correct
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


@pytest.mark.parametrize("schedule", [dict(schedule="multistep", milestones=(1, 2, 4)),
                                      dict(schedule="step", step_epochs=2)])
def test_decays_due_by_the_end_of_the_warm_up_apply_from_it(schedule):
    """The decays fall at absolute epochs: from the warm-up's end the rate is torch's ``MultiStepLR``/``StepLR``
    at that epoch (per epoch, no warm-up). A decay exactly at the warm-up's end, or inside it, had been dropped,
    leaving the rest of the run at 10x (or 100x) the rate."""
    c = config(batch_size=256, learning_rate=1.0, lr_scaling="none", num_epochs=6, warmup_epochs=2, **schedule)
    ours = make_schedule(c, steps_per_epoch=10)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(c.milestones), gamma=0.1)
           if c.schedule == "multistep" else torch.optim.lr_scheduler.StepLR(opt, step_size=c.step_epochs, gamma=0.1))
    for epoch in range(6):
        if epoch >= 2:
            np.testing.assert_allclose(float(ours(epoch * 10 + 5)), ref.get_last_lr()[0], rtol=1e-6,
                                       err_msg=f"epoch {epoch}")
        opt.step()
        ref.step()


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


def test_adamw_decays_kernels_only_by_value():
    """With zero gradients Adam's own step is 0, so the whole update is -lr * wd * w where the mask allows decay:
    conv and dense kernels decay, BatchNorm scale/bias and biases keep their value."""
    params = {"conv": {"kernel": jnp.full((3, 3, 2, 2), 2.0)}, "fc": {"kernel": jnp.full((4, 3), -1.0),
                                                                     "bias": jnp.ones(3)},
              "bn": {"scale": jnp.ones(2), "bias": jnp.full(2, 0.5)}}
    tx = make_optimizer(config(optimizer="adamw", batch_size=256, learning_rate=0.1, weight_decay=0.5,
                               schedule="constant"), 1)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.1 * 0.5 * 2.0)
    np.testing.assert_allclose(updates["fc"]["kernel"], -0.1 * 0.5 * -1.0)
    for leaf in (updates["fc"]["bias"], updates["bn"]["scale"], updates["bn"]["bias"]):
        np.testing.assert_array_equal(leaf, 0.0)
    everything = make_optimizer(config(optimizer="adamw", batch_size=256, learning_rate=0.1, weight_decay=0.5,
                                       schedule="constant", decay_norm_and_bias=True), 1)
    updates, _ = everything.update(jax.tree.map(jnp.zeros_like, params), everything.init(params), params)
    np.testing.assert_allclose(updates["bn"]["bias"], -0.1 * 0.5 * 0.5)


def test_label_smoothing_and_class_weights():
    t = soft_targets(jnp.array([1]), 4, 0.2)
    np.testing.assert_allclose(t, [[0.05, 0.85, 0.05, 0.05]], rtol=1e-6)
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(cross_entropy(logits, t), [np.log(4)], rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_class_weights_are_torchs_with_and_without_smoothing(smoothing):
    """torch's CrossEntropyLoss(weight=, label_smoothing=): each class's term weighted inside the smoothed sum, the
    mean over the labels' weights; with probability targets (mixup) per example the same weighted sum."""
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    logits, labels = rng.standard_normal((8, 5)).astype(np.float32) * 3, rng.integers(0, 5, 8)
    w = np.array([0.5, 2.0, 1.0, 3.0, 0.25], np.float32)
    expected = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels), weight=torch.from_numpy(w),
                               label_smoothing=smoothing)
    per_example = cross_entropy(jnp.asarray(logits), soft_targets(jnp.asarray(labels), 5, smoothing), jnp.asarray(w))
    mean = jnp.sum(per_example) / jnp.sum(loss_normaliser(jnp.asarray(labels), jnp.asarray(w)))
    np.testing.assert_allclose(float(mean), float(expected), rtol=1e-6)
    mixed = rng.dirichlet(np.ones(5), 8).astype(np.float32)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(mixed), jnp.asarray(w)),
                               F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(mixed),
                                               weight=torch.from_numpy(w), reduction="none").numpy(), rtol=1e-6)


def test_topk_correct():
    logits = jnp.array([[0.1, 0.9, 0.3, 0.2, 0.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    labels = jnp.array([2, 5])
    np.testing.assert_array_equal(topk_correct(logits, labels, 1), [0, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 2), [1, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 5), [1, 0])


@pytest.mark.parametrize("case", ["constant", "ties", "nan_rows", "nan_entries"])
def test_topk_correct_ranks_ties_and_nans_as_torch(case):
    """A tie with the label or a NaN logit counted as a hit: constant logits (a dead head) or NaN weights scored
    100% top-1. The reference is torch's stable descending sort (torch.topk's order: ties by index, NaN first)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 10)).astype(np.float32)
    if case == "constant":
        logits[:] = 0.5
    elif case == "ties":
        logits = np.round(logits)  # five or so distinct values per row
    elif case == "nan_rows":
        logits[::3] = np.nan
    else:
        logits[rng.random(logits.shape) < 0.1] = np.nan
    labels = rng.integers(0, 10, 64)
    order = torch.sort(torch.from_numpy(logits), dim=1, descending=True, stable=True).indices.numpy()
    for k in (1, 5):
        expected = (order[:, :k] == labels[:, None]).any(axis=1).astype(np.float32)
        np.testing.assert_array_equal(topk_correct(jnp.asarray(logits), jnp.asarray(labels), k), expected)


def labelled_images(n=6, size=8):
    """Example i is an image filled with i + 1 and labelled i, so any pixel and any target tells its source."""
    images = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32)[:, None, None, None], (n, size, size, 3))
    return images, soft_targets(jnp.arange(n), n)


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
@pytest.mark.parametrize("seed", range(4))
def test_mixed_images_and_targets_use_the_same_weight(mixup, cutmix, seed):
    """Example i is mixed with example n-1-i. Its target keeps weight lam on its own label and 1 - lam on the
    partner's; the image must hold the same proportions: for mixup every pixel is lam * own + (1 - lam) *
    partner, for CutMix a fraction 1 - lam of the pixels (the box) is the partner's."""
    n = 6
    images, targets = labelled_images(n)
    mixed, mixed_targets = mix_batch(jax.random.PRNGKey(seed), images, targets, mixup, cutmix)
    mixed, mixed_targets = np.asarray(mixed), np.asarray(mixed_targets)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    for i in range(n // 2):  # the middle pairs mix with each other; both halves are checked through i and n-1-i
        own, partner = i + 1.0, n - i
        lam = mixed_targets[i, i]
        np.testing.assert_allclose(mixed_targets[i, n - 1 - i], 1 - lam, atol=1e-6)
        pixels = mixed[i]
        if np.isin(pixels, [own, partner]).all():  # CutMix: whole pixels from one or the other
            np.testing.assert_allclose((pixels == partner).mean(), 1 - lam, atol=1e-6)
        else:  # mixup: one blend everywhere
            np.testing.assert_allclose(pixels, lam * own + (1 - lam) * partner, rtol=1e-5)
    assert not np.allclose(mixed, images)


def test_cutmix_weight_is_one_minus_the_box_area_even_when_the_box_is_clipped():
    """A box centred near a corner is cut off by the border: the label weight follows the pixels actually
    pasted, not the area drawn from the Beta distribution."""
    images, targets = labelled_images(2, size=16)
    clipped = 0
    for seed in range(40):
        mixed, mixed_targets = mix_batch(jax.random.PRNGKey(seed), images, targets, 0.0, 1.0)
        area = float((np.asarray(mixed[0]) == 2.0).mean())
        np.testing.assert_allclose(float(mixed_targets[0, 1]), area, atol=1e-6)
        box = np.asarray(mixed[0, :, :, 0]) == 2.0
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        clipped += bool(box.any()) and (rows[0] == 0 or cols[0] == 0 or rows[-1] == 15 or cols[-1] == 15)
    assert clipped  # the seeds include boxes that the border cut


def _lams_and_boxes(mixed_images, mixed_targets):
    """Per draw of a batch (ones, zeros): example 0's label weight, and the box the partner's zeros fill (first
    row, first column, height, width; -1 and 0s where nothing was cut), which only CutMix leaves."""
    images, lams = np.asarray(mixed_images)[:, 0, :, :, 0], np.asarray(mixed_targets)[:, 0, 0]
    boxes = []
    for image in images:
        cut = image == 0
        rows, cols = np.flatnonzero(cut.any(1)), np.flatnonzero(cut.any(0))
        boxes.append((rows[0], cols[0], len(rows), len(cols)) if cut.any() else (-1, -1, 0, 0))
    is_cutmix = np.isin(images, [0.0, 1.0]).reshape(len(images), -1).all(1)
    return lams, np.array(boxes), is_cutmix


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_and_cutmix_draw_as_torchvisions_v2(mixup, cutmix):
    """The draws themselves against torchvision's v2 MixUp / CutMix / RandomChoice of both (its reference
    recipe's mixup 0.2, cutmix 1.0): the label weight (Beta(alpha, alpha); CutMix's corrected by the box), the
    box's place and size on a non-square image, and how often CutMix is the one picked. The weights' agreement
    with the pixels is checked above; this fails for a wrong alpha, a wrong switch probability or a box drawn
    elsewhere."""
    import torch
    from torchvision.transforms import v2

    from conftest import assert_same_distribution

    draws, height, width = 3000, 24, 40
    images = jnp.stack([jnp.ones((height, width, 1)), jnp.zeros((height, width, 1))])
    targets = jnp.eye(2)
    keys = jax.random.split(jax.random.PRNGKey(0), draws)
    ours = _lams_and_boxes(*jax.vmap(lambda k: mix_batch(k, images, targets, mixup, cutmix))(keys))

    parts = ([v2.MixUp(alpha=mixup, num_classes=2)] if mixup else []) + (
        [v2.CutMix(alpha=cutmix, num_classes=2)] if cutmix else [])
    mix = parts[0] if len(parts) == 1 else v2.RandomChoice(parts)
    torch.manual_seed(0)
    batch, labels = torch.stack([torch.ones(1, height, width), torch.zeros(1, height, width)]), torch.arange(2)
    out = [mix(batch, labels) for _ in range(draws)]
    theirs = _lams_and_boxes(torch.stack([o[0] for o in out]).permute(0, 1, 3, 4, 2).numpy(),
                             torch.stack([o[1] for o in out]).numpy())

    assert_same_distribution(ours[0], theirs[0], "label weight")
    for column, what in enumerate(("box top", "box left", "box height", "box width")):
        assert_same_distribution(ours[1][:, column], theirs[1][:, column], what)
    share, reference = ours[2].mean(), theirs[2].mean()
    assert abs(share - reference) < 4 * np.sqrt(0.25 * 2 / draws), (share, reference)
