"""The ``Classifier`` facade: fit, evaluate, predict, save/load, export to torchvision.

The digits classifier is trained once per test session (``trained_digits``, shared with tests/test_export.py
and across pytest-xdist workers); what the freshly fitted, in-memory classifier gave (its history and its
predictions) is recorded then, and the tests use it loaded from the run's workdir, as a user would."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import data
from resnet_jax.checkpoint import ConfigMismatch
from resnet_jax.training.classifier import Classifier
from training_helpers import once_per_session


def validation_images(n=12):
    src = data.get_source("digits", "validation", image_size=8)
    return np.stack([src[i]["image"] for i in range(n)]), [src[i]["label"] for i in range(n)]


def trained_digits(tmp_path_factory):
    """``(workdir, record)`` of a real digits classifier (ResNet-8 at 8x8, 3 epochs), trained once per session;
    ``record``: the fitted classifier's ``history`` and its ``predict`` of ``validation_images()``, taken in
    memory right after ``fit``."""
    def compute(directory):
        clf = Classifier("resnet20", num_classes=10, in_channels=1, image_size=8,
                         model_overrides={"stage_sizes": (1, 1, 1)})
        clf.fit("digits", workdir=directory / "workdir", num_epochs=3, batch_size=32, augment="none",
                learning_rate=1.6, schedule="cosine", progress_bar=False, compilation_cache_dir="")
        record = {"history": clf.history, "predictions": clf.predict(validation_images()[0])}
        return json.loads(json.dumps(record, default=lambda v: v.item()))  # numpy scalars as numbers

    directory, record = once_per_session(tmp_path_factory, "digits_classifier", compute)
    return directory / "workdir", record


@pytest.fixture(scope="module")
def fitted_record(tmp_path_factory):
    return trained_digits(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, fitted_record):
    clf = Classifier.load(trained_digits(tmp_path_factory)[0])
    clf.history = fitted_record["history"]
    return clf


def test_fit_learns_and_evaluate_agrees_with_history(fitted):
    metrics = fitted.evaluate()
    assert metrics["accuracy"] > 0.8
    last_val = [r for r in fitted.history if r["split"] == "val"][-1]
    assert metrics["accuracy"] == pytest.approx(last_val["accuracy"])


def test_evaluate_takes_any_batch_size_on_any_device_count(tmp_path_factory, fitted):
    """``train.evaluate``'s default batch of 256 on 3 devices (which do not divide it) gives the metrics of one
    device: a raw sharding error before."""
    from conftest import run_python

    workdir = trained_digits(tmp_path_factory)[0]
    done = run_python(module="train.evaluate", args=[f"--workdir={workdir}", "--batch_size=256"],
                      env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(fitted.evaluate()["accuracy"])


def test_predict_returns_topk_names_and_probabilities(fitted):
    images, labels = validation_images()
    predictions = fitted.predict(images, top_k=3)
    assert len(predictions) == len(images) and all(len(p) == 3 for p in predictions)
    for top in predictions:
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    hits = sum(top[0][0] == str(label) for top, label in zip(predictions, labels))
    assert hits >= 8
    single = fitted.predict(images[0], top_k=1)
    assert single[0][0] == predictions[0][0]


def test_predict_preprocesses_exactly_as_evaluation_did(fitted):
    """The run resolved and saved its evaluation crop (whole image for fixed-size digits); predict reuses it."""
    assert fitted.config.eval_crop_fraction == 1.0
    images, _ = validation_images(5)
    src = data.get_source("digits", "validation", image_size=8)
    mean, std = fitted._stats()
    batch = next(iter(data.eval_loader(src, batch_size=5, image_size=8, mean=mean, std=std, channels=1)))
    np.testing.assert_allclose(np.asarray(fitted.preprocess(images)), batch["image"], atol=1e-6)


def test_predict_takes_a_greyscale_batch_and_refuses_other_shapes_in_one_sentence(fitted):
    """(N, H, W) uint8 digits (which once crashed inside PIL): for a one-channel model they are N images."""
    images, _ = validation_images(4)
    got = fitted.predict(images[:, :, :, 0], top_k=2)
    assert got == fitted.predict(images, top_k=2) == fitted.predict(list(images[:, :, :, 0]), top_k=2)
    with pytest.raises(ValueError, match=r"cannot read images of shape \(1, 4, 8, 8, 1\)"):
        fitted.predict(images[None])
    # np.asarray of a greyscale PNG with alpha, (H, W, 2): read as H images 2 pixels wide, it gave 8 predictions
    with_alpha = np.concatenate([images[0], np.full_like(images[0], 255)], axis=-1)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 2\).*greyscale image with alpha: keep the grey band"):
        fitted.predict(with_alpha)


def test_predict_reads_image_files_and_rejects_floats(fitted, tmp_path):
    from PIL import Image

    images, _ = validation_images(1)
    path = tmp_path / "digit.png"
    Image.fromarray(images[0][:, :, 0]).save(path)
    assert fitted.predict([str(path)], top_k=1)[0][0][0] == fitted.predict(images[0], top_k=1)[0][0][0]
    with pytest.raises(ValueError, match=r"uint8.*np\.clip\(x \* 255"):
        fitted.predict(images.astype(np.float32) / 255)
    # integers in 0..255 (np.asarray of a list, arithmetic in int64) need a cast, not the floats' "x * 255"
    with pytest.raises(ValueError, match=r"got int64 in the image; if its values are 0\.\.255, convert with "
                                         r"x\.astype\(np\.uint8\)"):
        fitted.predict(images[0].astype(np.int64))
    with pytest.raises(FileNotFoundError):
        fitted.predict([str(tmp_path / "missing.png")])


def test_save_load_round_trip_and_load_from_run(fitted, fitted_record, tmp_path):
    """The run's checkpoint predicts what the fitted classifier did in memory, and so does a save of it."""
    images, _ = validation_images()
    expected = fitted_record["predictions"]
    fitted.save(tmp_path / "saved")
    for source in (tmp_path / "saved", fitted.workdir):
        loaded = Classifier.load(source)
        got = loaded.predict(images)
        assert [[n for n, _ in t] for t in got] == [[n for n, _ in t] for t in expected]
        np.testing.assert_allclose([[p for _, p in t] for t in got], [[p for _, p in t] for t in expected],
                                   rtol=1e-5)


