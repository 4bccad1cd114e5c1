"""Flax variables <-> PyTorch ``state_dict`` in torchvision's or timm's names, with one strict report of every
mismatch.

The mapping is two tables and one loop. ``MODULES`` renames module paths (``layer1.0.conv1`` <->
``layer1_0/conv1``); ``PARAMS`` says, per kind of Flax module (conv, BatchNorm, the ``fc`` head), which tensor
becomes which variable and how its layout changes (conv OIHW <-> HWIO, linear transpose). A *naming* is a set of
``MODULES`` rows: torchvision's, or timm's, which spells the same modules differently only where ResNet-D differs
from torchvision (the deep stem ``conv1.0/1/3/4/6`` and the average-pool shortcut ``downsample.1/2``), so its rows
name the model settings (``stem``, ``shortcut``) they apply to. The export is defined as the inverse of the import
and a name is accepted only in the spelling the export would write, so the two directions cannot drift apart and
one naming's file never loads under the other's.

Because the rules are about *kinds* of layers, not a list of keys, they cover every model ``create_model`` builds:
torchvision's models of the same names match torchvision exactly, every name timm shares with this library
(``TIMM_MODELS``: the torchvision-style ResNets, ResNet-D, pre-activation ResNetV2, the SE and ECA ResNets)
matches timm, and the names no one else has (the CIFAR models, ``preact_resnetN``) round-trip through torchvision-style names
(``conv1_0``, ``bn_final``...).
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from resnet_jax.resnet import ResNet, create_model, model_config
from resnet_jax.torch_file import load_state_dict, save_state_dict
from resnet_jax.variable_fit import differences, shapes_of

Layout = Callable[[np.ndarray], np.ndarray]
NAMINGS = ("torchvision", "timm")


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    return a.transpose(3, 2, 0, 1)


def _transpose(a: np.ndarray) -> np.ndarray:
    return a.T


def _conv1d_to_hio(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 1, 0)


def _conv1x1_to_dense(a: np.ndarray) -> np.ndarray:
    return a[:, :, 0, 0].T


def _dense_to_conv1x1(a: np.ndarray) -> np.ndarray:
    return a.T[:, :, None, None]


# Module paths: (namings, torch path, Flax path, model settings the row needs[, torch kind]). {i}/{j}/{k} are
# numbers ({i0} is {i} - 1: timm's ResNetV2 counts stages from 0), {name} one path component. The first row that
# applies and matches wins, in either direction. The optional last entry is the kind of the torch module when it
# differs from the Flax module's: timm's ResNetV2 head is a 1x1 convolution where ours is a Dense.
_DEEP, _AVG = {"stem": "deep"}, {"shortcut": "avg_pool"}
_V2, _V2_PLAIN, _V2_DEEP = {"preact": True}, {"preact": True, "stem": "imagenet"}, {"preact": True, "stem": "deep"}
MODULES: tuple[tuple, ...] = (
    # timm's ResNetV2 (pre-activation): a named-Sequential stem, stages.N.blocks.M, a final norm, a conv head
    (("timm",), "stem.conv", "conv1", _V2_PLAIN),
    *((("timm",), f"stem.{t}", f, _V2_DEEP) for t, f in (("conv1", "conv1_0"), ("norm1", "bn1_0"),
                                                          ("conv2", "conv1_1"), ("norm2", "bn1_1"),
                                                          ("conv3", "conv1_2"))),
    (("timm",), "stages.{i0}.blocks.{j}.norm{k}", "layer{i}_{j}/bn{k}", _V2),
    (("timm",), "stages.{i0}.blocks.{j}.downsample.conv", "layer{i}_{j}/downsample/conv", _V2),
    (("timm",), "stages.{i0}.blocks.{j}.{name}", "layer{i}_{j}/{name}", _V2),
    (("timm",), "norm", "bn_final", _V2),
    (("timm",), "head.fc", "fc", _V2, "conv_head"),
    # timm's deep stem is one Sequential (2 and 5 are its ReLUs), closed by bn1 as the plain stem is
    (("timm",), "conv1.0", "conv1_0", _DEEP),
    (("timm",), "conv1.1", "bn1_0", _DEEP),
    (("timm",), "conv1.3", "conv1_1", _DEEP),
    (("timm",), "conv1.4", "bn1_1", _DEEP),
    (("timm",), "conv1.6", "conv1_2", _DEEP),
    (("timm",), "bn1", "bn1_2", _DEEP),
    # timm's average-pool shortcut: downsample.0 is the pool (an Identity at stride 1), which has no parameters
    (("timm",), "layer{i}.{j}.downsample.1", "layer{i}_{j}/downsample/conv", _AVG),
    (("timm",), "layer{i}.{j}.downsample.2", "layer{i}_{j}/downsample/bn", _AVG),
    # channel attention (timm's "se" module path for both kinds): SE's 1x1 convs are Dense layers here, ECA's
    # Conv1d across channels a (k, 1, 1) kernel
    (NAMINGS, "layer{i}.{j}.se.fc{k}", "layer{i}_{j}/se/fc{k}", {}, "conv_head"),
    (NAMINGS, "layer{i}.{j}.se.conv", "layer{i}_{j}/se/conv", {}, "conv1d"),
    (NAMINGS, "layer{i}.{j}.downsample.0", "layer{i}_{j}/downsample/conv", {}),
    (NAMINGS, "layer{i}.{j}.downsample.1", "layer{i}_{j}/downsample/bn", {}),
    (NAMINGS, "layer{i}.{j}.{name}", "layer{i}_{j}/{name}", {}),
    (NAMINGS, "{name}", "{name}", {}),
)
# Tensors: (Flax module kind, torch parameter, Flax collection, Flax variable or None to drop it, import layout,
# export layout). A Flax module's kind is its name's prefix: conv1, conv1_0, downsample/conv -> "conv".
PARAMS: tuple[tuple[str, str, str, str | None, Layout, Layout], ...] = (
    ("conv", "weight", "params", "kernel", _oihw_to_hwio, _hwio_to_oihw),
    ("conv", "bias", "params", "bias", _same, _same),  # only BatchNorm-folded models have one
    ("fc", "weight", "params", "kernel", _transpose, _transpose),
    ("fc", "bias", "params", "bias", _same, _same),
    ("conv_head", "weight", "params", "kernel", _conv1x1_to_dense, _dense_to_conv1x1),
    ("conv_head", "bias", "params", "bias", _same, _same),
    ("conv1d", "weight", "params", "kernel", _conv1d_to_hio, _conv1d_to_hio),
    ("bn", "weight", "params", "scale", _same, _same),
    ("bn", "bias", "params", "bias", _same, _same),
    ("bn", "running_mean", "batch_stats", "mean", _same, _same),
    ("bn", "running_var", "batch_stats", "var", _same, _same),
    ("bn", "num_batches_tracked", "batch_stats", None, _same, _same),  # a training counter Flax has no use for
)
_KINDS = ("conv", "bn", "fc")
_NUMBERS = ("i", "i0", "j", "k")
# timm's models of the same name compute exactly what ours do (tests/test_timm.py checks each against timm)
TIMM_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet18d", "resnet34d", "resnet50d",
               "resnet101d", "resnet152d", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
               "wide_resnet50_2", "wide_resnet101_2",
               *(f"resnetv2_{d}{s}" for d in (18, 34, 50, 101, 152) for s in ("", "d")),
               "seresnet18", "seresnet34", "seresnet50", "seresnet101", "seresnet152", "seresnet152d",
               "seresnext26d_32x4d", "seresnext50_32x4d", "seresnext101_32x4d", "seresnext101_32x8d",
               "seresnext101d_32x8d", "seresnext101_64x4d", "ecaresnet26t", "ecaresnet50d", "ecaresnet50t",
               "ecaresnet101d")
# torchvision's own ResNets (torchvision.models.<name>); tests/test_torchvision.py checks the list against it
TORCHVISION_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                      "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
# the settings that decide what a model computes from given weights; the others (num_classes, in_channels,
# dtype, remat, features_only, conv_impl...) are checked by the shapes or do not change the function
_ARCHITECTURE = ("stage_sizes", "block", "stage_widths", "stem", "stem_width", "shortcut", "groups",
                 "width_per_group", "preact", "bn_epsilon", "folded", "attn_layer")
# those that torchvision's ResNet class (block, layers, groups, width_per_group, norm_layer) cannot set
_NOT_IN_TORCHVISION = ("stage_widths", "stem", "stem_width", "shortcut", "preact", "attn_layer")


def _template_regex(template: str, separator: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    body = "".join(rf"(?P<{p[1:-1]}>\d+)" if p[1:-1] in _NUMBERS else rf"(?P<name>[^{re.escape(separator)}]+)"
                   if p == "{name}" else re.escape(p) for p in parts)
    return re.compile(body)


@functools.cache
def _module_rows(naming: str, settings: tuple[tuple[str, Any], ...]):
    """The ``MODULES`` rows of one naming that apply to a model with these settings, compiled both ways."""
    if naming not in NAMINGS:
        raise ValueError(f"unknown naming {naming!r}; choose one of {list(NAMINGS)}")
    given = dict(settings)
    return tuple((_template_regex(torch, "."), torch, _template_regex(flax, "/"), flax, kind[0] if kind else None)
                 for namings, torch, flax, needs, *kind in MODULES
                 if naming in namings and all(given.get(k) == v for k, v in needs.items()))


def _settings(model: ResNet | None) -> tuple[tuple[str, Any], ...]:
    """What the conditional rows look at; without a model, none of them applies."""
    if model is None:
        return ()
    stem = "deep" if model.stem == "deep_tiered" else model.stem  # the same layers, spelled alike, other widths
    return (("stem", stem), ("shortcut", model.shortcut), ("preact", model.preact))


def _rename(path: str, rows, source: int) -> tuple[str, str | None] | None:
    """A module path in the other spelling (``source`` 0: torch -> Flax, 2: Flax -> torch) and the torch
    module's kind when the row names one; None if no row matches."""
    for row in rows:
        match = row[source].fullmatch(path)
        if match:
            fields = match.groupdict()
            if "i" in fields:
                fields["i0"] = int(fields["i"]) - 1
            if "i0" in fields:
                fields["i"] = int(fields["i0"]) + 1
            return row[3 - source].format(**fields), row[4]
    return None


