"""One ONNX translation per JAX primitive: ``RULES[name](t, params, args, out_shape) -> ONNX value name`` (or
``(name, shape)`` where the value's shape is not ``out_shape``: the keep-dims broadcast).

Each rule receives the ``_Translator`` ``t`` of ``export/onnx_graph.py`` (which makes nodes and initializers and
knows the NCHW layout), the equation's parameters, its operands (``Tensor`` for values computed from the images,
numpy arrays for constants; at least one is a ``Tensor``) and its logical output shape. A primitive missing here
is refused by name; a rule refuses the forms of its primitive it does not translate.

Values of a narrow float dtype (bfloat16, float16) are computed in float32 and rounded to their dtype by the
translator after each rule (``onnx_graph.EMULATED``): onnxruntime has no bfloat16 convolution on CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

NCHW = (0, 3, 1, 2)  # physical axis k of an image tensor holds logical (NHWC) axis NCHW[k]
ELEMENTWISE = {"add": ("Add", np.add), "sub": ("Sub", np.subtract), "mul": ("Mul", np.multiply),
               "div": ("Div", np.divide), "max": ("Max", np.maximum), "min": ("Min", np.minimum)}
UNARY = {"rsqrt": (("Sqrt", "Reciprocal"), lambda a: 1 / np.sqrt(a)), "sqrt": (("Sqrt",), np.sqrt),
         "neg": (("Neg",), np.negative), "exp": (("Exp",), np.exp), "log": (("Log",), np.log),
         "logistic": (("Sigmoid",), lambda a: 1 / (1 + np.exp(-a)))}  # the SE and ECA gates


class Tensor:
    """An ONNX value computed from the images: its name, its logical (JAX) shape, stored in ``layout``, and its
    JAX dtype (a narrow float is held as float32 in the graph)."""

    def __init__(self, name: str, shape: tuple, dtype):
        self.name, self.shape, self.dtype = name, tuple(shape), np.dtype(dtype)


def layout(rank: int) -> tuple[int, ...]:
    """Where each logical axis lives: NCHW for images (rank 4), as is for every other rank."""
    return NCHW if rank == 4 else tuple(range(rank))


def refuse(what: str) -> ValueError:
    return ValueError(f"cannot export to ONNX: {what}; export --format=stablehlo instead")


def physical_axes(rank: int, logical_axes) -> list[int]:
    order = layout(rank)
    return [order.index(a) for a in logical_axes]


def elementwise(name: str):
    def rule(t, p, args, out_shape):
        if name == "max" and not isinstance(args[1], Tensor) and not np.any(args[1]):
            return t.node("Relu", [args[0].name])
        return t.node(ELEMENTWISE[name][0], [t.operand(a) for a in args])
    return rule


def unary(name: str):
    def rule(t, p, args, out_shape):
        out = args[0].name
        for op in UNARY[name][0]:
            out = t.node(op, [out])
        return out
    return rule


def convert_element_type(t, p, args, out_shape):
    """The float32 <-> bfloat16 conversions are the rounding the translator adds anyway (float32 is the
    physical type of both); anything else is an ONNX Cast."""
    x = args[0]
    target = t.physical_dtype(p["new_dtype"])
    if target == t.physical_dtype(x.dtype):
        return x.name
    return t.node("Cast", [x.name], to=t.helper.np_dtype_to_tensor_dtype(target))


def conv_general_dilated(t, p, args, out_shape):
    x, kernel, *rest = args
    dn = p["dimension_numbers"]
    if isinstance(kernel, Tensor) or tuple(dn.lhs_spec) != NCHW or tuple(dn.out_spec) != NCHW or rest:
        raise refuse("only NHWC convolutions with constant kernels are translated")
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise refuse("transposed or batch-grouped convolutions are not translated")
    if any(lo < 0 or hi < 0 for lo, hi in p["padding"]):  # lax crops there; ONNX's pads must be >= 0
        raise refuse("convolutions with negative padding (cropping) are not translated")
    oihw = np.asarray(kernel).transpose(dn.rhs_spec)
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    return t.node("Conv", [x.name, t.const(oihw, "w", nchw=False)], kernel_shape=list(oihw.shape[2:]),
                  strides=list(p["window_strides"]), pads=pads, dilations=list(p["rhs_dilation"]),
                  group=p["feature_group_count"])


def pool(max_pool: bool):
    def rule(t, p, args, out_shape):
        x = args[0]
        window, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
        if (window[0], window[3], strides[0], strides[3], padding[0], padding[3]) != (1, 1, 1, 1, (0, 0), (0, 0)):
            raise refuse("only spatial pooling windows are translated")
        if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
            raise refuse("dilated pooling windows are not translated")
        if any(not 0 <= pad < size for (lo, hi), size in zip(padding[1:3], window[1:3]) for pad in (lo, hi)):
            raise refuse("pooling padding of the window's size or more (or negative) is not translated: ONNX's "
                         "pooling operators take pads smaller than the window")
        attrs = dict(kernel_shape=list(window[1:3]), strides=list(strides[1:3]),
                     pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]])
        if max_pool:  # reduce_window_max pads with the dtype's lowest value; MaxPool ignores its padding: equal
            return t.node("MaxPool", [x.name], **attrs)
        average = t.node("AveragePool", [x.name], count_include_pad=1, **attrs)  # zero padding counted: a sum
        return t.node("Mul", [average, t.const(np.array(np.prod(window[1:3]), t.physical_dtype(x.dtype)),
                                               "window")])
    return rule


def reduce_sum(t, p, args, out_shape):
    x, axes = args[0], p["axes"]
    rank = len(x.shape)
    out = t.node("ReduceSum", [x.name, t.const(np.array(sorted(physical_axes(rank, axes)), np.int64), "axes")],
                 keepdims=0)
    kept = [a for a in layout(rank) if a not in axes]  # logical axes, in the physical order they remain
    ranks = {a: i for i, a in enumerate(sorted(kept))}
    order = [ranks[a] for a in kept]
    want = list(layout(len(out_shape)))
    return out if order == want else t.node("Transpose", [out], perm=[order.index(a) for a in want])


def dot_general(t, p, args, out_shape):
    x, w = args
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = p["dimension_numbers"]
    if isinstance(w, Tensor) or len(x.shape) != 2 or lhs_batch or rhs_batch or tuple(lhs_contract) != (1,):
        raise refuse("only (batch, features) @ constant matrices are translated")
    w = np.asarray(w) if tuple(rhs_contract) == (0,) else np.asarray(w).T
    return t.node("MatMul", [x.name, t.const(w, "fc")])


def reshape(t, p, args, out_shape):
    if p.get("dimensions") is not None:  # the rule below reshapes in the given order: the transposition was lost
        raise refuse(f"'reshape' transposes its operand first (dimensions={tuple(p['dimensions'])}), which is not "
                     "translated")
    shape = [d if isinstance(d, (int, np.integer)) else -1 for d in out_shape]
    out = t.node("Reshape", [t.to_logical(args[0]), t.const(np.array(shape, np.int64), "shape")])
    return t.from_logical(out, len(out_shape))


def pad(t, p, args, out_shape):
    """The pad value is stored in the tensor's own (physical) dtype: -inf stays -inf, 0 stays 0."""
    x, value = args
    config = p["padding_config"]
    if isinstance(value, Tensor) or any(interior for _, _, interior in config):
        raise refuse("only constant, non-interior padding is translated")
    order = layout(len(x.shape))
    pads = [config[a][0] for a in order] + [config[a][1] for a in order]
    return t.node("Pad", [x.name, t.const(np.array(pads, np.int64), "pads"),
                          t.const(np.asarray(value).astype(t.physical_dtype(x.dtype)), "pad_value")],
                  mode="constant")


