"""The training-mode BatchNorm + residual + ReLU with its hand-written gradient equals flax's BatchNorm followed
by the add and ReLU, differentiated automatically: values, running averages, and every gradient; in jnp and with
its passes in the extension's C++ (``extension=True``), in reverse mode, forward mode and forward-over-reverse."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_onednn
from resnet_jax.ops.batchnorm import BatchNorm, batch_norm_act

EXTENSION = [pytest.param(False, id="jnp"), pytest.param(True, id="extension")]


def reference(x, scale, bias, residual, relu, dtype=None):
    """flax's BatchNorm in training mode, then the add and the ReLU: what the model ran before."""
    bn = nn.BatchNorm(use_running_average=False, dtype=dtype)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)}}
    y, updates = bn.apply(variables, x, mutable=["batch_stats"])
    y = y if residual is None else y + residual
    y = jax.nn.relu(y) if relu else y
    # the running averages with momentum 0.99 from (0, 1) give back the batch statistics
    stats = updates["batch_stats"]
    return y, stats["mean"] / 0.01, (stats["var"] - 0.99) / 0.01


def inputs(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = jnp.asarray(rng.normal(1.5, 2.0, shape), dtype)  # a non-zero mean, as convolution outputs have
    residual = jnp.asarray(rng.normal(size=shape), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bias = jnp.asarray(rng.normal(size=c), jnp.float32)
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    return x, scale, bias, residual, dy


def relative(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("extension", EXTENSION)
@pytest.mark.parametrize("with_residual, relu", [(True, True), (False, True), (False, False), (True, False)])
@pytest.mark.parametrize("shape", [(4, 13, 11, 24), (1, 7, 5, 3)])
def test_values_and_gradients_equal_flax_batchnorm_add_relu(shape, with_residual, relu, extension):
    if extension:
        require_onednn()
    x, scale, bias, residual, dy = inputs(shape)
    residual = residual if with_residual else None
    dmean, dvar = jnp.linspace(-1, 1, shape[-1]), jnp.linspace(0.5, -0.5, shape[-1])

    def loss(fn):
        def f(x, scale, bias, residual):
            y, mean, var = fn(x, scale, bias, residual)
            # cotangents on the statistics too: the gradient must be right for any use of them
            return jnp.vdot(y, dy) + jnp.vdot(mean, dmean) + jnp.vdot(var, dvar), (y, mean, var)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

    (_, got), got_grads = loss(lambda *a: batch_norm_act(*a, relu=relu, extension=extension))(x, scale, bias,
                                                                                             residual)
    (_, want), want_grads = loss(lambda *a: reference(*a, relu))(x, scale, bias, residual)
    for part, g, w in zip(("output", "mean", "var"), got, want):
        assert relative(g, w) < 2e-6, part
    names = ("x", "scale", "bias", "residual")
    for name, g, w in zip(names, got_grads, want_grads):
        if w is None:
            assert g is None
            continue
        # float32 rounding: the sums run in another order than autodiff's
        assert relative(g, w) < 1e-5, name


@pytest.mark.parametrize("extension", EXTENSION)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_residual_that_is_not_differentiated_still_masks_the_relu(dtype, extension):
    """A residual without a tangent (a frozen stem's output entering the first block, a stop_gradient) reached
    the backward pass as "no residual", whose C++ passes rebuild the ReLU's mask from ``bn(x)`` alone: the
    forward computed ``relu(bn(x) + residual)``, and the input gradient was 76% off (of its scale)."""
    if extension:
        require_onednn()
    x, scale, bias, residual, dy = inputs((4, 13, 11, 24), dtype)

    def loss(fn):
        return jax.jit(jax.grad(lambda x, scale, bias: jnp.vdot(
            fn(x, scale, bias, jax.lax.stop_gradient(residual))[0].astype(jnp.float32), dy.astype(jnp.float32)),
            argnums=(0, 1, 2)))

    got = loss(lambda *a: batch_norm_act(*a, relu=True, extension=extension))(x, scale, bias)
    want = loss(lambda *a: reference(*a, relu=True, dtype=dtype))(x, scale, bias)
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        assert relative(g, w) < (1e-5 if dtype == jnp.float32 else 3e-2), name


@pytest.mark.parametrize("extension", EXTENSION)
def test_bfloat16_compute_keeps_float32_statistics_and_matches_flax(extension):
    if extension:
        require_onednn()
    x, scale, bias, residual, dy = inputs((4, 8, 8, 16), jnp.bfloat16)
    y, mean, var = batch_norm_act(x, scale, bias, residual, relu=True, dtype=jnp.bfloat16, extension=extension)
    want, want_mean, want_var = reference(x, scale, bias, residual, True, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and mean.dtype == var.dtype == jnp.float32
    assert relative(mean, want_mean) < 1e-6 and relative(var, want_var) < 1e-5
    assert relative(y, want) < 1e-2  # one bfloat16 rounding of the output
    dx = jax.grad(lambda x: jnp.vdot(batch_norm_act(x, scale, bias, residual, relu=True, extension=extension)[0]
                                     .astype(jnp.float32), dy.astype(jnp.float32)))(x)
    want_dx = jax.grad(lambda x: jnp.vdot(reference(x, scale, bias, residual, True, jnp.bfloat16)[0]
                                          .astype(jnp.float32), dy.astype(jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16 and relative(dx, want_dx) < 2e-2


@pytest.mark.parametrize("axis", [-1, 1])  # channels last: the fused path; channels first: flax's own
def test_module_has_flax_batchnorms_variables_and_torchs_running_averages(axis):
    """Output and variables as flax's BatchNorm; the running averages as ``torch.nn.BatchNorm2d``'s, whose
    variance averages in the unbiased batch variance (flax: the biased one, 1/(n-1) lower; n = 4*3*3 here)."""
    torch = pytest.importorskip("torch")
    x, _, _, residual, _ = inputs((4, 3, 3, 8))
    if axis == 1:
        x, residual = x.transpose(0, 3, 1, 2), residual.transpose(0, 3, 1, 2)
    ours = BatchNorm(use_running_average=False, momentum=0.9, axis=axis)
    theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, axis=axis)
    variables = theirs.init(jax.random.key(0), x)
    assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x)) == jax.tree_util.tree_structure(variables)
    variables = {"params": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)},
                 "batch_stats": {"mean": jnp.full(8, 0.3), "var": jnp.full(8, 2.0)}}
    got, got_stats = ours.apply(variables, x, residual=residual, relu=True, mutable=["batch_stats"])
    want = theirs.apply(variables, x, mutable=["batch_stats"])[0]
    assert relative(got, jax.nn.relu(want + residual)) < 2e-6
    reference = torch.nn.BatchNorm2d(8, momentum=0.1, eps=1e-5).train()
    reference.running_mean.fill_(0.3)
    reference.running_var.fill_(2.0)
    nchw = np.asarray(x if axis == 1 else x.transpose(0, 3, 1, 2), np.float32)
    reference(torch.from_numpy(nchw.copy()))
    for key, buffer in (("mean", reference.running_mean), ("var", reference.running_var)):
        assert relative(got_stats["batch_stats"][key], buffer.numpy()) < 2e-6, key
    # evaluation uses the running averages, as flax does, then the epilogue
    evaluated = BatchNorm(use_running_average=True, axis=axis).apply(variables, x, residual=residual, relu=True)
    expected = jax.nn.relu(nn.BatchNorm(use_running_average=True, axis=axis).apply(variables, x) + residual)
    np.testing.assert_array_equal(evaluated, expected)


def test_training_on_one_value_per_channel_is_refused_as_torch_does():
    """torch: "Expected more than 1 value per channel when training"; the normalised value would be 0."""
    x = jnp.ones((1, 1, 1, 8))
    variables = BatchNorm(use_running_average=True).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="one value per channel"):
        BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])
    BatchNorm(use_running_average=True).apply(variables, x)  # evaluation on one image is fine


