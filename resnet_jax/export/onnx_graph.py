"""ONNX export: the StableHLO artifact's own function, translated equation by equation into an ONNX graph.

The graph is not a second description of the network. ``inference_function`` (normalisation + the
BatchNorm-folded model, ``export/stablehlo.py``) is traced once with a symbolic batch axis, and each equation of
its jaxpr becomes an ONNX node. So every model ``create_model`` builds, and any block changed later, is exported
as the computation ``model.apply`` describes: fixing a block fixes every artifact. (A bfloat16 model's artifact
computes in bfloat16 everywhere; ``model.apply`` runs it in float32 on a CPU without bfloat16 instructions.)

How the translation stays small:
- Everything that does not depend on the images (folded weights, BatchNorm's ``rsqrt(var + eps)`` in
  pre-activation blocks, average-pool divisors, broadcasts of constants) is evaluated here, in numpy, and
  stored as an initializer.
- A broadcast whose shape holds the symbolic batch axis keeps its size-1 axes (numpy-style keep-dims); the
  elementwise op that consumes it broadcasts it, as ONNX ops do. Any other consumer of such a value (a
  reduction, a reshape, a convolution) is refused, as is a keep-dims output.
- Image tensors (rank 4, NHWC in JAX) live in ONNX's NCHW. Rank-4 constants are transposed to match, and
  convolution, pooling, reduction, pad and slice map their axes through that one permutation.

Why not an exporter: jax2onnx, the maintained JAX -> ONNX converter, pins ``orbax-checkpoint<0.11.37`` (this
project needs a newer one) and pulls in equinox, netron and huggingface-hub; a ResNet's jaxpr holds about
fifteen primitives.

What it cannot translate, it refuses in one sentence naming the primitive (export ``--format=stablehlo``
instead), before anything is written: a primitive with no rule in ``onnx_ops.RULES``, control flow (``scan``,
``while``, ``cond``: only the call-like primitives in ``CALLS`` are inlined), several outputs, other dtypes.
bfloat16 and float16 models are computed in float32 with each result rounded to its dtype (``EMULATED``).

Input: uint8 ``images`` (batch, S, S, C), NHWC like the JAX model. Output: float32 ``logits`` (batch, classes).
The batch axis is dynamic. Correctness is checked in onnxruntime against ``model.apply`` for every variant, and
for pre-activation models against timm's logits (tests/test_export.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

from resnet_jax.export.manifest import INPUT_NAME, OUTPUT_NAME, Preprocessing
from resnet_jax.export.onnx_ops import ELEMENTWISE, NCHW, RULES, UNARY, Tensor, keep_dims, refuse
from resnet_jax.export.stablehlo import check_exportable, inference_function

OPSET = 17
# Call-like primitives, whose body is exactly what they compute: inlined, each from the parameter holding its
# body. The ones jax 0.10.2 produces for these models: jit (every jnp function), custom_jvp_call (relu), remat2
# (jax.checkpoint: remat=True), custom_vjp_call (a custom gradient; tests/test_export_onnx_graph.py exports each).
# Every other primitive with a body (scan, while, cond, ...) is control flow, which inlining would get wrong (a
# scan would run once): it is refused.
CALLS = {"jit": "jaxpr", "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "remat2": "jaxpr"}
# Narrow floats are computed in float32 (onnxruntime's CPU kernels have no bfloat16 Conv) and rounded to their
# own dtype after each operation the jaxpr computes in it (a Cast to the narrow type and back). XLA may keep some
# intermediates in float32 instead, so the artifact equals model.apply within bfloat16 rounding, not bit for bit.
EMULATED = {np.dtype(jnp.bfloat16), np.dtype(np.float16)}
TRANSLATED = EMULATED | {np.dtype(np.float32)}  # the dtypes of image-dependent values the rules handle
# The consumers a keep-dims broadcast may reach (ONNX broadcasts their operands, and their results keep the
# operands' size-1 axes); any other primitive given one is refused (a reduction would sum the size-1 axis, a
# reshape or a convolution would read the wrong shape).
BROADCASTING = {*ELEMENTWISE, *UNARY, "convert_element_type"}


def _concrete(shape) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in shape)


def _body(value) -> tuple[Jaxpr, list]:
    """A call's body and its constants (remat2 holds an open jaxpr, the others a closed one)."""
    return (value.jaxpr, value.consts) if isinstance(value, ClosedJaxpr) else (value, [])


