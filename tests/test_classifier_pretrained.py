"""``Classifier.from_pretrained``: published weights plus the preprocessing they were measured with.

The reference is torchvision itself: its ResNet-18 with its own ``weights.transforms()``, fed the same weights
(a local file, as ``file=`` takes it: torchvision's ``resnet18()`` with a fixed seed and random BatchNorm
statistics, so no download), must give the same top-5 ImageNet names with probabilities within 1e-3 on
scikit-learn's sample photographs. The fine-tuned, exported and reloaded forms keep that preprocessing."""

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_image

from conftest import random_batch_stats, run_python
from resnet_jax.training.classifier import Classifier
from training_helpers import worker_env

TAG = "resnet18.IMAGENET1K_V1"


def photos():
    """Two photographs of different shapes (landscape, and a portrait cut with odd sizes)."""
    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    return [china, np.ascontiguousarray(flower[40:401, 100:333])]


@pytest.fixture(scope="module")
def torch_resnet18(tmp_path_factory):
    """``(model, file)``: torchvision's ResNet-18 with seeded random weights and BatchNorm statistics, and the
    file it was saved to with ``torch.save`` (its top-5 probabilities on the photos are 0.5 to 0.02, well apart)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.load_state_dict(random_batch_stats(model.state_dict(), 0))
    path = tmp_path_factory.mktemp("weights") / "resnet18-local.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


@pytest.fixture(scope="module")
def clf(torch_resnet18):
    return Classifier.from_pretrained(TAG, file=torch_resnet18[1])


def torchvision_top5(model, image):
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    with torch.no_grad():
        probs = torch.softmax(model(transform(Image.fromarray(image))[None]), -1)[0].numpy()
    order = np.argsort(-probs)[:5]
    return [names[i] for i in order], probs[order]


def test_predict_equals_torchvision_with_its_own_transforms(clf, torch_resnet18, tmp_path):
    """On an array and on an image file (lossless, so both hold the same pixels)."""
    Image.fromarray(photos()[1]).save(tmp_path / "photo.png")
    ours = clf.predict([photos()[0], str(tmp_path / "photo.png")])
    for image, top in zip(photos(), ours):
        names, probs = torchvision_top5(torch_resnet18[0], image)
        assert np.min(-np.diff(probs)) > 2e-3, "the reference's top-5 must be well separated to compare"
        assert [name for name, _ in top] == names
        np.testing.assert_allclose([p for _, p in top], probs, atol=1e-3)


def test_it_carries_the_tags_preprocessing_and_imagenets_names(clf):
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    assert clf.class_names == weights.meta["categories"]
    t = weights.transforms()
    assert (clf.config.eval_resize, clf.config.eval_crop, clf.config.eval_interpolation) == (
        t.resize_size[0], t.crop_size[0], t.interpolation.value)
    assert (list(clf.config.mean), list(clf.config.std)) == (t.mean, t.std)
    np.testing.assert_array_equal(clf.preprocess([photos()[1]])[0],
                                  t(Image.fromarray(photos()[1])).permute(1, 2, 0).numpy())


def test_config_keys_of_the_model_build_the_model_the_weights_load_into(torch_resnet18):
    """dtype, drop_path_rate and model_overrides were kept in the config but not in the model it predicted with;
    ``load`` rebuilt it from the config, so a saved classifier computed something else."""
    import jax.numpy as jnp

    from resnet_jax.training.config import model_from_config

    clf = Classifier.from_pretrained(TAG, file=torch_resnet18[1], dtype="bfloat16", drop_path_rate=0.1,
                                     model_overrides={"output_stride": 16})
    assert (clf.model.dtype, clf.model.drop_path_rate, clf.model.output_stride) == (jnp.bfloat16, 0.1, 16)
    assert clf.model == model_from_config(clf.config, 1000)
    assert clf.variables["params"]["conv1"]["kernel"].dtype == jnp.float32  # float32 master weights


def test_evaluate_defaults_to_imagenet_and_refuses_a_dataset_of_other_classes(clf):
    """A pretrained classifier kept the default config's dataset (digits): ``evaluate()`` scored its 1000 ImageNet
    logits against 10 digit labels (accuracy 0.0, no error)."""
    assert (clf.config.dataset, clf.config.val_split) == ("imagenet2012", "validation")
    with pytest.raises(ValueError, match=r"^digits has 10 classes but this model has 1000 \(tench, goldfish, "):
        clf.evaluate("digits", "train")


def test_imagenet_wordnet_ids_are_the_weights_classes_in_order():
    """The bundled WordNet ids are timm's ImageNet-1k synset list, and each names the class torchvision's weights
    give that logit (its name is one of the synset's lemmas, but for torchvision's two disambiguated names)."""
    import timm.data

    from resnet_jax.pretrained import imagenet_classes, imagenet_wnids

    info = timm.data.ImageNetInfo()
    assert imagenet_wnids() == [info.index_to_label_name(i) for i in range(1000)] == sorted(imagenet_wnids())
    lemmas = [info.index_to_description(i).lower() for i in range(1000)]
    names = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert names == imagenet_classes()
    odd = [i for i in range(1000) if names[i].lower() not in lemmas[i]]
    assert odd == [134, 639] and [names[i] for i in odd] == ["crane bird", "maillot tank suit"]


def test_extracted_imagenet_folders_evaluate_with_the_weights_labels(torch_resnet18, tmp_path):
    """The extracted ILSVRC2012 folders are named by WordNet id, the weights' classes by name: they are the same
    classes in the same order (they were refused as "other classes"). The loss equals torchvision's model on
    ``ImageFolder`` of the same folders with the same preprocessing, so every label is the logit it should be."""
    import torchvision.transforms as T

    from resnet_jax.pretrained import imagenet_wnids

    rng = np.random.default_rng(0)
    for wnid in imagenet_wnids():
        (tmp_path / "val" / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(tmp_path / "val" / wnid / "a.png")
    model, path = torch_resnet18
    clf = Classifier.from_pretrained(TAG, file=path, image_size=32)  # 32 px: 1000 images in a second
    ours = clf.evaluate(f"folder:{tmp_path}", "val")
    transform = T.Compose([T.Resize(clf.config.eval_resize), T.CenterCrop(32), T.ToTensor(),
                           T.Normalize(clf.config.mean, clf.config.std)])
    reference = torchvision.datasets.ImageFolder(tmp_path / "val", transform)
    images, labels = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in reference]))
    with torch.no_grad():
        logits = model(images)
    assert ours["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)
    assert ours["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_a_one_channel_model_of_rgb_weights_predicts_a_grey_photo_as_the_rgb_model_does(torch_resnet18):
    """``in_channels=1`` sums the RGB kernels (timm's ``adapt_input_conv``), so a grey photo should score as the
    RGB model scores it in colour; the weights' three means and stds left it unable to predict at all ("mean/std
    have 3/3 values but the images have 1 channels"). It takes their average, the value the summed kernel sees."""
    model, path = torch_resnet18
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    clf = Classifier.from_pretrained(TAG, file=path, in_channels=1)
    assert clf.config.mean == pytest.approx([np.mean(weights.transforms().mean)])
    assert clf.config.std == pytest.approx([np.mean(weights.transforms().std)])
    grey = np.asarray(Image.fromarray(photos()[0]).convert("L"))
    ours = clf.predict(grey)[0]
    names, probs = torchvision_top5(model, np.asarray(Image.fromarray(grey).convert("RGB")))
    assert ours[0][0] == names[0] and {n for n, _ in ours} == set(names)
    assert max(abs(p - dict(zip(names, probs))[n]) for n, p in ours) < 0.05
    four = Classifier.from_pretrained(TAG, file=path, in_channels=4)  # the colours repeated: R, G, B, R
    assert four.config.mean == pytest.approx([*weights.transforms().mean, weights.transforms().mean[0]])


@pytest.mark.parametrize("given", [{"num_classes": 10}, {"class_names": ["cat", "dog"]}])
def test_another_head_is_refused_with_the_way_to_get_one(torch_resnet18, given):
    """timm's habit, ``create_model(name, pretrained=True, num_classes=10)``, was a bare TypeError ("got multiple
    values for argument 'num_classes'"); the weights' own count is accepted."""
    with pytest.raises(ValueError, match=r"keeps the weights' head of 1000 classes .* clf\.fit\(dataset\) replaces"):
        Classifier.from_pretrained(TAG, file=torch_resnet18[1], **given)
    assert Classifier.from_pretrained(TAG, file=torch_resnet18[1], num_classes=1000).num_classes == 1000


def test_fine_tuning_at_another_size_evaluates_at_that_size(clf):
    """``from_pretrained`` derived the tag's 256/224 for its 224 crop; ``fit`` at 64 px derives them again around
    64 (kept at 224, a fine-tune at 64 px scored chance), keeping any evaluation key given to ``fit``."""
    assert (clf._fit_config("digits", {}).eval_resize, clf._fit_config("digits", {}).eval_crop) == (256, 224)
    small = clf._fit_config("digits", {"image_size": 64})
    assert (small.eval_resize, small.eval_crop, small.eval_interpolation) == (round(64 * 256 / 224), 64, "bilinear")
    given = clf._fit_config("digits", {"image_size": 64, "eval_resize": 80})
    assert (given.eval_resize, given.eval_crop, given.eval_interpolation) == (80, 0, "bilinear")


def test_export_carries_the_preprocessing_and_the_artifact_predicts_the_same(clf, tmp_path):
    from resnet_jax.export import load_exported

    path = clf.export(tmp_path / "resnet18.onnx")
    manifest = json.loads(path.with_name(path.name + ".json").read_text())
    prep = manifest["preprocessing"]
    assert manifest["format_version"] == 2
    assert (prep["resize_size"], prep["image_size"], prep["interpolation"], prep["crop_mode"]) == (
        256, 224, "bilinear", "center")
    exported = load_exported(path)
    resize_crop = torchvision.transforms.Compose([torchvision.transforms.Resize(256),
                                                  torchvision.transforms.CenterCrop(224)])
    np.testing.assert_array_equal(exported.prepare(photos()),
                                  [np.asarray(resize_crop(Image.fromarray(p))) for p in photos()])
    got, want = exported.predict(photos()), clf.predict(photos())
    assert [[n for n, _ in row] for row in got] == [[n for n, _ in row] for row in want]
    np.testing.assert_allclose([[p for _, p in row] for row in got], [[p for _, p in row] for row in want],
                               atol=1e-4)


def test_predict_command_prints_torchvisions_top5(torch_resnet18, tmp_path):
    """Also past a file that cannot be read: it is named on stderr and the exit code is 1, but the photos around
    it are still predicted (one truncated JPEG among many stopped the run with "image file is truncated")."""
    path, broken = tmp_path / "photo.png", tmp_path / "broken.jpg"
    Image.fromarray(photos()[1]).save(path)
    Image.fromarray(photos()[0]).save(broken)
    broken.write_bytes(broken.read_bytes()[:2000])
    # .npy inputs that cannot be used: an empty file (was a traceback that predicted nothing) and arrays of the
    # wrong dtype or layout (their errors did not say which file)
    empty, floats, planar = tmp_path / "empty.npy", tmp_path / "floats.npy", tmp_path / "planar.npy"
    empty.write_bytes(b"")
    np.save(floats, np.zeros((40, 50, 3), np.float32))
    np.save(planar, np.zeros((3, 40, 50), np.uint8))
    proc = run_python(module="train.predict", args=[f"--pretrained={TAG}", f"--weights_file={torch_resnet18[1]}",
                                                     str(path), str(broken), str(empty), str(floats), str(planar),
                                                     str(path)], env=worker_env(), check=False)
    assert proc.returncode == 1
    errors = proc.stderr.strip().splitlines()[-5:]
    assert errors[0].startswith(f"error: cannot read image {broken} (") and "replace or remove it" in errors[0]
    assert errors[1].startswith(f"error: {empty} is not a numeric .npy array (")
    assert errors[2].startswith(f"error: {floats}: ") and "uint8" in errors[2]
    assert errors[3].startswith(f"error: {planar}: ") and "(3, 40, 50)" in errors[3]
    assert errors[4] == "error: 4 of the inputs could not be read (said above); the others were predicted"
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == lines[6] == str(path) and len(lines) == 12
    printed = [line.split("%", 1)[1].strip() for line in lines[1:6]]
    assert printed == torchvision_top5(torch_resnet18[0], photos()[1])[0]


def test_many_photos_are_predicted_a_piece_at_a_time_as_torchvision_predicts_each(clf, torch_resnet18, tmp_path):
    """More photos than one piece (``PREDICT_CHUNK``), the last piece padded: every row is still its photo's."""
    from resnet_jax.data.images import PREDICT_CHUNK

    rng = np.random.default_rng(1)
    images = [np.ascontiguousarray(photos()[i % 2][rng.integers(0, 60):, rng.integers(0, 60):])
              for i in range(PREDICT_CHUNK + 3)]
    ours = clf.predict(images)
    assert len(ours) == PREDICT_CHUNK + 3
    for image, top in zip(images[PREDICT_CHUNK - 2:], ours[PREDICT_CHUNK - 2:]):  # across the piece boundary
        assert [name for name, _ in top] == torchvision_top5(torch_resnet18[0], image)[0]
    images[PREDICT_CHUNK + 1] = images[0].astype(np.uint16)  # a bad item is named by its place in the whole list
    with pytest.raises(ValueError, match=rf"uint16 in item {PREDICT_CHUNK + 1} of the list"):
        clf.predict(images)


def test_encoded_bytes_and_open_files_read_as_their_path(clf, tmp_path):
    """``requests.get(url).content`` or an upload widget's bytes: PIL opens them, so predict does."""
    import io

    path = tmp_path / "photo.png"
    Image.fromarray(photos()[1]).save(path)
    want = clf.predict(str(path))
    with open(path, "rb") as f:
        assert clf.predict(f) == want
    assert clf.predict(path.read_bytes()) == clf.predict(io.BytesIO(path.read_bytes())) == want
    for top in clf.predict([path.read_bytes(), str(path)]):  # a batch of two: float32 rounding apart
        assert [n for n, _ in top] == [n for n, _ in want[0]]
        np.testing.assert_allclose([p for _, p in top], [p for _, p in want[0]], atol=1e-5)
    with pytest.raises(ValueError, match=r"^cannot read image from the bytes given \(.*\); replace or remove it$"):
        clf.predict(b"not an image")
    with pytest.raises(ValueError, match=r"^https://example\.com/cat\.jpg is a URL; predict reads local files"):
        clf.predict("https://example.com/cat.jpg")
    with pytest.raises(ValueError, match=rf"^{tmp_path} is a directory; pass its image files"):
        clf.predict(str(tmp_path))


def test_init_from_takes_a_published_name_and_its_preprocessing(tmp_path):
    """``init_from="resnet18.IMAGENET1K_V1"`` (with ``weights_file``, a local copy; one block per stage, so the
    run's initialisation compiles quickly): every layer from the file, a new head for the run's 10 classes, and
    evaluation's preprocessing the tag's around the run's 32 px crop, and mean/std the tag's."""
    import ml_collections

    from resnet_jax.training.config import base_config, model_from_config, normalization_stats, validate
    from resnet_jax.training.pretrained_init import initial_variables

    torch.manual_seed(2)
    source = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    state = random_batch_stats(source.state_dict(), 2)
    torch.save(state, tmp_path / "small.pth")
    config = validate(ml_collections.ConfigDict({
        **base_config().to_dict(), "model": "resnet18", "model_overrides": {"stage_sizes": (1, 1, 1, 1)},
        "init_from": TAG, "weights_file": str(tmp_path / "small.pth"), "image_size": 32}))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    resize = round(32 * weights.resize_size[0] / weights.crop_size[0])  # the tag's ratio around the run's 32 px
    assert (config.eval_resize, config.eval_crop, config.eval_interpolation, config.eval_crop_mode) == (
        resize, 32, weights.interpolation.value, "center")
    assert normalization_stats(config) == (tuple(weights.mean), tuple(weights.std))
    logs = []
    variables = initial_variables(config, model_from_config(config, 10), (1, 32, 32, 3), logs.append)
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                  state["conv1.weight"].permute(2, 3, 1, 0).numpy())
    np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], state["bn1.running_var"].numpy())
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    assert logs == [f"initialised from {TAG} (new head: params/fc/bias, params/fc/kernel)"]