def test_models_train_through_the_fused_batchnorm():
    """Every BatchNorm of a training step runs the hand-written gradient (the point of it: fewer passes)."""
    from resnet_jax import create_model

    model = create_model("resnet18", num_classes=10)
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))  # shapes are enough
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables))
    assert jaxpr.count("name=_bn_act") == 20  # the stem's, 2 in each of 8 blocks, 3 shortcut BatchNorms


@pytest.mark.parametrize("relu", [True, False])
def test_forward_mode_and_forward_over_reverse_of_the_extension_path_equal_flax(relu):
    """jvp (the tangent primitive) and the jvp of a gradient (the backward primitive differentiated again)."""
    require_onednn()
    x, scale, bias, residual, dy = inputs((3, 6, 5, 16))
    tangents = inputs((3, 6, 5, 16), seed=1)[:4]

    def loss(fn):
        return lambda *a: jnp.vdot(fn(*a)[0], dy) + jnp.sum(fn(*a)[2])

    ours = loss(lambda *a: batch_norm_act(*a, relu=relu, extension=True))
    theirs = loss(lambda *a: reference(*a, relu))
    primals = (x, scale, bias, residual)
    ours_all = lambda *a: batch_norm_act(*a, relu=relu, extension=True)  # noqa: E731
    got = jax.jit(lambda p, t: jax.jvp(ours_all, p, t)[1])(primals, tangents)
    want = jax.jvp(lambda *a: reference(*a, relu), primals, tangents)[1]
    for name, g, w in zip(("output", "mean", "var"), got, want):
        assert relative(g, w) < 1e-5, name
    hvp = lambda f: jax.jit(lambda p, t: jax.jvp(jax.grad(f, argnums=(0, 1, 2, 3)), p, t)[1])  # noqa: E731
    for name, g, w in zip(("x", "scale", "bias", "residual"), hvp(ours)(primals, tangents),
                          hvp(theirs)(primals, tangents)):
        assert relative(g, w) < 1e-4, name