def _broadcast(shapes) -> tuple:
    """The shape ONNX gives an elementwise result (numpy's rule): per axis from the right, the one size other
    than 1, else 1. Where an operand is a keep-dims broadcast, so is the result (its aval's shape is larger)."""
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    return tuple(next((d for d in axis if not (isinstance(d, (int, np.integer)) and d == 1)), 1)
                 for axis in zip(*padded))


def _unexpanded(consumer: str) -> ValueError:
    return refuse(f"{consumer} takes a broadcast value, which the translation holds at size 1 on its new axes "
                  "(numpy-style keep-dims), valid for elementwise operations only")


def _has_body(params: dict) -> bool:
    """Whether an equation runs a sub-jaxpr: as a parameter, or in a tuple of them (cond's branches)."""
    values = [v for p in params.values() for v in (p if isinstance(p, (tuple, list)) else (p,))]
    return any(isinstance(v, (Jaxpr, ClosedJaxpr)) for v in values)


class _Translator:
    def __init__(self):
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.float = helper, numpy_helper, TensorProto.FLOAT
        self.nodes, self.initializers, self._count = [], [], 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    @staticmethod
    def physical_dtype(dtype) -> np.dtype:
        """The dtype a value of JAX ``dtype`` has in the graph."""
        return np.dtype(np.float32) if np.dtype(dtype) in EMULATED else np.dtype(dtype)

    def const(self, value: np.ndarray, hint: str = "const", nchw: bool = True) -> str:
        """An initializer holding ``value`` in its physical dtype and, with ``nchw``, the layout of its rank."""
        value = np.asarray(value)
        value = value.astype(self.physical_dtype(value.dtype))  # a bfloat16 value is exact in float32
        if value.ndim == 4 and nchw:
            value = value.transpose(NCHW)
        name = self.fresh(hint)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def operand(self, value) -> str:
        return value.name if isinstance(value, Tensor) else self.const(value)

    def to_logical(self, t: Tensor) -> str:
        return self.node("Transpose", [t.name], perm=list(np.argsort(NCHW))) if len(t.shape) == 4 else t.name

    def from_logical(self, name: str, rank: int) -> str:
        return self.node("Transpose", [name], perm=list(NCHW)) if rank == 4 else name

    # --------------------------------------------------------------------------------------------- the walk
    def run(self, jaxpr, inputs: list, consts: list) -> list:
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, (np.asarray(c) for c in consts), strict=True))
        env.update(zip(jaxpr.invars, inputs, strict=True))
        read = lambda v: np.asarray(v.val) if hasattr(v, "val") else env[v]  # noqa: E731 (a Literal has .val)
        for eqn in jaxpr.eqns:
            outs = self.equation(eqn, [read(v) for v in eqn.invars])
            env.update(zip(eqn.outvars, outs, strict=True))
        return [read(v) for v in jaxpr.outvars]

    def equation(self, eqn, args) -> list:
        """The equation's outputs: a call inlined, a constant computed now, an image-dependent value translated
        by its rule; anything else refused by name."""
        name, params = eqn.primitive.name, eqn.params
        if name in CALLS:
            body, consts = _body(params[CALLS[name]])
            return self.run(body, args, consts)
        if not any(isinstance(a, Tensor) for a in args):  # no image in it: computed now (jax runs any primitive)
            return self.evaluate(eqn, args)
        if _has_body(params):
            raise refuse(f"the model uses {name!r}, control flow whose body this translator does not unroll (it "
                         "would run once)")
        if len(eqn.outvars) != 1:
            raise refuse(f"{name!r} returns {len(eqn.outvars)} values and the translation handles one")
        if name not in RULES:
            raise refuse(f"the model uses {name!r}, which has no ONNX translation here")
        aval = eqn.outvars[0].aval
        if np.dtype(aval.dtype) not in TRANSLATED:
            raise refuse(f"{name!r} computes {aval.dtype} values and the translation handles float32, bfloat16 "
                         "and float16")
        shapes = [a.shape if isinstance(a, Tensor) else np.shape(a) for a in args]
        broadcasting = name in BROADCASTING
        if not broadcasting and any(tuple(s) != tuple(v.aval.shape) for s, v in zip(shapes, eqn.invars)):
            raise _unexpanded(name)
        out = RULES[name](self, params, args, tuple(aval.shape))
        out, shape = out if isinstance(out, tuple) else (out, _broadcast(shapes) if broadcasting else aval.shape)
        if np.dtype(aval.dtype) in EMULATED:  # rounded to its dtype, as the model computes it
            narrow = self.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))
            out = self.node("Cast", [self.node("Cast", [out], to=narrow)], to=self.float)
        return [Tensor(out, shape, aval.dtype)]

    def evaluate(self, eqn, args) -> list:
        name, out = eqn.primitive.name, eqn.outvars[0] if len(eqn.outvars) == 1 else None
        if out is not None and name in ELEMENTWISE:  # numpy broadcasts the keep-dims constants lax would refuse
            return [ELEMENTWISE[name][1](*args).astype(out.aval.dtype)]
        if out is not None and name in UNARY:
            return [UNARY[name][1](args[0]).astype(out.aval.dtype)]
        if name == "convert_element_type":
            return [args[0].astype(eqn.params["new_dtype"])]
        if name == "broadcast_in_dim":  # keep-dims where the batch axis is symbolic, the full shape otherwise
            shape = tuple(out.aval.shape)
            value = np.reshape(args[0], keep_dims(args[0].shape, shape, eqn.params["broadcast_dimensions"]))
            return [np.broadcast_to(value, shape) if _concrete(shape) else value]
        for v in eqn.outvars:
            if not _concrete(v.aval.shape):
                raise refuse(f"the constant {name} of shape {v.aval.shape} depends on the batch size")
        results = eqn.primitive.bind(*(jnp.asarray(a) for a in args), **eqn.params)
        return [np.asarray(r) for r in (results if eqn.primitive.multiple_results else [results])]

    def fuse_conv_bias(self) -> None:
        """``Add(Conv(x, w), b)`` with a constant ``b`` of one value per output channel -> ``Conv(x, w, b)``
        (a broadcast scalar stays an Add: Conv's bias has the output's channels): the folded BatchNorm's
        shift becomes the convolution's bias, as in the StableHLO artifact's fused convolution. Initializers
        left unused are dropped."""
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
            channels = self.numpy_helper.to_array(arrays[conv.input[1]]).shape[0] if conv.input[1] in arrays else None
            if value is None or value.shape != (1, channels, 1, 1):  # one value per output channel: Conv's bias
                continue
            conv.input.append(self.const(value.reshape(-1), "bias"))
            conv.output[0] = add.output[0]
            self.nodes.remove(add)
        used = {name for n in self.nodes for name in n.input}
        self.initializers = [t for t in self.initializers if t.name in used]


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
    (logits,) = t.run(closed.jaxpr, [Tensor(nchw, images.shape, images.dtype)], closed.consts)
    if not isinstance(logits, Tensor):
        raise refuse("the logits do not depend on the images")
    if logits.shape != tuple(closed.jaxpr.outvars[0].aval.shape):
        raise _unexpanded("the output")
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


def export_onnx(model, variables: dict[str, Any], preprocessing: Preprocessing) -> tuple[bytes, dict[str, Any]]:
    """The serialized ONNX model and the manifest entries specific to this format (``export_model`` writes both)."""
    import onnx

    return build_onnx(model, variables, preprocessing).SerializeToString(), {"opset": OPSET,
                                                                             "onnx_version": onnx.__version__}