def slice_(t, p, args, out_shape):
    x = args[0]
    rank = len(x.shape)
    strides = p["strides"] or (1,) * rank
    ends = [d if isinstance(d, (int, np.integer)) else np.iinfo(np.int64).max for d in p["limit_indices"]]
    return t.node("Slice", [x.name, t.const(np.array(p["start_indices"], np.int64), "starts"),
                            t.const(np.array(ends, np.int64), "ends"),
                            t.const(np.array(physical_axes(rank, range(rank)), np.int64), "axes"),
                            t.const(np.array(strides, np.int64), "steps")])


def broadcast_in_dim(t, p, args, out_shape):
    """New axes are inserted with size 1 (keep-dims): the elementwise op that consumes the value broadcasts it,
    as ONNX ops do, and the symbolic batch axis needs no shape computation. Returns (name, keep-dims shape)."""
    x = args[0]
    keep = keep_dims(x.shape, out_shape, p["broadcast_dimensions"])
    target = [d if isinstance(d, (int, np.integer)) else -1 for d in keep]  # the one symbolic axis: inferred
    out = t.node("Reshape", [t.to_logical(x), t.const(np.array(target, np.int64), "shape")])
    return t.from_logical(out, len(keep)), tuple(keep)


def keep_dims(shape: tuple, out_shape: tuple, dims) -> list:
    """``out_shape`` with the axes ``broadcast_in_dim`` adds to ``shape`` kept at size 1."""
    keep = [1] * len(out_shape)
    for source, target in zip(range(len(shape)), dims, strict=True):
        keep[target] = shape[source]
    return keep


def copy(t, p, args, out_shape):
    return args[0].name


RULES: dict[str, Callable[[Any, dict, list, tuple], Any]] = {
    **{name: elementwise(name) for name in ELEMENTWISE},
    **{name: unary(name) for name in UNARY},
    "convert_element_type": convert_element_type,
    "broadcast_in_dim": broadcast_in_dim,
    "conv_general_dilated": conv_general_dilated,
    "reduce_window_max": pool(max_pool=True),
    "reduce_window_sum": pool(max_pool=False),
    "reduce_sum": reduce_sum,
    "dot_general": dot_general,
    "reshape": reshape,
    "pad": pad,
    "slice": slice_,
    "copy": copy,
    "copy_p": copy,
}
