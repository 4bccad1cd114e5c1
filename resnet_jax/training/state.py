"""``TrainState``: everything a training step reads and writes, as one pytree that Orbax can save."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Parameters, BatchNorm statistics, optimizer state, step counter and the run's random key.

    ``apply_fn`` and ``tx`` are static (not saved): they are rebuilt from the config, so a checkpoint is
    plain arrays and restores into any process layout.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def arrays(self) -> dict[str, Any]:
        """The saved part of the state."""
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state, "rng": self.rng}

    def with_arrays(self, arrays: dict[str, Any]) -> "TrainState":
        return self.replace(**arrays)


def create_train_state(model, tx: optax.GradientTransformation, seed: int, input_shape: tuple[int, ...],
                       variables: dict[str, Any] | None = None) -> TrainState:
    """Initialise (or adopt ``variables``) and build the optimizer state; runs under ``jit`` so a caller can
    place the result with ``out_shardings``."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    if variables is None:
        variables = model.init(init_key, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=run_key, apply_fn=model.apply, tx=tx)
