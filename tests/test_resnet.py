"""The model family: exact parameter counts, shapes, features, dtypes, remat, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from flax.traverse_util import flatten_dict

import resnet_jax
from conftest import random_variables
from resnet_jax import create_model, list_models
from resnet_jax.resnet import model_config
from resnet_jax.torchvision import TIMM_MODELS, flax_to_torch_name, torch_to_flax_name

TORCHVISION_COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272, "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
}
# He et al. 2015 CIFAR models at 10 classes, and the CIFAR-stem ResNet-18 of the seed articles.
CIFAR_COUNTS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
                "resnet110": 1_727_962, "resnet18_cifar": 11_173_962}
# He et al. 2015, table 6: parameters of the CIFAR-10 networks (millions, as printed)
PAPER_PARAMS = {"resnet20": "0.27", "resnet32": "0.46", "resnet44": "0.66", "resnet56": "0.85", "resnet110": "1.7"}


def meta_state_dict(build):
    """A torch module's state_dict names and shapes, built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


def assert_same_names_and_shapes(theirs, naming, model, ours):
    """Every entry of ``theirs`` has a place of the same shape in ``ours`` (dropped ones aside), and every
    variable in ``ours`` a name of theirs that maps back to it."""
    for key, shape in theirs.items():
        path, layout = torch_to_flax_name(key, naming, model)
        if path is not None:  # num_batches_tracked is dropped
            assert layout(np.empty(shape, np.uint8)).shape == ours[path], key
    assert sorted(flax_to_torch_name(p, naming, model)[0] for p in ours) == sorted(
        k for k in theirs if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name", list_models())
def test_full_depth_variables_match_the_references(name):
    """Every listed model at full depth, traced once on abstract shapes (nothing computed or allocated, so the
    127M-parameter wide_resnet101_2 costs no memory): it initialises; torchvision's models and He et al.'s have
    their exact parameter counts (and the paper's, as its table 6 rounds them); and where torchvision or timm has
    the name, each of its weights has a place of the same shape here and each variable here its name that maps
    back. Depth shows only here: test_torchvision.py and test_timm.py compare outputs on fewer blocks per stage."""
    model = create_model(name)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, model.in_channels)))
    ours = {k: v.shape for k, v in flatten_dict(variables).items()}
    count = sum(int(np.prod(shape)) for path, shape in ours.items() if path[0] == "params")
    assert count == {**TORCHVISION_COUNTS, **CIFAR_COUNTS}.get(name, count) > 0
    if name in PAPER_PARAMS:
        digits = len(PAPER_PARAMS[name].split(".")[1])
        assert f"{count / 1e6:.{digits}f}" == PAPER_PARAMS[name]
    if hasattr(torchvision.models, name):
        assert_same_names_and_shapes(meta_state_dict(getattr(torchvision.models, name)), "torchvision", model, ours)
    if name in TIMM_MODELS:
        assert_same_names_and_shapes(meta_state_dict(lambda: timm.create_model(name)), "timm", model, ours)


def test_pinned_counts_name_listed_models():
    assert set(TORCHVISION_COUNTS) | set(CIFAR_COUNTS) <= set(list_models())
    assert set(PAPER_PARAMS) <= set(CIFAR_COUNTS)
    assert all(model_config(n)["num_classes"] == 10 for n in CIFAR_COUNTS)  # the counts are at 10 classes


def init(model, shape, seed=0):
    """``model.init`` itself, for the tests about what it initialises (the others use ``random_variables``)."""
    return model.init(jax.random.key(seed), jnp.zeros(shape), train=False)


def abstract_init(model, shape):
    """The variables' shapes and dtypes, from tracing ``init`` without running it."""
    return jax.eval_shape(lambda: init(model, shape))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logits_shape_square_and_non_square(name):
    """Compiled, not run op by op; the variables do not depend on the image size, so one initialisation serves
    both sizes. Two blocks in stage 1 (a projection and an identity shortcut) and one after: shapes do not depend
    on depth, and every listed model is traced at full depth in test_full_depth_variables_match_the_references."""
    model = create_model(name, num_classes=10, stage_sizes=(2, 1, 1, 1))
    variables = random_variables(model, (1, 64, 64, 3))
    apply = jax.jit(model.apply)
    for hw in ((64, 64), (40, 56)):
        logits = apply(variables, jax.random.normal(jax.random.key(1), (2, *hw, 3)))
        assert logits.shape == (2, 10) and logits.dtype == jnp.float32
        assert np.isfinite(np.asarray(logits)).all(), hw


