"""Flax variables <-> torchvision ``state_dict``: names, layouts, and one strict report of every mismatch.

The mapping is a table of rules, each a torchvision name pattern, the Flax path it becomes and the layout
change (conv OIHW <-> HWIO, linear transpose), plus a module-path rename (``layer1.0`` <-> ``layer1_0``,
``downsample.0/1`` <-> ``downsample/conv|bn``). One loop applies it in each direction, and the export is
defined as the inverse of the import, so the two cannot drift apart. Because the rules are about *kinds* of
layers, not a list of keys, they cover every model ``create_model`` builds: torchvision's own ten models
match torchvision exactly, and the variants (CIFAR stems, pre-activation, ResNet-D) round-trip through the
same names (``conv1_0``, ``bn_final``...) even though torchvision has no such model.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from resnet_jax.resnet import ResNet, create_model
from resnet_jax.torch_file import load_state_dict, save_state_dict

Layout = Callable[[np.ndarray], np.ndarray]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


# (torchvision module pattern, parameter name, Flax path template or None to drop it, import layout, export
# layout). The first rule whose "<module>.<parameter>" matches wins; the module path is renamed by _MODULE_RENAMES.
_CONV = r"(?:[^.]+\.)*(?:conv\w*|downsample\.0)"
RULES: tuple[tuple[str, str, str | None, Layout, Layout], ...] = (
    (_CONV, "weight", "params/{m}/kernel", _oihw_to_hwio, _hwio_to_oihw),
    ("fc", "weight", "params/{m}/kernel", _transpose, _transpose),
    ("fc", "bias", "params/{m}/bias", _same, _same),
    (".+", "weight", "params/{m}/scale", _same, _same),  # BatchNorm
    (".+", "bias", "params/{m}/bias", _same, _same),
    (".+", "running_mean", "batch_stats/{m}/mean", _same, _same),
    (".+", "running_var", "batch_stats/{m}/var", _same, _same),
    (".+", "num_batches_tracked", None, _same, _same),  # a training counter Flax has no use for
)
# (torchvision module-path pattern, Flax replacement), and back; applied in order.
_MODULE_RENAMES = ((r"layer(\d+)\.(\d+)", r"layer\1_\2"), (r"downsample\.0", "downsample/conv"),
                   (r"downsample\.1", "downsample/bn"), (r"\.", "/"))
_MODULE_RENAMES_BACK = ((r"layer(\d+)_(\d+)", r"layer\1.\2"), (r"downsample/conv", "downsample.0"),
                        (r"downsample/bn", "downsample.1"), (r"/", "."))
_HEAD = "fc."


def _rename(path: str, renames) -> str:
    for pattern, replacement in renames:
        path = re.sub(pattern, replacement, path)
    return path


def _match(name: str):
    """The first rule covering a torchvision name, and the Flax path it gives (None: dropped)."""
    for rule in RULES:
        module, param, template = rule[:3]
        match = re.fullmatch(rf"(?P<m>{module})\.{param}", name)
        if match:
            path = None if template is None else template.format(m=_rename(match["m"], _MODULE_RENAMES))
            return rule, None if path is None else tuple(path.split("/"))
    raise ValueError(f"no rule for the torchvision name {name!r}")


def torch_to_flax_name(name: str) -> tuple[tuple[str, ...] | None, Layout]:
    """Where a torchvision entry goes: the Flax path ``("params", "layer1_0", "conv1", "kernel")`` (None when
    the entry is dropped) and the layout change; ``ValueError`` for a name no rule covers."""
    rule, path = _match(name)
    return path, rule[3]


def flax_to_torch_name(path: tuple[str, ...]) -> tuple[str, Layout]:
    """The inverse of ``torch_to_flax_name``: each rule is tried backwards and kept only if the forward
    mapping picks that same rule and lands on the same path, so import and export agree by construction."""
    joined = "/".join(path)
    for rule in RULES:
        _, param, template, _, to_torch = rule
        if template is None:
            continue
        match = re.fullmatch(re.escape(template).replace(re.escape("{m}"), "(?P<m>.+)"), joined)
        if not match:
            continue
        candidate = f"{_rename(match['m'], _MODULE_RENAMES_BACK)}.{param}"
        try:
            if _match(candidate) == (rule, path):
                return candidate, to_torch
        except ValueError:
            pass
    raise ValueError(f"no torchvision name for the Flax variable {joined!r}")


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy/JAX array or a torch tensor (duck-typed: torch is never imported here)."""
    if hasattr(value, "detach"):  # a torch tensor, maybe a Parameter that requires grad, maybe on a GPU
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16 of its own
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _expected_shapes(model: ResNet) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    x = jax.ShapeDtypeStruct((1, 64, 64, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return {k: (tuple(v.shape), v.dtype) for k, v in flatten_dict(shapes).items()}


def convert_state_dict(model: ResNet, state_dict: Mapping[str, Any], *, skip_head: bool = False,
                       source: str = "the state_dict", model_name: str = "the model"
                       ) -> tuple[dict, list[tuple[str, ...]]]:
    """Map a torchvision state_dict onto ``model``'s variables, strictly.

    Returns the (nested) variables and the Flax paths left unfilled because ``skip_head`` dropped the head.
    Every missing, unexpected, mis-shaped or unnamed entry is collected and raised as one ``ValueError``.
    A model without a head (``features_only`` or ``num_classes=0``) ignores the file's ``fc.*`` entries.
    """
    expected = _expected_shapes(model)
    has_head = any(k[1] == "fc" for k in expected)
    flat, problems, unexpected, misshaped, seen = {}, [], [], [], set()
    for name, value in state_dict.items():
        if name.startswith(_HEAD) and (skip_head or not has_head):
            continue
        try:
            path, layout = torch_to_flax_name(name)
        except ValueError:
            unexpected.append(name)
            continue
        if path is None:
            continue
        if path not in expected:
            unexpected.append(name)
            continue
        seen.add(path)
        array = layout(to_numpy(value))
        shape, dtype = expected[path]
        if array.shape != shape:
            misshaped.append(f"{name}: file has {tuple(np.shape(value))}, model needs {_torch_shape(path, shape)}")
            continue
        flat[path] = jnp.asarray(array, dtype)
    head = [p for p in expected if p[1] == "fc"] if skip_head else []
    missing = [flax_to_torch_name(p)[0] for p in expected if p not in seen and p not in head]
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (the model has no such entry): {', '.join(unexpected)}")
    if missing:
        problems.append(f"{len(missing)} missing (the model needs them): {', '.join(missing)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped:\n    " + "\n    ".join(misshaped))
    if problems:
        hint = ""
        if any(m.startswith(_HEAD) for m in misshaped):
            hint = ("\nThe classifier head differs: to fine-tune with another number of classes pass "
                    "num_classes=N and new_head=True (a fresh head is initialised from rng).")
        raise ValueError(f"{source} does not fit {model_name}:\n  " + "\n  ".join(problems) + hint +
                         "\nCheck the model name and options (num_classes, in_channels, ...) match the file.")
    return unflatten_dict(flat), head


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax shape in torchvision's layout, for error messages."""
    _, layout = flax_to_torch_name(path)
    return layout(np.empty(shape, np.uint8)).shape


def load_torchvision(name: str, source: str | os.PathLike | Mapping[str, Any], *, new_head: bool = False,
                     rng: jax.Array | int = 0, **overrides: Any) -> tuple[ResNet, dict]:
    """Build ``create_model(name, **overrides)`` and fill it from torchvision weights.

    ``source`` is a ``.pth``/``.safetensors`` path or a state_dict (numpy arrays or torch tensors). Strict:
    every missing, unexpected or mis-shaped entry is named in one ``ValueError``. For fine-tuning, pass
    ``num_classes=N, new_head=True``: the file's ``fc`` is dropped and a new head initialised from ``rng``.
    Returns ``(model, {"params": ..., "batch_stats": ...})``.
    """
    model = create_model(name, **overrides)
    if isinstance(source, (str, os.PathLike)):
        label, state_dict = str(source), load_state_dict(source)
    elif isinstance(source, Mapping):
        label, state_dict = "the state_dict", source
    else:
        raise TypeError(f"source must be a file path or a mapping of names to arrays, got {type(source).__name__}")
    variables, head = convert_state_dict(model, _strip_wrapper_prefix(state_dict), skip_head=new_head,
                                         source=label, model_name=_describe(name, overrides))
    if head:
        key = jax.random.key(rng) if isinstance(rng, int) else rng
        fresh = _init_head(model, key)
        variables = unflatten_dict({**flatten_dict(variables), **{p: fresh[p] for p in head}})
    return model, variables


def _init_head(model: ResNet, key: jax.Array) -> dict[tuple[str, ...], jax.Array]:
    """A new classifier head, initialised by the model's own code but without running its backbone: the same
    module stripped to a one-conv stem as wide as the head's input (a few ops instead of hundreds). Flax
    derives each parameter's key from its module path, so ``fc`` gets what ``model.init(key)`` would give it."""
    fan_in = _expected_shapes(model)[("params", "fc", "kernel")][0][0]
    stub = model.clone(stage_sizes=(), stage_widths=(), stem="cifar", stem_width=fan_in, preact=False)
    x = jnp.zeros((1, 1, 1, model.in_channels))
    return flatten_dict(stub.init(key, x, train=False))


def _describe(name: str, overrides: Mapping[str, Any]) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return f"create_model({name!r}{', ' + options if options else ''})"


def _strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` / DDP put on every name."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"params", "batch_stats"}`` -> a torchvision state_dict (names, layouts, float32/int64 numpy arrays)
    that ``torchvision.models.X().load_state_dict(sd)`` accepts strictly, ``num_batches_tracked`` included."""
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
        raise ValueError(f"to_torchvision takes the model's variables ({{'params', 'batch_stats'}}), got the "
                         f"extra collection(s) {unknown}")
    flat = flatten_dict(dict(variables))
    modules = list(dict.fromkeys(path[1:-1] for path in flat))  # in creation order: torchvision's order too
    out: dict[str, np.ndarray] = {}
    for module in modules:
        for collection in ("params", "batch_stats"):  # weight, bias, then running_mean, running_var
            for path in (p for p in flat if p[0] == collection and p[1:-1] == module):
                name, layout = flax_to_torch_name(path)
                out[name] = np.array(layout(np.asarray(flat[path])), order="C")  # a writable copy
                if name.endswith(".running_var"):
                    out[name[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


def save_torchvision(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``to_torchvision(variables)`` as ``.safetensors`` (by extension) or a torch ``.pth``."""
    save_state_dict(path, to_torchvision(variables))
