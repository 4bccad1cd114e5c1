"""Binary cross-entropy against timm's ``BinaryCrossEntropy`` on hard labels with smoothing, on mixed soft targets,
with a target threshold, summed over classes, and at logits large enough to overflow a naive form."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.loss import BinaryCrossEntropy

from resnet_jax.training.losses import binary_cross_entropy, soft_targets

RNG = np.random.default_rng(0)
LOGITS = (RNG.standard_normal((6, 10)) * 4).astype(np.float32)
LOGITS[0, :3] = [90.0, -90.0, 40.0]  # exp() of these overflows float32 in a naive log(1 + exp(-x))
LABELS = RNG.integers(0, 10, 6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("threshold", [None, 0.2])
@pytest.mark.parametrize("sum_classes", [False, True])
def test_equals_timm_on_hard_labels(smoothing, threshold, sum_classes):
    reference = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold, sum_classes=sum_classes)
    expected = float(reference(torch.from_numpy(LOGITS), torch.from_numpy(LABELS)))
    ours = binary_cross_entropy(jnp.asarray(LOGITS), soft_targets(jnp.asarray(LABELS), 10, smoothing), threshold,
                                sum_classes)
    np.testing.assert_allclose(float(ours.mean()), expected, rtol=1e-6)


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_equals_timm_on_mixed_targets(threshold):
    """Dense targets (as mixup and cutmix make them) are taken as they are, not smoothed again."""
    targets = 0.7 * np.asarray(soft_targets(jnp.asarray(LABELS), 10, 0.1)) + 0.3 * np.asarray(
        soft_targets(jnp.asarray(LABELS[::-1]), 10, 0.1))
    reference = BinaryCrossEntropy(smoothing=0.1, target_threshold=threshold)
    expected = float(reference(torch.from_numpy(LOGITS), torch.from_numpy(targets.astype(np.float32))))
    ours = binary_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(targets), threshold)
    assert ours.shape == (6,)
    np.testing.assert_allclose(float(ours.mean()), expected, rtol=1e-6)


def test_its_gradient_is_torchs_at_a_logit_of_zero():
    """A zero-initialised head, or features a dead ReLU zeroed, gives logits of exactly 0. The loss was written
    with max(z, 0) and |z|, whose derivatives JAX takes at the kink as 0.5 and 1: the gradient there was -t
    instead of sigmoid(0) - t. Reference: torch's binary_cross_entropy_with_logits (timm's BCE calls it)."""
    import jax

    logits = np.array([[0.0, 0.0, 1e-3, -2.0], [0.0, 3.0, 0.0, 0.0]], np.float32)
    targets = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.3, 0.9]], np.float32)
    ours = jax.grad(lambda z: binary_cross_entropy(z, jnp.asarray(targets)).sum())(jnp.asarray(logits))
    z = torch.from_numpy(logits).requires_grad_()
    torch.nn.functional.binary_cross_entropy_with_logits(z, torch.from_numpy(targets), reduction="none").mean(
        -1).sum().backward()
    np.testing.assert_allclose(np.asarray(ours), z.grad.numpy(), rtol=1e-6, atol=1e-7)
