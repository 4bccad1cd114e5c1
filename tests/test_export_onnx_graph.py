"""The ONNX translator (resnet_jax/export/onnx_graph.py) translates what it knows and refuses the rest.

Control flow (``scan``, ``while``, ``cond``) used to be inlined as if it were a call, so a scan exported as one
iteration; now only the call-like primitives are inlined (jit, custom_jvp_call, custom_vjp_call, remat2), and
every other primitive, a primitive with several outputs and a value of another dtype get one sentence naming
it, before any file is written. bfloat16 models export, checked in onnxruntime against ``model.apply``.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest

from conftest import random_variables
from resnet_jax import create_model, data
from resnet_jax.export import Preprocessing, export_model, load_exported
from resnet_jax.resnet import ResNet


@jax.custom_vjp
def _doubled(x):
    return 2 * x


_doubled.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))


def _while(z):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] * 0.5 + 1), (0, z))[1]


# What the logits go through after the head: a construct the translator must refuse, or (custom_vjp) inline.
AFTER = {
    "scan": lambda z: jax.lax.scan(lambda c, _: (c * 0.5 + 1, None), z, None, length=3)[0],
    "while": _while,
    "cond": lambda z: jax.lax.cond(True, lambda v: v, lambda v: -v, z),
    "tanh": jnp.tanh,
    "top_k": lambda z: jax.lax.top_k(z, z.shape[-1])[0],
    "int32": lambda z: z.astype(jnp.int32).astype(z.dtype),  # an int32 value computed from the images
    # a reshape that transposes first was translated as the plain reshape (a transposed (N, 3, 16) one came out 3.7
    # off); this one moves a size-1 axis, enough for the rule
    "reshape_transposed": lambda z: jax.lax.reshape(z.reshape(z.shape[0], 1, z.shape[1]), z.shape,
                                                    dimensions=(0, 2, 1)),
    "custom_vjp": _doubled,
    # a broadcast is held at size 1 on its new axes (keep-dims) for the elementwise op that consumes it; a sum over
    # such an axis summed one copy (1/4 of these logits), after a multiply as well, and came out without a word
    "sum_of_broadcast": lambda z: jnp.broadcast_to(z[:, None, :], (z.shape[0], 4, z.shape[1])).sum(axis=1),
    "sum_of_scaled_broadcast": lambda z: (jnp.broadcast_to(z[:, None, :], (z.shape[0], 4, z.shape[1])) * 2).sum(1),
    # written as (batch, 1) where (batch, 5) is declared: was onnx.checker's ShapeInferenceError
    "broadcast_output": lambda z: jnp.broadcast_to(jax.lax.slice_in_dim(z, 0, 1, axis=1), z.shape),
    # elementwise all the way: exported
    "broadcast_added": lambda z: jnp.broadcast_to(jax.lax.slice_in_dim(z, 0, 1, axis=1), z.shape) * 2 + z,
}


class Wrapped(ResNet):
    """A ResNet whose logits go through ``AFTER[after]``: a real model (folded and exported as any other)
    holding the construct under test."""

    after: str = "scan"

    @nn.compact
    def __call__(self, x, train: bool = False):
        return AFTER[self.after](super().__call__(x, train))


SIZE = 16
PREP = Preprocessing(SIZE, (0.5,), (0.25,))


def wrapped(after):
    model = Wrapped(stage_sizes=(1, 1, 1), stage_widths=(8, 16, 32), stem="cifar", stem_width=8, in_channels=1,
                    num_classes=5, conv_impl="xla", after=after)
    return model, random_variables(model, (1, SIZE, SIZE, 1))


def batch(channels=1, size=SIZE, n=3):
    return np.random.default_rng(1).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


REFUSED = [  # (after, what the sentence names)
    ("scan", "uses 'scan', control flow whose body this translator does not unroll"),
    ("while", "uses 'while', control flow"),
    ("cond", "uses 'cond', control flow"),
    ("tanh", "uses 'tanh', which has no ONNX translation here"),
    ("top_k", "'top_k' returns 2 values and the translation handles one"),
    ("int32", "'convert_element_type' computes int32 values and the translation handles float32"),
    ("reshape_transposed", "'reshape' transposes its operand first (dimensions=(0, 2, 1)), which is not translated"),
    ("sum_of_broadcast", "reduce_sum takes a broadcast value, which the translation holds at size 1 on its new axes"),
    ("sum_of_scaled_broadcast", "reduce_sum takes a broadcast value"),
    ("broadcast_output", "the output takes a broadcast value"),
]


@pytest.mark.parametrize("after,named", REFUSED, ids=[r[0] for r in REFUSED])
def test_what_cannot_be_translated_is_refused_in_one_sentence_before_writing(after, named, tmp_path):
    """A scan model used to export as one iteration of its loop (and a while or cond as one pass of its body)."""
    model, variables = wrapped(after)
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="cannot export to ONNX: ") as err:
        export_model(model, variables, path, preprocessing=PREP)
    text = str(err.value)
    assert named in text and text.endswith("; export --format=stablehlo instead"), text
    assert "\n" not in text and ". " not in text, text
    assert list(tmp_path.iterdir()) == []  # neither the artifact nor its manifest


def _conv(x, padding):
    channels = x.shape[-1]
    kernel = np.random.default_rng(3).standard_normal((3, 3, channels, channels)).astype(np.float32)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


# What the images go through before the stem: constructs of the input's NHWC layout.
BEFORE = {
    "cropping_conv": lambda x: _conv(x, ((-1, 1), (1, -1))),  # negative padding: lax crops there
    "wide_pool_padding": lambda x: jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 1, 1, 1),
                                                         ((0, 0), (0, 3), (0, 3), (0, 0))),
    "scalar_shift": lambda x: _conv(x, "SAME") + jnp.full((1, 1, 1, 1), 0.3),  # one value for every channel
}


class Prepended(ResNet):
    """A ResNet whose input goes through ``BEFORE[before]`` first."""

    before: str = "scalar_shift"

    @nn.compact
    def __call__(self, x, train: bool = False):
        return super().__call__(BEFORE[self.before](x), train)


@pytest.mark.parametrize("before,named", [("cropping_conv", "convolutions with negative padding (cropping)"),
                                          ("wide_pool_padding", "pooling padding of the window's size or more")])
def test_input_constructs_onnx_cannot_hold_are_refused_not_written_invalid(before, named, tmp_path):
    """Used to be: written, onnx.checker content, then refused by onnx's shape inference (negative Conv pads) or
    by onnxruntime at load (pads >= the pooling window)."""
    model = Prepended(stage_sizes=(1, 1, 1), stage_widths=(8, 16, 32), stem="cifar", stem_width=8, in_channels=1,
                      num_classes=5, conv_impl="xla", before=before)
    with pytest.raises(ValueError, match=f"cannot export to ONNX: {re.escape(named)}"):
        export_model(model, random_variables(model, (1, SIZE, SIZE, 1)), tmp_path / "m.onnx", preprocessing=PREP)
    assert list(tmp_path.iterdir()) == []


def test_a_scalar_added_to_a_convolution_stays_an_add(tmp_path):
    """Used to be: fused into the Conv as a bias of one value for a convolution of several output channels, which
    onnxruntime refused to run ("bias must be a 1D tensor of size output_channels")."""
    model = Prepended(stage_sizes=(1, 1, 1), stage_widths=(8, 16, 32), stem="cifar", stem_width=8, in_channels=4,
                      num_classes=5, conv_impl="xla")
    graph = exported_equals_apply(model, random_variables(model, (1, SIZE, SIZE, 4)), tmp_path, channels=4)
    assert sum(n.op_type == "Add" for n in graph.node) >= 1


def exported_equals_apply(model, variables, tmp_path, prep=PREP, channels=1, bound=1e-4):
    """Export to ONNX, run in onnxruntime, compare with ``model.apply`` (jitted) within ``bound`` x the logits'
    scale; returns the ONNX graph."""
    path = export_model(model, variables, tmp_path / "m.onnx", preprocessing=prep)
    images = batch(channels, prep.image_size)
    want = np.asarray(jax.jit(model.apply)(variables, data.normalize(images, *prep.per_channel(channels))))
    np.testing.assert_allclose(load_exported(path).run(images), want, atol=bound * np.abs(want).max(), rtol=0)
    return onnx.load(str(path)).graph


def test_a_custom_vjp_function_is_inlined_as_its_forward_computation(tmp_path):
    exported_equals_apply(*wrapped("custom_vjp"), tmp_path)


def test_a_broadcast_consumed_elementwise_exports_at_size_one(tmp_path):
    """The keep-dims broadcast the refusals above guard: consumed elementwise (a multiply, then an add with a full
    value), it exports and equals model.apply."""
    exported_equals_apply(*wrapped("broadcast_added"), tmp_path)


def test_a_remat_model_exports(tmp_path):
    """remat=True wraps each block in jax.checkpoint ('remat2', an open jaxpr): it once failed with an
    AttributeError."""
    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=5, remat=True,
                         conv_impl="xla")
    variables = random_variables(model, (1, SIZE, SIZE, 1))
    exported_equals_apply(model, variables, tmp_path)


BF16 = [  # (name, overrides, size): the ops of both stems and of each kind of shortcut, in bfloat16
    ("resnet20", {"stage_sizes": (1, 1, 1), "in_channels": 1}, 16),   # zero-pad shortcut: a pad of bf16 values
    ("resnet50d", {"stage_sizes": (1, 1, 1, 1)}, 40),                 # deep stem, max-pool, avg-pool shortcut
]


@pytest.mark.parametrize("name,overrides,size", BF16, ids=[b[0] for b in BF16])
def test_a_bfloat16_model_exports_and_equals_model_apply(name, overrides, size, tmp_path):
    """onnxruntime has no bfloat16 convolution on CPU: the graph computes in float32 and rounds each bfloat16
    result (a Cast to bfloat16 and back). The bound is bfloat16's: a few units of its 2^-8 relative precision,
    as XLA rounds at fewer places than the jaxpr names (measured: at most 0.8% of the logits' scale)."""
    model = create_model(name, num_classes=11, dtype=jnp.bfloat16, conv_impl="xla", **overrides)
    channels = model.in_channels
    variables = random_variables(model, (1, size, size, channels))
    prep = Preprocessing(size, (0.4,) * channels, (0.2,) * channels)
    graph = exported_equals_apply(model, variables, tmp_path, prep, channels, bound=2e-2)
    rounded = [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.BFLOAT16]
    assert len(rounded) > sum(n.op_type == "Conv" for n in graph.node)
    assert {t.data_type for t in graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