@pytest.mark.parametrize("name,widths", [("resnet18", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))])
def test_features_only_strides_and_shared_names(name, widths):
    """Shape logic only, so on abstract shapes (traced, not run): strides 4/8/16/32 and the stage widths at
    ImageNet's 224 and at a non-square size, and the backbone's parameters are the classifier's minus ``fc``."""
    backbone = create_model(name, features_only=True)
    variables = abstract_init(backbone, (1, 64, 64, 3))
    for hw in ((224, 224), (96, 160)):
        feats = jax.eval_shape(backbone.apply, variables, jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32))
        assert [f.shape for f in feats] == [(1, hw[0] // s, hw[1] // s, c) for s, c in zip((4, 8, 16, 32), widths)]
    classifier_names = set(flatten_dict(abstract_init(create_model(name), (1, 64, 64, 3))["params"]))
    assert set(flatten_dict(variables["params"])) == {k for k in classifier_names if k[0] != "fc"}


def test_classifier_reuses_backbone_features():
    """The classifier's head sees exactly the backbone's last feature map (same parameters, same values)."""
    x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
    classifier = create_model("resnet18", num_classes=0, stage_sizes=(1, 1, 1, 1))
    backbone = create_model("resnet18", features_only=True, stage_sizes=(1, 1, 1, 1))
    variables = random_variables(classifier, x.shape)
    pooled, last = jax.jit(lambda v, x: (classifier.apply(v, x), backbone.apply(v, x)[-1]))(variables, x)
    np.testing.assert_allclose(pooled, last.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_bf16_compute_gives_float32_logits_close_to_float32():
    x = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))
    f32 = create_model("resnet18", num_classes=10, stage_sizes=(2, 1, 1, 1))
    variables = random_variables(f32, x.shape)
    bf16 = f32.clone(dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract_init(bf16, x.shape)))
    ref, low = jax.jit(lambda v, x: (f32.apply(v, x), bf16.apply(v, x)))(variables, x)
    assert low.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(ref - low).max()) < 0.05 * scale


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "avx2-cpu"])
def test_bf16_model_computes_in_float32_throughout_where_the_cpu_has_no_bfloat16(native, monkeypatch):
    """On a CPU without bfloat16 instructions (the flags decide: ``cpu.native_bfloat16``) a bfloat16 model under
    "auto" runs no bfloat16 operation at all, training step included, and still returns bfloat16 features; on
    one with them it computes in bfloat16. A forced XLA algorithm computes as named everywhere."""
    from resnet_jax.ops import cpu
    monkeypatch.setattr(cpu, "native_bfloat16", lambda: native)
    x = jnp.ones((2, 32, 32, 3))
    model = create_model("resnet18", num_classes=10, stage_sizes=(1, 1, 1, 1), dtype=jnp.bfloat16)
    variables = abstract_init(model, x.shape)

    def step(v):
        loss = lambda p: model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"])[0].sum()  # noqa
        return jax.grad(loss)(v["params"])

    assert ("bf16" in str(jax.make_jaxpr(step)(variables))) == native
    features = model.clone(features_only=True).apply
    assert all(f.dtype == jnp.bfloat16 for f in jax.eval_shape(lambda v: features(v, x), variables))
    forced = model.clone(conv_impl="xla")
    assert "bf16" in str(jax.make_jaxpr(lambda v: forced.apply(v, x))(variables))


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_remat_gives_same_outputs_and_gradients(name):
    """Remat wraps each block: a basic-block net, and bottlenecks with a projection and an identity shortcut
    (two blocks in stage 1, one in the others: depth adds nothing here)."""
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    small = {"stage_sizes": (2, 1, 1, 1) if name == "resnet50" else (2, 1, 1)}
    plain = create_model(name, num_classes=10, **small)
    remat = create_model(name, num_classes=10, remat=True, **small)
    variables = random_variables(plain, x.shape)
    assert jax.tree.structure(variables) == jax.tree.structure(abstract_init(remat, x.shape))

    def loss(params, model):
        logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits ** 2), updates

    # each compiled on its own (not op by op, and not in one function whose common parts XLA could merge)
    (l0, u0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, plain), has_aux=True))(variables["params"])
    (l1, u1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, remat), has_aux=True))(variables["params"])
    np.testing.assert_allclose(l0, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), (g0, u0), (g1, u1))


