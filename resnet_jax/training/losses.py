"""Softmax cross-entropy with label smoothing and class weights; binary cross-entropy (timm's, for ResNet Strikes
Back); mixup/cutmix; top-k correctness."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def soft_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def cross_entropy(logits: jax.Array, targets: jax.Array, class_weights: jax.Array | None = None) -> jax.Array:
    """Per-example loss against soft ``targets``. ``class_weights`` (one per class) weigh each class's term of the
    sum, as torch's ``CrossEntropyLoss(weight=)`` does: with label smoothing the smoothed mass is weighted class by
    class, not by the example's label (``loss_normaliser`` gives the mean's denominator)."""
    if class_weights is not None:
        targets = targets * class_weights
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def loss_normaliser(labels: jax.Array, class_weights: jax.Array | None, loss: str = "ce",
                    mixed: bool = False) -> jax.Array:
    """Each example's share of the batch mean's denominator: its class's weight for cross-entropy (torch's
    ``CrossEntropyLoss(weight=)`` divides by the summed weights of the labels), 1 for binary cross-entropy and
    without weights (timm's ``BinaryCrossEntropy(weight=)`` averages over every entry), and 1 for ``mixed``
    targets (mixup/cutmix): they are probabilities, and torch's mean over probability targets divides by the
    batch size (the labels' weights ignored each partner's class and rescaled every batch's step)."""
    if class_weights is None or loss == "bce" or mixed:
        return jnp.ones(labels.shape, jnp.float32)
    return class_weights[labels]


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, target_threshold: float | None = None,
                         sum_classes: bool = False, class_weights: jax.Array | None = None) -> jax.Array:
    """Per-example binary cross-entropy of each logit against its soft target, as timm's ``BinaryCrossEntropy``
    (the loss of the ResNet Strikes Back recipes): each class is an independent sigmoid, so a mixed image may be
    confidently both of its classes. ``targets`` come from ``soft_targets`` (and ``mix_batch``), smoothed as timm
    smooths them; ``target_threshold`` binarises them (1 above it, else 0); the loss is the mean over classes
    (timm's mean over all entries, once averaged over the batch) or, with ``sum_classes``, the sum.
    ``class_weights`` scale each class's term, as timm's ``weight`` (passed to torch's
    ``binary_cross_entropy_with_logits``) does."""
    logits = logits.astype(jnp.float32)
    if target_threshold is not None:
        targets = (targets > target_threshold).astype(jnp.float32)
    # softplus(z) - z * t: stable at any |z|, and its derivative is sigmoid(z) - t everywhere (the form with
    # max(z, 0) and |z| has the same value, but at z = 0 JAX differentiates both kinks and gave -t, 0.5 off)
    per_class = jax.nn.softplus(logits) - logits * targets
    if class_weights is not None:
        per_class = per_class * class_weights
    return per_class.sum(-1) if sum_classes else per_class.mean(-1)


def mix_batch(rng: jax.Array, images: jax.Array, targets: jax.Array, mixup_alpha: float, cutmix_alpha: float):
    """Mixup (Zhang et al.) or CutMix (Yun et al.; chosen with probability 1/2 when both are on): blend each
    example with the batch reversed, and its targets in the same proportion."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_choice, k_mix, k_cut, k_box = jax.random.split(rng, 4)
    partner_images, partner_targets = images[::-1], targets[::-1]

    def mixup(_):
        lam = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
        return lam * images + (1 - lam) * partner_images, lam

    def cutmix(_):
        lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
        h, w = images.shape[1:3]
        cut_h, cut_w = (h * jnp.sqrt(1 - lam)).astype(jnp.int32), (w * jnp.sqrt(1 - lam)).astype(jnp.int32)
        cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([h, w]))
        y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
        x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
        ys, xs = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        box = ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1))[None, :, :, None]
        area = (y1 - y0) * (x1 - x0) / (h * w)
        return jnp.where(box, partner_images, images), 1.0 - area  # lambda from the box actually cut

    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or jax.random.bernoulli(k_choice))
    if mixup_alpha > 0 and cutmix_alpha > 0:
        mixed, lam = jax.lax.cond(use_cutmix, cutmix, mixup, None)
    else:
        mixed, lam = (cutmix if cutmix_alpha > 0 else mixup)(None)
    return mixed.astype(images.dtype), lam * targets + (1 - lam) * partner_targets


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the ``k`` highest logits (k clipped to the number of classes), ranked as
    torch's ``topk``/``sort(descending=True)`` rank them: ties by the lower class index, NaN above every number.
    Counting only the logits strictly above the label's made every tie (constant logits, an untrained or dead
    head) and every NaN a hit: a model of NaN weights scored 100%."""
    k = min(k, logits.shape[-1])
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    nan, label_nan = jnp.isnan(logits), jnp.isnan(label_logit)
    above = (logits > label_logit) | (nan & ~label_nan)
    tied = (logits == label_logit) | (nan & label_nan)
    earlier = jnp.arange(logits.shape[-1]) < labels[:, None]
    return (jnp.sum(above | (tied & earlier), axis=-1) < k).astype(jnp.float32)
