"""A pass computed in float32 inside a bfloat16 model: by the detour "NAME@float32" (upcast, NAME, one rounding) or
by the extension's Winograd reading and writing bfloat16 itself. Either result is the float32 convolution of the
bfloat16 operands rounded once; "NAME@float32" is NAME itself on float32 inputs; and "auto" takes Winograd for a
bfloat16 3x3 layer's passes where it was measured faster than oneDNN's bfloat16 kernels on that CPU kind."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import require_onednn
from resnet_jax.ops import ConvSpec, choose, conv2d, cpu
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


def _with_cpu_flags(monkeypatch, flags):
    """The rules read the CPU's flags through ``cpu.flags``; a rule measured on another CPU kind is checked by
    giving it that kind's flags (the choice is a function of flags and shape only; nothing is run)."""
    monkeypatch.setattr(cpu, "flags", lambda: "flags\t\t: fpu sse2 avx2 fma " + flags)


def _spec(batch, size, channels, dtype="bfloat16"):
    return ConvSpec(batch, size, size, channels, channels, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, dtype)


WINOGRAD, ONEDNN = "onednn_winograd_f4", "onednn"


def test_auto_bfloat16_winograd_passes_without_amx(monkeypatch):
    """Measured on AVX-512 BF16 without AMX (BENCHMARKS.md, Machine A2, 2026-12-06): Winograd reading bfloat16
    beat oneDNN's bfloat16 kernel gradient on every ResNet-18-CIFAR and ResNet-50 3x3 layer at batches 8-128, and
    the forward and input gradient on outputs of whole 4x4 tiles up to 32x32; those lost on 14x14 and 7x7 (a
    quarter of each tile discarded) and on 56x56. float32, strided layers and the stems keep their algorithms."""
    require_onednn()
    _with_cpu_flags(monkeypatch, "avx512f avx512bw avx512_bf16")
    every = (WINOGRAD,) * 3
    for size, channels in ((32, 64), (16, 128), (8, 256), (4, 512)):  # ResNet-18-CIFAR, batch 128
        assert choose(_spec(128, size, channels), "cpu", measured=False) == every, size
    assert choose(_spec(32, 28, 128), "cpu", measured=False) == every  # ResNet-50's second stage
    for size, channels in ((56, 64), (14, 256), (7, 512)):  # its first, third and fourth
        assert choose(_spec(32, size, channels), "cpu", measured=False) == (ONEDNN, ONEDNN, WINOGRAD), size
    assert choose(_spec(8, 7, 512), "cpu", measured=False) == (ONEDNN, ONEDNN, WINOGRAD)  # 1.9 GFLOP still won
    assert choose(_spec(1, 7, 512), "cpu", measured=False) == (ONEDNN,) * 3  # 4 tiles: WINOGRAD_MIN_TILES
    assert choose(_spec(128, 32, 64, "float32"), "cpu", measured=False) == every
    strided = dataclasses.replace(_spec(128, 8, 256), strides=(2, 2))
    assert choose(strided, "cpu", measured=False) == (ONEDNN,) * 3  # Winograd computes stride 1 only
    stem = dataclasses.replace(_spec(128, 32, 64), in_channels=3)
    assert choose(stem, "cpu", measured=False) == (ONEDNN,) * 3
    # each pass by its own output: y 32x32 from an unpadded 34x34 input, whose 34x34 input gradient is not whole
    # tiles, and y 32x32 from a 30x30 input padded by 2
    unpadded = dataclasses.replace(_spec(128, 34, 64), padding=((0, 0), (0, 0)))
    assert choose(unpadded, "cpu", measured=False) == (WINOGRAD, ONEDNN, WINOGRAD)
    padded = dataclasses.replace(_spec(128, 30, 64), padding=((2, 2), (2, 2)))
    assert choose(padded, "cpu", measured=False) == (WINOGRAD, ONEDNN, WINOGRAD)


def test_auto_bfloat16_winograd_passes_with_amx(monkeypatch):
    """Measured with AMX (BENCHMARKS.md, Machine C, 2026-12-05): oneDNN's AMX kernels run 3-4x float32 Winograd
    on images of 14x14 and larger; Winograd won the kernel gradient on images of 8x8 pixels or fewer and the
    forward on 4x4 only, and neither below a few GFLOP."""
    require_onednn()
    _with_cpu_flags(monkeypatch, "avx512f avx512_bf16 amx_bf16 amx_tile")
    kernel_grad = (ONEDNN, ONEDNN, WINOGRAD)
    assert choose(_spec(128, 8, 256), "cpu", measured=False) == kernel_grad  # ResNet-18-CIFAR's third stage
    assert choose(_spec(128, 4, 512), "cpu", measured=False) == (WINOGRAD, ONEDNN, WINOGRAD)  # and its fourth
    assert choose(_spec(32, 7, 512), "cpu", measured=False) == kernel_grad  # ResNet-50's last stage
    assert choose(_spec(128, 16, 128), "cpu", measured=False) == (ONEDNN,) * 3  # 256 pixels: AMX throughout
    assert choose(_spec(8, 7, 512), "cpu", measured=False) == (ONEDNN,) * 3  # 1.9 GFLOP
    assert choose(_spec(128, 4, 512, "float32"), "cpu", measured=False) == (WINOGRAD,) * 3


