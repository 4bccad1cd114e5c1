"""``output_stride``: dilated last stages equal to torchvision's ``replace_stride_with_dilation`` and timm's
``output_stride`` with the same weights, on every convolution path (the algorithms, "auto"'s choice, BatchNorm
folding, the StableHLO and ONNX exports).

Small bottleneck models (torchvision refuses dilation in its BasicBlock) with two blocks in the dilated stages:
the first keeps the previous dilation on its 3x3 and has a stride-1 shortcut, the second has the new one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision

from conftest import assert_close, random_batch_stats, require_onednn
from resnet_jax import create_model
from resnet_jax.export import Preprocessing, export_model, load_exported
from resnet_jax.ops import ConvSpec, choose, conv2d, fold_batchnorm
from resnet_jax.ops.registry import ALGORITHMS, REGISTRY
from resnet_jax.ops.spec import pair
from resnet_jax.torchvision import convert_state_dict

LAYERS = [1, 1, 2, 2]
IMAGE = (2, 3, 40, 56)  # non-square
# torchvision's flags for layer2..layer4 -> our output_stride
TORCHVISION_FLAGS = {8: [False, True, True], 16: [False, False, True]}


def nchw_to_nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def torch_features(tm, x):
    """The four stage outputs and the logits of a torchvision-layout model (timm's ResNet has the same layers)."""
    with torch.no_grad():
        y = tm.maxpool(tm.act1(tm.bn1(tm.conv1(x)))) if hasattr(tm, "act1") else \
            tm.maxpool(tm.relu(tm.bn1(tm.conv1(x))))
        feats = []
        for layer in (tm.layer1, tm.layer2, tm.layer3, tm.layer4):
            y = layer(y)
            feats.append(y)
        return feats, tm(x)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(0)
    return torch.randn(IMAGE)


def ours_and_reference(reference, name, naming, output_stride, conv_impl="auto", **kw):
    model = create_model(name, stage_sizes=tuple(LAYERS), num_classes=10, output_stride=output_stride,
                         conv_impl=conv_impl, **kw)
    variables, _ = convert_state_dict(model, reference.state_dict(), naming=naming)
    return model, variables


def check_against(reference, model, variables, image):
    feats, logits = torch_features(reference, image)
    backbone = model.clone(features_only=True)
    ours_feats, ours_logits = jax.jit(lambda v, x: (backbone.apply(v, x), model.apply(v, x)))(
        variables, nchw_to_nhwc(image))
    strides = model.feature_strides()
    for k, (a, b) in enumerate(zip(ours_feats, feats)):
        assert a.shape[1:3] == (-(-IMAGE[2] // strides[k]), -(-IMAGE[3] // strides[k]))  # ceil
        assert_close(a, nchw_to_nhwc(b), f"stage {k + 1}")
    assert_close(ours_logits, jnp.asarray(logits.numpy()), "logits")


@pytest.mark.parametrize("output_stride,conv_impl", [(8, "auto"), (16, "auto"), (8, "onednn_winograd_f4@atrous")])
def test_equals_torchvision_replace_stride_with_dilation(output_stride, conv_impl, image):
    """The last case computes every dilated 3x3 by Winograd on its sub-grids, "auto" only the large ones."""
    torch.manual_seed(output_stride)
    tv = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, LAYERS, num_classes=10,
                                          replace_stride_with_dilation=TORCHVISION_FLAGS[output_stride])
    tv.load_state_dict(random_batch_stats(tv.state_dict(), output_stride))
    model, variables = ours_and_reference(tv.eval(), "resnet50", "torchvision", output_stride, conv_impl)
    assert model.feature_strides() == {8: (4, 8, 8, 8), 16: (4, 8, 16, 16)}[output_stride]
    check_against(tv, model, variables, image)


@pytest.mark.parametrize("name,output_stride", [("resnet50", 16), ("resnet50d", 8), ("seresnet18", 8)])
def test_equals_timm_output_stride(name, output_stride, image):
    """resnet50d at 8: the average-pool shortcut of a dilated stage is timm's 2x2 stride-1 "same" pool; seresnet18:
    basic blocks (which torchvision refuses to dilate) with SE."""
    torch.manual_seed(1)
    tm = timm.create_model(name, layers=LAYERS, num_classes=10, output_stride=output_stride).eval()
    tm.load_state_dict(random_batch_stats(tm.state_dict(), 1))
    model, variables = ours_and_reference(tm, name, "timm", output_stride)
    check_against(tm, model, variables, image)


def random_variables(model, shape):
    """Variables without compiling ``model.init`` (seconds on the loaded test machine): random BatchNorm
    statistics (conftest) on the abstract tree, and He-scaled normal draws for the kernels it leaves abstract."""
    variables = random_batch_stats(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape)), 2)

    def kernel(a):
        if isinstance(a, jax.Array):
            return a
        return jax.random.normal(jax.random.key(a.size), a.shape) * (2 / np.prod(a.shape[:-1])) ** 0.5
    return jax.tree.map(kernel, variables)


