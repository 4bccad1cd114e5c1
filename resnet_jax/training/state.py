"""``TrainState``: everything a training step reads and writes, as one pytree that Orbax can save."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from resnet_jax.training.ema import Ema


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
    ema: Ema | None = None              # the weights' moving average (config.model_ema), saved with the rest

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def ema_view(self) -> "TrainState":
        """This state with the EMA's weights in place of the raw ones: the same pytree structure, so an
        evaluation step compiled for the state runs it without compiling again."""
        return self.replace(params=self.ema.variables["params"], batch_stats=self.ema.variables["batch_stats"])

    def arrays(self) -> dict[str, Any]:
        """The saved part of the state."""
        arrays = {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                  "opt_state": self.opt_state, "rng": self.rng}
        if self.ema is not None:
            arrays["ema"] = {"variables": self.ema.variables, "count": self.ema.count}
        return arrays

    def with_arrays(self, arrays: dict[str, Any]) -> "TrainState":
        arrays = dict(arrays)
        if "ema" in arrays:
            arrays["ema"] = Ema(arrays["ema"]["variables"], arrays["ema"]["count"])
        return self.replace(**arrays)


def create_train_state(model, tx: optax.GradientTransformation, seed: int, input_shape: tuple[int, ...],
                       variables: dict[str, Any] | None = None, ema: bool = False) -> TrainState:
    """Initialise (or adopt ``variables``) and build the optimizer state, and with ``ema`` an average that starts
    as a copy of the weights; runs under ``jit`` so a caller can place the result with ``out_shardings``."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    if variables is None:
        variables = model.init(init_key, jnp.zeros(input_shape, jnp.float32), train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=run_key, apply_fn=model.apply, tx=tx,
                      ema=Ema.create({"params": params, "batch_stats": batch_stats}) if ema else None)