@pytest.mark.long  # two short training runs (~50 s); the quick suite's fit test covers the first start
def test_a_fine_tune_from_a_published_name_resumes_without_it(tmp_path):
    """``init_from`` is read only by a run's first start, so a resume may leave it out; the evaluation keys and
    mean/std the name filled in stay the run's. Used to be refused ("eval_resize: 37 -> 0, mean: [0.485, ...] ->
    [] ..."), and the way out was to copy them from config.json. A key set to another value is still refused."""
    import ml_collections

    from resnet_jax.checkpoint import ConfigMismatch
    from resnet_jax.training.config import base_config
    from resnet_jax.training.loop import train

    torch.manual_seed(3)
    source = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    torch.save(random_batch_stats(source.state_dict(), 3), tmp_path / "small.pth")
    run = dict(model="resnet18", model_overrides={"stage_sizes": (1, 1, 1, 1)}, batch_size=16, eval_batch_size=64,
               progress_bar=False, compilation_cache_dir="")

    def config(**keys):
        return ml_collections.ConfigDict({**base_config().to_dict(), **run, **keys})

    first = train(config(init_from=TAG, weights_file=str(tmp_path / "small.pth"), max_steps=1), tmp_path / "run")
    filled = [first.config[key] for key in ("eval_resize", "eval_interpolation", "mean", "std")]
    assert filled[0] == 37 and tuple(filled[2]) == (0.485, 0.456, 0.406)  # the tag's 256/224 around 32 px
    with pytest.raises(ConfigMismatch, match="eval_resize"):
        train(config(max_steps=2, eval_resize=40), tmp_path / "run")
    logs = []
    resumed = train(config(max_steps=2), tmp_path / "run", log=logs.append)
    assert resumed.resumed_from == 1 and int(resumed.state.step) == 2
    assert [resumed.config[key] for key in ("eval_resize", "eval_interpolation", "mean", "std")] == filled
    assert any('init_from: "resnet18.IMAGENET1K_V1" -> ""' in line for line in logs), logs


