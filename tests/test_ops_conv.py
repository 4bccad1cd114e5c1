"""Every convolution algorithm equals lax.conv_general_dilated in value and both gradients, on the shapes the
models use and on awkward ones, and refuses in one sentence the shapes outside its family; the epilogue, the
module, the per-shape choice and the errors behave."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import require_onednn
from resnet_jax import create_model
from resnet_jax.ops import ALGORITHMS, Conv, ConvSpec, choose, conv2d, cpu, onednn
from resnet_jax.ops.registry import REGISTRY

CASES = [  # (kernel, stride, groups, batch, height, width, cin, cout, padding)
    (1, 1, 1, 2, 7, 9, 8, 16, ((0, 0), (0, 0))),
    (1, 2, 1, 2, 9, 7, 8, 16, ((0, 0), (0, 0))),  # strided projection shortcut
    (1, 2, 1, 1, 8, 7, 4, 6, ((1, 0), (0, 1))),  # strided and padded: its input gradient drops the padding
    (3, 1, 1, 2, 13, 11, 5, 6, ((1, 1), (1, 1))),  # odd, non-square, channels not a multiple of 8
    (3, 1, 1, 1, 8, 8, 16, 24, ((1, 1), (1, 1))),  # batch 1, tiles that fit exactly
    (3, 1, 1, 2, 7, 9, 3, 5, ((0, 2), (2, 1))),  # asymmetric padding
    (3, 2, 1, 2, 9, 11, 5, 6, ((1, 1), (1, 1))),
    (3, 2, 1, 1, 8, 8, 4, 4, ((0, 2), (1, 0))),
    (7, 2, 1, 2, 15, 13, 3, 8, ((3, 3), (3, 3))),  # ImageNet stem
    (3, 2, 4, 2, 9, 9, 8, 12, ((1, 1), (1, 1))),  # ResNeXt grouped
    (1, 1, 2, 2, 5, 5, 4, 6, ((0, 0), (0, 0))),
    (3, 1, 1, 2, 8, 8, 8, 8, ((-1, 1), (1, 0))),  # a negative padding crops the input: XLA's own only
]
# Relative to the output's (or gradient's) largest value. Direct algorithms differ from lax only in summation
# order (~1e-6). Winograd's transforms add rounding that grows with the tile: F(2,3) stays near 1e-6, F(4,3)
# reaches 1e-5 on wide layers (its coefficients go up to 8 and 1/24).
TOLERANCE = {"winograd_f4": 1e-4, "onednn_winograd_f4": 1e-4, "onednn_winograd_f4@float32": 1e-4}
DEFAULT_TOLERANCE = 2e-5
EXTENSION = [name for name in ALGORITHMS if REGISTRY[name].cpu_only]
PARTS = ("output", "d/dinput", "d/dkernel")


def case_id(case):
    return f"k{case[0]}s{case[1]}g{case[2]}_b{case[3]}_{case[4]}x{case[5]}"


def spec_of(case, dtype="float32"):
    ksize, stride, groups, n, h, w, cin, cout, padding = case
    return ConvSpec(n, h, w, cin, cout, (ksize, ksize), (stride, stride), padding, groups, jnp.dtype(dtype).name)


def shape_limit(name, case):
    """None when the algorithm's record says it computes this shape, else what it cannot do. The record's
    ``shape_limit`` looks at shapes and dtypes only (it never builds or loads the extension), so this runs at
    collection time: the cases below are only the (algorithm, shape) pairs it computes."""
    return REGISTRY[name].shape_limit(spec_of(case))


# What each algorithm's docstring says it computes, written here independently of its ``limits``, so that a
# record refusing shapes it should compute (and so dropping them from the cases below unseen) fails a test
def padded(family):
    """``family`` on zero or positive padding only: a negative one (a crop) is XLA's own alone."""
    return lambda k, s, g, pad: all(p >= 0 for side in pad for p in side) and family(k, s, g, pad)


