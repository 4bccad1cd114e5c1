"""A pass computed in float32 inside a bfloat16 model ("NAME@float32"): its result is the float32 convolution of
the bfloat16 operands rounded once, it is NAME itself on float32 inputs, and "auto" takes it where it was
measured faster (a bfloat16 3x3 layer's kernel gradient on a small image)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import require_onednn
from resnet_jax.ops import ConvSpec, choose, conv2d, cpu, onednn
from resnet_jax.ops.widened import SUFFIX, WIDENED

CASES = {  # (kernel, stride, batch, height, width, cin, cout, padding): a shape each widened algorithm computes
    "onednn_gemm": (1, 2, 2, 9, 7, 16, 24, ((0, 0), (0, 0))),
    "onednn_winograd_f2": (3, 1, 2, 8, 8, 32, 16, ((1, 1), (1, 1))),
    "onednn_winograd_f4": (3, 1, 2, 13, 11, 32, 16, ((1, 1), (1, 1))),
}


def _inputs(case, seed=0):
    ksize, stride, n, h, w, cin, cout, padding = case
    kx, kk, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, h, w, cin))
    k = jax.random.normal(kk, (ksize, ksize, cin, cout)) / np.sqrt(ksize * ksize * cin)
    ho, wo = (h + sum(padding[0]) - ksize) // stride + 1, (w + sum(padding[1]) - ksize) // stride + 1
    return x, k, jax.random.normal(ky, (n, ho, wo, cout))


def _passes(algorithm, case, x, k, dy):
    ksize, stride, *_, padding = case

    def conv(a, b):
        if algorithm is None:
            return lax.conv_general_dilated(a, b, (stride, stride), padding, precision=lax.Precision.HIGHEST,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv2d(a, b, stride, padding, algorithm=algorithm)

    def run(a, b, c):
        y, vjp = jax.vjp(conv, a, b)
        return (y, *vjp(c))
    return jax.jit(run)(x, k, dy)


@pytest.mark.parametrize("base", WIDENED)
def test_bfloat16_passes_are_the_float32_convolution_rounded_once(base):
    """Output, input gradient and kernel gradient from bfloat16 operands equal lax's float32 convolution of the
    same (upcast) operands rounded to bfloat16 once: within one bfloat16 rounding (2^-8 of the value) plus the
    float32 algorithm's own error, far inside the several roundings a bfloat16 computation would add."""
    require_onednn()
    case = CASES[base]
    x, k, dy = (a.astype(jnp.bfloat16) for a in _inputs(case))
    got = _passes(base + SUFFIX, case, x, k, dy)
    want = _passes(None, case, *(a.astype(jnp.float32) for a in (x, k, dy)))
    for part, g, w in zip(("output", "input gradient", "kernel gradient"), got, want):
        assert g.dtype == jnp.bfloat16, part
        g, w = np.asarray(g, np.float32), np.asarray(w)
        rounded = np.asarray(jnp.asarray(w).astype(jnp.bfloat16), np.float32)
        scale = np.abs(w).max()
        # the float32 result rounded once: equal to lax's rounded value wherever the float32 error does not
        # cross a rounding boundary, and never more than one bfloat16 step from the float32 value
        assert np.mean(g == rounded) > 0.9, part
        np.testing.assert_array_less(np.abs(g - w), np.abs(w) * 2.0 ** -8 + 1e-4 * scale, err_msg=part)


