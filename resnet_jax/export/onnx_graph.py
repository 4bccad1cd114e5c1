"""ONNX export: the folded inference graph written op by op with the ``onnx`` package.

Why not an exporter: jax2onnx, the maintained JAX -> ONNX converter, pins ``orbax-checkpoint<0.11.37`` (this
project needs a newer one) and pulls in equinox, netron and huggingface-hub; a ResNet needs only a dozen ONNX
ops, so the graph is built here from the folded variables (``ops.fold_batchnorm``) and the model's knobs.

The graph mirrors ``resnet.py`` and ``blocks.py``: the stems (ImageNet 7x7 + max-pool, CIFAR 3x3, deep 3x3 x 3),
basic and bottleneck blocks with groups (ResNeXt) and widths, the three shortcuts (projection, ResNet-D's
average pool with torch's ceil mode, the CIFAR zero-pad), and pre-activation blocks, whose BatchNorms act on
a block's input rather than on a convolution's output and so stay as ``BatchNormalization`` ops. Every folded
variable must be consumed exactly once; one the graph did not use means the model has a part this file does
not know, and the export is refused instead of writing a different network. Correctness is checked against JAX
in onnxruntime by tests/test_export.py for each of those variants.

Input: uint8 ``images`` (batch, S, S, C), NHWC like the JAX model; the graph normalises and transposes to
ONNX's NCHW itself. Output: float32 ``logits`` (batch, classes). The batch axis is dynamic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax.export.manifest import INPUT_NAME, OUTPUT_NAME, Preprocessing
from resnet_jax.export.stablehlo import check_exportable
from resnet_jax.ops import fold_batchnorm

OPSET = 17
KNOWN = {"stem": ("imagenet", "cifar", "deep"), "shortcut": ("projection", "avg_pool", "zero_pad"),
         "block": ("basic", "bottleneck")}


class _Graph:
    """Nodes, initializers and the folded variables, each of which must be used exactly once."""

    def __init__(self, variables: dict[str, Any]):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers = [], []
        flat = jax.tree_util.tree_flatten_with_path(variables)[0]
        self.arrays = {tuple(k.key for k in path): np.asarray(leaf, np.float32) for path, leaf in flat}
        self.unused = set(self.arrays)
        self._names = 0

    def name(self, hint: str) -> str:
        self._names += 1
        return f"{hint}_{self._names}"

    def const(self, array: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def var(self, collection: str, *path: str) -> np.ndarray:
        key = (collection, *path)
        if key not in self.arrays:
            raise ValueError(f"the folded variables have no {'/'.join(key)}; this model's layout is not one the "
                             "ONNX export knows: export --format=stablehlo instead")
        self.unused.discard(key)
        return self.arrays[key]

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], **attrs))
        return out


def _conv(g: _Graph, x: str, scope: tuple[str, ...], strides: int = 1, groups: int = 1,
          residual: str | None = None, relu: bool = False) -> str:
    """``relu(conv(x) + bias + residual)`` for the ``Conv`` at ``scope``; padding k//2 as in ``resnet._conv``."""
    kernel = g.var("params", *scope, "kernel")  # HWIO, I = in_channels / groups
    kh, kw = kernel.shape[:2]
    inputs = [x, g.const(kernel.transpose(3, 2, 0, 1), "/".join(scope) + "/kernel")]  # -> OIHW
    if ("params", *scope, "bias") in g.arrays:
        inputs.append(g.const(g.var("params", *scope, "bias"), "/".join(scope) + "/bias"))
    y = g.op("Conv", inputs, "/".join(scope), kernel_shape=[kh, kw], strides=[strides, strides], group=groups,
             pads=[kh // 2, kw // 2, kh // 2, kw // 2])
    if residual is not None:
        y = g.op("Add", [y, residual])
    return g.op("Relu", [y]) if relu else y


def _batchnorm_relu(g: _Graph, x: str, scope: tuple[str, ...], epsilon: float) -> str:
    """A BatchNorm left unfolded (pre-activation: it normalises a sum, not a convolution), then ReLU."""
    inputs = [x] + [g.const(g.var(c, *scope, k), "/".join(scope) + "/" + k)
                    for c, k in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"),
                                 ("batch_stats", "var"))]
    return g.op("Relu", [g.op("BatchNormalization", inputs, "/".join(scope), epsilon=epsilon)])


def _stem(g: _Graph, model, x: str) -> str:
    relu = not model.preact
    if model.stem == "cifar":
        return _conv(g, x, ("conv1",), relu=relu)
    if model.stem == "deep":
        for k, strides in enumerate((2, 1, 1)):
            x = _conv(g, x, (f"conv1_{k}",), strides=strides, relu=not (k == 2 and model.preact))
    else:
        x = _conv(g, x, ("conv1",), strides=2, relu=relu)
    return g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])


