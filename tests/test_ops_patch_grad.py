"""The kernel gradient as outer products over blocks of input patches ("onednn_matmul_grad", csrc/patches.cc):
the blocks must sum to lax's kernel gradient for any geometry (padding on either side, strides, pixels that do
not fill the last block, patch rows longer than the kernel's row chunk), and "auto" must take it exactly where it
was measured to win."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import require_onednn
from resnet_jax.ops import ConvSpec, choose, conv2d
from resnet_jax.ops.onednn import algorithms, calls

AVX2 = "flags\t\t: fpu sse2 avx avx2 fma"
AVX512 = AVX2 + " avx512f avx512bw"


@pytest.mark.parametrize("image, kernel, stride, padding, block", [
    (9, 3, 2, ((1, 1), (1, 1)), 7),  # a ResNet downsampling 3x3; 25 pixels per image in blocks of 7
    (8, 3, 2, ((0, 1), (0, 1)), 5),  # "SAME" on an even image pads one side only
    (15, 7, 2, ((3, 3), (3, 3)), 4096),  # a stem; one block larger than every pixel
    (10, 3, 3, ((2, 0), (0, 2)), 1),  # stride 3, lopsided padding, one pixel per block
    (6, 3, 1, ((1, 1), (1, 1)), 16),  # stride 1
    (7, 1, 2, ((0, 0), (0, 0)), 3),  # a 1x1 kernel
    (9, 3, 2, ((1, 1), (1, 1)), 128),  # patch rows of 9 x 12 = 108: two row chunks of the packed panels
])
def test_blocks_sum_to_laxs_kernel_gradient(image, kernel, stride, padding, block):
    require_onednn()
    rng = np.random.default_rng(image * block)
    x = jnp.asarray(rng.standard_normal((2, image, image, 12)), jnp.float32)
    k = jnp.zeros((kernel, kernel, 12, 10), jnp.float32)
    spec = ConvSpec.of(x, k, stride, padding, 1)
    dy = jnp.asarray(rng.standard_normal(spec.y_shape), jnp.float32)
    got = jax.jit(lambda x, dy: calls.patch_kernel_grad(x, dy, spec, block))(x, dy)
    conv = lambda k: lax.conv_general_dilated(x, k, (stride, stride), padding,  # noqa: E731
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                              precision=lax.Precision.HIGHEST)
    want = jax.vjp(conv, k)[1](dy)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=2e-5 * float(jnp.abs(want).max()))


def spec(channels, kernel=3, stride=2, image=56, dtype="float32"):
    pad = kernel // 2
    return ConvSpec(32, image, image, channels, 2 * channels, (kernel, kernel), (stride, stride),
                    ((pad, pad), (pad, pad)), 1, dtype)


@pytest.mark.parametrize("flags", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_auto_takes_it_for_strided_layers(monkeypatch, flags):
    """Measured on AVX2 (BENCHMARKS.md, 2026-12-05) and AVX-512 (2026-12-06, eighth session): ahead on every
    stride-2 3x3 layer of ResNet-18/50 and ResNet-18-CIFAR, behind on ResNet-50's 3-channel 7x7 stem."""
    require_onednn()
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: flags)
    for channels in (64, 128, 256, 512):
        assert choose(spec(channels), "cpu", measured=False) == ("onednn", "onednn", "onednn_matmul_grad")
    stem = ConvSpec(32, 224, 224, 3, 64, (7, 7), (2, 2), ((3, 3), (3, 3)), 1, "float32")
    assert choose(stem, "cpu", measured=False) == ("onednn",) * 3
    assert choose(spec(64, stride=1, image=8), "cpu", measured=False) == ("onednn_winograd_f4",) * 3  # stride 1
    grouped = ConvSpec(32, 56, 56, 128, 128, (3, 3), (2, 2), ((1, 1), (1, 1)), 32, "float32")
    assert choose(grouped, "cpu", measured=False) == ("onednn",) * 3
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: "flags\t\t: fpu sse2 avx")  # the kernel needs AVX2 + FMA
    assert choose(spec(128), "cpu", measured=False) == ("onednn",) * 3


def test_auto_computes_a_strided_layers_kernel_gradient_by_patch_blocks(monkeypatch):
    """The choice reaches the compiled gradient: one call of the patch handler, and lax's values."""
    require_onednn()
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: AVX2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 16, 16, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)
    loss = lambda conv: lambda k: jnp.sum(jnp.sin(conv(x, k)))  # noqa: E731
    ours = jax.jit(jax.grad(loss(lambda x, k: conv2d(x, k, 2, ((1, 1), (1, 1))))))
    assert ours.lower(k).as_text().count("ResnetJaxPatchKernelGrad") == 1
    ref = jax.grad(loss(lambda x, k: lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)),
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                              precision=lax.Precision.HIGHEST)))(k)
    np.testing.assert_allclose(np.asarray(ours(k)), np.asarray(ref), rtol=0, atol=1e-4 * float(jnp.abs(ref).max()))


def test_it_refuses_cpus_without_avx2(monkeypatch):
    """The outer-product kernel is AVX2 code: elsewhere the algorithm says so, and "auto" keeps oneDNN's direct
    kernel gradient."""
    require_onednn()
    monkeypatch.setattr(algorithms.cpu, "flags", lambda: "flags\t\t: fpu sse2 avx")
    assert "AVX2 and FMA" in next(a for a in algorithms.ALGORITHMS if a.name == "onednn_matmul_grad").limits(spec(64))
    assert choose(spec(64), "cpu", measured=False) == ("onednn",) * 3
