"""StableHLO export: the folded inference function, serialized by ``jax.export`` with a symbolic batch axis.

The function takes uint8 NHWC images at the model's size and returns float32 logits. Inside it: the mean/std
normalisation, then the model with every BatchNorm that follows a convolution folded into it
(``ops.fold_batchnorm``) and the weights as constants, so the file is the whole computation. The batch axis is
symbolic: one artifact serves batch 1 and batch 512.

Convolutions are exported as XLA's own (``conv_impl="xla"``): "auto" may call the oneDNN extension through
``jax.ffi`` custom calls, which exist only in a process that loaded it, while an artifact must run on any
machine with ``jax`` alone (``jax.export`` itself refuses to serialize custom calls that lack a compatibility
guarantee, so without this the export would fail, not the deployment).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.export.manifest import Preprocessing
from resnet_jax.ops import fold_batchnorm


def inference_function(model, variables: dict[str, Any], preprocessing: Preprocessing
                       ) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """``images (N, S, S, C) uint8 -> logits (N, classes) float32``: normalisation + the folded model, with
    the folded weights closed over (they become constants of the exported module)."""
    check_exportable(model)
    built = []

    def fold(v):  # compiled as one program: op by op, each of its few hundred operations would compile alone
        folded_model, folded = fold_batchnorm(model.clone(conv_impl="xla"), v)
        built.append(folded_model)
        return folded

    folded = jax.jit(fold)(variables)
    folded_model = built[0]
    mean, std = (jnp.asarray(v) for v in preprocessing.per_channel(model.in_channels))

    def infer(images):
        x = (images.astype(jnp.float32) / 255 - mean) / std
        return folded_model.apply(folded, x, train=False)
    return infer


def check_exportable(model) -> None:
    """Refuse models whose output is not one logits array (export serves classifiers)."""
    if getattr(model, "features_only", False) or getattr(model, "num_classes", 1) == 0:
        raise ValueError("export writes classifiers (logits out); this model returns features "
                         "(features_only=True or num_classes=0): give it a head, or use jax.export directly")


def export_stablehlo(model, variables: dict[str, Any], preprocessing: Preprocessing,
                     platforms: Sequence[str] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The serialized artifact and the manifest entries specific to this format (``export_model`` writes both)."""
    size, channels = preprocessing.image_size, model.in_channels
    batch = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((*batch, size, size, channels), jnp.uint8)
    exported = jax.export.export(jax.jit(inference_function(model, variables, preprocessing)),
                                 platforms=tuple(platforms) if platforms else None)(spec)
    return bytes(exported.serialize()), {"platforms": list(exported.platforms), "jax_version": jax.__version__,
                                         "calling_convention_version": exported.calling_convention_version}


def run_serialized(data: bytes) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[tuple, tuple]]:
    """A jitted runner of a serialized artifact (what ``load_exported`` uses), and its signature: the input's
    and the output's shapes after the batch axis."""
    exported = jax.export.deserialize(bytearray(data))
    call = jax.jit(exported.call)
    signature = tuple(exported.in_avals[0].shape[1:]), tuple(exported.out_avals[0].shape[1:])
    return (lambda batch: np.asarray(call(batch))), signature
