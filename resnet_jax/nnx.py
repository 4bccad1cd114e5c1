"""Every named model as a Flax NNX module: ``resnet_jax.nnx.create_model("resnet50", rngs=nnx.Rngs(0))``.

The NNX module is a face on the linen ``ResNet``, not a second copy of the family: it holds the linen module as
static structure and its variables as NNX Variables, and a call runs linen's ``apply`` on them. So the model
table, per-layer convolution algorithms, BatchNorm folding, remat, ``features_only`` and the torchvision/timm
name tables all stay in one place, and the NNX model computes exactly what the linen one does (values and
gradients). The variables sit where a hand-written NNX ResNet would put them (``model.layer1_0.conv1.kernel``
is an ``nnx.Param``, ``model.bn1.mean`` an ``nnx.BatchStat``), named as the linen paths, so ``from_linen`` and
``to_linen`` are renames.

BatchNorm follows NNX's convention: ``model.train()`` / ``model.eval()`` (or ``nnx.view``) set
``use_running_average``. In train mode a call normalises with the batch's statistics and updates the running
averages in place; in eval mode it uses the running averages and changes nothing. Like ``nnx.BatchNorm``, every
model starts in train mode: call ``model.eval()`` before inference.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from resnet_jax import resnet as _linen
from resnet_jax import torchvision as _weights
from resnet_jax.pretrained import pretrained as _linen_pretrained  # the package's `pretrained` is this function
from resnet_jax.variable_fit import differences, listed, model_shapes, shapes_of

# The NNX API this face uses (Variable.set_value, nnx.to_pure_dict) is flax 0.12.3's; the linen models need only
# the package's flax>=0.10, so the floor is checked here, where an older flax failed at first use.
NNX_FLAX = (0, 12, 3)
_found = tuple(int(part) for part in flax.__version__.split(".")[:3] if part.isdigit())
if _found < NNX_FLAX:
    raise ImportError(f"resnet_jax.nnx needs flax >= {'.'.join(map(str, NNX_FLAX))} (nnx.view: 0.12.4), found "
                      f"{flax.__version__}; pip install -U flax (the linen models work with flax >= 0.10)")

# linen collection <-> NNX Variable type; every collection a ResNet has
_COLLECTIONS: dict[str, type[nnx.Variable]] = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class Layer(nnx.Module):
    """The variables of one linen submodule (a conv's kernel, a BatchNorm's scale/bias/mean/var, a block's
    layers), as attributes named like the linen ones."""

    def __init__(self, tree: Mapping[str, Any]):
        for name, value in tree.items():
            setattr(self, name, Layer(value) if isinstance(value, Mapping) else value)


class ResNet(nnx.Module):
    """A linen ``resnet_jax.ResNet`` and its variables as an NNX module; ``model(x)`` takes NHWC images and
    returns float32 logits (or the stage outputs with ``features_only``).

    Build it with ``create_model``, ``from_linen``, ``load_torchvision``, ``load_timm`` or ``pretrained``.
    ``linen_module`` is the linen definition (static); ``use_running_average`` is the BatchNorm mode. ``rngs``
    (an ``nnx.Rngs`` with a ``dropout`` stream, as ``nnx.Dropout`` takes it) draws stochastic depth's masks in
    train mode; a model with ``drop_path_rate > 0`` needs it to train.
    """

    def __init__(self, linen_module: _linen.ResNet, variables: Mapping[str, Any], *,
                 use_running_average: bool = False, rngs: nnx.Rngs | None = None):
        unknown = sorted(set(variables) - set(_COLLECTIONS))
        if unknown:
            raise ValueError(f"expected linen variables with the collections {sorted(_COLLECTIONS)}, got the "
                             f"extra collection(s) {unknown}")
        # a folded model (ops.fold_batchnorm) has its BatchNorm inside the convolutions: no statistics, inference only
        needed = [c for c in _COLLECTIONS if not (linen_module.folded and c == "batch_stats")]
        missing = [c for c in needed if not variables.get(c)]
        if missing:  # variables["params"] alone is an easy slip; it failed at the first call, in flax's words
            raise ValueError(f"the variables have no {' or '.join(map(repr, missing))} collection (a ResNet's "
                             f"BatchNorm needs its running mean and variance): pass the whole dict linen's init "
                             f"returns, {{'params': ..., 'batch_stats': ...}}, not one collection of it")
        shape = (1, 32, 32, linen_module.in_channels)  # another model's variables failed at the first call
        wrong = differences(model_shapes(linen_module, shape), shapes_of(variables))
        if wrong:
            raise ValueError(f"these variables do not fit the linen module: {listed(wrong)}; pass the variables made "
                             "with this module (its init, or the loader that built both)")
        tree: dict[str, Any] = {}
        for collection, kind in _COLLECTIONS.items():
            _merge(tree, jax.tree.map(kind, dict(variables.get(collection, {}))))
        for name, value in tree.items():
            setattr(self, name, Layer(value))
        self.linen_module = linen_module
        self.use_running_average = use_running_average or linen_module.folded  # a folded model only infers
        self.rngs = rngs

    def __call__(self, x: jax.Array) -> jax.Array | list[jax.Array]:
        variables = self.linen_variables()
        if self.use_running_average:
            return self.linen_module.apply(variables, x, train=False)
        out, updates = self.linen_module.apply(variables, x, train=True, mutable=["batch_stats"],
                                               rngs=self._dropout_rngs())
        _assign(self, updates.get("batch_stats", {}))  # the running averages, updated in place
        return out

    def _dropout_rngs(self) -> dict[str, jax.Array]:
        """A fresh key from the ``dropout`` stream for stochastic depth (none needed without it)."""
        if not self.linen_module.drop_path_rate:
            return {}
        if self.rngs is None or not hasattr(self.rngs, "dropout"):  # Rngs(params=0): no dropout or default stream
            given = "" if self.rngs is None else " (its rngs have no dropout stream, nor a default one)"
            raise ValueError(f"this model has drop_path_rate={self.linen_module.drop_path_rate} and trains with "
                             f"random masks{given}: build it with rngs=nnx.Rngs(dropout=seed) or nnx.Rngs(seed) "
                             "(create_model, from_linen, load_torchvision, load_timm, pretrained), or call "
                             "model.eval() for inference")
        return {"dropout": self.rngs.dropout()}

    def linen_variables(self) -> dict[str, Any]:
        """The variables as linen holds them: ``{"params": ..., "batch_stats": ...}`` of arrays."""
        out = {}
        for collection, kind in _COLLECTIONS.items():
            tree = _prune(nnx.to_pure_dict(nnx.state(self, kind)))
            if tree:
                out[collection] = tree
        return out

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``, as ``nnx.BatchNorm.set_view``.

        Args:
          use_running_average: if True, BatchNorm uses the stored running averages (eval mode); if False, the
            batch's statistics, updating the running averages (train mode).
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


def _merge(into: dict, tree: Mapping) -> None:
    for name, value in tree.items():
        if isinstance(value, Mapping):
            _merge(into.setdefault(name, {}), value)
        elif name in into:
            raise ValueError(f"the variable {name!r} appears in two collections; a ResNet's never do")
        else:
            into[name] = value


def _prune(tree: Mapping) -> dict:
    """Drop the empty branches a type-filtered state leaves (a conv has no BatchStat)."""
    out = {}
    for name, value in tree.items():
        value = _prune(value) if isinstance(value, Mapping) else value
        if not isinstance(value, dict) or value:
            out[name] = value
    return out


def _assign(node: nnx.Module, tree: Mapping) -> None:
    for name, value in tree.items():
        child = getattr(node, name)
        if isinstance(value, Mapping):
            _assign(child, value)
        else:
            child.set_value(value)


def from_linen(linen_module: _linen.ResNet, variables: Mapping[str, Any], *,
               use_running_average: bool = False, rngs: nnx.Rngs | None = None) -> ResNet:
    """An NNX model computing exactly what ``linen_module.apply(variables, ...)`` does (it shares the arrays);
    ``rngs``: the ``dropout`` stream for stochastic depth in train mode."""
    if not isinstance(linen_module, _linen.ResNet):
        raise TypeError(f"from_linen takes a resnet_jax.ResNet (from resnet_jax.create_model), got "
                        f"{type(linen_module).__name__}")
    return ResNet(linen_module, variables, use_running_average=use_running_average, rngs=rngs)


def to_linen(model: ResNet) -> tuple[_linen.ResNet, dict[str, Any]]:
    """``(linen_module, variables)``: ``linen_module.apply(variables, x, train=...)`` computes what ``model``
    does, e.g. for ``resnet_jax.save_torchvision`` or the linen training loop."""
    if not isinstance(model, ResNet):
        raise TypeError(f"to_linen takes a resnet_jax.nnx.ResNet, got {type(model).__name__}")
    return model.linen_module, model.linen_variables()


def create_model(name: str, *, rngs: nnx.Rngs, **overrides: Any) -> ResNet:
    """A freshly initialised named model, e.g. ``create_model("resnet50", rngs=nnx.Rngs(0), num_classes=10)``.

    ``overrides`` are ``resnet_jax.create_model``'s (``num_classes``, ``in_channels``, ``features_only``,
    ``dtype``, ``remat``, ``conv_impl``, ``drop_path_rate``...). The initial values are linen's ``init`` with
    ``rngs.params()``; the model keeps ``rngs`` for stochastic depth's ``dropout`` stream.
    """
    module = _linen.create_model(name, **overrides)
    x = jnp.zeros((1, 32, 32, module.in_channels), jnp.float32)  # parameters do not depend on the image size
    return ResNet(module, module.init(rngs.params(), x, train=False), rngs=rngs)


def load_torchvision(name: str, source: str | os.PathLike | Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
                     **kwargs: Any) -> ResNet:
    """``resnet_jax.load_torchvision`` (same arguments) as an NNX model; ``rngs`` as ``from_linen`` (the
    ``dropout`` stream that fine-tuning with ``drop_path_rate`` needs)."""
    return from_linen(*_weights.load_torchvision(name, source, **kwargs), rngs=rngs)


def load_timm(name: str, source: str | os.PathLike | Mapping[str, Any], *, rngs: nnx.Rngs | None = None,
              **kwargs: Any) -> ResNet:
    """``resnet_jax.load_timm`` (same arguments) as an NNX model; ``rngs`` as in ``load_torchvision``."""
    return from_linen(*_weights.load_timm(name, source, **kwargs), rngs=rngs)


def pretrained(name: str, weights: str = "DEFAULT", *, rngs: nnx.Rngs | None = None, **kwargs: Any) -> ResNet:
    """``resnet_jax.pretrained`` (same arguments: cached, sha256-checked download) as an NNX model; ``rngs`` as
    in ``load_torchvision``."""
    return from_linen(*_linen_pretrained(name, weights, **kwargs), rngs=rngs)


__all__ = ["Layer", "ResNet", "create_model", "from_linen", "load_timm", "load_torchvision", "pretrained",
           "to_linen"]
