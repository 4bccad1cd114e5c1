"""Every recipe in train/configs/ loads, validates and builds its model (shapes only: no data, no compile), and
a float setting that is NaN or infinite is refused."""

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from resnet_jax import create_model, list_models
from resnet_jax.training import validate
from resnet_jax.training.config import min_image_size, model_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.py") if p.stem != "__init__")
VARIANTS = {"imagenet_resnet50": ("step", "cosine")}  # recipes whose get_config takes a variant (file.py:variant)
CLASSES = {"digits": 10, "cifar10": 10, "imagenet2012": 1000}
CHANNELS = {"digits": 1, "cifar10": 3, "imagenet2012": 3}


def cases():
    return [(name, variant) for name in RECIPES for variant in VARIANTS.get(name, (None,))]


def test_the_recipe_list_is_not_empty():
    assert {"default", "cifar10_resnet56", "imagenet_resnet50"} <= set(RECIPES)


@pytest.mark.parametrize("name,variant", cases())
def test_recipe_validates_and_builds_its_model(name, variant):
    module = importlib.import_module(f"train.configs.{name}")
    config = validate(module.get_config() if variant is None else module.get_config(variant))
    assert config.dataset in CLASSES, f"add {config.dataset!r} to CLASSES and CHANNELS in this test"
    model = model_from_config(config, CLASSES[config.dataset])
    assert config.image_size >= min_image_size(model)
    if config.dataset == "digits":  # a mirrored digit is another digit or none: shifts only
        assert config.augment in ("crop", "none"), f"{name} mirrors digits (augment={config.augment!r})"
    images = jax.ShapeDtypeStruct((2, config.image_size, config.image_size, model.in_channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, CLASSES[config.dataset]) and logits.dtype == jnp.float32
    if model.in_channels != CHANNELS[config.dataset]:  # the loader converts 1 <-> 3 channels, nothing else
        assert {model.in_channels, CHANNELS[config.dataset]} == {1, 3}


def test_the_recipes_evaluate_at_the_resolution_they_train_at():
    """RSB A1 at timm's own sizes for any ``--img-size`` (``floor(size / crop_pct)``, crop_pct 0.95), the V2
    recipe at its 232/224 for 176 and the same ratios at another size; both fixed at 224 evaluated a 24 px run
    upsampled (chance accuracy). An explicit evaluation size still wins."""
    import timm.data

    rsb = importlib.import_module("train.configs.imagenet_resnet50_rsb_a1")
    for size in (224, 24, 160):
        config = rsb.get_config()
        config.image_size = size
        config = validate(config)
        timm_resize = timm.data.create_transform(size, crop_pct=0.95, interpolation="bicubic").transforms[0]
        assert (config.eval_resize, config.eval_crop) == (timm_resize.size, size)
    config = rsb.get_config()  # an evaluation size set by hand is that alone (it once set image_size too)
    config.eval_crop, config.eval_resize = 200, 210
    assert (validate(config).image_size, validate(config).eval_crop, validate(config).eval_resize) == (224, 200, 210)
    tv2 = importlib.import_module("train.configs.imagenet_resnet50_tv2")
    assert (validate(tv2.get_config()).eval_resize, validate(tv2.get_config()).eval_crop) == (232, 224)
    config = tv2.get_config()
    config.image_size = 24
    assert (validate(config).eval_resize, validate(config).eval_crop) == (32, 31)
    config.eval_crop, config.eval_resize = 20, 22
    config.image_size = 32
    assert (validate(config).eval_resize, validate(config).eval_crop) == (22, 20)


def test_an_unknown_variant_is_a_clear_error():
    module = importlib.import_module("train.configs.imagenet_resnet50")
    with pytest.raises(ValueError, match="unknown variant 'cosin'.*'step' or 'cosine'"):
        module.get_config("cosin")


@pytest.mark.parametrize("name,overrides", [(n, {}) for n in list_models()] + [("resnet50", {"output_stride": 8})])
def test_min_image_size_is_what_the_model_downsamples_by(name, overrides):
    """The smallest input the training loop accepts leaves exactly one pixel after the last stage, for every
    stem (the tiered one of ecaresnet26t/50t had none) and output stride."""
    model = create_model(name, features_only=True, **overrides)
    size = min_image_size(model)
    x = jax.ShapeDtypeStruct((1, 2 * size, 2 * size, model.in_channels), jnp.float32)
    features = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0], x)
    assert features[-1].shape[1:3] == (2, 2)