def test_init_from_a_published_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    import ml_collections

    from resnet_jax.pretrained import CACHE_ENV, MIRROR_ENV, DownloadError
    from resnet_jax.training.config import base_config, model_from_config, validate
    from resnet_jax.training.pretrained_init import initial_variables

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(MIRROR_ENV, "http://127.0.0.1:9")  # the discard port: nothing listens, no network used
    config = validate(ml_collections.ConfigDict({**base_config().to_dict(), "model": "resnet18",
                                                 "init_from": TAG, "image_size": 32}))
    with pytest.raises(DownloadError, match=f"put it at {tmp_path}/resnet18-f37072fd.pth"):
        initial_variables(config, model_from_config(config, 10), (1, 32, 32, 3), print)


def test_init_from_that_is_neither_a_path_nor_published_weights_is_one_sentence():
    import ml_collections

    from resnet_jax.training.config import base_config, validate

    for init_from, message in (("resnet18.IMAGENET1K_V9", "neither an existing file or workdir nor published"),
                               ("resnt50", "Did you mean 'resnet50'")):
        with pytest.raises(ValueError, match=message):
            validate(ml_collections.ConfigDict({**base_config().to_dict(), "init_from": init_from}))
    with pytest.raises(ValueError, match="weights_file is a local copy"):
        validate(ml_collections.ConfigDict({**base_config().to_dict(), "weights_file": "x.pth"}))