def test_fit_continues_from_the_weights_the_classifier_has(fitted, tmp_path):
    """A loaded (or fitted) classifier's ``fit`` trained a new model from scratch, silently: a 94% model fitted
    one more step at a tiny rate came out at chance. It continues from its weights now, as a Keras model's fit."""
    clf = Classifier.load(fitted.workdir)
    before = clf.evaluate()["accuracy"]
    clf.fit("digits", workdir=tmp_path / "more", max_steps=1, learning_rate=1e-9, schedule="constant",
            progress_bar=False, compilation_cache_dir="")
    assert before > 0.8 and abs(clf.evaluate()["accuracy"] - before) < 0.02
    jax.tree.map(lambda new, old: np.testing.assert_allclose(new, old, atol=1e-6), clf.variables["params"],
                 fitted.variables["params"])


def test_a_fit_on_other_data_derives_the_evaluation_crop_again(fitted):
    """The digits run derived a centre crop of 1.0 (fixed-size images); kept for a fit on photographs, those
    evaluated and predicted on the whole image, not torchvision's 87.5% crop. Given to fit, it is kept."""
    assert fitted.config.eval_crop_fraction == 1.0
    assert fitted._fit_config("imagenette/160px", {"augment": "imagenet"}).eval_crop_fraction == 0.0  # derived anew
    assert fitted._fit_config("digits", {"augment": "imagenet"}).eval_crop_fraction == 0.0
    assert fitted._fit_config("digits", {}).eval_crop_fraction == 1.0  # the same data: the same run's value
    given = fitted._fit_config("imagenette/160px", {"augment": "imagenet", "eval_crop_fraction": 0.9})
    assert given.eval_crop_fraction == 0.9


def test_evaluate_on_a_folder_without_the_run_s_split_says_which_argument_to_pass(fitted, tmp_path):
    """The folder's message named the run's config keys (config.val_split), which evaluate takes as split=."""
    (tmp_path / "held_out" / "0").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no split folder 'validation' \(its folders: held_out\); name one of "
                                         r"them as the split \(evaluate\(dataset, split=NAME\)\)"):
        fitted.evaluate(f"folder:{tmp_path}")


def test_a_refused_fit_leaves_no_directory_and_keeps_the_classifier_s_workdir(fitted, tmp_path, monkeypatch):
    """A fit refused before writing anything left an empty temporary directory, and pointed the classifier at it
    (its next fit then took that for the run its weights came from)."""
    import tempfile

    clf = Classifier.load(fitted.workdir)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(ValueError, match="learning_rate"):
        clf.fit("digits", learning_rate=-1.0)
    assert list(tmp_path.iterdir()) == [] and clf.workdir == fitted.workdir