@padded
def winograd(k, s, g, pad):
    return k == 3 and s == 1 and g == 1 and all(p <= 2 for side in pad for p in side)


@padded
def gemm(k, s, g, pad):
    return k == 1 and g == 1


def every(k, s, g, pad):
    return True


FAMILIES = {"xla": every, "matmul_grad": padded(every), "im2col": padded(lambda k, s, g, pad: g == 1),
            "gemm": gemm, "polyphase": padded(lambda k, s, g, pad: s == 2 and k >= 2), "winograd_f2": winograd,
            "winograd_f4": winograd, "onednn": padded(every),
            "onednn_matmul_grad": padded(lambda k, s, g, pad: g == 1), "onednn_gemm": gemm,
            "onednn_winograd_f2": winograd, "onednn_winograd_f4": winograd}
FAMILIES.update({name + "@float32": FAMILIES[name] for name in ("onednn_gemm", "onednn_winograd_f2",
                                                                "onednn_winograd_f4")})  # same shapes, any dtype
FAMILIES["onednn_winograd_f4@atrous"] = lambda k, s, g, pad: False  # dilated kernels only: test_dilation.py
COMPUTED = [(name, case) for name in ALGORITHMS for case in CASES if shape_limit(name, case) is None]
REFUSED = [(name, case) for name in ALGORITHMS for case in CASES if shape_limit(name, case) is not None]
UNDILATED = [name for name in ALGORITHMS if any(n == name for n, _ in COMPUTED)]  # the others: test_dilation.py


def first_computed(name):
    return next(case for n, case in COMPUTED if n == name)


def reference(x, k, stride, padding, groups):
    return lax.conv_general_dilated(x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups, precision=lax.Precision.HIGHEST)


def value_and_grads(fn, x, k, cotangent):
    """Output and both gradients of ``fn`` in one compiled function (one compilation per algorithm and shape)."""
    def passes(a, b, c):
        y, vjp = jax.vjp(fn, a, b)
        return (y, *vjp(c))
    return jax.jit(passes)(x, k, cotangent)


def conv_of(name, case):
    ksize, stride, groups, *_, padding = case
    return lambda a, b: conv2d(a, b, (stride, stride), padding, groups, algorithm=name)


def lax_of(case):
    ksize, stride, groups, *_, padding = case
    return lambda a, b: reference(a, b, stride, padding, groups)


@functools.cache
def lax_passes(case):
    """lax's output and gradients on ``inputs(case, float32)``, computed once per shape for all algorithms."""
    return value_and_grads(lax_of(case), *inputs(case, jnp.float32))


def refusal(name, case, dtype=jnp.float32):
    return REGISTRY[name].refusal(spec_of(case, dtype), "cpu")