@pytest.fixture(scope="module")
def dilated():
    """resnet50 at output stride 8 with random BatchNorm statistics, and its jitted logits at 40x56."""
    model = create_model("resnet50", stage_sizes=(1, 1, 1, 1), num_classes=10, output_stride=8)
    x = jax.random.normal(jax.random.key(1), (2, 40, 56, 3))
    variables = random_variables(model, x[:1].shape)
    return model, variables, x, jax.jit(model.apply)(variables, x)


@pytest.mark.parametrize("conv_impl", ["xla", "onednn_winograd_f4"])
def test_every_conv_impl_computes_the_dilated_model(dilated, conv_impl):
    """A forced algorithm that cannot dilate (Winograd, the patch matmul) leaves those layers to "auto"."""
    model, variables, x, want = dilated
    assert_close(jax.jit(model.clone(conv_impl=conv_impl).apply)(variables, x), want, conv_impl)


def test_batchnorm_folding_and_both_exports(dilated, tmp_path):
    model, variables, x, want = dilated
    folded_model = model.with_batchnorm_folded()
    folded = jax.jit(lambda v: fold_batchnorm(model, v)[1])(variables)
    assert_close(jax.jit(folded_model.apply)(folded, x), want, "folded")
    prep = Preprocessing(40, (0.5,) * 3, (0.25,) * 3)
    batch = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    expected = np.asarray(jax.jit(model.apply)(variables, (batch / 255.0 - 0.5) / 0.25))
    for suffix in ("stablehlo", "onnx"):  # the ONNX file runs in onnxruntime, with Conv's dilations attribute
        exported = load_exported(export_model(model, variables, tmp_path / f"m.{suffix}", preprocessing=prep))
        assert_close(exported.run(batch).astype(np.float32), expected.astype(np.float32), suffix)