def _kind(flax_module: str) -> str | None:
    last = flax_module.rsplit("/", 1)[-1]
    return next((k for k in _KINDS if last.startswith(k)), None)


def _forward(name: str, rows):
    module, _, param = name.rpartition(".")
    flax_module, torch_kind = (_rename(module, rows, 0) if module else None) or (None, None)
    kind = torch_kind or (flax_module and _kind(flax_module))
    for rule in PARAMS:
        if rule[0] == kind and rule[1] == param:
            path = None if rule[3] is None else (rule[2], *flax_module.split("/"), rule[3])
            return path, rule
    return None


def _backward(path: tuple[str, ...], rows):
    collection, flax_module, variable = path[0], "/".join(path[1:-1]), path[-1]
    module, torch_kind = _rename(flax_module, rows, 2) or (None, None)
    kind = torch_kind or _kind(flax_module)
    for rule in PARAMS:
        if module is not None and rule[0] == kind and rule[2:4] == (collection, variable):
            return f"{module}.{rule[1]}", rule
    return None


def torch_to_flax_name(name: str, naming: str = "torchvision", model: ResNet | None = None
                       ) -> tuple[tuple[str, ...] | None, Layout]:
    """Where a state_dict entry goes: the Flax path ``("params", "layer1_0", "conv1", "kernel")`` (None when the
    entry is dropped) and the layout change. ``model`` selects timm's ResNet-D rows. ``ValueError`` for a name
    no rule covers, or one spelled otherwise than this naming's export would write it."""
    rows = _module_rows(naming, _settings(model))
    found = _forward(name, rows)
    if found is not None:
        path, rule = found
        if path is None or (_backward(path, rows) or (None,))[0] == name:
            return path, rule[4]
    raise ValueError(f"no rule for the {naming} name {name!r}")