def test_train_mode_updates_batch_stats_with_torchvision_momentum():
    model = create_model("resnet20")
    x = 3.0 + jax.random.normal(jax.random.key(5), (8, 16, 16, 3))
    variables = init(model, x.shape)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    mean = updates["batch_stats"]["bn1"]["mean"]
    assert np.all(np.asarray(variables["batch_stats"]["bn1"]["mean"]) == 0)
    # stem BN sees conv1(x); after one step the running mean moved 10% of the way (torchvision momentum 0.1)
    conv_out = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1), [(1, 1), (1, 1)],
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(mean, 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["preact_resnet18", "preact_resnet50", "resnet50d", "resnext50_32x4d"])
def test_variants_run_on_odd_sizes(name):
    """Odd sizes meet every stride-2 step (stem, pool, stages 2-4), so one block per stage is enough. What can go
    wrong there is shape logic (a shortcut that rounds differently from its branch fails the residual add), so
    the train-mode forward pass is traced on abstract shapes, not compiled: the values are tested against
    torchvision and timm on non-square inputs in test_torchvision.py and test_timm.py."""
    model = create_model(name, num_classes=5, stage_sizes=(1, 1, 1, 1))
    x = jax.ShapeDtypeStruct((2, 75, 45, 3), jnp.float32)
    logits, updates = jax.eval_shape(lambda x: model.apply(init(model, x.shape), x, train=True,
                                                           mutable=["batch_stats"]), x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    expected = abstract_init(model, x.shape)["batch_stats"]
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(expected)


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "resnet50"])
def test_zero_init_residual_makes_blocks_start_as_identity(name):
    """With the residual branch zeroed, each block passes its (shortcut) input through unchanged. Two blocks in
    stage 1 (a projection and an identity shortcut), one after: every kind of block, at any depth."""
    model = create_model(name, zero_init_residual=True, features_only=True, stage_sizes=(2, 1, 1, 1))
    x = jax.random.normal(jax.random.key(7), (1, 64, 64, 3))
    variables = init(model, x.shape)
    # stage 1 of a basic-block net keeps its width: every block is the identity on its non-negative input
    if name == "resnet18":
        stem = create_model(name, features_only=True, stage_sizes=(0, 0, 0, 0))
        blocks, stem_only = jax.jit(lambda v, x: (model.apply(v, x)[0], stem.apply(v, x)[0]))(variables, x)
        np.testing.assert_allclose(blocks, stem_only, rtol=1e-6)
    flat = flatten_dict(variables["params"], sep="/")
    last = [v for k, v in flat.items() if k.endswith(("bn2/scale", "bn3/scale", "conv2/kernel", "conv3/kernel"))
            and (("preact" in name) == ("conv" in k)) and ("bn3" in k or "conv3" in k or "50" not in name)]
    assert last and all(float(jnp.abs(v).max()) == 0 for v in last)


def test_greyscale_input_channels():
    model = create_model("resnet18", in_channels=1, num_classes=3, stage_sizes=(1, 1, 1, 1))
    x = jnp.ones((2, 32, 48, 1))
    assert jax.jit(model.apply)(random_variables(model, x.shape), x).shape == (2, 3)


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnt50")
    with pytest.raises(ValueError, match="list_models"):
        create_model("vgg16")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="'num_clases': did you mean 'num_classes'"):
        create_model("resnet18", num_clases=10)
    # timm's keywords (timm.create_model's own) get our name for the same thing, or why there is none
    with pytest.raises(ValueError, match="'in_chans' \\(timm's\\) is in_channels.*'zero_init_last' \\(timm's\\) "
                                         "is zero_init_residual"):
        create_model("resnet18", in_chans=1, zero_init_last=True)
    with pytest.raises(ValueError, match="'global_pool' \\(timm's\\) is nothing: the pooling is always"):
        create_model("resnet18", global_pool="max")
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", stem="fancy")