@pytest.mark.parametrize("conv_impl, runs_extension", [("auto", True), ("jax", False)])
def test_a_training_step_runs_the_extensions_batchnorm_passes_where_the_model_may(conv_impl, runs_extension):
    """Forward (sums, apply) and backward (gradient sums, input gradient) run in C++ under "auto" on CPU: the
    value tests above would pass on the jnp path too, so this checks the compiled step itself."""
    require_onednn()
    from resnet_jax import create_model

    model = create_model("resnet18", num_classes=10, stage_sizes=(1, 1, 1, 1), conv_impl=conv_impl)
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits)

    text = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    for target in ("Sums", "Apply", "GradSums", "GradApply"):
        assert (f'custom_call_target="ResnetJaxBatchNorm{target}"' in text) == runs_extension, target


def test_the_extensions_bfloat16_passes_round_as_the_jnp_path():
    """One rounding to nearest even per bfloat16 result, as XLA's: the two paths agree on all but a few elements
    (float32 sums in another order move a value across a rounding boundary), and those by one unit in the last
    place. Truncating instead would change about half of them."""
    require_onednn()
    x, scale, bias, residual, dy = inputs((8, 12, 12, 32), jnp.bfloat16)

    def run(extension):
        def f(x, residual):
            y, mean, var = batch_norm_act(x, scale, bias, residual, relu=True, extension=extension)
            return y, jax.vjp(lambda x, r: batch_norm_act(x, scale, bias, r, relu=True, extension=extension)[0],
                              x, residual)[1](dy)
        return jax.jit(f)(x, residual)

    got, want = run(True), run(False)
    for name, g, w in zip(("output", "dx", "dresidual"), jax.tree.leaves(got), jax.tree.leaves(want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        differ = g != w
        assert differ.mean() < 1e-2, (name, differ.mean())
        ulp = np.abs(w[differ]) * 2.0 ** -7
        assert np.all(np.abs(g - w)[differ] <= ulp + 1e-30), name


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_mask_recomputed_from_x_is_the_mask_the_forward_wrote(dtype):
    """Without a residual the gradient passes take the ReLU's mask from ``x`` and the forward's coefficients
    instead of reading ``y``. On elements whose BatchNorm is within rounding of zero the two agree only if both
    round alike: ``x`` takes few values here, and each channel's bias puts one of them right at zero, so many
    elements sit on that edge; one channel is constant with no bias, so its BatchNorm is exactly zero (the ReLU
    then passes nothing). Both passes must give exactly what the mask read from ``y`` gives."""
    require_onednn()
    from resnet_jax.ops import batchnorm
    from resnet_jax.ops.onednn import calls

    rng = np.random.default_rng(3)
    shape = (8, 9, 9, 40)
    x = rng.integers(-6, 7, shape) * 0.37 + 1.3
    x[..., 0] = 1.5  # its mean exactly, in either dtype
    x = jnp.asarray(x, dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
    forward = jax.jit(lambda x, bias: batchnorm._bn_act(x, scale, bias, None, True, 1e-5, jnp.dtype(dtype), True))
    coef = np.asarray(forward(x, jnp.zeros_like(scale))[3])  # mean and mul do not depend on the bias
    edge = np.asarray(x, np.float32)[0, 0, 0]
    bias = jnp.asarray(-(edge - coef[0]) * coef[1], jnp.float32).at[0].set(0.0)  # a grid value of x normalised
    y, _, _, coef = forward(x, bias)
    normalised = (np.asarray(x, np.float32) - np.asarray(coef[0])) * np.asarray(coef[1]) + np.asarray(coef[2])
    assert np.mean(np.abs(normalised) < 1e-5) > 0.05 and np.all(np.asarray(y)[..., 0] == 0)  # on the edge
    ct = jnp.asarray(rng.normal(size=shape), dtype)
    grad_coef = jnp.asarray(rng.normal(size=(3, shape[-1])), jnp.float32)
    sums = jax.jit(calls.batch_norm_grad_sums, static_argnums=(4, 5))
    apply = jax.jit(calls.batch_norm_grad_apply, static_argnums=(5, 6))
    np.testing.assert_array_equal(sums(ct, y, x, coef, True, True), sums(ct, y, x, coef, True))
    np.testing.assert_array_equal(np.asarray(apply(ct, y, x, grad_coef, coef, True, True), np.float32),
                                  np.asarray(apply(ct, y, x, grad_coef, coef, True), np.float32))
    assert not np.array_equal(sums(ct, y, x, coef, True), sums(ct, y, x, coef, False))  # the mask matters here


def test_only_the_batchnorms_without_a_residual_take_the_mask_from_x():
    """In a compiled training step: every BatchNorm + ReLU without a residual (the stem's and the first of each
    basic block) computes its gradient without reading its output; the blocks' last BatchNorms (residual) and
    the shortcuts' (no ReLU) keep their own passes."""
    require_onednn()
    import re

    from resnet_jax import create_model

    model = create_model("resnet18", num_classes=10, stage_sizes=(1, 1, 1, 1))
    x = jnp.ones((2, 32, 32, 3))
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params):
        return jnp.sum(model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])[0])

    text = jax.jit(jax.grad(loss)).lower(variables["params"]).compile().as_text()
    flags = re.findall(r'custom_call_target="ResnetJaxBatchNormGrad(Sums|Apply)".*?mask_from_x = (\d)', text)
    from_x = [kind for kind, flag in flags if flag == "1"]
    assert sorted(from_x) == ["Apply"] * 5 + ["Sums"] * 5  # the stem's and 4 blocks' first BatchNorms


