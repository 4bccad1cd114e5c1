"""``train_step`` and ``eval_step``: pure functions, ``jax.jit``-compiled with explicit shardings.

Both return *sums* (loss, correct, count) rather than means, so metrics from any number of steps, devices or
padded evaluation batches add up exactly; the host divides once when it logs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from resnet_jax.ops import fold_batchnorm
from resnet_jax.parallel import batch_sharding, replicated
from resnet_jax.training.config import check_against_data
from resnet_jax.training.losses import (binary_cross_entropy, cross_entropy, loss_normaliser, mix_batch,
                                        soft_targets, topk_correct)
from resnet_jax.training.state import TrainState

METRIC_KEYS = ("loss", "correct", "top5", "count")


def _sums(per_example_loss, logits, labels, weight):
    return {"loss": jnp.sum(per_example_loss * weight), "correct": jnp.sum(topk_correct(logits, labels, 1) * weight),
            "top5": jnp.sum(topk_correct(logits, labels, 5) * weight), "count": jnp.sum(weight)}


def make_train_step(config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh) -> Callable:
    """``step(state, batch) -> (state, metric sums)``; the state's buffers are donated (updated in place).

    With ``config.grad_accum_steps`` = k > 1 the batch is split into k micro-batches run one after another
    (``_accumulated``): the update is the one step on the mean of their gradients, which is the gradient of the
    whole batch's loss, but each forward pass normalises with its own micro-batch's BatchNorm statistics and the
    running statistics take k updates, as k smaller steps would, so the result is close to, not equal to, one
    pass over the whole batch."""
    check_against_data(config, num_classes)
    class_weights = jnp.asarray(config.class_weights, jnp.float32) if len(config.class_weights) else None
    loss_of = _loss(config, class_weights)

    def step(state: TrainState, batch):
        images, labels = batch["image"], batch["label"]
        rng = jax.random.fold_in(state.rng, state.step)
        targets = soft_targets(labels, num_classes, config.label_smoothing)
        images, targets = mix_batch(rng, images, targets, config.mixup_alpha, config.cutmix_alpha)
        mixed = config.mixup_alpha > 0 or config.cutmix_alpha > 0
        # A batch whose labels all weigh 0 teaches nothing: loss and gradient 0 (torch's mean is 0/0 = NaN there,
        # or x/0 = inf with label smoothing, and one such batch would end the run as diverged).
        total_weight = jnp.sum(loss_normaliser(labels, class_weights, config.loss, mixed))
        weighed = total_weight > 0
        total_weight = jnp.where(weighed, total_weight, 1.0)
        dropout_key = jax.random.fold_in(rng, 1)  # stochastic depth's draws: deterministic under the run's seed

        def loss_fn(params, batch_stats, dropout_key, images, targets):
            logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats}, images,
                                             train=True, mutable=["batch_stats"],
                                             rngs={"dropout": dropout_key})  # drop_path_rate
            per_example = loss_of(logits, targets)
            loss = jnp.where(weighed, jnp.sum(per_example) / total_weight, 0.0)
            return loss, (logits, per_example, updates["batch_stats"])

        grad_fn = jax.grad(loss_fn, has_aux=True)
        if config.grad_accum_steps == 1:
            grads, (logits, per_example, batch_stats) = grad_fn(state.params, state.batch_stats, dropout_key,
                                                                images, targets)
        else:
            grads, (logits, per_example, batch_stats) = _accumulated(grad_fn, config.grad_accum_steps, state,
                                                                     dropout_key, (images, targets))
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        # the logged loss is the one minimised: the sum over the batch's normaliser, counted per example
        ones = jnp.ones(labels.shape, jnp.float32)
        return new_state, _sums(jnp.where(weighed, per_example * (labels.shape[0] / total_weight), 0.0), logits,
                                labels, ones)

    return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


def _loss(config: ml_collections.ConfigDict, class_weights: jax.Array | None) -> Callable:
    """Per-example training loss against soft targets, with ``class_weights`` inside: softmax cross-entropy, or
    timm's binary cross-entropy (targets smoothed by ``label_smoothing`` and mixed as timm's Mixup does, then
    thresholded if asked)."""
    if config.loss == "bce":
        threshold = config.bce_target_threshold or None
        return lambda logits, targets: binary_cross_entropy(logits, targets, threshold, class_weights=class_weights)
    return lambda logits, targets: cross_entropy(logits, targets, class_weights)


def _accumulated(grad_fn: Callable, k: int, state: TrainState, dropout_key: jax.Array, batch: tuple):
    """``grad_fn`` over k micro-batches in sequence (a ``lax.scan``), BatchNorm statistics carried from one to
    the next; the gradients summed (each micro-batch's loss is already divided by the whole batch's weight, so
    the sum is the mean of the micro-batch means, and with class weights the whole batch's weighted mean).
    Micro-batch j holds examples j, j + k, j + 2k, ...: every device contributes to each one without moving
    data. Each micro-batch draws its own stochastic-depth masks (``dropout_key`` folded with its index). Logits
    and losses come back in the batch's order."""
    def split(x):  # (B, ...) -> (k, B / k, ...), strided
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def merge(x):  # the inverse of split
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    def micro(carry, indexed):
        grads, batch_stats = carry
        index, micro_batch = indexed
        g, (logits, per_example, batch_stats) = grad_fn(state.params, batch_stats,
                                                        jax.random.fold_in(dropout_key, index), *micro_batch)
        return (jax.tree.map(jnp.add, grads, g), batch_stats), (logits, per_example)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, batch_stats), (logits, per_example) = jax.lax.scan(micro, (zeros, state.batch_stats),
                                                               (jnp.arange(k), jax.tree.map(split, batch)))
    return grads, (merge(logits), merge(per_example), batch_stats)


def folded_logits(model, variables, images):
    """Inference logits with BatchNorm folded into the convolutions (inside a jitted function, the fold costs
    one elementwise pass over the weights per call)."""
    folded_model, folded = fold_batchnorm(model, variables)
    return folded_model.apply(folded, images, train=False)


def make_eval_step(mesh: Mesh, model=None) -> Callable:
    """``step(state_or_variables_fn, batch) -> metric sums`` over the examples whose ``mask`` is set.

    Given the ``model``, evaluation runs it with BatchNorm folded into the convolutions (``ops.fold_batchnorm``,
    inside the step, so the fold costs one elementwise pass over the weights per batch): the same outputs
    within float32 rounding, one pass over every activation fewer, and the residual add and ReLU fused into the
    convolutions where the CPU extension runs them.
    """

    def logits_of(state, images):
        if model is None:
            return state.apply_fn(state.variables, images, train=False)
        return folded_logits(model, state.variables, images)

    def step(state: TrainState, batch):
        logits = logits_of(state, batch["image"])
        labels = batch["label"]
        targets = soft_targets(labels, logits.shape[-1])
        return _sums(cross_entropy(logits, targets), logits, labels, batch["mask"].astype(jnp.float32))

    return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=replicated(mesh))


def add_sums(total: dict | None, sums: dict) -> dict:
    """Running total of metric sums, kept on device so the loop never waits for the host."""
    return sums if total is None else jax.tree.map(jnp.add, total, sums)


def means(total: dict) -> dict[str, float]:
    """Host-side loss / accuracy / top5 from sums (the one place metrics are fetched)."""
    host = jax.device_get(total)
    count = max(float(host["count"]), 1.0)
    return {"loss": float(host["loss"]) / count, "accuracy": float(host["correct"]) / count,
            "top5": float(host["top5"]) / count, "count": float(host["count"])}