def inputs(case, dtype, seed=0):
    ksize, stride, groups, n, h, w, cin, cout, padding = case
    kx, kk, ky = jax.random.split(jax.random.key(seed + 10 * ksize + stride), 3)
    x = jax.random.normal(kx, (n, h, w, cin)).astype(dtype)
    k = jax.random.normal(kk, (ksize, ksize, cin // groups, cout)).astype(dtype)
    return x, k, jax.random.normal(ky, spec_of(case).y_shape).astype(dtype)


def assert_close(got, want, tol, name):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got / scale, want / scale, atol=tol, err_msg=name)


def requires_extension(name):
    if REGISTRY[name].cpu_only:
        require_onednn()


# "NAME@float32" on float32 inputs is NAME itself, bit for bit (test_ops_widened.py): not timed twice here
@pytest.mark.parametrize("name, case", [pytest.param(n, c, id=f"{n}-{case_id(c)}") for n, c in COMPUTED
                                        if not n.endswith("@float32")])
def test_algorithm_matches_lax_in_value_and_both_gradients(name, case):
    requires_extension(name)
    ours = value_and_grads(conv_of(name, case), *inputs(case, jnp.float32))  # forced: a refusal would raise
    for part, got, exp in zip(PARTS, ours, lax_passes(case)):
        assert_close(got, exp, TOLERANCE.get(name, DEFAULT_TOLERANCE), f"{name} {part}")


# The extension's Winograd has two schedules (csrc/winograd.cc); the cases above use few channels and fewer tiles
# than one block, so these take each in full, where the layout of the transformed-tile matrices (their skewed
# slices, a kernel read transposed) shows. Not in CASES: every 3x3 algorithm would run the 160-channel one.
SCHEDULES = {
    # 16 -> 24 channels: blocks of 64 tiles; 3 x 5 x 5 tiles of 4x4 = 75, so one full block and one of 11
    "blocked, partial last block": (3, 1, 1, 3, 17, 19, 16, 24, ((1, 1), (1, 1))),
    # 36 x 160 x 192 floats of transformed kernel (4.4 MB): one product over every tile
    "whole": (3, 1, 1, 2, 9, 10, 160, 192, ((1, 1), (1, 1))),
}


@pytest.mark.parametrize("case", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_each_winograd_schedule_matches_lax_in_value_and_both_gradients(case):
    requires_extension("onednn_winograd_f4")
    ours = value_and_grads(conv_of("onednn_winograd_f4", case), *inputs(case, jnp.float32))
    for part, got, want in zip(PARTS, ours, lax_passes(case)):
        err = float(jnp.abs(got - want).max()) / float(jnp.abs(want).max())
        assert err < TOLERANCE["onednn_winograd_f4"], f"{part}: {err:.1e} of the largest value"


@pytest.mark.parametrize("name", ALGORITHMS)
def test_each_algorithm_computes_its_family_and_refuses_the_rest_in_one_sentence(name):
    """The cases above are the pairs the records accept; this pins that split to each algorithm's documented
    family, and checks that a forced algorithm refuses every other shape (at trace time, naming the shape)."""
    family = FAMILIES[name]
    assert {case_id(c) for n, c in COMPUTED if n == name} == {case_id(c) for c in CASES if family(*c[:3], c[8])}
    for case in (c for n, c in REFUSED if n == name):
        reason = refusal(name, case)
        assert reason.startswith(f"algorithm {name!r} computes ") and " only; this convolution is " in reason
        assert reason.endswith(spec_of(case).describe()), reason
        x, k, _ = inputs(case, jnp.float32)
        with pytest.raises(ValueError, match=f"^{re.escape(reason)}; use algorithm='auto'"):
            jax.eval_shape(conv_of(name, case), x, k)


@pytest.mark.parametrize("name", UNDILATED)
def test_bfloat16_where_supported(name):
    requires_extension(name)
    case = first_computed(name)
    reason = refusal(name, case, jnp.bfloat16)
    if reason:
        # oneDNN's direct kernels take bfloat16 where the CPU has bf16 instructions
        float32_only = ("onednn_winograd_f2", "onednn_winograd_f4", "onednn_gemm", "onednn_matmul_grad",
                        *(() if cpu.native_bfloat16() else ("onednn",)))
        assert "float32 only" in reason and name in float32_only
        return
    x, k, dy = inputs(case, jnp.bfloat16)
    ours = value_and_grads(conv_of(name, case), x, k, dy)
    up = lambda a: a.astype(jnp.float32)  # noqa: E731
    want = value_and_grads(lax_of(case), up(x), up(k), up(dy))
    for part, got, exp in zip(PARTS, ours, want):
        assert_close(up(got), exp, 3e-2, f"{name} {part}")  # bf16 keeps 8 bits of mantissa
        assert got.dtype == jnp.bfloat16


@pytest.mark.parametrize("name", UNDILATED)
def test_fused_epilogue_equals_the_unfused_ops_in_value_and_gradients(name):
    requires_extension(name)
    case = first_computed(name)
    ksize, stride, groups, *_, padding = case
    x, k, dy = inputs(case, jnp.float32, seed=1)
    bias = jax.random.normal(jax.random.key(5), (k.shape[-1],))
    residual = jax.random.normal(jax.random.key(6), dy.shape)

    def ours(a, b, c, r):
        return conv2d(a, b, (stride, stride), padding, groups, bias=c, residual=r, relu=True, algorithm=name)

    def want(a, b, c, r):
        return jax.nn.relu(reference(a, b, stride, padding, groups) + c + r)

    def passes(fn):
        def value_and_all_grads(*args):
            y, vjp = jax.vjp(fn, *args)
            return y, vjp(dy)
        return jax.jit(value_and_all_grads)(x, k, bias, residual)

    (y, grads), (y_want, grads_want) = passes(ours), passes(want)
    assert_close(y, y_want, TOLERANCE.get(name, DEFAULT_TOLERANCE), "output")
    for part, g, e in zip(("input", "kernel", "bias", "residual"), grads, grads_want):
        assert_close(g, e, TOLERANCE.get(name, DEFAULT_TOLERANCE), f"d/d{part}")


@pytest.mark.parametrize("x_shape, kernel_shape, groups, match", [
    ((8, 8, 16), (3, 3, 16, 16), 1, r"rank 4.*got shapes \(8, 8, 16\).*x\[None\]"),
    ((2, 8, 8, 16), (3, 3, 8, 16), 1, r"16 input channels in 1 group\(s\) need a kernel \(HWIO\) of 16 input"),
    ((2, 8, 8, 16), (1, 1, 8, 16), 1, r"need a kernel \(HWIO\) of 16 input channels"),
    ((2, 8, 8, 16), (3, 3, 5, 15), 3, r"groups=3 does not divide the image's 16 channels"),
])
@pytest.mark.parametrize("algorithm", ["auto", "xla"])
def test_a_call_that_cannot_be_a_convolution_is_one_sentence_on_every_path(x_shape, kernel_shape, groups, match,
                                                                           algorithm):
    """The extension's kernels said "INVALID_ARGUMENT: oneDNN conv: inconsistent channel counts or groups" from
    inside the compiled program, and a rank-3 image "not enough values to unpack"."""
    with pytest.raises(ValueError, match=match):
        conv2d(jnp.ones(x_shape), jnp.ones(kernel_shape), groups=groups, algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ["auto", "onednn"])
def test_no_input_channels_and_a_broadcast_residual_compute_as_lax(algorithm):
    """Zero input channels (zeros, as lax gives) failed to build oneDNN's kernel; a residual of a broadcastable
    shape was refused by the fused epilogue while XLA's path broadcast it."""
    require_onednn()
    x, k = jnp.ones((2, 8, 8, 0)), jnp.ones((3, 3, 0, 16))
    np.testing.assert_array_equal(conv2d(x, k, algorithm=algorithm), jnp.zeros((2, 8, 8, 16)))
    rng = np.random.default_rng(0)
    x, k = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32), jnp.ones((3, 3, 16, 16)) / 100
    residual = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
    got = conv2d(x, k, residual=residual, relu=True, algorithm=algorithm)
    want = conv2d(x, k, residual=residual, relu=True, algorithm="xla")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_forced_algorithm_that_cannot_compute_a_shape_says_why():
    x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    with pytest.raises(ValueError, match=r"'gemm' computes ungrouped 1x1 convolutions only; this convolution is "
                                         r"3x3 stride 2x2 on 8x8x4"):
        conv2d(x, k, (2, 2), ((1, 1), (1, 1)), algorithm="gemm")
    with pytest.raises(ValueError, match=r"'winograd_f4' computes ungrouped 3x3 stride-1"):
        conv2d(x, k, (2, 2), ((1, 1), (1, 1)), algorithm="winograd_f4")
    with pytest.raises(ValueError, match=r"unknown convolution algorithm 'cudnn'"):
        conv2d(x, k, algorithm="cudnn")
    with pytest.raises(ValueError, match=r"three of those joined by '/'"):
        conv2d(x, k, algorithm="xla/winograd_f4")
    with pytest.raises(ValueError, match=r"'gemm' computes ungrouped 1x1"):
        conv2d(x, k, algorithm="xla/xla/gemm")


@pytest.mark.parametrize("algorithm", ["auto", "jax"])
@pytest.mark.parametrize("case", [(3, 1, 1, 2, 8, 8, 8, 8, ((-1, 1), (1, 0))),
                                  (1, 1, 1, 2, 6, 7, 8, 16, ((0, -1), (-2, 1))),
                                  (3, 2, 1, 2, 9, 9, 8, 8, ((1, -1), (0, 0)))], ids=case_id)
def test_negative_padding_is_computed_by_xla_under_every_choice(algorithm, case):
    """lax crops the input where padding is negative; the other algorithms pad with zeros only, so the choices
    hand such a layer to XLA's own (it had failed in oneDNN, ``jnp.pad`` or an index, or padded wrongly)."""
    ksize, stride, groups, *_, padding = case
    conv = lambda a, b: conv2d(a, b, (stride, stride), padding, groups, algorithm=algorithm)  # noqa: E731
    for part, got, want in zip(PARTS, value_and_grads(conv, *inputs(case, jnp.float32)), lax_passes(case)):
        assert_close(got, want, DEFAULT_TOLERANCE, f"{algorithm} {part}")
    assert choose(spec_of(case), "cpu") == choose(spec_of(case), "cpu", extension=False) == ("xla",) * 3


@pytest.mark.parametrize("algorithm", ["auto", "jax", "onednn", "onednn_winograd_f4", "gemm", "winograd_f4"])
def test_linear_transpose_gives_the_input_and_kernel_gradients(algorithm):
    """jax.linear_transpose of the convolution in x (and in the kernel) is the input (kernel) gradient, as for
    lax's: on every extension path it failed ("no transpose rule for custom_vmap_call"), the custom_jvp that
    wraps a fused epilogue being in the way of a plain convolution too."""
    if algorithm.startswith("onednn"):
        require_onednn()
    kernel_size = 1 if algorithm == "gemm" else 3
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kernel_size, kernel_size, 16, 24)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 8, 8, 24)), jnp.float32)
    ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, k: conv2d(x, k, algorithm=algorithm)
    for argnum, primal in ((0, x), (1, k)):
        transposed = [jax.jit(jax.linear_transpose(
            lambda a, f=f: f(a, k) if argnum == 0 else f(x, a), primal))(ct)[0] for f in (ours, ref)]
        assert_close(*transposed, 2e-5, f"{algorithm}, transposed in {'xk'[argnum]}")