def test_auto_bfloat16_without_bfloat16_instructions_stays_with_xla(monkeypatch):
    """Without bfloat16 instructions (AVX2: oneDNN 3.2 has no bfloat16 convolutions there) a bfloat16 model
    computes in float32 throughout (README); a bfloat16 convolution called directly keeps XLA's algorithms, as
    before Winograd read bfloat16: it was measured only against oneDNN's bfloat16 kernels."""
    require_onednn()
    _with_cpu_flags(monkeypatch, "")
    assert choose(_spec(128, 8, 256), "cpu", measured=False) == ("xla", "xla", "matmul_grad")
    assert choose(_spec(128, 8, 256, "float32"), "cpu", measured=False) == (WINOGRAD,) * 3


@pytest.mark.parametrize("m", (2, 4))
def test_winograd_reads_and_writes_bfloat16_itself(m):
    """The extension's Winograd takes bfloat16 activations as they are: its three passes equal the float32
    detour ("@float32": upcast, float32 Winograd, one rounding) bit for bit, so they are lax's float32
    convolution rounded once (checked against lax directly too), and the compiled call holds no float32 copy of
    the input."""
    require_onednn()
    name = f"onednn_winograd_f{m}"
    case = CASES["onednn_winograd_f4"]
    x, k, dy = (a.astype(jnp.bfloat16) for a in _inputs(case, seed=5))
    got = _passes(name, case, x, k, dy)
    detour = _passes(name + SUFFIX, case, x, k, dy)
    want = _passes(None, case, *(a.astype(jnp.float32) for a in (x, k, dy)))
    for part, g, d, w in zip(("output", "input gradient", "kernel gradient"), got, detour, want):
        assert g.dtype == jnp.bfloat16, part
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(d, np.float32), err_msg=part)
        g, w = np.asarray(g, np.float32), np.asarray(w)
        scale = np.abs(w).max()
        np.testing.assert_array_less(np.abs(g - w), np.abs(w) * 2.0 ** -8 + 1e-4 * scale, err_msg=part)
    _, stride, n, h, w_, cin, *_ = case
    def lowered(algorithm):
        return jax.jit(lambda a, b: conv2d(a, b, stride, case[-1], algorithm=algorithm)).lower(x, k).as_text()
    upcast_x = f"tensor<{n}x{h}x{w_}x{cin}xf32>"
    assert upcast_x not in lowered(name)  # no float32 pass over x
    assert upcast_x in lowered(name + SUFFIX)  # the detour's, for contrast


def test_bfloat16_winograd_epilogue_and_summed_gradient():
    """The forward's epilogue (a block's folded bias, residual, ReLU) and the input gradient summed into another
    (a shortcut's) read bfloat16 and round once: equal to lax's float32 result of the same operands within one
    bfloat16 rounding."""
    require_onednn()
    from resnet_jax.ops.registry import REGISTRY

    case = CASES["onednn_winograd_f4"]
    _, stride, *_, padding = case
    x, k, residual = (a.astype(jnp.bfloat16) for a in _inputs(case, seed=6))
    bias = jax.random.normal(jax.random.key(7), (k.shape[-1],)).astype(jnp.bfloat16)
    up = lambda a: a.astype(jnp.float32)  # noqa: E731
    conv = lambda a, b: lax.conv_general_dilated(up(a), up(b), (stride, stride), padding,  # noqa: E731
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                 precision=lax.Precision.HIGHEST)
    algorithm, spec = REGISTRY[WINOGRAD], ConvSpec.of(x, k, stride, padding, 1)
    got = jax.jit(lambda: algorithm.fused_forward(x, k, spec, bias, residual, True))()
    want = np.asarray(jax.nn.relu(conv(x, k) + up(bias) + up(residual)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float32) - want), np.abs(want) * 2.0 ** -8 + 1e-5)
    acc = jax.random.normal(jax.random.key(8), x.shape).astype(jnp.bfloat16)
    dx = jax.jit(lambda: algorithm.summed_input_grad(residual, k, spec, acc))()
    want = np.asarray(jax.vjp(lambda a: conv(a, k), up(x))[1](up(residual))[0] + up(acc))
    assert dx.dtype == jnp.bfloat16
    scale = np.abs(want).max()
    np.testing.assert_array_less(np.abs(np.asarray(dx, np.float32) - want), np.abs(want) * 2.0 ** -8 + 1e-4 * scale)


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