def _shortcut(g: _Graph, model, x: str, scope: tuple[str, ...], channels_in: int, channels_out: int,
              strides: int) -> str:
    """``blocks.Shortcut``: identity, or the configured downsampling to ``channels_out`` at ``strides``."""
    if strides == 1 and channels_in == channels_out:
        return x
    if model.shortcut == "zero_pad":
        step = g.const(np.array([strides, strides], np.int64), "steps")
        x = g.op("Slice", [x, g.const(np.zeros(2, np.int64), "starts"),
                           g.const(np.full(2, np.iinfo(np.int64).max), "ends"),
                           g.const(np.array([2, 3], np.int64), "axes"), step])
        missing = channels_out - channels_in
        pads = np.array([0, missing // 2, 0, 0, 0, missing - missing // 2, 0, 0], np.int64)
        return g.op("Pad", [x, g.const(pads, "pads")], mode="constant")
    if model.shortcut == "avg_pool" and strides > 1:
        x = g.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1, count_include_pad=0)
        strides = 1
    return _conv(g, x, (*scope, "downsample", "conv"), strides=strides)


def _block(g: _Graph, model, x: str, scope: str, channels_in: int, width: int, strides: int) -> tuple[str, int]:
    """One residual block (``blocks.BasicBlock`` / ``blocks.Bottleneck``); returns its output and channels."""
    s = (scope,)
    bottleneck = model.block == "bottleneck"
    out = width * (4 if bottleneck else 1)
    groups = model.groups if bottleneck else 1
    if model.preact:
        x = _batchnorm_relu(g, x, (scope, "bn1"), model.bn_epsilon)
    residual = _shortcut(g, model, x, s, channels_in, out, strides)
    if bottleneck:
        y = _conv(g, x, (*s, "conv1"), relu=True)
        y = _conv(g, y, (*s, "conv2"), strides=strides, groups=groups, relu=True)
        last = (*s, "conv3")
    else:
        y = _conv(g, x, (*s, "conv1"), strides=strides, relu=True)
        last = (*s, "conv2")
    return _conv(g, y, last, residual=residual, relu=not model.preact), out


def build_onnx(model, variables: dict[str, Any], preprocessing: Preprocessing):
    """The ``onnx.ModelProto`` of the folded model (checked with ``onnx.checker``)."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install 'resnet-jax[export]' (or onnx)") from None

    check_exportable(model)
    for field, known in KNOWN.items():
        if getattr(model, field) not in known:
            raise ValueError(f"the ONNX export does not know {field}={getattr(model, field)!r}; export "
                             "--format=stablehlo instead")
    folded_model, folded = fold_batchnorm(model, variables)
    g = _Graph(folded)
    size, channels = preprocessing.image_size, model.in_channels
    mean, std = preprocessing.per_channel(channels)
    x = g.op("Cast", [INPUT_NAME], to=TensorProto.FLOAT)
    x = g.op("Div", [x, g.const(np.array(255, np.float32), "255")])
    x = g.op("Sub", [x, g.const(mean, "mean")])  # (x / 255 - mean) / std, in the JAX artifact's order
    x = g.op("Div", [x, g.const(std, "std")])
    x = g.op("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC -> NCHW
    x = _stem(g, model, x)
    have = model.stem_width
    for i, (blocks, width) in enumerate(zip(model.stage_sizes, model.stage_widths)):
        for j in range(blocks):
            x, have = _block(g, model, x, f"layer{i + 1}_{j}", have, width, 2 if i > 0 and j == 0 else 1)
    if model.preact:
        x = _batchnorm_relu(g, x, ("bn_final",), model.bn_epsilon)
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    g.nodes.append(helper.make_node("Gemm", [x, g.const(g.var("params", "fc", "kernel"), "fc/kernel"),
                                             g.const(g.var("params", "fc", "bias"), "fc/bias")], [OUTPUT_NAME]))
    if g.unused:
        names = sorted("/".join(k) for k in g.unused)
        raise ValueError(f"the ONNX graph left {len(names)} variables unused ({', '.join(names[:3])}...): this "
                         "model has parts the ONNX export does not know; export --format=stablehlo instead")
    graph = helper.make_graph(
        g.nodes, f"{type(folded_model).__name__}_folded",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", size, size, channels])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", model.num_classes])],
        g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="resnet_jax")
    proto.ir_version = min(proto.ir_version, 8)  # opset 17's IR version: readable by onnxruntime >= 1.14
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, variables: dict[str, Any], path: Path, preprocessing: Preprocessing) -> dict[str, Any]:
    """Write the ONNX model to ``path``; returns the manifest entries specific to this format."""
    proto = build_onnx(model, variables, preprocessing)
    path.write_bytes(proto.SerializeToString())
    import onnx

    return {"opset": OPSET, "onnx_version": onnx.__version__}
