"""Layer-wise adaptive optimizers for large batches, as timm implements them (the reference for ResNet Strikes
Back, whose A1/A2 recipes train with LAMB): each weight tensor's step is rescaled by a trust ratio of its norm to
its update's norm, so layers learn at comparable relative rates whatever their scale.

``decay_mask`` (a pytree of bools, or a function of the params returning one) says which tensors get weight
decay; as in timm, only those get the trust ratio too (timm puts norms and biases in a group with weight decay 0,
where the ratio is not applied). Learning rates may be optax schedules.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def lamb(learning_rate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.01,
         max_grad_norm: float | None = 1.0, decay_mask: Any = None) -> optax.GradientTransformation:
    """timm's ``Lamb`` (You et al. 2020) with its defaults: gradients clipped to a global norm of
    ``max_grad_norm``, Adam moments with bias correction, weight decay added to the update (coupled), the update
    scaled by ``|w| / |update|`` per tensor (1 where either norm is 0), then by the learning rate."""
    decayed = [optax.add_decayed_weights(weight_decay, mask=decay_mask),
               optax.masked(optax.scale_by_trust_ratio(), _everywhere(decay_mask))] if weight_decay else []
    return optax.chain(optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity(),
                       optax.scale_by_adam(b1, b2, eps), *decayed, optax.scale_by_learning_rate(learning_rate))


def lars(learning_rate, *, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 0.001,
         eps: float = 1e-8, nesterov: bool = False, decay_mask: Any = None) -> optax.GradientTransformation:
    """timm's ``Lars`` (You et al. 2017): for decayed tensors the gradient plus weight decay is scaled by
    ``trust_coefficient * |w| / (|g| + weight_decay * |w| + eps)`` (1 where a norm is 0), then heavy-ball momentum
    (the first step's buffer is the update itself), then the learning rate."""
    scaled = [optax.masked(_scale_by_lars_ratio(weight_decay, trust_coefficient, eps), _everywhere(decay_mask))
              ] if weight_decay else []
    return optax.chain(*scaled, optax.trace(momentum, nesterov), optax.scale_by_learning_rate(learning_rate))


def _everywhere(mask):
    """``mask``, or every tensor where none is given (a mask of True everywhere)."""
    return mask if mask is not None else (lambda params: jax.tree.map(lambda _: True, params))


class _Empty(NamedTuple):
    pass


def _scale_by_lars_ratio(weight_decay: float, trust_coefficient: float, eps: float) -> optax.GradientTransformation:
    def update(grads, state, params):
        if params is None:
            raise ValueError("LARS needs the parameters: call tx.update(grads, state, params)")

        def scale(g, w):
            w_norm, g_norm = jnp.linalg.norm(w.ravel()), jnp.linalg.norm(g.ravel())
            ratio = trust_coefficient * w_norm / (g_norm + w_norm * weight_decay + eps)
            ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
            return (g + weight_decay * w) * ratio

        return jax.tree.map(scale, grads, params), state

    return optax.GradientTransformation(lambda params: _Empty(), update)