def test_export_torchvision_round_trips(fitted, tmp_path):
    from resnet_jax.torch_file import read_torch_file

    path = fitted.export_torchvision(tmp_path / "digits.pth")
    state_dict = read_torch_file(path)
    assert state_dict["conv1.weight"].shape == (16, 1, 3, 3) and state_dict["fc.weight"].shape == (10, 64)
    assert "layer1.0.bn1.num_batches_tracked" in state_dict


def test_unfitted_classifier_says_what_to_do():
    with pytest.raises(RuntimeError, match="fit"):
        Classifier("resnet20").predict(np.zeros((8, 8, 3), np.uint8))


def test_input_channels_given_as_a_model_override_are_refused_not_replaced():
    """``model_overrides={"in_channels": 1}`` was silently replaced by the argument's default (3): a greyscale
    classifier built for colour. The sentence names the argument to use; the argument itself works."""
    with pytest.raises(ValueError, match=r"Classifier\(\.\.\., in_channels=1\)"):
        Classifier("resnet20", num_classes=10, image_size=8, model_overrides={"in_channels": 1})
    assert Classifier("resnet20", num_classes=10, image_size=8, in_channels=1,
                      model_overrides={"in_channels": 1}).model.in_channels == 1


def test_predict_compiles_once_and_equals_the_plain_model(fitted, caplog):
    """Repeated predictions reuse one compiled function (it was re-traced and re-compiled on every call), and it
    is the BatchNorm-folded model that evaluation runs, equal to the plain one within float32 rounding; the
    top-3 it returns are the plain model's most probable classes with their softmax probabilities."""
    images, _ = validation_images(7)  # a batch size no other test predicts, so the first call compiles
    batch = fitted.preprocess(images)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        first = fitted._logits(batch)
        compiled = len([r for r in caplog.records if "Finished XLA compilation" in r.getMessage()])
        caplog.clear()
        again = fitted.predict(images, top_k=3)
        assert not [r.getMessage() for r in caplog.records if "Finished XLA compilation" in r.getMessage()]
    assert compiled >= 1
    plain = fitted.model.apply(fitted.variables, batch, train=False)
    scale = float(jnp.abs(plain).max())
    np.testing.assert_allclose(first, plain, rtol=0, atol=1e-4 * scale)
    logits = np.asarray(plain, np.float64)
    reference = np.exp(logits - logits.max(-1, keepdims=True))
    reference /= reference.sum(-1, keepdims=True)
    tolerance = 2e-4 * scale  # a probability moves by at most twice the largest change of a logit
    for row, probs in zip(again, reference, strict=True):
        picked = [fitted.class_names.index(name) for name, _ in row]
        assert len(picked) == 3
        np.testing.assert_allclose([p for _, p in row], probs[picked], rtol=0, atol=tolerance)
        assert np.delete(probs, picked).max() <= probs[picked].min() + tolerance  # no likelier class left out


def test_predict_follows_new_weights(fitted):
    """predict folds the BatchNorm into the convolutions once per set of weights, not on every call; new weights
    (new arrays, as training and loading make) are folded again, and the old ones give their old logits back."""
    images, _ = validation_images(4)
    batch = fitted.preprocess(images)
    before = fitted._logits(batch)
    old = fitted.variables
    params = dict(old["params"])
    favoured = int(jnp.argmin(before[0]))  # the first image's least likely class becomes every image's likeliest
    params["fc"] = {**params["fc"], "bias": params["fc"]["bias"].at[favoured].add(1e3)}
    try:
        fitted.variables = {**old, "params": params}
        after = fitted._logits(batch)
        plain = fitted.model.apply(fitted.variables, batch, train=False)
        np.testing.assert_allclose(after, plain, rtol=0, atol=1e-4 * float(jnp.abs(plain).max()))
        assert [top[0][0] for top in fitted.predict(images, top_k=1)] == [fitted.class_names[favoured]] * 4
    finally:
        fitted.variables = old
    np.testing.assert_array_equal(fitted._logits(batch), before)


def test_class_names_of_another_length_are_refused():
    """Used to be accepted (2 names for 10 classes), and predict then named classes from a short list."""
    with pytest.raises(ValueError, match=r"class_names has 2 names for a model of 10 classes \(num_classes\); give "
                                         r"one name per class"):
        Classifier("resnet20", 10, in_channels=1, image_size=8, class_names=["a", "b"])
    assert Classifier("resnet20", 2, in_channels=1, image_size=8, class_names=["a", "b"]).class_names == ["a", "b"]


TINY = dict(in_channels=1, image_size=8, model_overrides={"stage_sizes": (1, 1, 1)})
ONE_STEP = dict(max_steps=1, batch_size=32, augment="none", progress_bar=False, compilation_cache_dir="")