@pytest.mark.parametrize("shape,hint", [((1, 3, 32, 32), "NCHW"), ((32, 32, 3), "batch axis"),
                                        ((1, 32, 32, 4), "in_channels=4"), ((32, 32), "got shape")])
def test_wrong_input_shape_gives_clear_error(shape, hint):
    model = create_model("resnet18")
    with pytest.raises(ValueError, match=hint):
        model.init(jax.random.key(0), jnp.zeros(shape))


def test_images_without_pixels_and_nested_lists_get_true_messages():
    """Used to be: a (2, 0, 0, 3) batch gave NaN logits without an error (torch refuses an empty image), and a
    nested list of shape (1, 1, 1, 3) was said to have shape ()."""
    with pytest.raises(RuntimeError):
        torchvision.models.resnet18().eval()(torch.zeros((2, 3, 0, 0)))
    model = create_model("resnet18", num_classes=4)
    with pytest.raises(ValueError, match=r"shape \(2, 0, 0, 3\), with no pixels: height and width must be >= 1"):
        model.init(jax.random.key(0), jnp.zeros((2, 0, 0, 3)))
    variables = model.init(jax.random.key(0), [[[[0.0, 0.0, 0.0]]]])  # a list is an image like any other
    assert variables["params"]["fc"]["kernel"].shape == (512, 4)
    with pytest.raises(ValueError, match=r"NHWC images of shape \(batch, height, width, 3\), got shape \(1, 1, 2\)"):
        model.apply(variables, [[[0.0, 0.0]]])


def test_a_greyscale_batch_without_its_channel_axis_is_told_to_add_it():
    """(N, H, W) to a one-channel model had the advice x[None], which then asked for in_channels=W."""
    model = create_model("resnet20", in_channels=1)
    with pytest.raises(ValueError, match=r"got shape \(8, 16, 16\)\. A greyscale batch \(N, H, W\) needs its "
                                         r"channel axis: x\[\.\.\., None\]"):
        model.init(jax.random.key(0), jnp.zeros((8, 16, 16)))
    with pytest.raises(ValueError, match=r"Add a batch axis with x\[None\]"):  # one image, channels last
        model.init(jax.random.key(0), jnp.zeros((16, 16, 1)))


@pytest.mark.parametrize("option,message", [
    ({"drop_path_rate": None}, "drop_path_rate must be a number in \\[0, 1\\), got None"),
    ({"num_classes": -1}, "num_classes must be a whole number >= 0 .*got -1"),
    ({"num_classes": 2.5}, "num_classes must be a whole number >= 0 .*got 2.5"),
    # a flag given as text took its truthiness: "False" built a pre-activation model, zeroed the residual BNs
    ({"preact": "False"}, "preact must be True or False, got 'False'"),
    ({"zero_init_residual": "False"}, "zero_init_residual must be True or False, got 'False'"),
    ({"features_only": "no"}, "features_only must be True or False, got 'no'"),
    # a zero count divided by zero in the initialisers; a negative stage size was accepted
    ({"groups": 0}, "groups must be a whole number >= 1, got 0"),
    ({"stem_width": 0}, "stem_width must be a whole number >= 1, got 0"),
    ({"in_channels": "1"}, "in_channels must be a whole number >= 1, got '1'"),
    ({"stage_sizes": (2, -1, 2, 2)}, r"stage_sizes must be a sequence of whole numbers >= 0.*got \(2, -1, 2, 2\)"),
    ({"stage_sizes": 2}, "stage_sizes must be a sequence of whole numbers >= 0.*got 2"),
    ({"dtype": "float8"}, "dtype must be a floating dtype .*got 'float8'"),
    ({"param_dtype": jnp.int32}, "param_dtype must be a floating dtype"),
    # out of range, these gave NaN logits without an error
    ({"bn_epsilon": -1.0}, r"bn_epsilon must be a finite number >= 0 .*got -1.0"),
    ({"bn_momentum": 1.5}, r"bn_momentum is the running averages' decay, in \[0, 1\] .*got 1.5"),
    # a zero-width first convolution (ZeroDivisionError) and a zero_pad shortcut asked to narrow (numpy's error)
    ({"stem": "deep_tiered", "stem_width": 6}, r"stem='deep_tiered' needs stem_width >= 8 .*got 6"),
    ({"shortcut": "zero_pad", "stage_widths": (64, 32, 256, 512)},
     r"shortcut='zero_pad' pads the channels, so the widths cannot shrink .*got \[64, 64, 32, 256, 512\]")])