FLOATS_WITH_A_RANGE = ("learning_rate", "warmup_epochs", "weight_decay", "mixup_alpha", "cutmix_alpha", "momentum",
                       "lr_decay", "eval_crop_fraction", "label_smoothing", "random_erasing", "bce_target_threshold",
                       "model_ema_decay", "drop_path_rate", "lars_trust_coefficient")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", FLOATS_WITH_A_RANGE)
def test_a_float_setting_that_is_not_finite_is_one_sentence(key, value):
    """NaN passed every ``x <= 0`` / ``x < 0`` check and infinity every lower bound (``--config.learning_rate=nan``
    was accepted and trained on NaN)."""
    from resnet_jax.training.config import base_config

    config = base_config()
    config[key] = value
    with pytest.raises(ValueError, match=rf"^config\.{key} must be a finite number, got {value}$"):
        validate(config)


@pytest.mark.parametrize("changes, message", [
    ({"ra_reps": True}, r"^config\.ra_reps must be a number, got True$"),
    ({"mixup_alpha": True}, r"^config\.mixup_alpha must be a number, got True$"),
    ({"num_workers": -1}, r"^config\.num_workers must be 0 \(read in this process\) or more, got -1$"),
    ({"seed": -1}, r"^config\.seed must be in \[0, 2\*\*32\), got -1$"),
    ({"nesterov": True, "momentum": 0.0}, r"^config\.nesterov=True needs a momentum"),
    ({"nesterov": True, "optimizer": "adamw"}, r"^config\.nesterov=True applies to the sgd and lars optimizers; adamw"),
    ({"nesterov": True, "optimizer": "lamb"}, r"^config\.nesterov=True applies to the sgd and lars optimizers; lamb"),
    ({"warmup_epochs": 5.0, "num_epochs": 2}, r"^config\.warmup_epochs=5\.0 is not shorter than config\.num_epochs=2"),
    ({"bce_target_threshold": 0.2}, r"^config\.bce_target_threshold binarises .* with loss='ce' it would be ignored"),
    ({"bce_target_threshold": 1.0, "loss": "bce"}, r"^config\.bce_target_threshold must be in \[0, 1\) \(0 = off\)"),
])
def test_mistyped_or_contradictory_settings_are_one_sentence_before_training(changes, message):
    """Each was accepted and did something else: True as ra_reps 1 or mixup 1.0, nesterov without momentum as
    plain SGD (torch.optim.SGD refuses it), a warm-up as long as the run never reaching the peak (a shrunk
    recipe keeps its 5 epochs), a BCE threshold ignored by CE; a negative worker count or seed failed later, in
    the data pipeline's words, after the run had started."""
    import ml_collections

    from resnet_jax.training.config import base_config

    with pytest.raises(ValueError, match=message):
        validate(ml_collections.ConfigDict({**base_config().to_dict(), **changes}))


@pytest.mark.parametrize("key, values, message", [
    ("mean", (0.5, float("nan"), 0.5), "must be finite numbers"),
    ("std", (0.2, 0.2, float("inf")), "must be finite numbers"),
    ("class_weights", (1.0, float("nan")), "must be finite numbers"),
    ("std", (0.2, 0.0, 0.2), "must be positive"),
    ("std", (-0.2, 0.2, 0.2), "must be positive"),
    ("class_weights", (1.0, -1.0), "must be 0 or more with at least one positive"),
    ("class_weights", (0.0, 0.0), "must be 0 or more with at least one positive"),
    ("lars_trust_coefficient", 0.0, "must be positive"),
])
def test_per_channel_numbers_out_of_range_are_one_sentence(key, values, message):
    """A NaN mean or class weight trained on NaN, a zero std divided by zero (torchvision's ``Normalize`` refuses
    it), negative or all-zero class weights gave a loss without a minimum or without a gradient."""
    from resnet_jax.training.config import base_config

    config = base_config()
    config[key] = values
    if key in ("mean", "std"):
        config["mean" if key == "std" else "std"] = (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match=rf"^config\.{key} {message}"):
        validate(config)