@pytest.mark.parametrize("given", [{"num_classes": 5}, {"class_names": ["a", "b", "c"]}])
def test_fit_refuses_a_dataset_of_another_class_count_than_the_model_was_made_for(tmp_path, given):
    """``Classifier("resnet20", 5).fit("digits")`` trained a 10-class model without a word (the head followed
    the data). Refused before anything is written; without a class count the head still follows the data."""
    clf = Classifier("resnet20", **given, **TINY)
    count = given.get("num_classes") or len(given["class_names"])
    given = f"num_classes={count}" if "num_classes" in given else f"class_names has {count} names"
    with pytest.raises(ValueError, match=rf"^{given} but digits has 10 classes, which the labels"):
        clf.fit("digits", workdir=tmp_path / "run", **ONE_STEP)
    assert not (tmp_path / "run").exists()
    assert clf.num_classes == count and clf.variables is None
    follows = Classifier("resnet20", **TINY)
    follows.fit("digits", workdir=tmp_path / "follows", **ONE_STEP)
    assert follows.num_classes == 10 and follows.model.num_classes == 10


def test_class_names_given_for_index_labelled_data_are_kept_by_fit_save_and_load(tmp_path):
    """digits' labels are numbers: the names a user gives were replaced by "0".."9" at fit (and so lost in the
    saved run); they now name the predictions, in memory and loaded back."""
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    clf = Classifier("resnet20", class_names=names, **TINY)
    assert clf.num_classes == 10
    clf.fit("digits", workdir=tmp_path / "run", **ONE_STEP)
    loaded = Classifier.load(tmp_path / "run")
    assert clf.class_names == loaded.class_names == names
    assert {name for top in loaded.predict(validation_images(4)[0], top_k=3) for name, _ in top} <= set(names)
    # the run's advice in fit's own words: keyword arguments, not the command line's flags
    with pytest.raises(ConfigMismatch) as refused:
        clf.fit("digits", workdir=tmp_path / "run", **{**ONE_STEP, "learning_rate": 0.5})
    assert "use a new workdir" in str(refused.value) and "pass restart=True" in str(refused.value)
    assert "--" not in str(refused.value)


def test_fit_given_an_array_says_it_takes_a_dataset_name(tmp_path):
    """Used to be numpy's "The truth value of an array with more than one element is ambiguous"."""
    with pytest.raises(ValueError, match=r"^fit takes a dataset's name \('digits', .*not ndarray; write in-memory "
                                         r"images to a folder"):
        Classifier("resnet20", in_channels=1).fit(np.zeros((4, 8, 8, 1), np.uint8), workdir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_class_weights_from_numpy_as_sklearn_computes_them():
    """``compute_class_weight`` returns an array (and torch's CrossEntropyLoss takes one); ml_collections refused
    it as "cannot be casted to type tuple", in Classifier(...) and in fit(...)."""
    from sklearn.utils.class_weight import compute_class_weight

    weights = compute_class_weight("balanced", classes=np.arange(3), y=np.array([0, 0, 1, 2, 2, 2]))
    clf = Classifier("resnet20", 3, in_channels=1, class_weights=weights, mean=np.array([0.5]), std=np.array([0.25]))
    assert clf.config.class_weights == tuple(weights.tolist()) and tuple(clf.config.mean) == (0.5,)
    assert clf._fit_config("digits", {"class_weights": weights[::-1].copy()}).class_weights == tuple(weights[::-1])


def test_a_greyscale_folder_trains_a_one_channel_model_without_asking_for_its_statistics(tmp_path):
    """A folder dataset has no known statistics, so ImageNet's three values were used, and a one-channel model
    refused them ("mean/std have 3/3 values but the images have 1 channels"): fitted to one channel as published
    RGB weights are for such a model (stats_for_channels: the three values' mean)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "validation"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(
                    tmp_path / "data" / split / name / f"{i}.png")
    clf = Classifier("resnet20", in_channels=1, image_size=8, model_overrides={"stage_sizes": (1, 1, 1)})
    clf.fit(f"folder:{tmp_path / 'data'}", workdir=tmp_path / "run", max_steps=1, batch_size=4, eval_batch_size=4,
            progress_bar=False, compilation_cache_dir="")
    mean, std = clf._stats()
    assert mean == pytest.approx((np.mean([0.485, 0.456, 0.406]),)) and std == pytest.approx((np.mean([0.229, 0.224,
                                                                                                        0.225]),))
    assert clf.class_names == ["a", "b"] and len(clf.predict(np.zeros((8, 8), np.uint8))[0]) == 2
