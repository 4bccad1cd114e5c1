"""A convolution whose input also feeds the identity shortcut (``conv2d(..., fan_out=True)``): the gradient at the
input is ``lax``'s (both uses summed), in reverse and forward mode, under ``vmap`` and to second order; the sum runs
inside the input gradient's call where the algorithm can (oneDNN's GEMM, the extension's Winograd), and every
ResNet block whose first convolution can takes this path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import require_onednn
from resnet_jax import create_model
from resnet_jax.ops import ConvSpec, conv2d
from resnet_jax.ops.onednn import calls
from resnet_jax.ops.registry import REGISTRY

# (algorithm, kernel, stride, padding, the call that sums in the backward, or None where it is added after)
CASES = [
    ("onednn_gemm", 1, 1, ((0, 0), (0, 0)), "ResnetJaxMatmulAccumulate"),
    ("onednn_winograd_f4", 3, 1, ((1, 1), (1, 1)), "ResnetJaxWinogradForward"),
    ("onednn_gemm", 1, 2, ((0, 0), (0, 0)), None),  # strided: the gradient is spread over the kept pixels
    ("onednn", 3, 1, ((1, 1), (1, 1)), None),  # oneDNN's backward-data primitive takes no post-ops
    ("gemm", 1, 1, ((0, 0), (0, 0)), None),
    ("xla", 3, 1, ((1, 1), (1, 1)), None),
]


def operands(ksize, channels=16):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (2, 9, 10, channels))
    k = jax.random.normal(keys[1], (ksize, ksize, channels, channels)) / (ksize * channels ** 0.5)
    return x, k, keys[2], keys[3]


def block_loss(conv):
    """A block's fan-out: ``x`` into the convolution and, by the second output, into the shortcut, each followed
    by something nonlinear so the second derivative sees both."""
    def loss(x, k, py, px):
        y, kept = conv(x, k)
        return jnp.sum(py * jnp.tanh(y)) + jnp.sum(px * jnp.sin(kept)) + jnp.sum(jnp.tanh(y + kept) ** 2)
    return loss


def ours(algorithm, stride, padding):
    return lambda x, k: conv2d(x, k, stride, padding, algorithm=algorithm, fan_out=True)


def reference(stride, padding):
    def conv(x, k):
        return lax.conv_general_dilated(x, k, (stride, stride), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")), x
    return conv


def require(algorithm):
    if REGISTRY[algorithm].cpu_only:
        require_onednn()


@pytest.mark.parametrize("algorithm, ksize, stride, padding, summing_call", CASES,
                         ids=[f"{c[0]}_k{c[1]}s{c[2]}" for c in CASES])
def test_gradients_equal_lax_and_the_sum_runs_in_the_input_gradient(algorithm, ksize, stride, padding, summing_call):
    require(algorithm)
    x, k, ky, kx = operands(ksize)
    y_shape = jax.eval_shape(reference(stride, padding), x, k)[0].shape
    py, px = jax.random.normal(ky, y_shape), jax.random.normal(kx, x.shape)
    if stride != 1:  # the shortcut then needs a shape of its own: y + kept is only for equal shapes
        def loss_of(conv):
            def loss(x, k, py, px):
                y, kept = conv(x, k)
                return jnp.sum(py * jnp.tanh(y)) + jnp.sum(px * jnp.sin(kept))
            return loss
    else:
        loss_of = block_loss
    grad = jax.jit(jax.grad(loss_of(ours(algorithm, stride, padding)), argnums=(0, 1)))
    want = jax.grad(loss_of(reference(stride, padding)), argnums=(0, 1))(x, k, py, px)
    for got, expected, what in zip(grad(x, k, py, px), want, ("d/dx", "d/dkernel")):
        scale = float(jnp.max(jnp.abs(expected)))
        np.testing.assert_allclose(got, expected, atol=1e-4 * scale, err_msg=f"{algorithm} {what}")
    hlo = grad.lower(x, k, py, px).as_text()
    if summing_call == "ResnetJaxMatmulAccumulate":
        assert hlo.count("ResnetJaxMatmulAccumulate") == 1, "the sum did not run inside the GEMM"
    elif summing_call == "ResnetJaxWinogradForward":  # the input gradient's Winograd with the shortcut's as residual
        summing = [line for line in hlo.splitlines() if summing_call in line and "has_residual = 1" in line]
        assert len(summing) == 1, "the sum did not run inside the Winograd input gradient"
    else:
        assert "ResnetJaxMatmulAccumulate" not in hlo and "has_residual = 1" not in hlo


@pytest.mark.parametrize("algorithm, dilation, dtype", [("onednn_winograd_f4@atrous", 2, jnp.float32),
                                                       ("onednn_winograd_f4@float32", 1, jnp.bfloat16)])
def test_wrapped_algorithms_add_after_their_own_input_gradient(algorithm, dilation, dtype):
    """Algorithms made from another one (Winograd on dilated sub-grids, float32 Winograd for bfloat16 layers)
    change its operands, so its in-kernel sum does not apply to theirs: they add after, and stay exact."""
    require(algorithm)
    if REGISTRY[algorithm].refusal(conv_spec(dilation, dtype), "cpu"):
        pytest.skip(REGISTRY[algorithm].refusal(conv_spec(dilation, dtype), "cpu"))
    x, k, ky, kx = operands(3)
    x, k = x.astype(dtype), k.astype(dtype)
    padding = ((dilation, dilation),) * 2
    py, px = jax.random.normal(ky, x.shape, dtype), jax.random.normal(kx, x.shape, dtype)

    def conv(algorithm):
        return lambda a, b: conv2d(a, b, 1, padding, algorithm=algorithm, dilation=dilation, fan_out=True)
    grad = jax.jit(jax.grad(block_loss(conv(algorithm)), argnums=(0, 1)))
    want = jax.jit(jax.grad(block_loss(conv("xla")), argnums=(0, 1)))(x, k, py, px)
    for got, expected in zip(grad(x, k, py, px), want):
        scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32))))
        tolerance = 5e-2 if dtype == jnp.bfloat16 else 1e-4
        np.testing.assert_allclose(got.astype(jnp.float32), expected.astype(jnp.float32), atol=tolerance * scale)
    assert "has_residual = 1" not in grad.lower(x, k, py, px).as_text()


def test_a_wrapper_keeps_where_its_base_runs_and_nothing_tied_to_the_base_operands():
    """``Algorithm.wrapping`` (what ``@atrous`` and ``@float32`` are built with) keeps only where the base can run;
    an in-kernel sum or a fused epilogue of the base never reaches the wrapper unless it passes its own."""
    from resnet_jax.ops.spec import Algorithm

    def never(*args):
        raise AssertionError("the base's own operands only")

    base = Algorithm(name="base", forward=never, input_grad=never, kernel_grad=never, cpu_only=True,
                     xla_ops_only=True, unavailable=lambda: "missing", fused_forward=never, summed_input_grad=never,
                     dilated=True)
    wrapper = Algorithm.wrapping(base, "@w", forward=None, input_grad=None, kernel_grad=None)
    assert (wrapper.name, wrapper.cpu_only, wrapper.xla_ops_only, wrapper.unavailable()) == ("base@w", True, True,
                                                                                          "missing")
    assert (wrapper.fused_forward, wrapper.summed_input_grad, wrapper.dilated) == (None, None, False)
    for name in ("onednn_winograd_f4@atrous", "onednn_winograd_f4@float32"):
        if name in REGISTRY:
            assert REGISTRY[name].summed_input_grad is None, name


def conv_spec(dilation, dtype):
    x, k, _, _ = operands(3)
    return ConvSpec.of(x.astype(dtype), k.astype(dtype), 1, ((dilation, dilation),) * 2, 1, dilation)


@pytest.mark.parametrize("algorithm", ["onednn_gemm", "onednn_winograd_f4", "xla"])
def test_forward_mode_second_order_and_vmap_equal_lax(algorithm):
    require(algorithm)
    ksize = 1 if algorithm == "onednn_gemm" else 3
    padding = ((ksize // 2,) * 2,) * 2
    x, k, ky, kx = operands(ksize)
    py, px = jax.random.normal(ky, x.shape), jax.random.normal(kx, x.shape)
    mine, ref = block_loss(ours(algorithm, 1, padding)), block_loss(reference(1, padding))
    tx, tk = jax.random.normal(ky, x.shape), jax.random.normal(kx, k.shape) / 10

    def hvp(loss):  # forward over reverse: the derivative of the gradient (the fan-out's transpose) along (tx, tk)
        return jax.jvp(lambda a, b: jax.grad(loss, argnums=(0, 1))(a, b, py, px), (x, k), (tx, tk))

    got, want = jax.jit(lambda: hvp(mine))(), hvp(ref)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=2e-4 * float(jnp.max(jnp.abs(w))))
    # reverse over reverse: the Hessian's product along the input (a derivative of input_grad_sum_p itself)
    hx = jax.jit(jax.grad(lambda a: jnp.vdot(jax.grad(mine)(a, k, py, px), tx)))(x)
    want_hx = jax.grad(lambda a: jnp.vdot(jax.grad(ref)(a, k, py, px), tx))(x)
    np.testing.assert_allclose(hx, want_hx, atol=2e-4 * float(jnp.max(jnp.abs(want_hx))))
    # per-example gradients: vmap over the images, the kernel shared
    per_example = jax.jit(jax.vmap(jax.grad(mine, argnums=(0, 1)), in_axes=(0, None, 0, 0)))
    expected = jax.vmap(jax.grad(ref, argnums=(0, 1)), in_axes=(0, None, 0, 0))
    for g, w in zip(per_example(x[:, None], k, py[:, None], px[:, None]),
                    expected(x[:, None], k, py[:, None], px[:, None])):
        np.testing.assert_allclose(g, w, atol=2e-4 * float(jnp.max(jnp.abs(w))))


def test_the_accumulating_gemm_leaves_a_still_needed_accumulator_intact():
    """XLA hands the accumulator's buffer to the call; where the accumulator is read again afterwards, it must
    copy it first, and the caller's value must be unchanged."""
    require_onednn()
    keys = jax.random.split(jax.random.key(3), 3)
    a, b = jax.random.normal(keys[0], (40, 24)), jax.random.normal(keys[1], (16, 24))
    acc = jax.random.normal(keys[2], (40, 16))
    total, again = jax.jit(lambda a, b, acc: (calls.matmul(a, b, transpose_b=True, accumulate=acc), acc * 1))(
        a, b, acc)
    np.testing.assert_allclose(total, acc + a @ b.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(again, acc)
    with pytest.raises(ValueError, match="accumulates into a product over the batch"):
        calls.matmul(a, b[:, :40].T, transpose_a=True, accumulate=acc)


# (model, sums in its plain blocks, in its pre-activation blocks): every block's input feeds its first convolution
# and its shortcut (the input itself, or the downsampling); a pre-activation block's shortcut reads the input
# un-normalised, so only its downsampling shares the first convolution's (normalised) input
SUMMING = [("resnet50", 16, 4), ("resnet18", 5, 0)]


@pytest.mark.parametrize("name, plain, preact", SUMMING, ids=[s[0] for s in SUMMING])
def test_every_block_sums_its_shortcuts_gradient_in_its_first_convolution(name, plain, preact):
    """ResNet-50: all 16 blocks' first 1x1 convolutions run oneDNN's GEMM, each accumulating the shortcut's
    gradient (12 identity blocks and 4 downsampling ones); pre-activation, the 4 whose downsampling reads the
    normalised input. ResNet-18: the 5 identity blocks' first 3x3 layers run Winograd at this size, taking it as
    their residual; its downsampling blocks' first layers are strided (oneDNN's direct kernels, which take no
    post-op: added after), and a pre-activation identity block's first layer shares nothing with its shortcut."""
    require_onednn()
    x = jax.ShapeDtypeStruct((8, 160, 160, 3), jnp.float32)  # ResNet-18's last stage: 5x5, Winograd's 32 tiles

    def summing_calls(model):
        variables = jax.eval_shape(model.init, jax.random.key(0), x)

        def loss(params, batch_stats, x):
            out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
            return jnp.sum(out)
        hlo = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"], x).as_text()
        return (hlo.count("ResnetJaxMatmulAccumulate")
                + sum(1 for line in hlo.splitlines() if "ResnetJaxWinogradForward" in line
                      and "has_residual = 1" in line and re.search(r"transposed_kernel = 1", line)))

    assert summing_calls(create_model(name)) == plain
    assert summing_calls(create_model(name, preact=True)) == preact


def test_the_shortcuts_gradient_is_summed_in_place_without_copies():
    """The two calls that update a block's gradient in place (the last BatchNorm's sums pass writing the masked
    cotangent over it, the first convolution's GEMM adding into that) get their buffers as they are: XLA copies
    an in-place operand when it cannot hand it over (a reshape between the calls made it copy each, ~80 ms of a
    float32 ResNet-50 step), and a copy would undo what the in-place call saves."""
    require_onednn()
    model = create_model("resnet50", stage_sizes=(3, 1, 1, 1))
    x = jax.ShapeDtypeStruct((4, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def loss(params, batch_stats, x):
        out, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out)
    hlo = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"], x).compile().as_text()
    # name -> (result shape, op, operands) of every instruction
    defined = {name: (shape, op, [o.strip() for o in operands.split(",")]) for name, shape, op, operands in
               re.findall(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\S+) ([\w\-]+)\(([^)]*)\)", hlo, re.M)}

    def elements(shape):
        dims = re.search(r"\[([\d,]*)\]", shape).group(1)
        return int(np.prod([int(d) for d in dims.split(",") if d]))

    def copied(name):
        """Whether ``name`` is a copy of another buffer: a copy, or a one-operand fusion of as many elements (a
        bitcast-copy, a transpose); a broadcast (the head's gradient) makes new values and is no copy."""
        shape, op, operands = defined[name]
        if op == "copy":
            return True
        return op == "fusion" and len(operands) == 1 and elements(defined[operands[0]][0]) == elements(shape)

    in_place = re.findall(r"custom-call\(([^)]*)\), custom_call_target=\"(ResnetJaxMatmulAccumulate|"
                          r"ResnetJaxBatchNormGradSumsMasked)\"", hlo)
    assert sorted({target for _, target in in_place}) == ["ResnetJaxBatchNormGradSumsMasked",
                                                          "ResnetJaxMatmulAccumulate"]
    for operands, target in in_place:
        names = [o.strip() for o in operands.split(",")]
        updated = names[2] if target == "ResnetJaxMatmulAccumulate" else names[0]
        assert not copied(updated), (target, updated, defined[updated][:2])