@pytest.mark.parametrize("extension", EXTENSION)
def test_a_channel_whose_mean_dwarfs_its_spread_keeps_its_statistics(extension):
    """Used to be: the variance as E[x^2] - mean^2 in float32 (flax's fast variance) lost every digit at a mean
    1e4 times the spread: variance 0, outputs ~100x too large, input gradients 1e6x off. Sums of x shifted by its
    first pixel keep them; the reference is torch's batch_norm in float64 (a two-pass variance)."""
    import torch
    import torch.nn.functional as F

    if extension:
        require_onednn()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 4, 4, 8)) + 1e4).astype(np.float32)
    ct = rng.standard_normal(x.shape).astype(np.float32)
    xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    y_ref = F.batch_norm(xt, None, None, torch.ones(8, dtype=torch.float64), None, training=True, eps=1e-5)
    y_ref.backward(torch.tensor(ct.transpose(0, 3, 1, 2), dtype=torch.float64))
    scale, bias = jnp.ones(8), jnp.zeros(8)
    (y, mean, var), vjp = jax.vjp(lambda x: batch_norm_act(x, scale, bias, extension=extension), jnp.asarray(x))
    (dx,) = vjp((jnp.asarray(ct), jnp.zeros(8), jnp.zeros(8)))
    assert relative(y, y_ref.detach().numpy().transpose(0, 2, 3, 1)) < 1e-3
    assert relative(dx, xt.grad.numpy().transpose(0, 2, 3, 1)) < 3e-3
    np.testing.assert_allclose(var, x.reshape(-1, 8).astype(np.float64).var(0), rtol=1e-3)


