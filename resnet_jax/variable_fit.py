"""Whether variables are the ones a model makes: compared by name and shape, each difference in a few words.

Why one place: exporting (``export_model``), writing timm's names (``to_timm``) and any other consumer of a
model's variables must refuse another model's (another class count, the params alone) before using them, each
saying what differs rather than failing later inside folding, a KeyError or torch's strict load.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

Shapes = dict[tuple[str, ...], tuple[int, ...]]


def shapes_of(variables: Mapping[str, Any]) -> Shapes:
    """``{path: shape}`` of a (nested) variables dict."""
    return {k: tuple(jnp.shape(v)) for k, v in flatten_dict(dict(variables)).items()}


def model_shapes(model, input_shape: tuple[int, ...]) -> Shapes:
    """The ``params`` and ``batch_stats`` shapes ``model.init`` makes for an input of ``input_shape`` (traced
    only, nothing computed)."""
    made = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
    return shapes_of({c: made[c] for c in ("params", "batch_stats") if c in made})


def differences(expected: Shapes, got: Shapes) -> list[str]:
    """Every entry missing, unexpected or of another shape, as "missing params/fc/bias" and the like."""
    return ([f"missing {'/'.join(k)}" for k in expected if k not in got]
            + [f"unexpected {'/'.join(k)}" for k in got if k not in expected]
            + [f"{'/'.join(k)} is {got[k]}, the model's {shape}" for k, shape in expected.items()
               if k in got and got[k] != shape])


def listed(wrong: list[str], most: int = 4) -> str:
    """The first ``most`` differences and how many more: another depth's variables differ in hundreds of entries,
    and the first few say what is wrong."""
    return "; ".join(wrong[:most]) + (f" (and {len(wrong) - most} more)" if len(wrong) > most else "")