def test_numpy_numbers_are_numbers():
    """``np.float32`` statistics (as computed from a dataset) were refused as "must be finite numbers"."""
    import numpy as np

    from resnet_jax.training.config import base_config

    config = base_config()
    config.mean, config.std = tuple(np.float32([0.5, 0.4, 0.3])), tuple(np.float64([0.2, 0.2, 0.2]))
    assert validate(config).mean == pytest.approx((0.5, 0.4, 0.3))
    import json  # stored as Python floats: numpy scalars made config.json "unserializable" and the checkpoint fail
    assert json.loads(validate(config).to_json())["std"] == pytest.approx([0.2, 0.2, 0.2])
    config.mean = (True, 0.4, 0.3)
    with pytest.raises(ValueError, match="must be finite numbers"):
        validate(config)


@pytest.mark.parametrize("recipe, decays_everything", [
    ("imagenet_resnet50", True),  # torchvision's reference train.py: --norm-weight-decay/--bias-weight-decay unset
    ("imagenet_resnet50:cosine", False),  # He et al. 2019's "no bias decay"
    ("cifar10_resnet56", True), ("cifar10_resnet18", True),  # torch.optim.SGD(model.parameters(), weight_decay=...)
    ("imagenet_resnet50_tv2", False), ("imagenet_resnet50_rsb_a1", False),  # --norm-weight-decay 0; timm's factory
])
def test_recipes_decay_the_parameters_their_references_decay(recipe, decays_everything):
    """The seed recipes cite references that decay every parameter, BatchNorm's scale and bias included; they
    had kept the library's default, which exempts them (all 107 one-dimensional tensors of ResNet-50)."""
    import jax.numpy as jnp

    from resnet_jax.training import make_optimizer

    name, _, variant = recipe.partition(":")
    module = importlib.import_module(f"train.configs.{name}")
    config = validate(module.get_config(variant) if variant else module.get_config())
    config.update(learning_rate=0.1, lr_scaling="none", schedule="constant", warmup_epochs=0.0, momentum=0.0)
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2)}}
    tx = make_optimizer(config, steps_per_epoch=1)
    updates, _ = tx.update({"conv": {"kernel": jnp.zeros((3, 3, 2, 2))}, "bn": {"scale": jnp.zeros(2)}},
                           tx.init(params), params)
    assert float(updates["conv"]["kernel"].ravel()[0]) < 0  # conv kernels decay in every recipe
    assert (float(updates["bn"]["scale"][0]) < 0) == decays_everything


@pytest.mark.parametrize("threshold, smoothing, made", [(0.95, 0.1, 0), (0.9, 0.0, None), (0.005, 0.1, 1),
                                                        (0.91, 0.1, 0)])
def test_a_bce_threshold_outside_the_targets_values_is_refused_once_the_classes_are_known(threshold, smoothing, made):
    """Targets are binarised as timm does (1 above the threshold, else 0) after smoothing: with 0.1 over 10
    classes they are 0.01 and 0.91, and a threshold at or above 0.91 made every target 0 (the loss then only
    pushed every logit down), one below 0.01 every target 1; both were accepted. 0.9 without smoothing (targets 0
    and 1) binarises as it should."""
    import ml_collections

    from resnet_jax.training.config import base_config, check_against_data

    config = validate(ml_collections.ConfigDict({**base_config().to_dict(), "loss": "bce",
                                                 "bce_target_threshold": threshold, "label_smoothing": smoothing}))
    if made is None:
        check_against_data(config, 10)
        return
    with pytest.raises(ValueError, match=rf"^config\.bce_target_threshold={threshold} makes every target {made}: "
                                         rf"with label_smoothing=0\.1 over 10 classes the targets are 0\.01 and 0\.91"):
        check_against_data(config, 10)