def test_dilated_convolution_each_algorithm_and_auto():
    """conv2d with dilation 2: every algorithm that takes it equals lax; every other one refuses it in one
    sentence (or leaves it to "auto" with ``fallback``); "auto" picks one that computes it."""
    x = jax.random.normal(jax.random.key(0), (2, 13, 17, 16))
    k = jax.random.normal(jax.random.key(1), (3, 3, 16, 8))
    want = jax.lax.conv_general_dilated(x, k, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    spec = ConvSpec.of(x, k, 1, ((2, 2), (2, 2)), 1, dilation=2)
    assert spec.y_shape == want.shape and spec.dilated
    assert all(REGISTRY[n].refusal(spec, "cpu") is None for n in choose(spec, "cpu"))
    for name in ALGORITHMS:
        if REGISTRY[name].dilated:
            assert_close(conv2d(x, k, 1, ((2, 2), (2, 2)), algorithm=name, dilation=2), want, name)
        else:
            assert "undilated convolutions only" in REGISTRY[name].refusal(spec, "cpu") or \
                REGISTRY[name].limits(spec) is not None, name
    with pytest.raises(ValueError, match="undilated convolutions only"):
        conv2d(x, k, 1, ((2, 2), (2, 2)), algorithm="winograd_f4", dilation=2)
    assert_close(conv2d(x, k, 1, ((2, 2), (2, 2)), algorithm="auto", dilation=2), want, "auto")
    assert_close(conv2d(x, k, 1, ((2, 2), (2, 2)), algorithm="winograd_f4", dilation=2, fallback=True), want,
                 "fallback")


@pytest.mark.parametrize("groups,stride,dilation,padding", [
    (1, 1, 2, ((2, 2), (2, 2))),        # a dilated stage's 3x3 (15x18: sub-grids of unequal size)
    (4, 1, 4, ((4, 4), (4, 4))),        # grouped (ResNeXt) at output stride 8's second dilation
    (1, 2, 2, ((1, 3), (2, 2))),        # strided, uneven padding: geometry beyond ResNet's own
    (1, 1, (3, 2), ((1, 0), (0, 3))),   # a dilation and a padding per axis
])
def test_dilated_gradients_of_each_algorithm(groups, stride, dilation, padding):
    """Value and both gradients of every algorithm that computes a dilated convolution (oneDNN's direct kernels,
    Winograd on the sub-grids) equal lax's."""
    require_onednn()
    x = jax.random.normal(jax.random.key(0), (2, 15, 18, 16))
    k = jax.random.normal(jax.random.key(1), (3, 3, 16 // groups, 8))

    def reference(a, b):
        return jax.lax.conv_general_dilated(a, b, (stride, stride), padding, rhs_dilation=pair(dilation),
                                            feature_group_count=groups, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=jax.lax.Precision.HIGHEST)
    y, pullback = jax.vjp(reference, x, k)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    want = (y, *pullback(dy))
    spec = ConvSpec.of(x, k, stride, padding, groups, dilation)
    names = [n for n in ALGORITHMS if REGISTRY[n].dilated and REGISTRY[n].refusal(spec, "cpu") is None]
    assert ("onednn_winograd_f4@atrous" in names) == (groups == 1 and stride == 1) and "onednn" in names
    for name in names:
        def ours(a, b, name=name):
            return conv2d(a, b, stride, padding, groups=groups, algorithm=name, dilation=dilation)
        got_y, got_pullback = jax.vjp(jax.jit(ours), x, k)
        for got, expected, what in zip((got_y, *got_pullback(dy)), want, ("value", "input grad", "kernel grad")):
            assert_close(got, expected, f"{name} {what}")


def test_sub_grid_winograd_with_the_epilogue_and_its_dtypes():
    """Winograd on the sub-grids with bias, residual and ReLU equals lax's ops in value and all four gradients. It
    also reads bfloat16 (lax's float32 result rounded once), but "auto" leaves bfloat16 dilated layers to oneDNN's
    direct kernels, which take the dilation themselves: the sub-grid route was not measured in bfloat16."""
    require_onednn()
    x = jax.random.normal(jax.random.key(0), (2, 10, 13, 8))
    k = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))
    bias, residual = jax.random.normal(jax.random.key(2), (8,)), jax.random.normal(jax.random.key(3), (2, 10, 13, 8))

    def ours(a, b, c, r):
        return conv2d(a, b, 1, "SAME", bias=c, residual=r, relu=True, algorithm="onednn_winograd_f4@atrous",
                      dilation=2)

    def want(a, b, c, r):
        y = jax.lax.conv_general_dilated(a, b, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
        return jax.nn.relu(y + c + r)
    dy = jax.random.normal(jax.random.key(4), residual.shape)

    def value_and_grads(fn):
        y, pullback = jax.vjp(jax.jit(fn), x, k, bias, residual)
        return (y, *pullback(dy))
    for g, e, what in zip(value_and_grads(ours), value_and_grads(want),
                          ("value", "d/dinput", "d/dkernel", "d/dbias", "d/dresidual")):
        assert_close(g, e, what)
    xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    got = conv2d(xb, kb, 1, "SAME", algorithm="onednn_winograd_f4@atrous", dilation=2)
    exact = np.asarray(jax.lax.conv_general_dilated(xb.astype(jnp.float32), kb.astype(jnp.float32), (1, 1),
                                                    ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"))
    assert got.dtype == jnp.bfloat16  # read and written as bfloat16, computed in float32, rounded once
    np.testing.assert_array_less(np.abs(np.asarray(got, np.float32) - exact),
                                 np.abs(exact) * 2.0 ** -8 + 1e-4 * np.abs(exact).max())
    spec = ConvSpec.of(xb, kb, 1, "SAME", 1, 2)
    assert REGISTRY["onednn_winograd_f4@atrous"].refusal(spec, "cpu") is None
    assert "onednn_winograd_f4@atrous" not in choose(spec, "cpu", measured=False)  # unmeasured in bfloat16


def test_auto_takes_winograd_on_sub_grids_for_large_dilated_layers():
    """A dilated ResNet-50's stage-3/4 3x3 at 512 px computes by Winograd on its sub-grids, and so does a small one
    down to 16 tiles of 4x4 over its sub-grids (8x8 at dilation 2: four 4x4 sub-grids of one tile each, per
    image); a grouped one or one of fewer tiles by oneDNN's direct kernels; without the extension by XLA's."""
    require_onednn()

    def spec(groups=1, size=64, channels=256, batch=4):
        x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.float32)
        kernel = jax.ShapeDtypeStruct((3, 3, channels // groups, channels), jnp.float32)
        return ConvSpec.of(x, kernel, 1, "SAME", groups, 2)
    assert choose(spec(), "cpu", measured=False) == ("onednn_winograd_f4@atrous",) * 3
    assert choose(spec(groups=32), "cpu", measured=False) == ("onednn",) * 3
    assert choose(spec(size=8, channels=32), "cpu", measured=False) == ("onednn_winograd_f4@atrous",) * 3
    assert choose(spec(size=8, channels=32, batch=3), "cpu", measured=False) == ("onednn",) * 3  # 12 tiles
    # 12x12 at dilation 2: four 6x6 sub-grids of 2x2 tiles each (not the 3x3 tiles of an undilated 12x12)
    assert choose(spec(size=12, channels=32, batch=1), "cpu", measured=False) == ("onednn_winograd_f4@atrous",) * 3
    assert choose(spec(), "cpu", extension=False, measured=False) == ("xla",) * 3


def test_bad_output_stride_is_refused():
    with pytest.raises(ValueError, match="output_stride must be one of"):
        create_model("resnet50", output_stride=4)
    # the message named a stride of 32 for models whose last stage is at 4 (resnet20) or 8 (resnet18_cifar)
    with pytest.raises(ValueError, match="this CIFAR-stem model's last stage is at stride 4 already"):
        create_model("resnet20", output_stride=16)
    with pytest.raises(ValueError, match="this CIFAR-stem model's last stage is at stride 8 already"):
        create_model("resnet18_cifar", output_stride=8)


@pytest.mark.long
@pytest.mark.parametrize("output_stride", [8, 16])
def test_full_resnet50_equals_torchvision(output_stride):
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(replace_stride_with_dilation=TORCHVISION_FLAGS[output_stride]).eval()
    tv.load_state_dict(random_batch_stats(tv.state_dict(), 0))
    model = create_model("resnet50", output_stride=output_stride)
    variables, _ = convert_state_dict(model, tv.state_dict())
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        want = tv(x).numpy()
    assert_close(jax.jit(model.apply)(variables, nchw_to_nhwc(x)), jnp.asarray(want), "logits")
