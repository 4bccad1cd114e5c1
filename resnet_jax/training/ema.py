"""An exponential moving average (EMA) of the weights and BatchNorm statistics, kept as torchvision's
classification recipe keeps one (``--model-ema``, its V2 weights): the average starts as a copy, then moves
``ema = decay * ema + (1 - decay) * current`` every ``update_every`` steps, BatchNorm statistics included; the
count restarts during the learning-rate warm-up, so each update there copies the weights again.

Why a separate average: late in a long recipe the raw weights still jump with each noisy step, while the
average sits near the middle of where they wander and usually evaluates better; torchvision reports its V2
ResNet-50 accuracy with it.

    decay = adjusted_decay(0.99998, global_batch=1024, update_every=32, epochs=600)   # torchvision's train.py
    ema = Ema.create(state.variables)
    ema = ema.update(state.variables, decay)        # jit-able; ema.reset() during warm-up
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp


def adjusted_decay(decay: float, *, global_batch: int, update_every: int, epochs: int) -> float:
    """torchvision's adjustment of ``--model-ema-decay``: the per-update weight of the new value,
    ``1 - decay``, is scaled by ``global_batch * update_every / epochs`` (capped at 1), so one setting gives a
    similar averaging horizon, in epochs, across batch sizes, update intervals and schedule lengths."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"the EMA decay must be in [0, 1], got {decay}")
    if min(global_batch, update_every, epochs) < 1:
        raise ValueError(f"global_batch, update_every and epochs must be positive, got {global_batch}, "
                         f"{update_every}, {epochs}")
    return 1.0 - min(1.0, (1.0 - decay) * global_batch * update_every / epochs)


@flax.struct.dataclass
class Ema:
    """The averaged ``{"params", "batch_stats"}`` and how many updates they hold (0: the next one copies)."""

    variables: Any
    count: jax.Array

    @classmethod
    def create(cls, variables: Any) -> Ema:
        return cls(jax.tree.map(jnp.array, variables), jnp.zeros((), jnp.int32))

    def update(self, variables: Any, decay: float | jax.Array) -> Ema:
        """One averaging step towards ``variables`` (a copy of them if the count is 0)."""
        first = self.count == 0

        def average(avg, new):
            new = new.astype(avg.dtype)
            return jnp.where(first, new, decay * avg + (1 - decay) * new)

        return Ema(jax.tree.map(average, self.variables, variables), self.count + 1)

    def reset(self) -> Ema:
        """The next update copies the weights (torchvision zeroes its count in each warm-up epoch)."""
        return self.replace(count=jnp.zeros_like(self.count))


def make_ema_update(config, steps_per_epoch: int, sharding) -> Callable[[Any, int], Any]:
    """``update(state, step_index) -> state``: the loop's EMA step after the training step ``step_index``
    (counted from 0), as torchvision's train.py runs it: an update after every ``model_ema_steps``-th batch of
    each epoch (its ``i % model_ema_steps == 0``), with the count reset after it in the warm-up epochs (its
    ``epoch < lr_warmup_epochs``), so that until warm-up ends the average is a copy of the weights. Counted in
    steps, where the learning rate's warm-up ends (``round(warmup_epochs * steps_per_epoch)``): the same steps
    for whole epochs, and a fractional warm-up (0.5) no longer copied to the end of its epoch. The decay is
    ``adjusted_decay`` of ``model_ema_decay``. Whether and how to update depends on the step alone, so a resumed
    run updates exactly where an uninterrupted one does."""
    decay = adjusted_decay(config.model_ema_decay, global_batch=config.batch_size,
                           update_every=config.model_ema_steps, epochs=config.num_epochs)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))  # as optim.make_schedule counts them

    def averaged(state, reset: bool):
        ema = state.ema.update(state.variables, decay)
        return state.replace(ema=ema.reset() if reset else ema)

    jitted = {reset: jax.jit(functools.partial(averaged, reset=reset), in_shardings=(sharding,),
                             out_shardings=sharding, donate_argnums=0) for reset in (False, True)}

    def update(state, step_index: int):
        if step_index % steps_per_epoch % config.model_ema_steps:
            return state
        return jitted[step_index < warmup_steps](state)

    return update