def test_float64_convolutions_compute_in_float64_under_every_choice():
    """The 1x1 GEMM and the patch matmul of the kernel gradient (what "auto" and "jax" choose for float64)
    accumulated in float32: float64 results with float32's precision (1e-7 off lax in float64)."""
    from conftest import run_python

    out = run_python("""
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        from jax import lax
        from resnet_jax.ops import conv2d
        rng = np.random.default_rng(0)
        worst = 0.0
        for kh in (1, 3):
            x, k = jnp.asarray(rng.standard_normal((2, 8, 8, 16))), jnp.asarray(rng.standard_normal((kh, kh, 16, 32)))
            ref = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
            want, vjp = jax.vjp(ref, x, k)
            ct = jnp.asarray(rng.standard_normal(want.shape))
            for algorithm in ("auto", "jax"):
                got, got_vjp = jax.vjp(lambda x, k: conv2d(x, k, algorithm=algorithm), x, k)
                assert got.dtype == jnp.float64
                for a, b in zip((got, *got_vjp(ct)), (want, *vjp(ct))):
                    worst = max(worst, float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))))
        print(worst)
    """).stdout
    assert float(out) < 1e-13


def test_extension_algorithms_refuse_other_backends():
    g = ConvSpec(1, 8, 8, 4, 4, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")
    for name in EXTENSION:
        assert "runs on CPU only (this backend is gpu)" in REGISTRY[name].refusal(g, "gpu")


def test_auto_choice_per_backend_shape_and_pass():
    g3 = ConvSpec(128, 16, 16, 128, 128, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")
    g1 = ConvSpec(128, 16, 16, 128, 256, (1, 1), (2, 2), ((0, 0), (0, 0)), 1, "float32")
    stem = ConvSpec(128, 32, 32, 3, 64, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")
    big_stem = ConvSpec(32, 224, 224, 3, 64, (7, 7), (2, 2), ((3, 3), (3, 3)), 1, "float32")
    for g in (g3, g1, stem, big_stem):
        assert choose(g, "gpu") == choose(g, "tpu") == ("xla",) * 3  # cuDNN / the TPU compiler choose for themselves
        assert all(REGISTRY[name].refusal(g, "cpu") is None for name in choose(g, "cpu"))
        assert not any(REGISTRY[name].cpu_only for name in choose(g, "cpu", extension=False))
    assert choose(g3, "cpu", extension=False) == ("xla", "xla", "winograd_f4")
    assert choose(g1, "cpu", extension=False) == ("gemm", "gemm", "gemm")
    assert choose(big_stem, "cpu", extension=False) == ("xla", "xla", "matmul_grad")
    if onednn.available():
        assert choose(g3, "cpu") == ("onednn_winograd_f4",) * 3
        assert choose(g1, "cpu") == ("onednn", "onednn_gemm", "onednn_gemm")
        assert choose(stem, "cpu") == choose(big_stem, "cpu") == ("onednn",) * 3
        small = ConvSpec(8, 16, 16, 128, 128, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")  # 0.6 GFLOP
        assert choose(small, "cpu") == ("onednn_winograd_f4",) * 3  # 128 tiles of 4x4
        few = ConvSpec(2, 7, 7, 512, 512, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")  # 8 tiles
        assert choose(few, "cpu") == ("onednn",) * 3  # transforming the kernel costs more than Winograd saves


def test_auto_runs_bfloat16_1x1_layers_on_onednn_where_the_cpu_has_bfloat16():
    """oneDNN's GEMM is float32 only, and "auto" used to send bfloat16 1x1 layers to XLA's bfloat16 dot, whose
    input gradient ran ResNet-50's 1x1 layers at 9-198 GFLOP/s against oneDNN's direct kernels' 34-388
    (BENCHMARKS.md, Machine A2, 2026-12-03). The direct kernels must compute them, within bf16's rounding."""
    g1 = ConvSpec(32, 14, 14, 256, 1024, (1, 1), (1, 1), ((0, 0), (0, 0)), 1, "bfloat16")
    native = onednn.available() and cpu.native_bfloat16()
    assert choose(g1, "cpu") == (("onednn",) * 3 if native else ("gemm",) * 3)
    assert choose(g1, "cpu", extension=False) == ("gemm",) * 3
    assert choose(dataclasses.replace(g1, dtype="float32"), "cpu")[1:] == (
        ("onednn_gemm",) * 2 if onednn.available() else ("gemm",) * 2)  # float32 keeps the GEMM
    for stride in (1, 2):
        case = (1, stride, 1, 4, 10, 14, 32, 48, ((0, 0), (0, 0)))  # non-square, strided and not
        x, k, dy = inputs(case, jnp.bfloat16)
        ours = value_and_grads(lambda a, b, s=stride: conv2d(a, b, s, "VALID"), x, k, dy)
        up = lambda a: a.astype(jnp.float32)  # noqa: E731
        want = value_and_grads(lax_of(case), up(x), up(k), up(dy))
        for part, got, exp in zip(PARTS, ours, want):
            assert got.dtype == jnp.bfloat16
            assert_close(up(got), exp, 3e-2, f"bfloat16 1x1 stride {stride} {part}")


def test_passes_from_different_algorithms_compose_into_one_exact_convolution():
    from resnet_jax.ops.conv import _composed

    case = CASES[3]
    *_, padding = case
    passes = ("im2col", "winograd_f2", "winograd_f4")
    ours = value_and_grads(lambda a, b: _composed(a, b, None, None, ConvSpec.of(a, b, (1, 1), padding, 1), False,
                                                  passes), *inputs(case, jnp.float32))
    for part, got, exp in zip(PARTS, ours, lax_passes(case)):
        assert_close(got, exp, 1e-4, part)


def test_module_is_a_drop_in_for_nn_conv():
    import flax.linen as nn
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    for bias in (False, True):
        args = dict(features=4, kernel_size=(3, 3), strides=2, padding=[(1, 1), (1, 1)], use_bias=bias)
        ref = nn.Conv(**args)
        params = ref.init(jax.random.key(0), x)
        ours = Conv(**args, algorithm="matmul_grad")
        assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
        np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)


MODEL_IMPLS = ["xla", "matmul_grad", "auto", "onednn", "winograd_f4"]


@pytest.mark.long  # a whole model compiled under every conv_impl
@pytest.mark.parametrize("name, shape", [("resnet18_cifar", (2, 32, 24, 3)), ("resnext50_32x4d", (2, 40, 56, 3))],
                         ids=["basic_cifar_stem", "grouped_bottleneck_imagenet_stem"])
def test_model_params_outputs_and_grads_agree_across_conv_impls(name, shape):
    """One block per stage: every layer kind (the stem, 3x3 and grouped convolutions, strided 1x1 projections,
    the fused residual) is there, and an algorithm's error would show in any block of any depth.

    Gradients are compared in inference mode: through train-mode BatchNorm over 2 images, a 1e-6 change in
    a convolution's output moves some kernel gradients of this loss by 5% (measured with float64 as the
    truth, even for XLA's own convolution with 1e-6 noise added), so train mode is checked on its outputs and
    statistics, at a tolerance that allows for that amplification."""
    x = jax.random.normal(jax.random.key(0), shape)
    impls = [i for i in MODEL_IMPLS if not REGISTRY.get(i) or not REGISTRY[i].cpu_only or onednn.available()]

    def everything(model):
        """Initial variables, inference loss and gradient, and a train-mode step, in one compiled function."""
        def run(key):
            v = model.init(key, x)
            loss = lambda params: jnp.sum(model.apply({**v, "params": params}, x) ** 2)  # noqa: E731
            return v, jax.value_and_grad(loss)(v["params"]), model.apply(v, x, train=True, mutable=["batch_stats"])
        return jax.jit(run)(jax.random.key(0))

    models = [create_model(name, stage_sizes=(1, 1, 1, 1), num_classes=5, conv_impl=impl) for impl in impls]
    v0, (l0, g0), t0 = everything(models[0])
    for impl, model in zip(impls[1:], models[1:]):
        v1, (l1, g1), t1 = everything(model)
        # parameters never depend on the algorithm, so the gradients below are taken at the same point
        assert jax.tree.map(jnp.shape, v1) == jax.tree.map(jnp.shape, v0)
        jax.tree.map(np.testing.assert_array_equal, v1, v0)
        np.testing.assert_allclose(l1, l0, rtol=1e-4, err_msg=impl)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()), err_msg=impl)
        for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t0)):
            np.testing.assert_allclose(a, b, atol=1e-3 * float(jnp.abs(b).max()), err_msg=impl)