def flax_to_torch_name(path: tuple[str, ...], naming: str = "torchvision", model: ResNet | None = None
                       ) -> tuple[str, Layout]:
    """The inverse of ``torch_to_flax_name``: kept only if importing the name lands on the same path, so import
    and export agree by construction."""
    rows = _module_rows(naming, _settings(model))
    found = _backward(tuple(path), rows)
    if found is not None and (_forward(found[0], rows) or (None,))[0] == tuple(path):
        return found[0], found[1][5]
    raise ValueError(f"no {naming} name for the Flax variable {'/'.join(path)!r}")


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


# What follows the last stage: the pre-activation stack's closing BatchNorm and the head. A model that does not build
# them (``features_only`` drops both, ``num_classes=0`` the head) ignores the file's entries for them.
_AFTER_STAGES = ("bn_final", "fc")


def convert_state_dict(model: ResNet, state_dict: Mapping[str, Any], *, skip_head: bool = False,
                       source: str = "the state_dict", model_name: str = "the model", naming: str = "torchvision"
                       ) -> tuple[dict, list[tuple[str, ...]]]:
    """Map a state_dict in ``naming``'s names onto ``model``'s variables, strictly.

    Returns the (nested) variables and the Flax paths left unfilled because ``skip_head`` dropped the head.
    Every missing, unexpected, mis-shaped or unnamed entry is collected and raised as one ``ValueError``.
    RGB weights loaded into a model of other ``in_channels`` have their first convolution adapted as timm does
    (``adapt_input_conv``). A model without a head (``features_only`` or ``num_classes=0``) ignores the file's
    head entries, and a ``features_only`` pre-activation model its closing BatchNorm's too (``_AFTER_STAGES``).
    """
    nested = [k for k, v in state_dict.items() if isinstance(v, Mapping)]
    if nested:  # a training checkpoint ({"model": state_dict, "epoch": 3, ...}) rather than the state_dict itself
        raise ValueError(f"{source} holds dictionaries under {', '.join(map(repr, nested))}, not tensors: it looks "
                         f"like a training checkpoint around a state_dict; pass the state_dict itself, e.g. "
                         f"checkpoint[{nested[0]!r}]")
    expected = _expected_shapes(model)
    built = {k[1] for k in expected}
    flat, problems, unexpected, misshaped, seen, head_misshaped = {}, [], [], [], set(), False
    for name, value in state_dict.items():
        try:
            path, layout = torch_to_flax_name(name, naming, model)
        except ValueError:
            unexpected.append(name)
            continue
        if path is None or (path[1] == "fc" and skip_head) or (path[1] in _AFTER_STAGES and path[1] not in built):
            continue
        if path not in expected:
            unexpected.append(name)
            continue
        seen.add(path)
        shape, dtype = expected[path]
        needed = _torch_shape(path, shape, naming, model)  # compared before the layout change, which may not apply
        if _is_input_conv(np.shape(value), needed, model):
            value = adapt_input_conv(to_numpy(value), model.in_channels)
        if tuple(np.shape(value)) != needed:
            misshaped.append(f"{name}: file has {tuple(np.shape(value))}, model needs {needed}")
            head_misshaped |= path[1] == "fc" and np.shape(value)[:1] != needed[:1]  # other classes, same width
            continue
        # a copy: jnp.asarray of a numpy view of a torch tensor (BatchNorm's vectors and biases, which need no
        # transpose) shared its memory on CPU, so editing or training the torch model changed these weights
        flat[path] = jnp.array(layout(to_numpy(value)), dtype, copy=True)
    head = [p for p in expected if p[1] == "fc"] if skip_head else []
    missing = sorted((flax_to_torch_name(p, naming, model)[0] for p in expected if p not in seen and p not in head),
                     key=lambda name: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")])
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (the model has no such entry): {', '.join(_some(unexpected))}")
    if missing:
        problems.append(f"{len(missing)} missing (the model needs them): {', '.join(_some(missing))}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped:\n    " + "\n    ".join(_some(misshaped)))
    if problems:
        hint = ""
        if head_misshaped:
            hint = ("\nThe classifier head differs: to fine-tune with another number of classes pass "
                    "num_classes=N and new_head=True (a fresh head is initialised from rng).")
        other = {"torchvision": "timm", "timm": "torchvision"}[naming]
        if unexpected and missing and _fits_naming(model, state_dict, other, set(expected)):
            hint += f"\nThe names are {other}'s: load it with load_{other} instead."
        raise ValueError(f"{source} does not fit {model_name}:\n  " + "\n  ".join(problems) + hint +
                         "\nCheck the model name and options (num_classes, in_channels, ...) match the file.")
    return unflatten_dict(flat), head


def _some(items: list[str], shown: int = 12) -> list[str]:
    """The first ``shown`` of ``items`` and how many more: a file of another depth gave a message of hundreds of
    names (6 KB), where the first few say what is wrong."""
    return items if len(items) <= shown else [*items[:shown], f"... and {len(items) - shown} more"]


def _is_input_conv(have: tuple[int, ...], needed: tuple[int, ...], model: ResNet) -> bool:
    """An RGB file's first convolution for a model of other input channels: the one kernel (O, 3, kh, kw) where
    the model needs (O, in_channels, kh, kw); no later convolution takes 3 channels."""
    return (len(have) == 4 and have[1] == 3 and model.in_channels != 3 and tuple(needed) ==
            (have[0], model.in_channels, *have[2:]))


def adapt_input_conv(kernel: np.ndarray, in_channels: int) -> np.ndarray:
    """An RGB first-layer kernel (O, 3, kh, kw) for ``in_channels`` inputs, as timm adapts pretrained weights
    (``timm.models._manipulate.adapt_input_conv``): summed over the colours for one channel (a grey image then
    gives what the RGB model gave the same grey in colour), else the colours repeated and scaled by
    3 / in_channels, so an input with every channel alike still sums to the same response."""
    kernel = np.asarray(kernel)
    dtype = kernel.dtype
    kernel = kernel.astype(np.float32)
    if in_channels == 1:
        adapted = kernel.sum(axis=1, keepdims=True)
    else:
        repeats = -(-in_channels // 3)
        adapted = np.tile(kernel, (1, repeats, 1, 1))[:, :in_channels] * (3 / in_channels)
    return adapted.astype(dtype)


def _fits_naming(model: ResNet, state_dict: Mapping[str, Any], naming: str, expected: set) -> bool:
    """Whether the file's names, read in another naming, are exactly ``model``'s entries (for the error's hint).
    Names that merely parse were not enough: a torchvision ResNet-18 given to load_timm("resnet18d") was sent to
    load_torchvision, which fails as well (the stems differ). ``expected``: the model's entries (Flax paths)."""
    try:
        paths = {torch_to_flax_name(n, naming, model)[0] for n in state_dict} - {None}
    except ValueError:
        return False
    return paths == expected


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...], naming: str, model: ResNet) -> tuple[int, ...]:
    """A Flax shape in PyTorch's layout, for error messages."""
    _, layout = flax_to_torch_name(path, naming, model)
    return layout(np.empty(shape, np.uint8)).shape


