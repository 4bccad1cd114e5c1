"""The model family: exact parameter counts, shapes, features, dtypes, remat, and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import resnet_jax
from resnet_jax import create_model, list_models

TORCHVISION_COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336,
    "resnext101_64x4d": 83_455_272, "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696,
}
# He et al. 2015 CIFAR models at 10 classes, and the CIFAR-stem ResNet-18 of the seed articles.
CIFAR_COUNTS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
                "resnet110": 1_727_962, "resnet18_cifar": 11_173_962}


def param_count(model, size=64):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, model.in_channels)))
    return sum(p.size for p in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name,count", sorted({**TORCHVISION_COUNTS, **CIFAR_COUNTS}.items()))
def test_parameter_count_is_exact(name, count):
    overrides = {"num_classes": 10} if name in CIFAR_COUNTS else {}
    assert param_count(create_model(name, **overrides)) == count


def test_every_listed_model_initialises():
    for name in list_models():
        assert param_count(create_model(name, num_classes=7)) > 0, name


def init(model, shape, seed=0):
    return model.init(jax.random.key(seed), jnp.zeros(shape), train=False)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("hw", [(224, 224), (96, 160)])
def test_logits_shape_square_and_non_square(name, hw):
    model = create_model(name, num_classes=10)
    x = jax.random.normal(jax.random.key(1), (2, *hw, 3))
    variables = init(model, x.shape)
    logits = model.apply(variables, x)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name,widths", [("resnet18", (64, 128, 256, 512)), ("resnet50", (256, 512, 1024, 2048))])
def test_features_only_strides_and_shared_names(name, widths):
    hw = (96, 160)
    backbone = create_model(name, features_only=True)
    feats = backbone.apply(init(backbone, (1, *hw, 3)), jnp.ones((1, *hw, 3)))
    assert [f.shape for f in feats] == [(1, hw[0] // s, hw[1] // s, c) for s, c in zip((4, 8, 16, 32), widths)]
    classifier_names = set(flatten_dict(init(create_model(name), (1, 64, 64, 3))["params"]))
    backbone_names = set(flatten_dict(init(backbone, (1, 64, 64, 3))["params"]))
    assert backbone_names == {k for k in classifier_names if k[0] != "fc"}


def test_classifier_reuses_backbone_features():
    """The classifier's head sees exactly the backbone's last feature map (same parameters, same values)."""
    x = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
    classifier = create_model("resnet18", num_classes=0)
    variables = init(classifier, x.shape)
    pooled = classifier.apply(variables, x)
    last = create_model("resnet18", features_only=True).apply(variables, x)[-1]
    np.testing.assert_allclose(pooled, last.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_bf16_compute_gives_float32_logits_close_to_float32():
    x = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))
    f32 = create_model("resnet18", num_classes=10)
    variables = init(f32, x.shape)
    bf16 = create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(init(bf16, x.shape)))
    ref, low = f32.apply(variables, x), bf16.apply(variables, x)
    assert low.dtype == jnp.float32
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(ref - low).max()) < 0.05 * scale


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_remat_gives_same_outputs_and_gradients(name):
    x = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    plain, remat = create_model(name, num_classes=10), create_model(name, num_classes=10, remat=True)
    variables = init(plain, x.shape)
    assert jax.tree.structure(variables) == jax.tree.structure(init(remat, x.shape))

    def loss(params, model):
        logits, updates = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(logits ** 2), updates

    (l0, u0), g0 = jax.value_and_grad(loss, has_aux=True)(variables["params"], plain)
    (l1, u1), g1 = jax.value_and_grad(loss, has_aux=True)(variables["params"], remat)
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
    model = create_model(name, num_classes=5)
    x = jax.random.normal(jax.random.key(6), (2, 75, 45, 3))
    logits, _ = model.apply(init(model, x.shape), x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 5) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "resnet50"])
def test_zero_init_residual_makes_blocks_start_as_identity(name):
    """With the residual branch zeroed, each block passes its (shortcut) input through unchanged."""
    model = create_model(name, zero_init_residual=True, features_only=True)
    x = jax.random.normal(jax.random.key(7), (1, 64, 64, 3))
    variables = init(model, x.shape)
    feats = model.apply(variables, x)
    # stage 1 of a basic-block net keeps its width: every block is the identity on its non-negative input
    if name == "resnet18":
        stem = create_model(name, features_only=True, stage_sizes=(0, 0, 0, 0))
        np.testing.assert_allclose(feats[0], stem.apply(variables, x)[0], rtol=1e-6)
    flat = flatten_dict(variables["params"], sep="/")
    last = [v for k, v in flat.items() if k.endswith(("bn2/scale", "bn3/scale", "conv2/kernel", "conv3/kernel"))
            and (("preact" in name) == ("conv" in k)) and ("bn3" in k or "conv3" in k or "50" not in name)]
    assert last and all(float(jnp.abs(v).max()) == 0 for v in last)


def test_greyscale_input_channels():
    model = create_model("resnet18", in_channels=1, num_classes=3)
    x = jnp.ones((2, 32, 48, 1))
    assert model.apply(init(model, x.shape), x).shape == (2, 3)


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnt50")
    with pytest.raises(ValueError, match="list_models"):
        create_model("vgg16")


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="num_clases"):
        create_model("resnet18", num_clases=10)
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", stem="fancy")


@pytest.mark.parametrize("shape,hint", [((1, 3, 32, 32), "NCHW"), ((32, 32, 3), "batch axis"),
                                        ((1, 32, 32, 4), "in_channels=4"), ((32, 32), "got shape")])
def test_wrong_input_shape_gives_clear_error(shape, hint):
    model = create_model("resnet18")
    with pytest.raises(ValueError, match=hint):
        model.init(jax.random.key(0), jnp.zeros(shape))


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
