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
from resnet_jax.training.losses import cross_entropy, mix_batch, soft_targets, topk_correct
from resnet_jax.training.state import TrainState

METRIC_KEYS = ("loss", "correct", "top5", "count")


def _sums(per_example_loss, logits, labels, weight):
    return {"loss": jnp.sum(per_example_loss * weight), "correct": jnp.sum(topk_correct(logits, labels, 1) * weight),
            "top5": jnp.sum(topk_correct(logits, labels, 5) * weight), "count": jnp.sum(weight)}


def make_train_step(config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh) -> Callable:
    """``step(state, batch) -> (state, metric sums)``; the state's buffers are donated (updated in place)."""
    check_against_data(config, num_classes)
    class_weights = jnp.asarray(config.class_weights, jnp.float32) if len(config.class_weights) else None

    def step(state: TrainState, batch):
        images, labels = batch["image"], batch["label"]
        rng = jax.random.fold_in(state.rng, state.step)
        targets = soft_targets(labels, num_classes, config.label_smoothing)
        images, targets = mix_batch(rng, images, targets, config.mixup_alpha, config.cutmix_alpha)
        weights = jnp.ones(labels.shape, jnp.float32) if class_weights is None else class_weights[labels]

        def loss_fn(params):
            logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, images,
                                             train=True, mutable=["batch_stats"],
                                             rngs={"dropout": jax.random.fold_in(rng, 1)})  # drop_path_rate
            per_example = cross_entropy(logits, targets, weights)
            return jnp.sum(per_example) / jnp.sum(weights), (logits, per_example, updates["batch_stats"])

        grads, (logits, per_example, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        ones = jnp.ones(labels.shape, jnp.float32)  # weights are already inside per_example
        return new_state, _sums(per_example, logits, labels, ones)

    return jax.jit(step, in_shardings=(replicated(mesh), batch_sharding(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)


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
