"""The 1x1 kernel gradient ``x^T @ dy`` by the extension's own outer-product kernel (csrc/outer_products.h):
oneDNN's GEMM read ``x`` transposed at ~80-130 GFLOP/s on most of ResNet-50's channel pairs on AVX2 (and the
small ones at 180-250 on AVX-512), so there the pixels
are summed as outer products of packed panels. The sum must be the product for any sizes (tiles past out's
edge, a short last block, fewer pixels than threads), the kernel gradient must equal lax's, the call must be
wired where the rule says, and the rule must be the measured one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import require_onednn
from resnet_jax.ops import ConvSpec
from resnet_jax.ops.onednn import algorithms, calls

AVX2 = "flags\t\t: fpu sse2 avx avx2 fma"
AVX512 = AVX2 + " avx512f avx512bw"


def _require_avx2():
    require_onednn()
    if not algorithms.own_kernel_built():
        pytest.skip("the own kernel is built for CPUs with AVX2 and FMA; this one has neither")


@pytest.mark.parametrize("pixels, rows, cols", [
    (100, 13, 21),  # neither side a multiple of the 6 x 16 (AVX2) or 8 x 32 (AVX-512) tile
    (96, 24, 32),  # whole tiles only, of either size
    (97, 8, 64),  # one pixel past AVX-512's block of 96
    (1, 5, 3),  # fewer pixels than threads: one thread sums nothing
    (0, 4, 17),  # no pixels at all: zeros
    (5000, 70, 66),  # several pixel blocks (~700 pixels here on AVX2, 96 on AVX-512), the last short
    (300, 256, 1024),  # one block of 71 pixels and a short one
])
def test_outer_products_sum_to_the_product(pixels, rows, cols):
    _require_avx2()
    rng = np.random.default_rng(pixels + rows)
    x = rng.standard_normal((pixels, rows)).astype(np.float32)
    dy = rng.standard_normal((pixels, cols)).astype(np.float32)
    got = jax.jit(lambda a, b: calls.matmul(a, b, transpose_a=True, own_kernel=True))(x, dy)
    want = x.astype(np.float64).T @ dy
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * max(np.abs(want).max(), 1))


@pytest.mark.parametrize("stride", [1, 2])
def test_kernel_gradient_by_the_own_kernel_equals_lax(monkeypatch, stride):
    """A 1x1 layer of 24 -> 40 channels with the rule forced to the own kernel."""
    _require_avx2()
    monkeypatch.setattr(algorithms, "kernel_grad_own_kernel", lambda rows, cols: True)
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.standard_normal((2, 14, 14, 24)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 24, 40)), jnp.float32)
    out = (2, 14 // stride, 14 // stride, 40)
    dy = jnp.asarray(rng.standard_normal(out), jnp.float32)
    spec = ConvSpec(2, 14, 14, 24, 40, (1, 1), (stride, stride), ((0, 0), (0, 0)), 1, "float32")
    gemm = next(a for a in algorithms.ALGORITHMS if a.name == "onednn_gemm")
    got = jax.jit(lambda x, dy: gemm.kernel_grad(x, dy, spec))(x, dy)
    hlo = jax.jit(lambda x, dy: gemm.kernel_grad(x, dy, spec)).lower(x, dy).as_text()
    assert "own_kernel = 1" in hlo
    _, vjp = jax.vjp(lambda k: lax.conv_general_dilated(x, k, (stride, stride), "VALID",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC")), kernel)
    want = vjp(dy)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


# (rows, cols) -> whether the own kernel won, AVX2 (BENCHMARKS.md, 2026-12-05); ties left to oneDNN
MEASURED = {(256, 128): True, (128, 512): True, (512, 128): True, (256, 512): True, (512, 256): True,
            (256, 1024): True, (1024, 256): True, (128, 2048): True, (2048, 128): True, (384, 512): True,
            (512, 512): True, (64, 1024): True, (2048, 64): True,
            (64, 64): False, (64, 256): False, (256, 64): False, (128, 64): False, (384, 1024): False,
            (512, 1024): False, (1024, 512): False, (512, 2048): False, (2048, 384): False, (1024, 2048): False}
# the same on AVX-512, its 8 x 32 tile (BENCHMARKS.md, 2026-12-06, eighth session); within 3% left out
MEASURED_AVX512 = {(64, 64): True, (64, 256): True, (256, 64): True, (256, 128): True, (128, 512): True,
                   (512, 128): True, (256, 512): True, (512, 256): True, (64, 1024): True, (1024, 128): True,
                   (128, 1024): True, (2048, 64): True, (64, 2048): True,
                   (1024, 256): False, (512, 1024): False, (1024, 512): False, (512, 2048): False,
                   (2048, 512): False, (1024, 2048): False, (2048, 1024): False, (2048, 2048): False}


@pytest.mark.parametrize("flags, measured", [(AVX2, MEASURED), (AVX512, MEASURED_AVX512)], ids=["avx2", "avx512"])
def test_the_rule_is_the_measured_one(monkeypatch, flags, measured):
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: flags)
    assert {pair: algorithms.kernel_grad_own_kernel(*pair) for pair in measured} == measured
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: "flags\t\t: fpu sse2 avx")  # the kernel needs AVX2 + FMA
    assert not any(algorithms.kernel_grad_own_kernel(*pair) for pair in measured)