@pytest.mark.parametrize("base", WIDENED)
def test_float32_inputs_run_the_base_algorithm_itself(base):
    require_onednn()
    case = CASES[base]
    x, k, dy = _inputs(case, seed=1)
    for got, want in zip(_passes(base + SUFFIX, case, x, k, dy), _passes(base, case, x, k, dy)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_auto_takes_float32_winograd_passes_for_bfloat16_layers_on_small_images():
    """Measured (BENCHMARKS.md, issue 33): oneDNN's bfloat16 kernel gradient of a 3x3 layer ran 1.2-1.9x slower
    than float32 Winograd on the upcast operands on images of 8x8 pixels or fewer, tied at 14x14, and won on
    layers of a few GFLOP; its forward lost only on 4x4 images. The input gradient, larger images and float32
    keep their algorithms."""
    if not (onednn.available() and cpu.native_bfloat16()):
        pytest.skip("needs the oneDNN extension on a CPU with bfloat16 instructions (avx512_bf16 or amx_bf16): "
                    "elsewhere a bfloat16 model computes its convolutions in float32")
    def spec(batch, size, channels, dtype="bfloat16"):
        return ConvSpec(batch, size, size, channels, channels, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, dtype)

    widened = ("onednn", "onednn", "onednn_winograd_f4@float32")
    assert choose(spec(128, 8, 256), "cpu") == widened  # ResNet-18-CIFAR's third stage
    assert choose(spec(128, 4, 512), "cpu") == ("onednn_winograd_f4@float32", *widened[1:])  # and its fourth
    assert choose(spec(32, 7, 512), "cpu") == widened  # ResNet-50's last stage
    assert choose(spec(128, 16, 128), "cpu") == ("onednn",) * 3  # 256 pixels: bfloat16 throughout
    assert choose(spec(8, 7, 512), "cpu") == ("onednn",) * 3  # 1.9 GFLOP: the upcast's cost is not repaid
    assert choose(spec(128, 4, 512, "float32"), "cpu") == ("onednn_winograd_f4",) * 3
    strided = dataclasses.replace(spec(128, 8, 256), strides=(2, 2))
    assert choose(strided, "cpu") == ("onednn",) * 3  # Winograd computes stride 1 only
    assert choose(spec(128, 4, 512), "cpu", extension=False) == ("xla", "xla", "matmul_grad")


def test_a_widened_kernel_gradient_composes_under_every_transformation():
    """The choice "auto" makes for small bfloat16 layers, forced on a small shape: reverse mode, forward over
    reverse (a Hessian-vector product) and vmap run through the widened pass and agree with lax's float32
    convolution within bfloat16 rounding. The other two passes are XLA's, which compute bfloat16 on any CPU
    (oneDNN's need bfloat16 instructions), so this runs on AVX2 machines too."""
    require_onednn()
    case = CASES["onednn_winograd_f4"]
    _, stride, *_, padding = case
    x, k, dy = (a.astype(jnp.bfloat16) for a in _inputs(case, seed=2))

    def loss(algorithm):
        def f(a, b):
            if algorithm is None:
                y = lax.conv_general_dilated(a.astype(jnp.float32), b.astype(jnp.float32), (stride, stride), padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                             precision=lax.Precision.HIGHEST)
            else:
                y = conv2d(a, b, stride, padding, algorithm=algorithm).astype(jnp.float32)
            return jnp.sum(jnp.tanh(y) * dy.astype(jnp.float32))
        return f

    ours, ref = loss("xla/xla/onednn_winograd_f4@float32"), loss(None)
    def gradient(f):
        return jax.grad(f, argnums=1)(x, k)

    def hvp(f):
        return jax.jvp(jax.grad(f, argnums=1), (x, k), (x, k))[1]

    def per_image(f):
        return jax.vmap(lambda a: jax.grad(f, argnums=1)(a[None], k))(x)

    for transform in (gradient, hvp, per_image):
        got, want = (np.asarray(jax.jit(lambda: transform(f))(), np.float32) for f in (ours, ref))
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, atol=3e-2)


def test_the_widened_forward_applies_the_epilogue_in_bfloat16():
    """The forward "auto" takes on the smallest images runs with the epilogue a block gives it (folded bias,
    residual, ReLU): equal to lax's float32 convolution plus the same epilogue, within bfloat16 rounding (the
    gradients by XLA, as above)."""
    require_onednn()
    case = CASES["onednn_winograd_f4"]
    _, stride, *_, padding = case
    x, k, residual = (a.astype(jnp.bfloat16) for a in _inputs(case, seed=3))
    bias = jax.random.normal(jax.random.key(4), (k.shape[-1],)).astype(jnp.bfloat16)
    got = conv2d(x, k, stride, padding, bias=bias, residual=residual, relu=True,
                 algorithm="onednn_winograd_f4@float32/xla/xla")
    up = lambda a: a.astype(jnp.float32)  # noqa: E731
    y = lax.conv_general_dilated(up(x), up(k), (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=lax.Precision.HIGHEST)
    want = np.asarray(jax.nn.relu(y + up(bias) + up(residual)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2.0 ** -7 * np.abs(want).max())
