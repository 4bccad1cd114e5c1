"""The extension's C++ handlers check every operand they are handed, against the others, before touching memory:
a wrong shape or dtype is an error in Python that names the operand, not a read past a buffer's end. A failed
allocation is an error too, and the process goes on. The handlers are called here directly through
``jax.ffi.ffi_call``, as ``onednn/calls.py`` calls them, but with the operands a caller could get wrong."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_onednn, run_python

PAD = (1, 1, 1, 1)  # top, bottom, left, right
X = np.ones((2, 8, 8, 4), np.float32)
W = np.ones((3, 3, 4, 6), np.float32)
Y = (2, 8, 8, 6)
NO_EPILOGUE = dict(has_bias=0, has_residual=0, relu=0)
CONV = dict(strides=(1, 1), padding=PAD, groups=1, dilation=(1, 1))
WINOGRAD = dict(padding=PAD, m=4)
WINOGRAD_FORWARD = dict(WINOGRAD, transposed_kernel=0)
PATCHES = dict(strides=(1, 1), padding=PAD, pixel_block=16)
POOL = dict(window=(3, 3), strides=(2, 2), padding=PAD)  # X's 8x8 pooled to 4x4
POOLED, FIRST = np.ones((2, 4, 4, 4), np.float32), np.zeros((2, 4, 4, 4), np.int8)


def call(target, result_shape, *operands, result_dtype=np.float32, **attrs):
    require_onednn()  # registers the targets
    values = {k: np.asarray(v, np.int64) if isinstance(v, tuple) else np.int64(v) for k, v in attrs.items()}
    f = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(result_shape, result_dtype), vmap_method="sequential")
    return np.asarray(jax.block_until_ready(f(*operands, **values)))


def bf16(a):
    return jnp.asarray(a, jnp.bfloat16)


def test_well_formed_calls_run():
    """The baseline the refusals below differ from in one operand each."""
    want = jax.lax.conv_general_dilated(X, W, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    bias, residual = np.arange(6, dtype=np.float32), np.full(Y, 0.5, np.float32)
    for target, attrs in (("ResnetJaxConvForward", CONV), ("ResnetJaxWinogradForward", WINOGRAD_FORWARD)):
        np.testing.assert_allclose(call(target, Y, X, W, **attrs, **NO_EPILOGUE), want, rtol=1e-5, atol=1e-4)
        got = call(target, Y, X, W, bias, residual, **attrs, has_bias=1, has_residual=1, relu=0)
        np.testing.assert_allclose(got, want + bias + 0.5, rtol=1e-5, atol=1e-4)
    # an input gradient's kernel: the extension reads a (3, 3, O, C) kernel flipped, its channels exchanged
    k = np.random.default_rng(0).standard_normal((3, 3, 6, 4)).astype(np.float32)
    flipped = jax.lax.conv_general_dilated(X, np.flip(k, (0, 1)).transpose(0, 1, 3, 2), (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = call("ResnetJaxWinogradForward", Y, X, k, **dict(WINOGRAD_FORWARD, transposed_kernel=1), **NO_EPILOGUE)
    np.testing.assert_allclose(got, flipped, rtol=1e-5, atol=1e-4)
    dy = np.ones(Y, np.float32)
    assert call("ResnetJaxConvBackwardData", X.shape, dy, W, **CONV).shape == X.shape
    assert call("ResnetJaxMaxPoolGrad", X.shape, POOLED, FIRST, **POOL).shape == X.shape
    for target, attrs in (("ResnetJaxConvBackwardWeights", CONV), ("ResnetJaxWinogradBackwardWeights", WINOGRAD),
                          ("ResnetJaxPatchKernelGrad", PATCHES)):
        assert call(target, W.shape, X, dy, **attrs).shape == W.shape


REFUSED = {
    "winograd kernel of other channels": (
        "ResnetJaxWinogradForward", Y, [X, np.ones((3, 3, 4, 5), np.float32)], dict(**WINOGRAD_FORWARD, **NO_EPILOGUE),
        "the kernel must be HWIO (3, 3, C, O)"),
    "winograd transposed kernel not (3, 3, O, C)": (
        "ResnetJaxWinogradForward", Y, [X, W], dict(WINOGRAD_FORWARD, transposed_kernel=1, **NO_EPILOGUE),
        "a transposed kernel must be (3, 3, O, C)"),
    "winograd 5x5 kernel": (
        "ResnetJaxWinogradForward", Y, [X, np.ones((5, 5, 4, 6), np.float32)], dict(**WINOGRAD_FORWARD, **NO_EPILOGUE),
        "the kernel must be HWIO (3, 3, C, O)"),
    "winograd bfloat16 kernel": (
        "ResnetJaxWinogradForward", Y, [X, bf16(W)], dict(**WINOGRAD_FORWARD, **NO_EPILOGUE),
        "the kernel (or its gradient) must be float32"),
    "winograd bfloat16 input for a float32 output": (
        "ResnetJaxWinogradForward", Y, [bf16(X), W], dict(**WINOGRAD_FORWARD, **NO_EPILOGUE),
        "both float32 or both bfloat16"),
    "winograd bfloat16 residual for a float32 output": (
        "ResnetJaxWinogradForward", Y, [X, W, bf16(np.ones(Y))],
        dict(**WINOGRAD_FORWARD, has_bias=0, has_residual=1, relu=0), "the residual must have the output's shape and dtype"),
    "winograd bias one short": (
        "ResnetJaxWinogradForward", Y, [X, W, np.ones(5, np.float32)],
        dict(**WINOGRAD_FORWARD, has_bias=1, has_residual=0, relu=0), "the bias must be float32 of shape (O,)"),
    "winograd bfloat16 bias": (
        "ResnetJaxWinogradForward", Y, [X, W, bf16(np.ones(6))],
        dict(**WINOGRAD_FORWARD, has_bias=1, has_residual=0, relu=0), "the bias must be float32 of shape (O,)"),
    "winograd residual of other channels": (
        "ResnetJaxWinogradForward", Y, [X, W, np.ones((2, 8, 8, 5), np.float32)],
        dict(**WINOGRAD_FORWARD, has_bias=0, has_residual=1, relu=0), "the residual must have the output's shape and dtype"),
    "winograd kernel gradient of other channels": (
        "ResnetJaxWinogradBackwardWeights", (3, 3, 4, 5), [X, np.ones(Y, np.float32)], WINOGRAD,
        "the kernel must be HWIO (3, 3, C, O)"),
    "winograd negative padding": (
        "ResnetJaxWinogradForward", (2, 4, 4, 6), [X, W],
        dict(padding=(-1, -1, -1, -1), m=4, transposed_kernel=0, **NO_EPILOGUE),
        "negative padding"),
    "conv bias one short": (
        "ResnetJaxConvForward", Y, [X, W, np.ones(5, np.float32)], dict(**CONV, has_bias=1, has_residual=0, relu=0),
        "the bias must be float32 or bfloat16 of shape (O,)"),
    # as many bytes as the output, but not its shape (a check of the byte count alone lets this through)
    "conv residual of the output's size but not its shape": (
        "ResnetJaxConvForward", Y, [X, W, np.ones((2, 8, 6, 8), np.float32)],
        dict(**CONV, has_bias=0, has_residual=1, relu=0), "the residual must have the output's shape and dtype"),
    "conv bfloat16 kernel for float32 input": (
        "ResnetJaxConvForward", Y, [X, bf16(W)], dict(**CONV, **NO_EPILOGUE), "must share one dtype"),
    "conv output taller than the geometry gives": (
        "ResnetJaxConvForward", (2, 9, 8, 6), [X, W], dict(**CONV, **NO_EPILOGUE), "do not follow from the input"),
    "conv zero stride": (
        "ResnetJaxConvForward", Y, [X, W], dict(CONV, strides=(0, 1), **NO_EPILOGUE), "do not follow from the input"),
    "conv zero dilation": (
        "ResnetJaxConvForward", Y, [X, W], dict(CONV, dilation=(1, 0), **NO_EPILOGUE), "do not follow from the input"),
    # the output of an undilated kernel, but the call says dilation 2 (whose window is 5x5)
    "conv dilation the output does not have": (
        "ResnetJaxConvBackwardData", X.shape, [np.ones(Y, np.float32), W], dict(CONV, dilation=(2, 2)),
        "do not follow from the input"),
    "conv input gradient with a bfloat16 kernel": (
        "ResnetJaxConvBackwardData", X.shape, [np.ones(Y, np.float32), bf16(W)], CONV, "must share one dtype"),
    "patch kernel gradient of an output gradient the geometry does not give": (
        "ResnetJaxPatchKernelGrad", W.shape, [X, np.ones((2, 4, 4, 6), np.float32)], PATCHES, "inconsistent shapes"),
    "patch kernel gradient of other output channels": (
        "ResnetJaxPatchKernelGrad", W.shape, [X, np.ones((2, 8, 8, 5), np.float32)], PATCHES, "inconsistent shapes"),
    "patch kernel gradient with zero stride": (
        "ResnetJaxPatchKernelGrad", W.shape, [X, np.ones(Y, np.float32)], dict(PATCHES, strides=(1, 0)),
        "inconsistent shapes"),
    "patch kernel gradient without a pixel block": (
        "ResnetJaxPatchKernelGrad", W.shape, [X, np.ones(Y, np.float32)], dict(PATCHES, pixel_block=0),
        "pixel_block must be positive"),
    "patch kernel gradient of bfloat16 operands": (
        "ResnetJaxPatchKernelGrad", W.shape, [bf16(X), bf16(np.ones(Y))], PATCHES, "expected F32 but got BF16"),
    "max-pool gradient with indices of another shape": (
        "ResnetJaxMaxPoolGrad", X.shape, [POOLED, np.zeros((2, 4, 4, 3), np.int8)], POOL, "inconsistent shapes"),
    "max-pool gradient onto an input the geometry does not give": (
        "ResnetJaxMaxPoolGrad", (2, 12, 8, 4), [POOLED, FIRST], POOL, "inconsistent shapes"),
    "max-pool gradient of a window with more taps than int8 indices name": (
        "ResnetJaxMaxPoolGrad", (2, 16, 16, 4), [np.ones((2, 1, 1, 4), np.float32), np.zeros((2, 1, 1, 4), np.int8)],
        dict(window=(16, 16), strides=(1, 1), padding=(0, 0, 0, 0)), "inconsistent shapes"),
    "max-pool gradient with float32 indices": (
        "ResnetJaxMaxPoolGrad", X.shape, [POOLED, FIRST.astype(np.float32)], POOL, "expected S8 but got F32"),
    "matmul by the own kernel without the transposed read": (
        "ResnetJaxMatmul", (4, 6), [np.ones((4, 5), np.float32), np.ones((5, 6), np.float32)],
        dict(transpose_lhs=0, transpose_rhs=0, own_kernel=1), "the own kernel computes lhs^T x rhs only"),
    "matmul by the own kernel with rhs transposed": (
        "ResnetJaxMatmul", (4, 6), [np.ones((5, 4), np.float32), np.ones((6, 5), np.float32)],
        dict(transpose_lhs=1, transpose_rhs=1, own_kernel=1), "the own kernel computes lhs^T x rhs only"),
    "matmul inner sizes that differ": (
        "ResnetJaxMatmul", (4, 6), [np.ones((5, 4), np.float32), np.ones((6, 6), np.float32)],
        dict(transpose_lhs=1, transpose_rhs=0, own_kernel=1), "inconsistent shapes"),
    "conv kernel gradient with a bfloat16 output gradient": (
        "ResnetJaxConvBackwardWeights", W.shape, [X, bf16(np.ones(Y))], CONV, "must share one dtype"),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_wrong_operand_is_refused_with_what_was_wrong(case):
    target, shape, operands, attrs, message = REFUSED[case]
    with pytest.raises(jax.errors.JaxRuntimeError, match="INVALID_ARGUMENT") as caught:
        call(target, shape, *operands, **attrs)
    assert message in str(caught.value), str(caught.value)


def test_a_failed_allocation_is_an_error_and_the_process_goes_on():
    """A Winograd layer whose work buffers (2 x 36 x tiles x 512 floats, 604 MB) do not fit under an address-space
    limit set just above what the process holds plus its output: the call raises RESOURCE_EXHAUSTED, and once
    the limit is lifted the same call computes."""
    require_onednn()
    done = run_python("""
        import resource
        import jax, jax.numpy as jnp, numpy as np
        from resnet_jax.ops.onednn import calls

        x = jnp.asarray(np.ones((1, 256, 256, 512), np.float32))  # 128 MB
        k = jnp.asarray(np.full((3, 3, 512, 512), 1e-3, np.float32))
        layer = jax.jit(lambda x, k: calls.winograd_forward(x, k, ((1, 1), (1, 1)), 4)).lower(x, k).compile()
        held = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
        # room for the output and 192 MB more, a third of the work buffers: VmSize read here sometimes already
        # counts a 128 MB region that the output reuses later, and a margin of 512 MB then let 604 MB fit
        resource.setrlimit(resource.RLIMIT_AS, (held + x.nbytes + (192 << 20), resource.RLIM_INFINITY))
        try:
            layer(x, k).block_until_ready()
            print("computed under the limit")
        except jax.errors.JaxRuntimeError as err:
            print("refused:", err)
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print("then:", float(layer(x, k)[0, 128, 128, 0]))
    """, timeout=600)
    assert "refused: RESOURCE_EXHAUSTED: resnet_jax oneDNN extension: out of memory" in done.stdout, done.stdout
    then = float(done.stdout.split("then:")[1])
    assert abs(then - 9 * 512 * 1e-3) < 1e-3, done.stdout  # 9 taps x 512 channels x 1e-3