def load_torchvision(name: str, source: str | os.PathLike | Mapping[str, Any], *, new_head: bool = False,
                     rng: jax.Array | int = 0, **overrides: Any) -> tuple[ResNet, dict]:
    """Build ``create_model(name, **overrides)`` and fill it from torchvision weights.

    ``source`` is a ``.pth``/``.safetensors`` path or a state_dict (numpy arrays or torch tensors). Strict:
    every missing, unexpected or mis-shaped entry is named in one ``ValueError``. For fine-tuning, pass
    ``num_classes=N, new_head=True``: the file's ``fc`` is dropped and a new head initialised from ``rng``.
    Returns ``(model, {"params": ..., "batch_stats": ...})``.

    For torchvision's own models (``TORCHVISION_MODELS``), overrides naming what torchvision's ``ResNet`` class
    cannot build (``shortcut``, ``stem``, ``preact``...) are refused, as ``load_timm`` refuses its: a
    ``shortcut="avg_pool"`` loads (the shapes agree) and computes something else. What that class does take
    (``stage_sizes``, ``block``, ``groups``, ``width_per_group``, and ``bn_epsilon`` for a ``norm_layer`` of
    another eps) stays free. Other names (this library's models, saved by ``save_torchvision``) take any override.
    """
    if name in TORCHVISION_MODELS:
        _refuse_architecture_changes("load_torchvision", name, name, "torchvision", overrides, _NOT_IN_TORCHVISION)
    return _load("torchvision", create_model(name, **overrides), name, source, new_head, rng, overrides)


