"""ONNX export: the StableHLO artifact's own function, translated equation by equation into an ONNX graph.

The graph is not a second description of the network. ``inference_function`` (normalisation + the
BatchNorm-folded model, ``export/stablehlo.py``) is traced once with a symbolic batch axis, and each equation of
its jaxpr becomes an ONNX node. So every model ``create_model`` builds, and any block changed later, is exported
as exactly what ``model.apply`` computes: fixing a block fixes every artifact.

How the translation stays small:
- Everything that does not depend on the images (folded weights, BatchNorm's ``rsqrt(var + eps)`` in
  pre-activation blocks, average-pool divisors, broadcasts of constants) is evaluated here, in numpy, and
  stored as an initializer.
- A broadcast whose shape holds the symbolic batch axis keeps its size-1 axes (numpy-style keep-dims); the
  elementwise op that consumes it broadcasts it, as ONNX ops do.
- Image tensors (rank 4, NHWC in JAX) live in ONNX's NCHW. Rank-4 constants are transposed to match, and
  convolution, pooling, reduction, pad and slice map their axes through that one permutation.

Why not an exporter: jax2onnx, the maintained JAX -> ONNX converter, pins ``orbax-checkpoint<0.11.37`` (this
project needs a newer one) and pulls in equinox, netron and huggingface-hub; a ResNet's jaxpr holds about
fifteen primitives. An equation with no translation here is refused by name (export ``--format=stablehlo``).

Input: uint8 ``images`` (batch, S, S, C), NHWC like the JAX model. Output: float32 ``logits`` (batch, classes).
The batch axis is dynamic. Correctness is checked in onnxruntime against ``model.apply`` for every variant, and
for pre-activation models against timm's logits (tests/test_export.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.export.manifest import INPUT_NAME, OUTPUT_NAME, Preprocessing
from resnet_jax.export.stablehlo import check_exportable, inference_function

OPSET = 17
NCHW = (0, 3, 1, 2)  # physical axis k of an image tensor holds logical (NHWC) axis NCHW[k]
_ELEMENTWISE = {"add": ("Add", np.add), "sub": ("Sub", np.subtract), "mul": ("Mul", np.multiply),
                "div": ("Div", np.divide), "max": ("Max", np.maximum), "min": ("Min", np.minimum)}
_UNARY = {"rsqrt": ("Reciprocal(Sqrt)", lambda a: 1 / np.sqrt(a)), "sqrt": ("Sqrt", np.sqrt),
          "neg": ("Neg", np.negative), "exp": ("Exp", np.exp), "log": ("Log", np.log)}
_INLINE = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # jit, custom_jvp_call (relu), custom_vjp_call: their body


def _layout(rank: int) -> tuple[int, ...]:
    return NCHW if rank == 4 else tuple(range(rank))


def _concrete(shape) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


class _Tensor:
    """An ONNX value computed from the images: its name and its logical (JAX) shape, stored in ``_layout``."""

    def __init__(self, name: str, shape: tuple):
        self.name, self.shape = name, tuple(shape)


class _Translator:
    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self._count = [], [], 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        """An initializer holding ``value`` in the physical layout of its rank."""
        value = np.asarray(value)
        if value.ndim == 4:
            value = value.transpose(NCHW)
        name = self.fresh(hint)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def operand(self, value) -> str:
        return value.name if isinstance(value, _Tensor) else self.const(value)

    # --------------------------------------------------------------------------------------------- the walk
    def run(self, jaxpr, inputs: list, consts: list) -> list:
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, (np.asarray(c) for c in consts)))
        env.update(zip(jaxpr.invars, inputs))
        read = lambda v: np.asarray(v.val) if hasattr(v, "val") else env[v]  # noqa: E731 (a Literal has .val)
        for eqn in jaxpr.eqns:
            args = [read(v) for v in eqn.invars]
            outs = self.equation(eqn, args)
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, args) -> list:
        name, params = eqn.primitive.name, eqn.params
        body = next((params[k] for k in _INLINE if k in params), None)
        if body is not None:
            return self.run(body.jaxpr, args, body.consts)
        out_shape = tuple(eqn.outvars[0].aval.shape)
        if name == "broadcast_in_dim":
            return [self.broadcast(args[0], out_shape, params["broadcast_dimensions"])]
        if not any(isinstance(a, _Tensor) for a in args):  # no image in it: compute it now
            return [self.evaluate(eqn, args)]
        return [_Tensor(self.translate(name, params, args, out_shape, eqn.outvars[0].aval.dtype), out_shape)]

    def evaluate(self, eqn, args) -> np.ndarray:
        name = eqn.primitive.name
        if name in _ELEMENTWISE:  # numpy broadcasts the keep-dims constants that lax would refuse
            return _ELEMENTWISE[name][1](*args).astype(eqn.outvars[0].aval.dtype)
        if name in _UNARY:
            return _UNARY[name][1](args[0]).astype(eqn.outvars[0].aval.dtype)
        if name == "convert_element_type":
            return args[0].astype(eqn.params["new_dtype"])
        if not _concrete(eqn.outvars[0].aval.shape):
            raise ValueError(f"cannot export: the constant {name} of shape {eqn.outvars[0].aval.shape} depends "
                             "on the batch size; export --format=stablehlo instead")
        return np.asarray(eqn.primitive.bind(*(jnp.asarray(a) for a in args), **eqn.params))

    def broadcast(self, value, shape: tuple, dims: tuple[int, ...]):
        """Insert the new axes as size 1 (keep-dims); where the shape is concrete and ``value`` constant, the
        full broadcast (so constants computed from it have their real shape)."""
        keep = [1] * len(shape)
        for source, target in enumerate(dims):
            keep[target] = value.shape[source]
        if not isinstance(value, _Tensor):
            value = np.reshape(value, keep)
            return np.broadcast_to(value, shape) if _concrete(shape) else value
        flat = self.to_logical(value)
        target = [d if isinstance(d, (int, np.integer)) else -1 for d in keep]  # the one symbolic axis: inferred
        out = self.node("Reshape", [flat, self.const(np.array(target, np.int64), "shape")])
        return _Tensor(self.from_logical(out, len(keep)), tuple(keep))

    def to_logical(self, t: _Tensor) -> str:
        return self.node("Transpose", [t.name], perm=list(np.argsort(NCHW))) if len(t.shape) == 4 else t.name

    def from_logical(self, name: str, rank: int) -> str:
        return self.node("Transpose", [name], perm=list(NCHW)) if rank == 4 else name

    def fuse_conv_bias(self) -> None:
        """``Add(Conv(x, w), b)`` with a per-channel constant ``b`` -> ``Conv(x, w, b)``: the folded BatchNorm's
        shift becomes the convolution's bias, as in the StableHLO artifact's fused convolution."""
        arrays = {t.name: t for t in self.initializers}
        producers = {n.output[0]: n for n in self.nodes}
        uses: dict[str, int] = {}
        for n in self.nodes:
            for name in n.input:
                uses[name] = uses.get(name, 0) + 1
        for add in [n for n in self.nodes if n.op_type == "Add"]:
            conv, bias = producers.get(add.input[0]), arrays.get(add.input[1])
            if conv is None or conv.op_type != "Conv" or len(conv.input) != 2 or uses[conv.output[0]] != 1:
                continue
            value = self.numpy_helper.to_array(bias) if bias is not None else None
            if value is None or value.shape != (1, value.size, 1, 1):
                continue
            conv.input.append(self.const(value.reshape(-1), "bias"))
            conv.output[0] = add.output[0]
            self.nodes.remove(add)

    # ------------------------------------------------------------------------------------ one op at a time
    def translate(self, name: str, p: dict, args: list, out_shape: tuple, dtype) -> str:
        x = args[0]
        if name in _ELEMENTWISE:
            if name == "max" and not isinstance(args[1], _Tensor) and not np.any(args[1]):
                return self.node("Relu", [x.name])
            return self.node(_ELEMENTWISE[name][0], [self.operand(a) for a in args])
        if name == "rsqrt":
            return self.node("Reciprocal", [self.node("Sqrt", [x.name])])
        if name in _UNARY:
            return self.node(_UNARY[name][0], [x.name])
        if name == "convert_element_type":
            return self.node("Cast", [x.name], to=self.helper.np_dtype_to_tensor_dtype(np.dtype(p["new_dtype"])))
        if name == "conv_general_dilated":
            return self.conv(x, args[1], args[2:], p)
        if name in ("reduce_window_max", "reduce_window_sum"):
            return self.pool(x, p, max_pool=name == "reduce_window_max")
        if name == "reduce_sum":
            return self.reduce_sum(x, p["axes"], out_shape)
        if name == "dot_general":
            return self.matmul(x, args[1], p["dimension_numbers"])
        if name == "reshape":
            shape = [d if isinstance(d, int) else -1 for d in out_shape]
            out = self.node("Reshape", [self.to_logical(x), self.const(np.array(shape, np.int64), "shape")])
            return self.from_logical(out, len(out_shape))
        if name == "pad":
            return self.pad(x, args[1], p["padding_config"])
        if name == "slice":
            return self.slice(x, p)
        if name in ("copy", "copy_p"):
            return self.node("Identity", [x.name])
        raise ValueError(f"cannot export to ONNX: the model uses {name!r}, which has no ONNX translation here; "
                         "export --format=stablehlo instead")

    def physical(self, rank: int, logical_axes) -> list[int]:
        order = _layout(rank)
        return [order.index(a) for a in logical_axes]

    def conv(self, x: _Tensor, kernel, rest, p) -> str:
        dn = p["dimension_numbers"]
        if isinstance(kernel, _Tensor) or tuple(dn.lhs_spec) != NCHW or tuple(dn.out_spec) != NCHW or rest:
            raise ValueError("cannot export to ONNX: only NHWC convolutions with constant kernels are translated")
        if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
            raise ValueError("cannot export to ONNX: transposed or batch-grouped convolutions are not translated")
        oihw = np.asarray(kernel).transpose(dn.rhs_spec)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(oihw), name := self.fresh("w")))
        pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
        return self.node("Conv", [x.name, name], kernel_shape=list(oihw.shape[2:]), strides=list(p["window_strides"]),
                         pads=pads, dilations=list(p["rhs_dilation"]), group=p["feature_group_count"])

    def pool(self, x: _Tensor, p, max_pool: bool) -> str:
        window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        if window[0] != 1 or window[3] != 1 or strides[0] != 1 or strides[3] != 1 or any(padding[i] != (0, 0)
                                                                                         for i in (0, 3)):
            raise ValueError("cannot export to ONNX: only spatial pooling windows are translated")
        attrs = dict(kernel_shape=list(window[1:3]), strides=list(strides[1:3]),
                     pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
        if max_pool:  # reduce_window_max pads with -inf, which MaxPool's padding equals
            return self.node("MaxPool", [x.name], **attrs)
        average = self.node("AveragePool", [x.name], count_include_pad=1, **attrs)  # zero padding counted: a sum
        return self.node("Mul", [average, self.const(np.array(np.prod(window[1:3]), np.float32), "window")])

    def reduce_sum(self, x: _Tensor, axes, out_shape) -> str:
        rank = len(x.shape)
        physical = sorted(self.physical(rank, axes))
        out = self.node("ReduceSum", [x.name, self.const(np.array(physical, np.int64), "axes")], keepdims=0)
        kept = [a for a in _layout(rank) if a not in axes]  # logical axes, in the physical order they remain
        ranks = {a: i for i, a in enumerate(sorted(kept))}
        order = [ranks[a] for a in kept]
        want = list(_layout(len(out_shape)))
        if order == want:
            return out
        return self.node("Transpose", [out], perm=[order.index(a) for a in want])

    def matmul(self, x: _Tensor, w, dn) -> str:
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dn
        if isinstance(w, _Tensor) or len(x.shape) != 2 or lhs_batch or rhs_batch or tuple(lhs_contract) != (1,):
            raise ValueError("cannot export to ONNX: only (batch, features) @ constant matrices are translated")
        w = np.asarray(w) if tuple(rhs_contract) == (0,) else np.asarray(w).T
        return self.node("MatMul", [x.name, self.const(w, "fc")])

    def pad(self, x: _Tensor, value, config) -> str:
        if isinstance(value, _Tensor) or any(interior for _, _, interior in config):
            raise ValueError("cannot export to ONNX: only constant, non-interior padding is translated")
        order = _layout(len(x.shape))
        pads = [config[a][0] for a in order] + [config[a][1] for a in order]
        return self.node("Pad", [x.name, self.const(np.array(pads, np.int64), "pads"),
                                 self.const(np.asarray(value, np.float32), "pad_value")], mode="constant")

    def slice(self, x: _Tensor, p) -> str:
        rank = len(x.shape)
        strides = p["strides"] or (1,) * rank
        axes = self.physical(rank, range(rank))
        ends = [d if isinstance(d, (int, np.integer)) else np.iinfo(np.int64).max for d in p["limit_indices"]]
        return self.node("Slice", [x.name, self.const(np.array(p["start_indices"], np.int64), "starts"),
                                   self.const(np.array(ends, np.int64), "ends"),
                                   self.const(np.array(axes, np.int64), "axes"),
                                   self.const(np.array(strides, np.int64), "steps")])


def build_onnx(model, variables: dict[str, Any], preprocessing: Preprocessing):
    """The ``onnx.ModelProto`` of ``inference_function(model, variables, preprocessing)`` (checked with
    ``onnx.checker``)."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install -e '.[export]' in the clone (or pip install onnx)") from None

    check_exportable(model)
    size, channels = preprocessing.image_size, model.in_channels
    images = jax.ShapeDtypeStruct((*jax.export.symbolic_shape("batch"), size, size, channels), jnp.uint8)
    closed = jax.make_jaxpr(inference_function(model, variables, preprocessing))(images)
    t = _Translator()
    nchw = t.node("Transpose", [INPUT_NAME], perm=list(NCHW))
    (logits,) = t.run(closed.jaxpr, [_Tensor(nchw, images.shape)], closed.consts)
    t.nodes.append(helper.make_node("Identity", [logits.name], [OUTPUT_NAME]))
    t.fuse_conv_bias()
    graph = helper.make_graph(
        t.nodes, f"{type(model).__name__}_folded",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", size, size, channels])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", model.num_classes])],
        t.initializers)
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
