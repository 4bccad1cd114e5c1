"""The extension's Winograd F(4,3) on shapes that take each of its schedules (csrc/winograd.cc): "blocked" with
several blocks of tiles and a partial last one, and "whole" (a transformed kernel over 4 MB), all three passes
against lax's convolution. The layer tests (test_ops_conv.py) use few channels and fewer tiles than one block,
so this is where the layout of the transformed-tile matrices (their skewed slices) is checked in full."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import require_onednn
from resnet_jax.ops import conv2d

PADDING = ((1, 1), (1, 1))
CASES = {  # (batch, height, width, in, out)
    # 16 channels: blocks of 64 tiles; 3 x 5 x 5 tiles of 4x4 = 75, so one full block and one of 11
    "blocked, partial last block": (3, 17, 19, 16, 24),
    # 36 x 160 x 192 floats of transformed kernel (4.4 MB): one product over every tile
    "whole": (2, 9, 10, 160, 192),
}


def passes(fn, x, k, dy):
    y, vjp = jax.vjp(fn, x, k)
    return (y, *vjp(dy))


@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
def test_each_schedule_matches_lax_in_value_and_both_gradients(shape):
    require_onednn()
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((n, h, w, cin), np.float32), rng.standard_normal((n, h, w, cout), np.float32)
    k = rng.standard_normal((3, 3, cin, cout), np.float32)
    ours = jax.jit(lambda *a: passes(lambda x, k: conv2d(x, k, (1, 1), PADDING,
                                                         algorithm="onednn_winograd_f4"), *a))(x, k, dy)
    theirs = jax.jit(lambda *a: passes(lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), PADDING, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST),
        *a))(x, k, dy)
    for part, got, want in zip(("output", "d/dinput", "d/dkernel"), ours, theirs):
        scale = float(jnp.abs(want).max())
        err = float(jnp.abs(got - want).max()) / scale
        assert err < 1e-4, f"{part}: {err:.1e} of the largest value"