def load_timm(name: str, source: str | os.PathLike | Mapping[str, Any], *, new_head: bool = False,
              rng: jax.Array | int = 0, **overrides: Any) -> tuple[ResNet, dict]:
    """Build timm's ``name`` (e.g. ``"resnet50d"``, or a tagged ``"resnet50.a1_in1k"``) and fill it from a timm
    state_dict: a ``.safetensors`` (the hub's format) or ``.pth``/``.bin`` path, or a mapping.

    Only the names in ``TIMM_MODELS``, whose timm architecture is exactly ours, are accepted, and overrides
    that would change the architecture (``stem``, ``shortcut``, ``groups``...) are refused, so a timm file never
    loads into a different computation. ``new_head``, ``rng`` and the other overrides (``num_classes``,
    ``features_only``, ``dtype``...) work as in ``load_torchvision``. Returns ``(model, variables)``.
    """
    arch = name.split(".", 1)[0]  # timm's "architecture.tag" names one file of one architecture
    if arch not in TIMM_MODELS:
        missing = ("; its normalisation (GroupNorm, EvoNorm, or BiT's weight-standardised convolutions) has no "
                   "equal here, where ResNetV2 uses BatchNorm" if arch.startswith("resnetv2_") else "")
        raise ValueError(f"{arch!r} is not one of the timm models whose architecture resnet_jax builds exactly"
                         f"{missing}; choose one of {list(TIMM_MODELS)} (other timm ResNets, e.g. resnet26d or "
                         f"seresnetaa50d, have no equal here)")
    _refuse_architecture_changes("load_timm", name, arch, "timm", overrides)
    return _load("timm", create_model(arch, **overrides), name, source, new_head, rng, overrides)


