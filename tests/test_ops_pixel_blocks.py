"""The 1x1 kernel gradient ``x^T @ dy`` by pixel blocks (csrc/matmul.cc): oneDNN's GEMM read ``x`` transposed at
half speed on some channel pairs, so there the pixels go in blocks, both operands transposed into buffers first.
The blocks must sum to the product for any sizes (remainders of the 8x8 transposes and of the last block), the
kernel gradient must equal lax's, and the rule must be the measured one."""

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


@pytest.mark.parametrize("pixels, rows, cols, block", [
    (100, 13, 21, 24),  # neither side a multiple of 8; the last block short
    (96, 16, 8, 32),  # whole 8x8 tiles only
    (7, 9, 10, 3),
    (5, 3, 3, 1),  # one pixel per block
    (40, 24, 72, 4096),  # a block larger than the pixels: one short block
    (130, 70, 66, 64),  # past one 64x64 transpose tile each way
])
def test_blocks_sum_to_the_product(pixels, rows, cols, block):
    require_onednn()
    rng = np.random.default_rng(pixels)
    x = rng.standard_normal((pixels, rows)).astype(np.float32)
    dy = rng.standard_normal((pixels, cols)).astype(np.float32)
    got = jax.jit(lambda a, b: calls.matmul(a, b, transpose_a=True, pixel_block=block))(x, dy)
    want = x.astype(np.float64).T @ dy
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("stride", [1, 2])
def test_kernel_gradient_by_blocks_equals_lax(monkeypatch, stride):
    """A 1x1 layer of 24 -> 40 channels with the rule forced to blocks of 8 pixels (13 blocks, the last short)."""
    require_onednn()
    monkeypatch.setattr(algorithms, "kernel_grad_pixel_block", lambda rows, cols: 8)
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.standard_normal((2, 14, 14, 24)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((1, 1, 24, 40)), jnp.float32)
    out = (2, 14 // stride, 14 // stride, 40)
    dy = jnp.asarray(rng.standard_normal(out), jnp.float32)
    spec = ConvSpec(2, 14, 14, 24, 40, (1, 1), (stride, stride), ((0, 0), (0, 0)), 1, "float32")
    gemm = next(a for a in algorithms.ALGORITHMS if a.name == "onednn_gemm")
    got = jax.jit(lambda x, dy: gemm.kernel_grad(x, dy, spec))(x, dy)
    hlo = jax.jit(lambda x, dy: gemm.kernel_grad(x, dy, spec)).lower(x, dy).as_text()
    assert "pixel_block = 8" in hlo
    _, vjp = jax.vjp(lambda k: lax.conv_general_dilated(x, k, (stride, stride), "VALID",
                                                       dimension_numbers=("NHWC", "HWIO", "NHWC")), kernel)
    want = vjp(dy)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


# (rows, cols) -> whether the blocks won, 6272 pixels, AVX2 (BENCHMARKS.md, 2026-12-04); ties left to oneDNN
MEASURED = {(64, 1024): True, (128, 2048): True, (256, 1024): True, (1024, 256): True, (2048, 64): True,
            (256, 512): True, (512, 256): True, (384, 512): True, (512, 512): True,
            (64, 256): False, (128, 128): False, (256, 256): False, (256, 384): False, (512, 128): False,
            (384, 1024): False, (512, 1024): False, (1024, 1024): False, (2048, 512): False}


@pytest.mark.parametrize("pair", MEASURED, ids=[f"{r}x{c}" for r, c in MEASURED])
def test_the_rule_is_the_measured_one(monkeypatch, pair):
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: AVX2)
    assert (algorithms.kernel_grad_pixel_block(*pair) > 0) == MEASURED[pair]
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: AVX512)  # other GEMM kernels there, not measured
    assert algorithms.kernel_grad_pixel_block(*pair) == 0