def test_options_of_the_wrong_kind_are_one_sentence(option, message):
    """Used to be a raw TypeError from a comparison with None, an MLIRError at the head for -1 classes, a
    ZeroDivisionError, or another model than asked for."""
    with pytest.raises(ValueError, match=message):
        create_model("resnet18", **option)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int32, jnp.bool_])
def test_integer_images_are_refused_as_torch_refuses_them(dtype):
    """Flax promotes 0..255 pixels silently (the logits of unnormalised images); torchvision's model refuses a
    uint8 batch ("expected scalar type Byte but found Float"), and so does this one, saying what to do."""
    with pytest.raises(RuntimeError):
        torchvision.models.resnet18()(torch.zeros((1, 3, 32, 32), dtype=torch.uint8))
    model = create_model("resnet18")
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=rf"^expected normalised floating-point images, got {jnp.dtype(dtype).name}: "
                                         r"scale and normalise them first"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3), dtype))


def test_flax_name_reaches_the_module_inside_a_users_compact_module():
    """Every Flax module takes ``name=``; ``create_model``'s own first argument took it ("got multiple values for
    argument 'name'"), so a backbone could not get the stable path that pretrained weights are grafted onto."""
    import flax.linen as nn

    class WithHead(nn.Module):
        @nn.compact
        def __call__(self, x):
            features = create_model("resnet18", num_classes=0, name="backbone")(x)
            return nn.Dense(2, name="head")(features)

    params = WithHead().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert sorted(params) == ["backbone", "head"] and "conv1" in params["backbone"]


def test_a_symbolic_batch_exports_on_the_pure_jax_paths(tmp_path):
    """``jax.export`` with a symbolic batch failed inside the algorithm choice ("_DimExpr is not JSON
    serializable") on ``conv_impl="jax"``; sizes that are symbols take XLA's convolutions. The reloaded function
    equals ``model.apply`` at two batch sizes."""
    from jax import export

    model = create_model("resnet18", num_classes=3, conv_impl="jax")
    variables = random_variables(model, (2, 32, 32, 3))
    batch = export.symbolic_shape("b")[0]
    exported = export.export(jax.jit(lambda v, x: model.apply(v, x)))(
        variables, jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32))
    reloaded = export.deserialize(exported.serialize())
    for n in (1, 3):
        x = jnp.asarray(np.random.default_rng(n).standard_normal((n, 32, 32, 3)), jnp.float32)
        want = np.asarray(model.apply(variables, x))  # other float32 algorithms (rounding differs by CPU): to scale
        np.testing.assert_allclose(reloaded.call(variables, x), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_basic_block_rejects_groups():
    with pytest.raises(ValueError, match="Bottleneck"):
        init(create_model("resnet18", groups=32), (1, 32, 32, 3))


def test_public_api_names():
    for name in ["create_model", "list_models", "ResNet", "BasicBlock", "Bottleneck"]:
        assert hasattr(resnet_jax, name)
    names = list_models()
    assert names == sorted(names) and {"resnet50", "resnet56", "resnext101_64x4d", "preact_resnet152",
                                       "resnet50d", "resnet18_cifar", "wide_resnet101_2"} <= set(names)


def test_summary_cli(capsys):
    from resnet_jax.__main__ import main
    assert main(["resnet20", "--image-size", "32"]) == 0
    assert "269,722 parameters" in capsys.readouterr().out
    assert main(["resnt50"]) == 2
    assert "resnet50" in capsys.readouterr().err