def _refuse_architecture_changes(loader: str, name: str, arch: str, library: str, overrides: Mapping,
                                 fields: tuple[str, ...] = _ARCHITECTURE) -> None:
    config = model_config(arch)
    changed = sorted(k for k in fields if k in overrides and not _same(overrides[k], config.get(k, _default(k))))
    if changed:
        raise ValueError(f"{loader}({name!r}) builds {library}'s {arch} architecture; the option(s) {changed} "
                         "would change what the weights compute. Drop them, or build that model with create_model "
                         "and train it.")


def _default(field: str) -> Any:
    return ResNet.__dataclass_fields__[field].default


def _same(setting: Any, architecture: Any) -> bool:
    """One setting of a model equals an architecture's: ``stage_sizes=[2, 2, 2, 2]`` is resnet18's ``(2, 2, 2, 2)``
    (create_model takes either)."""
    def plain(value):
        return tuple(value) if isinstance(value, list) else value
    return plain(setting) == plain(architecture)


def _load(naming: str, model: ResNet, name: str, source, new_head: bool, rng, overrides) -> tuple[ResNet, dict]:
    if isinstance(source, (str, os.PathLike)):
        label, state_dict = str(source), load_state_dict(source)
    elif isinstance(source, Mapping):
        label, state_dict = "the state_dict", source
    else:
        raise TypeError(f"source must be a file path or a mapping of names to arrays, got {type(source).__name__}")
    state_dict = strip_wrapper_prefix(state_dict)
    if naming == "timm":
        state_dict = _unflatten_timm_features(state_dict)
    variables, head = convert_state_dict(model, state_dict, skip_head=new_head,
                                         source=label, model_name=_describe(name, overrides), naming=naming)
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


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # nn.DataParallel / DDP, torch.compile