@pytest.mark.long
def test_fit_fine_tunes_with_a_new_head_and_keeps_the_tags_preprocessing(torch_resnet18, tmp_path):
    clf = Classifier.from_pretrained(TAG, file=torch_resnet18[1], image_size=32)
    clf.fit("digits", workdir=tmp_path / "run", max_steps=3, batch_size=16, eval_batch_size=64,
            eval_resize=40, eval_crop=32, progress_bar=False, compilation_cache_dir="")
    assert clf.model.num_classes == 10 and clf.variables["params"]["fc"]["kernel"].shape == (512, 10)
    assert clf.class_names == [str(i) for i in range(10)]
    loaded = Classifier.load(tmp_path / "run")
    assert (loaded.config.init_from, loaded.config.eval_resize, list(loaded.config.mean)) == (
        TAG, 40, [0.485, 0.456, 0.406])
    digits = [np.repeat(d[..., None], 3, -1) for d in load_digits_images(2)]
    assert loaded.predict(digits) == clf.predict(digits)


def load_digits_images(n):
    from resnet_jax import data

    src = data.get_source("digits", "validation", image_size=8)
    return [np.asarray(src[i]["image"])[..., 0] for i in range(n)]


@pytest.mark.long  # a second whole model at 288; the quick torchvision check above covers the shared path
def test_a_timm_tag_equals_timms_model_with_its_own_transform(tmp_path):
    """timm's ``resnet18.a1_in1k`` (its names, bicubic, evaluated at 288 uncropped) from a local safetensors file,
    against timm's model with ``create_transform(**resolve_data_config(model=m, use_test_size=True))``."""
    import safetensors.torch
    import timm
    import timm.data

    torch.manual_seed(1)
    model = timm.create_model("resnet18.a1_in1k", pretrained=False)
    model.load_state_dict(random_batch_stats(model.state_dict(), 1))
    model.eval()
    safetensors.torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    clf = Classifier.from_pretrained("resnet18.a1_in1k", file=tmp_path / "model.safetensors")
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model, use_test_size=True))
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack([transform(Image.fromarray(p)) for p in photos()])), -1).numpy()
    for row, top in zip(probs, clf.predict(photos())):
        order = np.argsort(-row)[:5]
        assert np.min(-np.diff(row[order])) > 2e-3, "the reference's top-5 must be well separated to compare"
        assert [name for name, _ in top] == [clf.class_names[i] for i in order]
        np.testing.assert_allclose([p for _, p in top], row[order], atol=1e-3)
