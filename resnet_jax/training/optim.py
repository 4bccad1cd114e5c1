"""Optimizers and learning-rate schedules from Optax, chosen by config.

Schedules are defined in epochs (as papers state them) and converted to steps here, once.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from resnet_jax.training.layerwise import lamb, lars


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``learning_rate`` is per 256 images."""
    if config.lr_scaling == "linear":
        return config.learning_rate * config.batch_size / 256
    return config.learning_rate


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate per step: a linear warm-up from 0 over ``warmup_epochs``, then the schedule. The step
    and multistep decays fall at absolute epochs (Goyal et al.'s convention: the warm-up does not shift them, as
    torchvision's ``SequentialLR`` would), so after the warm-up the rate is the schedule's at that epoch, every
    decay due by then applied (one exactly at the warm-up's end had been dropped, leaving 10x the rate)."""
    lr = peak_learning_rate(config)
    total = config.num_epochs * steps_per_epoch
    if config.max_steps > 0:
        total = min(total, config.max_steps)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(1, total - warmup))
    else:
        epochs = (range(config.step_epochs, config.num_epochs + 1, config.step_epochs) if config.schedule == "step"
                  else config.milestones)
        boundaries: dict[int, float] = {}
        for e in (e for e in epochs if e > 0):  # a decay due by the warm-up's end applies from its end on
            b = max(0, int(e * steps_per_epoch) - warmup)
            boundaries[b] = boundaries.get(b, 1.0) * config.lr_decay
        main = optax.piecewise_constant_schedule(lr, boundaries)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params):
    """Weight decay applies to conv and dense kernels; BatchNorm scale/bias and biases (1-D) are exempt."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    schedule = make_schedule(config, steps_per_epoch)
    mask = None if config.decay_norm_and_bias else decay_mask
    if config.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask)
    if config.optimizer == "lamb":  # timm's Lamb at its defaults (betas, eps, clipping to norm 1), the RSB recipes'
        return lamb(schedule, weight_decay=config.weight_decay, decay_mask=mask)
    if config.optimizer == "lars":  # timm's Lars; the MLPerf ResNet submissions' large-batch optimizer
        return lars(schedule, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov,
                    trust_coefficient=config.lars_trust_coefficient, decay_mask=mask)
    # SGD as in PyTorch: L2 term added to the gradient, then (Nesterov) momentum, then the learning rate.
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask),
                       optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
