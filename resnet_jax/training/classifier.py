"""``Classifier``: model name + number of classes -> ``fit``, ``evaluate``, ``predict``, ``save``/``load``,
``export_torchvision``, ``export`` (StableHLO / ONNX). A thin facade over ``train`` and the checkpoint module,
for notebooks and scripts.

    clf = Classifier("resnet20", num_classes=10, in_channels=1, image_size=16)
    clf.fit("digits", workdir="runs/digits", num_epochs=30)
    clf.predict(images)          # [[("3", 0.98), ("8", 0.01), ...], ...]
    clf.export_torchvision("digits.pth")
    clf.export("digits.onnx")    # or digits.stablehlo: resnet_jax.export.load_exported reads either

    clf = Classifier.from_pretrained("resnet50")     # published ImageNet weights, with their preprocessing
    clf.predict("photo.jpg")     # [[("tabby", 0.61), ...]]
    clf.fit("imagenette/160px", workdir="runs/imagenette")  # fine-tunes it with a new head
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import data
from resnet_jax.checkpoint import load_variables
from resnet_jax.data.images import PREDICT_CHUNK, check_top_k, in_chunks, prepare_batch, top_classes
from resnet_jax.ops import fold_batchnorm
from resnet_jax.parallel import batch_multiple, make_mesh
from resnet_jax.pretrained import same_classes
from resnet_jax.training.config import (base_config, declared_classes, eval_transform, model_arguments,
                                        model_from_config, normalization_stats, validate)
from resnet_jax.training.loop import evaluate_loader, train
from resnet_jax.training.steps import make_eval_step


def _in_keyword_terms(err: Exception) -> None:
    """``err`` with the training run's advice in ``fit``'s words: it names command-line flags (``use a new
    --workdir, or pass --config.restart=True``) and config keys Classifier takes as its own arguments
    (``config.model_overrides.num_classes``), which through ``fit`` are keyword arguments (``workdir=``,
    ``restart=True``, ``num_classes``). Reworded in place, so the exception keeps its type and traceback."""
    if len(err.args) == 1 and isinstance(err.args[0], str):
        words = re.sub(r"(?<!python -m train )--workdir", "workdir", err.args[0])
        words = re.sub(r"--config\.(\w+)", r"\1", words)
        words = re.sub(r"\bconfig\.(?:model_overrides\.)?(num_classes|class_names)\b", r"\1", words)
        err.args = (words,)


class Classifier:
    """An image classifier: a ResNet, its variables, its class names and how to preprocess images."""

    def __init__(self, model: str = "resnet20", num_classes: int | None = None, *, in_channels: int = 3,
                 image_size: int = 32, class_names: Sequence[str] | None = None, **config: Any):
        """``num_classes`` and ``class_names`` (in label order) say which classes the model is for, and ``fit``
        refuses a dataset of others; either one alone sets the count. Both left out, the head follows the dataset
        ``fit`` trains on (until then: 10 classes named by their labels)."""
        config = _plain_values(config)
        overrides = dict(config.pop("model_overrides", {}))
        if overrides.get("in_channels", in_channels) != in_channels:  # it was silently replaced by the argument
            raise ValueError(f"in_channels is Classifier's own argument: Classifier(..., in_channels="
                             f"{overrides['in_channels']}), not a model override")
        overrides["in_channels"] = in_channels  # known to validate
        if num_classes is not None:
            if overrides.get("num_classes", num_classes) != num_classes:
                raise ValueError(f"num_classes is Classifier's own argument: Classifier(..., num_classes="
                                 f"{overrides['num_classes']}), not a model override")
            overrides["num_classes"] = num_classes
        if class_names is not None:
            if isinstance(class_names, str):
                raise ValueError(f"class_names must be a list of names, one per class, got the string "
                                 f"{class_names!r}")
            config["class_names"] = tuple(class_names)
        try:
            self.config = validate(ml_collections.ConfigDict({**base_config().to_dict(), "model": model,
                                                              "image_size": image_size, **config,
                                                              "model_overrides": overrides}))
        except ValueError as e:  # the config's words for Classifier's own arguments
            _in_keyword_terms(e)
            raise
        declared = declared_classes(self.config)  # its kind is checked by the model (ResNet's num_classes)
        self._set_head(10 if declared is None else declared, list(self.config.class_names))
        self.variables: dict[str, Any] | None = None
        self.workdir: Path | None = None
        self.history: list[dict[str, Any]] = []
        self._compiled_logits, self._compiled_for, self._folded_for = None, None, None

    def _set_head(self, num_classes: int, class_names: Sequence[str]) -> None:
        """The head this classifier's model has now (its names, else the label numbers) and that model."""
        self.model = model_from_config(self.config, num_classes)  # first: ResNet checks num_classes's kind
        self.num_classes = num_classes
        self.class_names = list(class_names) or [str(i) for i in range(num_classes)]

    @classmethod
    def from_pretrained(cls, name: str, weights: Any = "DEFAULT", *, file: str | Path | None = None,
                        **config: Any) -> "Classifier":
        """A classifier with published ImageNet weights (``resnet_jax.pretrained``): ``"resnet50"``,
        ``"resnet50.IMAGENET1K_V1"``, ``"resnet50.a1_in1k"``, or ``name`` plus ``weights``. It predicts,
        evaluates and exports with the preprocessing the weights' accuracy was measured with
        (``weights_info(...).transforms()``: resize, crop, interpolation, mean/std), and ``fit`` fine-tunes it
        with a new head for the dataset's classes (``config.init_from`` names the weights). ImageNet-1k weights
        evaluate on ``imagenet2012``'s validation split unless told another dataset of their classes (the
        extracted WordNet-id folders, ``folder:PATH``, are).

        ``file``: a local copy of the weights instead of the download (no digest check, the file is the user's;
        the preprocessing is still the tag's). ``config``: config keys, e.g. ``image_size`` to fine-tune at; those
        of the model (``dtype``, ``drop_path_rate``, ``model_overrides``...) build the model the weights load into,
        as ``fit`` and ``load`` build it."""
        from resnet_jax.pretrained import pretrained, weights_info

        info = weights_info(name, weights)
        if config.get("num_classes", info.num_classes) != info.num_classes or "class_names" in config:
            raise ValueError(f"from_pretrained keeps the weights' head of {info.num_classes} classes and their "
                             f"names; for another head, fine-tune: clf.fit(dataset) replaces it with one for the "
                             f"dataset's classes and names")
        config.pop("num_classes", None)
        tagged = f"{info.model}.{info.tag}"
        imagenet = {"dataset": "imagenet2012", "val_split": "validation"} if info.num_classes == 1000 else {}
        settings = {"image_size": info.crop_size, "augment": "imagenet", "init_from": tagged,
                    "weights_file": str(file) if file is not None else "", **imagenet, **config}
        clf = cls(info.model, **settings)  # no class count of its own: fit puts a head for the dataset's classes
        clf._set_head(info.num_classes, info.categories)
        _, clf.variables = pretrained(tagged, file=file, **model_arguments(clf.config, info.num_classes))
        return clf

    # --- training and evaluation -------------------------------------------------------------------------
    def fit(self, dataset: str = "digits", *, workdir: str | Path | None = None, **config: Any) -> list[dict]:
        """Train on ``dataset`` (any ``get_source`` name); config keys as keyword arguments. Resumes if
        ``workdir`` holds checkpoints of the same run. Returns the metrics history. A new ``image_size`` derives
        evaluation's preprocessing again for it (``config.eval_resize`` etc., those not given here).

        A classifier that has weights (loaded, published, or fitted before) continues from them, as a Keras
        model's ``fit`` does (a head for another class count is initialised afresh); ``init_from=`` names other
        starting weights, and a new ``Classifier`` starts from scratch."""
        if not isinstance(dataset, (str, os.PathLike)) or not str(dataset):  # an array: numpy's truth-value error
            raise ValueError(f"fit takes a dataset's name ('digits', 'cifar10', 'folder:/path/to/images', any TFDS "
                             f"name), not {type(dataset).__name__}; write in-memory images to a folder of one "
                             "sub-folder per class and pass 'folder:' and its path")
        dataset = str(dataset)
        # its own weights, unless they are exactly init_from's (from_pretrained, no run yet: the run reads them
        # by name, as the record says)
        own = self.variables is not None and self.workdir is not None and "init_from" not in config
        start_from = self.variables if own else None
        run_dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="resnet_jax_"))
        try:
            result = train(self._fit_config(dataset, config), run_dir, start_from=start_from)
        except Exception as err:
            if run_dir.is_dir() and any(run_dir.iterdir()):
                self.workdir = run_dir  # a run to resume or look into (a preempted fit: the same call resumes it)
            elif not workdir:
                run_dir.rmdir()  # refused before anything was written: no empty temporary directory left behind
            _in_keyword_terms(err)
            raise
        self.workdir = run_dir
        self.config = result.config
        self._set_head(result.model.num_classes, result.class_names)
        self.variables, self.history = result.variables, result.history
        return self.history

    def _fit_config(self, dataset: str, config: dict[str, Any]) -> ml_collections.ConfigDict:
        """This classifier's config with ``config``'s keys. Evaluation's preprocessing was derived for the old
        ``image_size`` (published weights': 256/224 for a 224 crop): kept at a new one, a run fine-tuning at 64 px
        would evaluate at 224 and score chance, so those not given here go back to unset and ``validate`` derives
        them; likewise the centre crop the last run derived for its dataset and augmentation (digits' 1.0 kept
        for photographs, which evaluate at 0.875)."""
        config = _plain_values(config)
        cfg = ml_collections.ConfigDict(self.config.to_dict())
        unset = {}
        if config.get("image_size", cfg.image_size) != cfg.image_size:
            unset.update(eval_resize=0, eval_crop=0, eval_interpolation="", eval_crop_mode="")
        if dataset != cfg.dataset or config.get("augment", cfg.augment) != cfg.augment:
            unset.update(eval_crop_fraction=0.0)  # the last run derived it for its own data (1.0 for digits)
        cfg.update({k: v for k, v in unset.items() if k not in config})
        cfg.update({"dataset": dataset, **config})
        return validate(cfg)

    def evaluate(self, dataset: str | None = None, split: str | None = None, batch_size: int = 256
                 ) -> dict[str, float]:
        """Loss, top-1 and top-5 accuracy on a split (default: the validation split it was trained with).
        ``batch_size`` is rounded down to a multiple of the devices (and processes), at least one each: the
        metrics do not depend on it (the last batch's padding is masked), so any machine takes the default."""
        variables = self._require_variables()
        mesh = make_mesh()
        multiple = batch_multiple(mesh)
        batch_size = max(multiple, batch_size // multiple * multiple)
        try:
            source = data.get_source(dataset or self.config.dataset, split or self.config.val_split,
                                     image_size=self.config.image_size, seed=self.config.seed,
                                     data_dir=self.config.data_dir or None)
        except ValueError as err:  # the data's advice names the run's config keys; here the split is an argument
            if len(err.args) == 1 and isinstance(err.args[0], str):
                err.args = (err.args[0].replace("(config.train_split / config.val_split)", "(evaluate(dataset, "
                                                "split=NAME))"),)
            raise
        if source.num_classes != self.num_classes:
            raise ValueError(f"{source.name} has {source.num_classes} classes but this model has {self.num_classes} "
                             f"({_listed(self.class_names)}); evaluate it on a dataset of its classes: "
                             f"evaluate(dataset, split)")
        if source.labels_by_name and not same_classes(source.class_names, self.class_names):
            raise ValueError(f"{source!r} has the classes {_listed(source.class_names)} but this model was trained "
                             f"on {_listed(self.class_names)}: the same label would mean another class; evaluate "
                             f"on folders of the model's classes")
        mean, std = self._stats()
        loader = data.eval_loader(source, batch_size=batch_size, image_size=self.config.image_size, mean=mean,
                                  std=std, channels=self.model.in_channels,
                                  crop_fraction=self.config.eval_crop_fraction or None,
                                  transform=eval_transform(self.config))
        state = _Evaluable(self.model.apply, variables)
        return evaluate_loader(state, make_eval_step(mesh, self.model), loader, mesh)

    def predict(self, images: Any, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k ``(class name, probability)`` per image. ``images``: one uint8 image ``(H, W)`` or
        ``(H, W, C)``, a batch ``(N, H, W, C)``, a greyscale batch ``(N, H, W)`` for a one-channel model, or a
        list of arrays, file paths or encoded images (``resnet_jax.data.images``), read a piece at a time."""
        check_top_k(top_k)
        chunks, out = in_chunks(images), []
        for first, chunk in chunks:
            batch = self.preprocess(chunk, first)
            n = len(batch)
            if len(chunks) > 1 and n < PREDICT_CHUNK:  # the last piece padded: one compiled shape for them all
                batch = jnp.concatenate([batch, jnp.repeat(batch[-1:], PREDICT_CHUNK - n, axis=0)])
            out += top_classes(self._logits(batch)[:n], self.class_names, top_k)
        return out

    def _logits(self, batch: jnp.ndarray) -> jnp.ndarray:
        """The BatchNorm-folded model, as evaluation runs it, jitted once per model (every later call with a
        batch of the same shape reuses the compiled function), its variables folded once per set of weights:
        folding on every call cost 8 of ~35 ms of a bfloat16 ResNet-50's single image (BENCHMARKS.md). The
        weights are recognised by their arrays' identities (jax arrays never change in place, so new weights are
        new arrays), which the cache holds so that no identity is reused while it stands. Weights held as numpy
        arrays (as loading makes them), which could change in place, are put on the device once first, so
        ``variables`` holds jax arrays after a prediction."""
        if self._compiled_for is not self.model:
            self._compiled_for, self._folded_for = self.model, None
        variables = self._require_variables()
        leaves = jax.tree.leaves(variables)
        if not all(isinstance(leaf, jax.Array) for leaf in leaves):
            self.variables = variables = jax.tree.map(jnp.asarray, variables)
            leaves = jax.tree.leaves(variables)
        if self._folded_for is None or len(leaves) != len(self._folded_for[0]) or any(
                a is not b for a, b in zip(leaves, self._folded_for[0])):
            folded_model, folded = fold_batchnorm(self.model, variables)
            if self._folded_for is None:  # once per model: a later fold changes only the weights
                self._compiled_logits = jax.jit(functools.partial(folded_model.apply, train=False))
            self._folded_for = (leaves, folded)
        return self._compiled_logits(self._folded_for[1], batch)

    def preprocess(self, images: Any, first: int = 0) -> jnp.ndarray:
        """Images as the model saw them in evaluation: resized, centre-cropped, channels fixed, normalised; with
        the published weights' preprocessing (``config.eval_resize``...) when it has one. ``first``: the index of
        the first image in what the user passed, for messages."""
        transform = eval_transform(self.config)
        if transform is not None:
            batch = transform.prepare(images, self.model.in_channels, first)
        else:
            batch = prepare_batch(images, size=self.config.image_size, crop_fraction=self.crop_fraction,
                                  channels=self.model.in_channels, first=first)
        return jnp.asarray(data.normalize(batch, *self._stats()))

    @property
    def crop_fraction(self) -> float:
        """The centre crop evaluation and prediction take (the run's, else ImageNet-style 0.875 or whole)."""
        return self.config.eval_crop_fraction or (0.875 if self.config.augment == "imagenet" else 1.0)

    # --- persistence -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, workdir: str | Path, step: int | str | None = None, use_ema: bool = False) -> "Classifier":
        """A classifier from a training run's workdir (latest checkpoint, a step, or ``"best"``); ``use_ema``:
        with the run's moving average of the weights (``config.model_ema``) rather than the weights."""
        config, variables, class_names = load_variables(workdir, step, use_ema)
        config = validate(ml_collections.ConfigDict(config))
        num_classes = int(np.shape(variables["params"]["fc"]["bias"])[0])
        clf = cls(config.model, in_channels=config.model_overrides.get("in_channels", 3),
                  **{k: v for k, v in config.items() if k not in ("model", "model_overrides")})
        clf.config = config  # with its own class count and names, if the run was given them
        clf._set_head(num_classes, class_names)
        clf.variables, clf.workdir = variables, Path(workdir)
        return clf

    def save(self, workdir: str | Path) -> Path:
        """Write the variables, config and class names as a checkpoint that ``Classifier.load`` reads."""
        from resnet_jax.checkpoint import save_variables

        return save_variables(workdir, self._require_variables(), self.config.to_dict(), self.class_names)

    def export_torchvision(self, path: str | Path) -> Path:
        """A ``.pth`` (or ``.safetensors``) state_dict in torchvision's names and layouts:
        ``torchvision.models.<model>(num_classes=...)`` loads it strictly where torchvision has the architecture
        (``resnet_jax.torchvision.torch_library``). Other architectures (ResNet-D, CIFAR, pre-activation) get
        names by the same rules, which ``load_torchvision`` reads back; ``export_timm`` writes timm's."""
        from resnet_jax.torchvision import save_torchvision

        save_torchvision(self._require_variables(), path)
        return Path(path)

    def export_timm(self, path: str | Path) -> Path:
        """A ``.pth`` (or ``.safetensors``) state_dict that ``timm.create_model(<model>, num_classes=...,
        in_chans=...)`` loads strictly, for the architectures timm has (``TIMM_MODELS``: ResNet-D, SE, ECA,
        ResNetV2 among them); others are refused, naming them."""
        from resnet_jax.torchvision import save_timm

        save_timm(self.model, self._require_variables(), path)
        return Path(path)

    def export_state_dict(self, path: str | Path, naming: str = "auto") -> tuple[Path, str]:
        """The state_dict in ``naming``'s names ("torchvision", "timm", or "auto": the PyTorch library that has
        the architecture, ``torch_library``); returns the path and a sentence naming the constructor that loads
        it (with ``in_chans`` and the dilation a model of other input channels or ``output_stride`` needs)."""
        from resnet_jax.torchvision import torch_library

        if naming not in ("auto", "torchvision", "timm"):
            raise ValueError(f"naming must be 'auto', 'torchvision' or 'timm', got {naming!r}")
        # a model without a head: timm builds it headless (features_only, num_classes=0), torchvision cannot
        headless = self.model.features_only or self.model.num_classes == 0
        if naming == "auto":
            library = torch_library(self.model, ("timm", "torchvision") if headless else ("torchvision", "timm"))
            naming = library[0] if library else "torchvision"
        else:
            library = torch_library(self.model, (naming,))
        path = self.export_timm(path) if naming == "timm" else self.export_torchvision(path)  # timm: or refused
        if library is None:
            return path, (f"torchvision's naming rules for {self.config.model}, which torchvision does not build; "
                          f"resnet_jax.load_torchvision reads it back")
        model, stride = self.model, self.model.output_stride
        if naming == "timm":
            # timm's features_only model is its stage outputs, but it renames a pre-activation network's modules
            # (stages.0 -> stages_0): that one is loaded into the headless classifier, whose final norm it lacks
            stages = model.features_only and not model.preact
            options = (["features_only=True", "out_indices=(1, 2, 3, 4)"] if stages
                       else [f"num_classes={0 if model.features_only else model.num_classes}"])
            options += [f"in_chans={model.in_channels}"] * (model.in_channels != 3)
            options += [f"output_stride={stride}"] * (stride != 32)
            loader, missing = f"timm.create_model({library[1]!r}, {', '.join(options)})", (
                "the final norm" if model.features_only and model.preact else None)
        else:  # the same weights, dilated: the constructor must be told, or it computes another function
            options = [f"num_classes={model.num_classes}"] * (not headless)
            options += [f"replace_stride_with_dilation={[False, stride == 8, True]}"] * (stride != 32)
            loader, missing = f"torchvision.models.{library[1]}({', '.join(options)})", "the head" if headless else None
        if missing:
            return path, (f"{naming} state_dict without {missing}: {loader}.load_state_dict(..., strict=False) "
                          "loads the rest")
        return path, f"{naming} state_dict: {loader}.load_state_dict(...) loads it"

    def export(self, path: str | Path, format: str | None = None, platforms: Sequence[str] | None = None
               ) -> Path:
        """An inference artifact with BatchNorm folded and this run's preprocessing: "stablehlo" (jax.export) or
        "onnx" (default: from the suffix), plus its JSON manifest; ``resnet_jax.export.load_exported`` reads it."""
        from resnet_jax.export import Preprocessing, export_model

        mean, std = self._stats()
        transform = eval_transform(self.config)
        if transform is None:
            prep = Preprocessing(self.config.image_size, mean, std, self.crop_fraction)
        else:
            prep = Preprocessing(transform.crop_size, mean, std, transform.crop_size / transform.resize_size,
                                 resize_size=transform.resize_size, interpolation=transform.interpolation,
                                 crop_mode=transform.crop_mode)
        return export_model(self.model, self._require_variables(), path, format=format, platforms=platforms,
                            preprocessing=prep, class_names=self.class_names, model_name=self.config.model)

    # --- helpers -----------------------------------------------------------------------------------------
    def _require_variables(self) -> dict[str, Any]:
        if self.variables is None:
            raise RuntimeError("this Classifier has no weights yet: call fit(...) or Classifier.load(workdir)")
        return self.variables

    def _stats(self):
        return normalization_stats(self.config)


def _plain_values(config: dict[str, Any]) -> dict[str, Any]:
    """Arrays given for the config's sequence keys as tuples: ``class_weights=compute_class_weight(...)`` (a numpy
    array, as torch's ``CrossEntropyLoss(weight=...)`` takes) failed in ml_collections as "cannot be casted to
    type tuple"; ``mean``/``std`` likewise."""
    return {k: tuple(np.asarray(v).tolist()) if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 1 else v
            for k, v in config.items()}


def _listed(names: Sequence[str]) -> str:
    return ", ".join(map(str, names[:6])) + (f", ... ({len(names)})" if len(names) > 6 else "")


class _Evaluable:
    """Just enough of a ``TrainState`` (``apply_fn`` + ``variables``) for ``eval_step``."""

    def __init__(self, apply_fn, variables):
        self.apply_fn, self.variables = apply_fn, variables


jax.tree_util.register_pytree_node(_Evaluable, lambda e: ((e.variables,), e.apply_fn),
                                   lambda fn, children: _Evaluable(fn, children[0]))