@pytest.mark.parametrize("extension", EXTENSION)
def test_gradients_of_a_channel_whose_mean_dwarfs_its_spread_are_centred_as_torchs(extension):
    """Used to be: the backward pass summed g * x and took mean * sum g off after, and forward mode likewise
    (mean(x * dx) - mean * mean(dx)): at a mean 1e4 times the spread the two cancel, and the scale's gradient was
    5e-3 to 7e-3 off here, the input gradient and the tangent 3e-5 to 8e-5. Centred before it multiplies, as
    torch's backward does, x leaves 7e-4 and 4e-6 to 8e-6: the float32 mean's own rounding. Reference: torch's
    batch_norm in float64, reverse and forward mode (torch's float32 is 2e-2 off on the scale's gradient here)."""
    import torch
    import torch.nn.functional as F

    if extension:
        require_onednn()
    rng = np.random.default_rng(1)
    shape = (8, 16, 16, 4)
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    ct, dx_in = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    scale = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2), dtype=torch.float64)  # noqa: E731
    nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # noqa: E731
    xt, wt = nchw(x).requires_grad_(), torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    F.batch_norm(xt, None, None, wt, None, training=True, eps=1e-5).backward(nchw(ct))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(nchw(x), nchw(dx_in))
        tangent = torch.autograd.forward_ad.unpack_dual(F.batch_norm(dual, None, None, torch.tensor(
            scale, dtype=torch.float64), None, training=True, eps=1e-5)).tangent

    def forward(x, scale):
        return batch_norm_act(x, scale, jnp.zeros(4), extension=extension)[0]

    _, vjp = jax.vjp(jax.jit(forward), jnp.asarray(x), jnp.asarray(scale))
    dx, dscale = vjp(jnp.asarray(ct))
    assert relative(dscale, wt.grad.numpy()) < 2e-3
    assert relative(dx, nhwc(xt.grad)) < 1.5e-5
    _, t = jax.jit(lambda x, d: jax.jvp(lambda x: forward(x, jnp.asarray(scale)), (x,), (d,)))(
        jnp.asarray(x), jnp.asarray(dx_in))
    assert relative(t, nhwc(tangent)) < 2e-5