def strip_wrapper_prefix(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop the prefixes that wrappers put on every name: ``module.`` (``nn.DataParallel``, DDP) and
    ``_orig_mod.`` (``torch.compile``), in any nesting (a compiled DDP model saves both)."""
    while state_dict:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


_TIMM_FLATTENED = re.compile(r"^(stem|stages)_")


def _unflatten_timm_features(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The classifier's names for a timm ``features_only`` ResNetV2's: timm's feature wrapper flattens the model's
    top-level sequences into one, joining their names with "_" (``stem.conv1`` -> ``stem_conv1``, ``stages.0``
    -> ``stages_0``). ResNet's own features_only keeps its names (its stem and stages are top-level already)."""
    if any(k.startswith(("stem.", "stages.")) for k in state_dict):
        return state_dict
    return {_TIMM_FLATTENED.sub(r"\1.", k): v for k, v in state_dict.items()}


def to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{"params", "batch_stats"}`` -> a torchvision state_dict (names, layouts, float32/int64 numpy arrays)
    that ``torchvision.models.X().load_state_dict(sd)`` accepts strictly, ``num_batches_tracked`` included."""
    _check_batchnorm_kept(variables)
    return _export(variables, "torchvision", None)


def _check_batchnorm_kept(variables: Mapping[str, Any]) -> None:
    """Refuse variables torch's strict load would: parameters without their BatchNorm statistics (an optimizer's
    params alone), or BatchNorm folded into the convolutions (``ops.fold_batchnorm``), which torchvision's and
    timm's ResNets keep as layers of their own (their convolutions have no bias)."""
    flat = flatten_dict(dict(variables))
    norms = sorted({p[1:-1] for p in flat if p[0] == "params" and p[-1] == "scale"})
    convolutions = {p[:-1] for p, v in flat.items() if p[-1] == "kernel" and np.ndim(v) == 4}
    if not norms and any(p[:-1] in convolutions and p[-1] == "bias" for p in flat):
        raise ValueError("these variables have BatchNorm folded into the convolutions (ops.fold_batchnorm): "
                         "torchvision's and timm's models keep BatchNorm layers and convolutions without bias. "
                         "Export the variables from before folding")
    unpaired = [m for m in norms if not {("batch_stats", *m, "mean"), ("batch_stats", *m, "var")} <= flat.keys()]
    if unpaired:
        raise ValueError(f"these variables hold no BatchNorm statistics (batch_stats) for {len(unpaired)} of their "
                         f"{len(norms)} BatchNorm layers ({', '.join('/'.join(m) for m in unpaired[:3])}...), which "
                         "torch's state_dict needs as running_mean/running_var. Pass the whole variables "
                         "{'params': ..., 'batch_stats': ...} (a TrainState's or Classifier's), not the params alone")


def torch_library(model: ResNet | str, libraries: tuple[str, ...] = ("torchvision", "timm")
                  ) -> tuple[str, str] | None:
    """``(library, name)`` of a PyTorch model with ``model``'s architecture: ``("torchvision", "resnet50")`` where
    ``torchvision.models.resnet50`` is it, else ``("timm", "resnet50d")`` for ``timm.create_model``, else None
    (CIFAR ResNets, changed depths or widths: no library builds them; ``preact_resnet18`` is timm's
    ``resnetv2_18``). A model of other ``in_channels`` is timm's (``in_chans``), as torchvision's constructors
    have no such option, and so is a dilated ResNet-18/34 (``output_stride`` < 32: torchvision's basic blocks
    refuse dilation). ``libraries``: which to consider, in that order."""
    model = create_model(model) if isinstance(model, str) else model
    # torchvision's constructors take no input channel count (timm's take in_chans), and its basic blocks refuse
    # dilation (replace_stride_with_dilation raises for ResNet-18/34; timm's output_stride dilates them)
    torchvision_builds = model.in_channels == 3 and (model.output_stride == 32 or model.block != "basic")
    names = {"torchvision": TORCHVISION_MODELS if torchvision_builds else (), "timm": TIMM_MODELS}
    for library in libraries:
        for arch in names[library]:
            config = model_config(arch)
            if all(_same(getattr(model, k), config.get(k, _default(k))) for k in _ARCHITECTURE):
                return library, arch
    return None