def test_model_conv_impl_applies_where_it_can_and_auto_elsewhere():
    """A model-wide algorithm that computes only some layers (Winograd: 3x3 stride 1) runs those, "auto" the
    rest, so conv_impl="winograd_f4" is usable on a whole ResNet; conv2d itself refuses (tested above)."""
    model = create_model("resnet18_cifar", stage_sizes=(1, 1, 1, 1), num_classes=3, conv_impl="winograd_f4")
    x = jnp.ones((1, 16, 16, 3))
    y = jax.jit(lambda x: model.apply(model.init(jax.random.key(0), x), x))(x)
    assert y.shape == (1, 3)


def test_unknown_conv_impl_is_a_clear_error():
    with pytest.raises(ValueError, match="conv_impl"):
        create_model("resnet18", conv_impl="cudnn")


def test_bfloat16_computes_in_float32_where_the_cpu_has_no_bfloat16_instructions():
    """There oneDNN refuses bfloat16 and XLA emulates it (a ResNet-18-CIFAR step 2.8x slower than float32,
    BENCHMARKS.md): "auto" and "jax" upcast the convolution, a forced algorithm computes as named."""
    from resnet_jax.ops import rules

    assert rules.compute_dtype("bfloat16", "auto", "cpu", native_bfloat16=False) == "float32"
    assert rules.compute_dtype("bfloat16", "jax", "cpu", native_bfloat16=False) == "float32"
    assert rules.compute_dtype("bfloat16", "auto", "cpu", native_bfloat16=True) == "bfloat16"
    assert rules.compute_dtype("bfloat16", "xla", "cpu", native_bfloat16=False) == "bfloat16"
    assert rules.compute_dtype("bfloat16", "auto", "gpu", native_bfloat16=False) == "bfloat16"
    assert rules.compute_dtype("float32", "auto", "cpu", native_bfloat16=False) == "float32"
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (2, 8, 8, 16)).astype(jnp.bfloat16)
    k = (jax.random.normal(keys[1], (3, 3, 16, 16)) / 12).astype(jnp.bfloat16)
    f = lambda a, b: conv2d(a, b, (1, 1), ((1, 1), (1, 1)), algorithm="auto", relu=True)  # noqa: E731
    y = jax.jit(f)(x, k)
    assert y.dtype == jnp.bfloat16
    dx = jax.jit(jax.grad(lambda a: jnp.sum(f(a, k).astype(jnp.float32))))(x)
    assert dx.dtype == jnp.bfloat16
    if cpu.native_bfloat16():
        return  # this CPU computes bfloat16 natively; the rule above covers the other kind
    text = str(jax.make_jaxpr(f)(x, k))
    assert "new_dtype=float32" in text  # the convolution runs on upcast operands
    want = jax.nn.relu(lax.conv_general_dilated(x.astype(jnp.float32), k.astype(jnp.float32), (1, 1),
                                                ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("height,width", [(1, 1), (2, 1), (1, 3)])
def test_bfloat16_kernel_gradient_of_taps_that_see_only_padding_is_zero(height, width):
    """Used to be: oneDNN's bfloat16 kernel gradient left the accumulators of taps that read only padding (a
    1-pixel-wide input at a stride-2 3x3) as an earlier call had left them in the scratchpad: up to 1e31 came
    back, where the gradient is 0 (``onednn`` and ``auto``). A larger kernel gradient runs first to leave values
    there; the reference is XLA in float32 on the same bfloat16 values."""
    require_onednn()
    rng = np.random.default_rng(0)

    def kernel_grad(x, k, dy, algorithm):
        return jax.vjp(lambda kk: conv2d(x, kk, 2, "SAME", algorithm=algorithm), k)[1](dy)[0]

    def case(h, w, algorithm):
        x = jnp.asarray(rng.standard_normal((1, h, w, 8)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal(conv2d(x, k, 2, "SAME", algorithm="xla").shape), jnp.bfloat16)
        f32 = [a.astype(jnp.float32) for a in (x, k, dy)]
        return np.asarray(kernel_grad(x, k, dy, algorithm).astype(jnp.float32)), np.asarray(kernel_grad(*f32, "xla"))

    algorithms = ("onednn", "auto")
    if not cpu.native_bfloat16():  # oneDNN's bfloat16 kernels need AVX-512 BF16 or AMX; "auto" computes in float32
        with pytest.raises(ValueError, match="algorithm 'onednn' computes float32 only, not bfloat16"):
            case(height, width, "onednn")
        algorithms = ("auto",)
    for algorithm in algorithms:
        case(6, 6, algorithm)
        got, want = case(height, width, algorithm)
        np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max(), err_msg=algorithm)
