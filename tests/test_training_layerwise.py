"""LAMB and LARS against timm's ``Lamb`` and ``Lars`` (the ResNet Strikes Back reference): the same parameters
after each of six steps from the same weights and gradients, with weight decay on the weight tensors only (timm's
no-decay group for norms and biases), a learning-rate schedule, and gradient clipping that triggers."""

import jax
import numpy as np
import optax
import pytest
import torch
from timm.optim import Lamb, Lars

from resnet_jax.training.layerwise import lamb, lars

SHAPES = {"conv": (3, 3, 4, 8), "scale": (8,), "bias": (8,), "fc": (8, 5)}
DECAYED = {"conv": True, "scale": False, "bias": False, "fc": True}


def run_both(ours, make_theirs, steps=6, grad_scale=1.0, lr_at=lambda step: 0.1):
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    tensors = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    theirs = make_theirs([{"params": [tensors[k] for k in SHAPES if DECAYED[k]]},
                          {"params": [tensors[k] for k in SHAPES if not DECAYED[k]], "weight_decay": 0.0}])
    state, update = ours.init(params), jax.jit(ours.update)
    for step in range(steps):
        grads = {k: (grad_scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
        for group in theirs.param_groups:
            group["lr"] = lr_at(step)
        for k, t in tensors.items():
            t.grad = torch.from_numpy(grads[k].copy())
        theirs.step()
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k, t in tensors.items():
            np.testing.assert_allclose(np.asarray(params[k]), t.detach().numpy(), rtol=2e-5, atol=2e-6,
                                       err_msg=f"{k} after step {step + 1}")


def schedule(step):
    return 0.1 * (0.5 ** step)


@pytest.mark.parametrize("grad_scale", [0.01, 10.0], ids=["unclipped", "clipped"])
def test_lamb_equals_timm(grad_scale):
    ours = lamb(schedule, weight_decay=0.05, decay_mask=DECAYED)
    run_both(ours, lambda groups: Lamb(groups, lr=0.1, weight_decay=0.05), grad_scale=grad_scale, lr_at=schedule)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_equals_timm(nesterov):
    ours = lars(schedule, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02, nesterov=nesterov,
                decay_mask=DECAYED)
    run_both(ours, lambda groups: Lars(groups, lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coeff=0.02,
                                       nesterov=nesterov), lr_at=schedule)


def test_lars_without_params_says_so():
    tx = lars(0.1, weight_decay=1e-4)
    params = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, tx.init(params))