def to_timm(model: ResNet | str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``model``'s variables -> a timm state_dict that ``timm.create_model(name).load_state_dict(sd)`` accepts
    strictly. timm spells ResNet-D's layers by the model's settings, which the variables do not record, so the
    model (or its name) is needed; a model timm does not have (CIFAR, other depths...) is refused."""
    model = create_model(model) if isinstance(model, str) else model
    _check_batchnorm_kept(variables)
    if model.folded:
        raise ValueError("this model has BatchNorm folded into its convolutions (ops.fold_batchnorm); timm's models "
                         "keep BatchNorm layers. Export the model and variables from before folding")
    found = torch_library(model, ("timm",))
    if found is not None:
        _check_variables_are_the_models(model, variables, f"timm's {found[1]!r}")
        return _export(variables, "timm", model)
    raise ValueError(f"timm has no model with this architecture (stem={model.stem!r}, shortcut={model.shortcut!r}, "
                     f"preact={model.preact}, stage_sizes={tuple(model.stage_sizes)}...); timm's files hold only "
                     f"{list(TIMM_MODELS)}. Use save_torchvision for the others.")


def _check_variables_are_the_models(model: ResNet, variables: Mapping[str, Any], name: str) -> None:
    """Refuse variables of another architecture than ``model``: the timm names are spelt by the model's settings,
    so resnet18d's variables given as "resnet50d" (or "resnet18") would be written under names no timm model of
    either has. The head's width is the variables' own (any class count, or none, exports)."""
    flat = shapes_of(variables)
    head = flat.get(("params", "fc", "kernel"))
    model = model.clone(num_classes=0 if head is None else head[-1])
    # without a head they may be the backbone's (features_only: a pre-activation one has no closing BatchNorm)
    kinds = [model] if head is not None else [model, model.clone(features_only=not model.features_only)]
    wrong = [_differences(flat, kind) for kind in kinds]
    if all(wrong):
        raise ValueError(f"these variables do not fit {name}: {'; '.join(_some(wrong[0], 6))}. Pass the model (or "
                         f"name) they were made with.")


def _differences(flat: dict[tuple[str, ...], tuple[int, ...]], model: ResNet) -> list[str]:
    return differences({k: shape for k, (shape, _) in _expected_shapes(model).items()}, flat)


def _export(variables: Mapping[str, Any], naming: str, model: ResNet | None) -> dict[str, np.ndarray]:
    unknown = sorted(set(variables) - {"params", "batch_stats"})
    if unknown:
        raise ValueError(f"expected the model's variables ({{'params', 'batch_stats'}}), got the extra "
                         f"collection(s) {unknown}")
    flat = flatten_dict(dict(variables))
    modules = list(dict.fromkeys(path[1:-1] for path in flat))  # in creation order: PyTorch's order too
    out: dict[str, np.ndarray] = {}
    for module in modules:
        for collection in ("params", "batch_stats"):  # weight, bias, then running_mean, running_var
            for path in (p for p in flat if p[0] == collection and p[1:-1] == module):
                name, layout = flax_to_torch_name(path, naming, model)
                out[name] = np.array(layout(np.asarray(flat[path])), order="C")  # a writable copy
                if name.endswith(".running_var"):
                    out[name[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out


def save_torchvision(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``to_torchvision(variables)`` as ``.safetensors`` (by extension) or a torch ``.pth``."""
    save_state_dict(path, to_torchvision(variables))


def save_timm(model: ResNet | str, variables: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``to_timm(model, variables)`` as ``.safetensors`` (by extension) or a torch ``.pth``."""
    save_state_dict(path, to_timm(model, variables))
