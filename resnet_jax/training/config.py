"""The training configuration: every key with its default, and validation that runs before anything compiles.

Configs are plain ``ml_collections.ConfigDict`` objects (big_vision style). ``train/configs/*.py`` start from
``base_config()`` and change what their recipe needs, so a key missing from a recipe always has a default and a
mistyped key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os

import ml_collections

from resnet_jax.data import AUGMENTS
from resnet_jax.data.pipeline import SHUFFLE_SEEDINGS, TRAIN_INTERPOLATIONS
from resnet_jax.resnet import MODEL_CONFIGS, create_model

OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")
SCHEDULES = ("constant", "step", "multistep", "cosine")
DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # model
    c.model = "resnet20"
    c.model_overrides = ml_collections.ConfigDict()  # any ResNet field, e.g. {"in_channels": 1}
    c.dtype = "float32"                 # compute dtype; parameters and logits stay float32
    c.remat = False
    c.zero_init_residual = False
    c.drop_path_rate = 0.0              # stochastic depth: the last block's rate (ResNet.drop_path_rate)
    c.init_from = ""                    # torchvision .pth/.safetensors file, a run's workdir, or published weights
                                        # ("resnet50", "resnet50.IMAGENET1K_V2", "resnet50.a1_in1k") to start from
    c.weights_file = ""                 # a local copy of the published weights init_from names (no download)
    c.init_from_step = ""               # init_from=<a run's workdir>: "" its latest checkpoint, "best", or a step
    c.init_from_ema = False             # init_from=<a run's workdir>: its moving average (config.model_ema)
    # data
    c.dataset = "digits"                # "digits", "synthetic", "folder:PATH" (class folders), or any TFDS name
    c.data_dir = ""                     # TFDS data_dir ("" = TFDS default)
    c.train_split = "train"
    c.val_split = "validation"
    c.image_size = 32
    c.augment = "cifar"                 # "cifar" (pad-crop + flip), "crop" (pad-crop, no flip: digits, text),
                                        # "imagenet" (random-resized crop + flip), "none"
    c.train_interpolation = "bilinear"  # "imagenet"'s resize: "bilinear" (torchvision), "bicubic", or "random"
                                        # (each crop by one of the two: timm train.py's default)
    c.eval_crop_fraction = 0.0          # centre crop at evaluation/predict (0: 1.0 for fixed-size data or augment
                                        # "cifar"/"crop", which train on the whole frame; else 0.875)
    c.normalize = "dataset"             # "dataset" (per-dataset mean/std) or "imagenet" (for torchvision weights)
    c.mean = ()                         # per-channel mean/std in 0..1 units, replacing normalize's (published
    c.std = ()                          # weights in init_from set their own)
    # evaluation/predict/export resolution, apart from training's image_size: resize (short side, truncated as
    # torchvision does) to eval_resize, centre-crop eval_crop, with Pillow's eval_interpolation and timm's
    # eval_crop_mode (resnet_jax.data.transforms.EvalTransform). 0 = image_size / eval_crop_fraction, cropped to
    # image_size as before ("" = bilinear, center). Published weights in init_from fill each one left unset with
    # the preprocessing they were measured with, at the run's resolution: their crop fraction, interpolation and
    # crop mode around a crop of eval_crop or image_size (exactly theirs when that is their crop size).
    c.eval_resize = 0
    c.eval_crop = 0
    c.eval_interpolation = ""
    c.eval_crop_mode = ""
    c.num_workers = 0                   # Grain worker processes (0 = in-process)
    # optimisation
    c.batch_size = 128                  # global, across all devices and processes
    c.eval_batch_size = 256
    c.num_epochs = 90
    c.max_steps = -1                    # stop after this many steps in total (-1: num_epochs decides); the
                                        # schedule ends there too, so it is no pause point: SIGTERM pauses
    c.optimizer = "sgd"
    c.learning_rate = 0.1               # per 256 images when lr_scaling == "linear"
    c.lr_scaling = "linear"             # "linear": lr * batch_size / 256 (Goyal et al.); "none": as given
    c.momentum = 0.9                    # "sgd" and "lars"; "adamw"/"lamb" use their betas (0.9, 0.999), as
                                        # torchvision's and timm's train.py do
    c.nesterov = False
    c.weight_decay = 1e-4
    c.decay_norm_and_bias = False       # False exempts BatchNorm scale/bias and biases from weight decay
    c.schedule = "step"
    c.step_epochs = 30                  # "step": multiply by lr_decay every step_epochs (the seed's StepLR)
    c.milestones = (30, 60)             # "multistep": epochs at which to multiply by lr_decay
    c.lr_decay = 0.1
    c.warmup_epochs = 0.0               # linear warm-up from 0, for any schedule
    c.label_smoothing = 0.0
    c.class_weights = ()                # per-class loss weights (empty: uniform)
    c.class_names = ()                  # the classes' names in label order (empty: the dataset's, else the labels)
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0
    c.seed = 0
    c.shuffle_seeding = "hashed"        # how seed orders the epochs: "hashed" (each seed its own orders) or "offset"
                                        # (Grain's shuffle seeded with seed itself, epoch e with seed + e: seed s + 1
                                        # saw seed s's orders one epoch later); runs saved before this key resume
                                        # with "offset" (VALUE_BEFORE_ADDED)
    # the parts of torchvision's V2 and timm's ResNet Strikes Back recipes (train/configs/imagenet_resnet50_*.py)
    c.auto_augment = ""                 # after the crop/flip: "ta_wide" (TrivialAugmentWide), "ra" (RandAugment,
                                        # 2 ops at magnitude 9), both torchvision's, or timm's "rand-m7-mstd0.5-inc1"
    c.random_erasing = 0.0              # probability of torchvision's RandomErasing, after normalisation
    c.ra_reps = 1                       # repeated augmentation (torchvision's RASampler --ra-reps): each image of the
                                        # epoch's first len/ra_reps is seen ra_reps times, augmented independently
    c.loss = "ce"                       # "ce": softmax cross-entropy; "bce": timm's BinaryCrossEntropy
    c.bce_target_threshold = 0.0        # "bce": targets above it become 1, the others 0 (0 = off)
    c.lars_trust_coefficient = 0.001    # "lars" (timm's trust_coeff)
    c.model_ema = False                 # keep an EMA of the weights, evaluated as "val_ema" (torchvision's --model-ema);
    #                                     its accuracy then ranks the checkpoints ("best") and drives early stopping (timm)
    c.model_ema_steps = 32              # update it every this many steps of each epoch
    c.model_ema_decay = 0.99998         # torchvision's decay, adjusted for batch, steps and epochs (training/ema.py)
    c.grad_accum_steps = 1              # micro-batches per step: batch_size is still the batch of one update
    # run
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500      # also at each epoch end
    c.keep_checkpoints = 3
    c.eval_every_epochs = 1
    c.early_stopping_patience = 0       # evaluations without val-accuracy improvement before stopping (0 = off)
    c.progress_bar = True
    c.compilation_cache_dir = "auto"    # JAX's persistent compilation cache during the run: "auto" = the directory
                                        # JAX already has (JAX_COMPILATION_CACHE_DIR), else ~/.cache/resnet_jax/jit;
                                        # a path; "" = none of ours (training/compile_cache.py)
    c.restart = False                   # True: move an existing run in the workdir aside and start over
    # multi-host: flags or RESNET_JAX_* environment variables; empty = one process, "auto" = from the cluster
    # environment (SLURM, Open MPI, TPU pods)
    c.coordinator_address = ""
    c.num_processes = -1
    c.process_id = -1
    return c


# What may differ when a run continues in its workdir (``training/workdir.py`` compares against config.json).
# CONTINUABLE keys say how long, how often and how fast, never what a step computes: changing one is accepted and
# logged. PER_INVOCATION keys describe this command, not the run: they are not compared. Every other key defines
# the run (model, data, optimisation, seed, ...), so changing it in an existing workdir is refused. A new key is
# therefore refused until someone decides it is safe, which is the failure that loses nothing.
CONTINUABLE = ("num_epochs", "max_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "eval_every_epochs", "eval_batch_size", "early_stopping_patience", "progress_bar",
               "compilation_cache_dir", "data_dir")
# Read only by a run's first start: once it has a checkpoint they may change or vanish (a fine-tune's .pth moved
# off node-local disk blocked its resume).
STARTING_WEIGHTS = ("init_from", "weights_file", "init_from_step", "init_from_ema")
# What published weights named in init_from fill in where the config leaves them unset (_check_eval_preprocessing).
# A resumed run keeps its saved values of these instead (workdir.kept_values): init_from is not read again.
FILLED_BY_WEIGHTS = ("eval_resize", "eval_crop", "eval_interpolation", "eval_crop_mode", "mean", "std")
# Keys whose default changed what a run computes when they were added: the value runs saved before the key existed
# used. A resume of such a run keeps it (workdir.kept_values) and the comparison completes the saved config with it,
# so an old run goes on exactly as it started; a new run takes the default.
VALUE_BEFORE_ADDED = {"shuffle_seeding": "offset"}
# The number of processes is not compared here: it can come from the environment, so the checkpoint records the
# count that wrote it and a resume with another count is refused there (the data position is saved per process).
PER_INVOCATION = ("restart", "coordinator_address", "num_processes", "process_id")


# The float settings with a range, checked to be finite before their ranges are.
RANGED_FLOATS = ("learning_rate", "warmup_epochs", "weight_decay", "mixup_alpha", "cutmix_alpha", "momentum",
                 "lr_decay", "eval_crop_fraction", "label_smoothing", "random_erasing", "bce_target_threshold",
                 "model_ema_decay", "drop_path_rate", "lars_trust_coefficient")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"config.{key}={value!r} is not one of {list(choices)}{hint}")


def _absolute_folder(dataset: str) -> str:
    """``folder:PATH`` with PATH absolute (``~`` expanded): the config is the run's record, and a relative path
    would name another folder when the run is resumed or evaluated from another directory."""
    from resnet_jax.data.folder import PREFIX

    if not isinstance(dataset, str) or not dataset.startswith(PREFIX):
        return dataset
    return PREFIX + os.path.abspath(os.path.expanduser(dataset[len(PREFIX):]))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Return ``config`` completed with defaults; raise ``ValueError`` (one sentence) on any bad setting."""
    full = base_config()
    unknown = sorted(set(config.keys()) - set(full.keys()))
    if unknown:
        close = {k: difflib.get_close_matches(k, full.keys(), n=1) for k in unknown}
        hints = ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in close.items())
        raise ValueError(f"unknown config key(s) {hints}")
    for key in (*INTEGERS, *RANGED_FLOATS):  # before update(), which turns True into 1.0 for a float key
        if key in config and isinstance(config[key], bool):
            raise ValueError(f"config.{key} must be a number, got {config[key]!r}")
    try:
        full.update(config)
    except TypeError as err:  # a ConfigDict not made by base_config: ml_collections' type check, then a traceback
        raise ValueError(f"a config value has the wrong type: {err}") from None
    full.dataset = _absolute_folder(full.dataset)
    if full.model not in MODEL_CONFIGS:
        create_model(full.model)  # raises the registry's error with close matches
    _choice("optimizer", full.optimizer, OPTIMIZERS)
    _choice("schedule", full.schedule, SCHEDULES)
    _choice("dtype", full.dtype, DTYPES)
    _choice("augment", full.augment, AUGMENTS)
    _choice("train_interpolation", full.train_interpolation, TRAIN_INTERPOLATIONS)
    _choice("lr_scaling", full.lr_scaling, ("linear", "none"))
    _choice("normalize", full.normalize, ("dataset", "imagenet"))
    _choice("shuffle_seeding", full.shuffle_seeding, SHUFFLE_SEEDINGS)
    _check_kinds(full)  # first: the checks after it compare numbers (None had been int()'s TypeError)
    for key in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "image_size"):
        if int(full[key]) <= 0:
            raise ValueError(f"config.{key} must be positive, got {full[key]}")
    for key in RANGED_FLOATS:  # NaN fails no `x < 0` or `x <= 0` test, and infinity passes the lower bounds
        if not math.isfinite(full[key]):
            raise ValueError(f"config.{key} must be a finite number, got {full[key]}")
    for key in ("learning_rate", "lars_trust_coefficient"):
        if full[key] <= 0:
            raise ValueError(f"config.{key} must be positive, got {full[key]}")
    _check_per_channel_numbers(full)
    _check_schedule_numbers(full)
    if not 0.0 <= full.eval_crop_fraction <= 1.0:
        raise ValueError(f"config.eval_crop_fraction must be in (0, 1] (or 0 for the dataset's default), "
                         f"got {full.eval_crop_fraction}")
    if not 0.0 <= full.label_smoothing < 1.0:
        raise ValueError(f"config.label_smoothing must be in [0, 1), got {full.label_smoothing}")
    _check_model_overrides(full.model_overrides)
    _check_class_names(full)
    _check_recipe_keys(full)
    _absolute_weight_paths(full)
    _check_eval_preprocessing(full)
    return full


def _absolute_weight_paths(full: ml_collections.ConfigDict) -> None:
    """``init_from``/``weights_file`` naming an existing file or workdir, as absolute paths: the run's saved config
    keeps them, and a relative one (``init_from="srcrun"``) read later from another directory, or after the
    source moved, was taken for a published weights name and made the finished run unloadable."""
    from pathlib import Path

    for key in ("init_from", "weights_file"):
        value = full.get(key)
        if value and Path(value).expanduser().exists():
            full[key] = str(Path(value).expanduser().resolve())


# The integer settings: a boolean is an int to Python (True trained with ra_reps=1 and mixup_alpha=1.0 silently)
INTEGERS = ("batch_size", "eval_batch_size", "num_epochs", "max_steps", "log_every_steps", "checkpoint_every_steps",
            "keep_checkpoints", "image_size", "ra_reps", "model_ema_steps", "grad_accum_steps", "num_workers", "seed",
            "eval_every_epochs", "step_epochs", "early_stopping_patience", "eval_resize", "eval_crop")


def _check_kinds(full: ml_collections.ConfigDict) -> None:
    """Numbers where numbers are meant, and the ranges the data pipeline would otherwise refuse later, in its own
    words and after the run had started (a negative worker count or seed)."""
    for key in (*INTEGERS, *RANGED_FLOATS):
        if not isinstance(full[key], numbers.Real):
            raise ValueError(f"config.{key} must be a number, got {full[key]!r}")
    for key in INTEGERS:
        if int(full[key]) != full[key]:
            raise ValueError(f"config.{key} must be a whole number, got {full[key]}")
    milestones = tuple(full.milestones)
    if not all(isinstance(m, numbers.Integral) and not isinstance(m, bool) for m in milestones):
        raise ValueError(f"config.milestones must be whole numbers of epochs, got {milestones}")
    if full.num_workers < 0:
        raise ValueError(f"config.num_workers must be 0 (read in this process) or more, got {full.num_workers}")
    if not 0 <= full.seed < 2**32:
        raise ValueError(f"config.seed must be in [0, 2**32), got {full.seed}")


def _check_per_channel_numbers(full: ml_collections.ConfigDict) -> None:
    """``mean``, ``std`` and ``class_weights`` value by value: a NaN there trains on NaN from the first step, a zero
    std divides by zero (torchvision's ``Normalize`` refuses it too), and negative or all-zero class weights make a
    loss without a minimum or without a gradient."""
    for key in ("mean", "std", "class_weights"):
        values = tuple(full[key])
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"config.{key} must be finite numbers, got {values}")
        full[key] = tuple(float(v) for v in values)  # numpy scalars are not JSON: config.json, checkpoints
    if any(v <= 0 for v in full.std):
        raise ValueError(f"config.std must be positive (inputs are divided by it), got {tuple(full.std)}")
    weights = tuple(full.class_weights)
    if weights and (min(weights) < 0 or max(weights) == 0):
        raise ValueError(f"config.class_weights must be 0 or more with at least one positive, got {weights}")


def _check_schedule_numbers(full: ml_collections.ConfigDict) -> None:
    """The optimisation and run numbers outside their ranges, refused here rather than met as a division by zero
    after an epoch of training (``eval_every_epochs=0``), a silently shifted schedule (a negative warm-up) or a
    limit read as none (``max_steps=0``)."""
    if int(full.max_steps) == 0 or int(full.max_steps) < -1:
        raise ValueError(f"config.max_steps must be positive, or -1 for num_epochs to decide, got {full.max_steps}")
    for key in ("eval_every_epochs", "step_epochs"):
        if int(full[key]) < 1:
            raise ValueError(f"config.{key} must be at least 1, got {full[key]}")
    for key in ("warmup_epochs", "weight_decay", "mixup_alpha", "cutmix_alpha", "early_stopping_patience"):
        if full[key] < 0:
            raise ValueError(f"config.{key} must be 0 or more, got {full[key]}")
    if not 0.0 <= full.momentum < 1.0:
        raise ValueError(f"config.momentum must be in [0, 1), got {full.momentum}")
    if full.nesterov and full.momentum == 0 and full.optimizer in ("sgd", "lars"):  # torch.optim.SGD refuses it too
        raise ValueError("config.nesterov=True needs a momentum; with config.momentum=0 it would be plain SGD")
    if full.nesterov and full.optimizer not in ("sgd", "lars"):  # it was accepted and changed nothing
        raise ValueError(f"config.nesterov=True applies to the sgd and lars optimizers; {full.optimizer} has no "
                         f"Nesterov variant here (its moments are Adam's), so drop nesterov or choose sgd/lars")
    if 0 < full.num_epochs <= full.warmup_epochs:
        raise ValueError(f"config.warmup_epochs={full.warmup_epochs} is not shorter than config.num_epochs="
                         f"{full.num_epochs}: the learning rate would never reach its peak, nor the schedule start; "
                         "shorten the warm-up with the run")
    if full.lr_decay <= 0:
        raise ValueError(f"config.lr_decay must be positive, got {full.lr_decay}")
    if full.schedule == "multistep" and (list(full.milestones) != sorted(set(full.milestones))
                                         or any(int(m) < 1 for m in full.milestones)):
        raise ValueError(f"config.milestones must be increasing epochs from 1 on, got {tuple(full.milestones)}")


def _check_recipe_keys(full: ml_collections.ConfigDict) -> None:
    """The keys of the V2/RSB recipe parts (auto-augmentation, erasing, repeats, BCE, EMA, accumulation)."""
    from resnet_jax.data.autoaugment import policy

    _choice("loss", full.loss, ("ce", "bce"))
    policy(full.auto_augment)  # raises with the accepted forms
    for key in ("ra_reps", "model_ema_steps", "grad_accum_steps"):
        if int(full[key]) < 1:
            raise ValueError(f"config.{key} must be at least 1, got {full[key]}")
    for key in ("random_erasing", "model_ema_decay"):
        if not 0.0 <= full[key] <= 1.0:
            raise ValueError(f"config.{key} must be in [0, 1], got {full[key]}")
    if not 0.0 <= full.bce_target_threshold < 1.0:  # no target is above 1: every one would become 0
        raise ValueError(f"config.bce_target_threshold must be in [0, 1) (0 = off), got {full.bce_target_threshold}")
    if full.bce_target_threshold and full.loss != "bce":
        raise ValueError(f"config.bce_target_threshold binarises the targets of loss='bce'; with loss="
                         f"{full.loss!r} it would be ignored: set loss='bce' or leave it 0")
    if full.batch_size % full.grad_accum_steps:
        raise ValueError(f"config.batch_size={full.batch_size} does not split into config.grad_accum_steps="
                         f"{full.grad_accum_steps} equal micro-batches; make it a multiple")


_PATH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".npz")


def published_weights(init_from: str):
    """The ``Weights`` record ``init_from`` names (``"resnet50"``, ``"resnet50.IMAGENET1K_V2"``,
    ``"resnet50.a1_in1k"``), or ``None`` when it is empty, an existing path, or looks like one (a file suffix or a
    directory separator: ``check_init_from`` then says it is missing)."""
    from pathlib import Path

    from resnet_jax.pretrained import weights_info

    if not init_from or Path(init_from).expanduser().exists() or "/" in init_from or "\\" in init_from:
        return None
    if Path(init_from).suffix.lower() in _PATH_SUFFIXES:
        return None
    try:
        return weights_info(init_from)
    except ValueError as err:
        raise ValueError(f"config.init_from={init_from!r} is neither an existing file or workdir nor published "
                         f"weights: {err}") from None


def _check_eval_preprocessing(full: ml_collections.ConfigDict) -> None:
    """Published weights in ``init_from`` fill in each evaluation key left unset with the preprocessing they were
    measured with, and their mean/std (unless ``mean`` is set); then every such key is checked.

    Why at the run's resolution: the weights' resize and crop (256/224) describe evaluating at the resolution
    they were trained for. A run fine-tuning at another ``image_size`` (64 px digits) evaluated at theirs scored
    chance (10%) for a model at 94% at its own; so the crop is the run's (``eval_crop`` or ``image_size``), the
    resize keeps the weights' ratio to it, and interpolation and crop mode are theirs."""
    from resnet_jax.data.transforms import CROP_MODES, INTERPOLATIONS

    filled = full.eval_resize and full.mean and not full.weights_file  # a saved run's: no look-up needed
    info = None if filled else published_weights(full.init_from)
    if full.weights_file and info is None:
        raise ValueError(f"config.weights_file is a local copy of the published weights init_from names, but "
                         f"init_from={full.init_from!r} names none; set init_from to e.g. 'resnet50.IMAGENET1K_V2', "
                         "or give the file itself as init_from")
    if info is not None:
        crop = full.eval_crop or full.image_size
        if not full.eval_resize:  # the weights' resize : crop ratio, rounded to the nearest pixel
            full.eval_resize, full.eval_crop = (crop * info.resize_size + info.crop_size // 2) // info.crop_size, crop
        full.eval_interpolation = full.eval_interpolation or info.interpolation
        full.eval_crop_mode = full.eval_crop_mode or info.crop_mode
        if not full.mean and not full.std:
            channels = full.model_overrides.get("in_channels", 3)
            full.mean, full.std = (stats_for_channels(v, channels) for v in (info.mean, info.std))
    full.eval_interpolation = full.eval_interpolation or "bilinear"
    full.eval_crop_mode = full.eval_crop_mode or "center"
    if full.eval_resize < 0 or full.eval_crop < 0:
        raise ValueError(f"config.eval_resize and config.eval_crop must be positive (or 0 for the defaults), got "
                         f"{full.eval_resize} and {full.eval_crop}")
    _choice("eval_interpolation", full.eval_interpolation, tuple(INTERPOLATIONS))
    _choice("eval_crop_mode", full.eval_crop_mode, CROP_MODES)
    if len(full.mean) != len(full.std):
        raise ValueError(f"config.mean and config.std need the same number of values, got {len(full.mean)} and "
                         f"{len(full.std)}")
    channels = full.model_overrides.get("in_channels", 3)
    if len(full.mean) not in (0, 1, channels):
        raise ValueError(f"config.mean and config.std need one value per channel ({channels}) or one for all, got "
                         f"{len(full.mean)}")


def stats_for_channels(values, channels: int) -> tuple[float, ...]:
    """RGB weights' mean or std for a model of ``channels`` inputs, following how ``adapt_input_conv`` (timm's
    rule) feeds them the RGB kernel: one channel gets the sum of the three kernels, so the three values' mean;
    more channels repeat R, G, B in turn, so each takes its colour's value."""
    values = tuple(float(v) for v in values)
    if channels == len(values) or len(values) != 3:
        return values
    if channels == 1:
        return (sum(values) / 3,)
    return tuple(values[c % 3] for c in range(channels))


def eval_transform(config: ml_collections.ConfigDict):
    """The ``EvalTransform`` evaluation, prediction and export use when ``eval_resize`` is set, else ``None`` (the
    run's own resize to ``image_size / eval_crop_fraction``)."""
    from resnet_jax.data.transforms import EvalTransform

    if not config.get("eval_resize"):
        return None
    mean, std = normalization_stats(config)
    return EvalTransform(int(config.eval_resize), int(config.eval_crop or config.image_size), tuple(mean),
                         tuple(std), config.eval_interpolation, config.eval_crop_mode)


# Set by model_from_config from the top-level keys of the same name; an override would be silently replaced.
_TOP_LEVEL_MODEL_KEYS = ("dtype", "remat", "zero_init_residual", "drop_path_rate")


def _check_model_overrides(overrides) -> None:
    """Unknown ``model_overrides`` keys fail here, by name, rather than deep inside model construction."""
    from resnet_jax.resnet import ResNet

    fields = [f.name for f in dataclasses.fields(ResNet) if f.name not in ("parent", "name")]
    for key in overrides.keys():
        if key in _TOP_LEVEL_MODEL_KEYS:
            raise ValueError(f"config.model_overrides.{key} is set by config.{key}; set that instead")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"config.model_overrides has unknown key {key!r} ({hint}ResNet fields are "
                             f"{', '.join(sorted(set(fields) - set(_TOP_LEVEL_MODEL_KEYS)))})")


def _check_class_names(full: ml_collections.ConfigDict) -> None:
    """``class_names``: distinct non-empty strings (what predictions print and a saved model keeps), one per class
    where the class count is given too."""
    names = tuple(full.class_names)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"config.class_names must be distinct non-empty strings, one per class in label order, got "
                         f"{names}")
    full.class_names = names
    head = declared_classes(full)
    if names and head != len(names):
        raise ValueError(f"config.class_names has {len(names)} names for a model of {head} classes "
                         f"(config.model_overrides.num_classes); give one name per class")


def declared_classes(config: ml_collections.ConfigDict) -> int | None:
    """The class count the config fixes for the model: ``model_overrides.num_classes``, else one per name of
    ``class_names``; None where it leaves the count to the dataset."""
    return config.model_overrides.get("num_classes", len(config.class_names) or None)


def check_against_data(config: ml_collections.ConfigDict, num_classes: int, source=None) -> None:
    """Settings that can only be checked once the dataset is known; called before anything compiles. A class
    count or class names given for the model (``Classifier(num_classes=..., class_names=...)``, or these config
    keys) must be the dataset's: a 5-class head on 10-class labels had silently become a 10-class one. Names are
    compared with ``source``'s where its labels are positions in its own class list (class folders); elsewhere the
    dataset fixes each label's meaning and the names only rename them."""
    head = declared_classes(config)
    if head is not None and head != num_classes:
        given = (f"config.model_overrides.num_classes={head}" if "num_classes" in config.model_overrides
                 else f"config.class_names has {head} names")
        raise ValueError(f"{given} but {config.dataset} has {num_classes} classes, which the labels and the loss "
                         f"use; give {num_classes}, or leave the classes out and the head follows the dataset")
    from resnet_jax.pretrained import same_classes

    if source is not None and source.labels_by_name and config.class_names and \
            not same_classes(source.class_names, config.class_names):
        raise ValueError(f"config.class_names are {', '.join(config.class_names)} but {config.dataset}'s classes, "
                         f"in label order, are {', '.join(source.class_names)}: the names would label other classes; "
                         f"give the dataset's names in its order, or leave them out and the dataset's are taken")
    threshold = config.bce_target_threshold if config.loss == "bce" else 0.0
    off = config.label_smoothing / num_classes  # the smoothed targets' values (losses.soft_targets), as timm's
    on = 1.0 - config.label_smoothing + off
    if threshold and not off <= threshold < on:
        raise ValueError(f"config.bce_target_threshold={threshold} makes every target {1 if threshold < off else 0}: "
                         f"with label_smoothing={config.label_smoothing} over {num_classes} classes the targets are "
                         f"{off:g} and {on:g} (mixup blends between them); give a value in [{off:g}, {on:g}), "
                         f"timm's recipes use 0.2")
    if len(config.class_weights) and len(config.class_weights) != num_classes:
        raise ValueError(f"config.class_weights has {len(config.class_weights)} entries but {config.dataset} has "
                         f"{num_classes} classes; give one weight per class (or none)")


def model_from_config(config: ml_collections.ConfigDict, num_classes: int, in_channels: int | None = None):
    """The ``ResNet`` a config describes, for ``num_classes`` outputs."""
    return create_model(config.model, **model_arguments(config, num_classes, in_channels))


def model_arguments(config: ml_collections.ConfigDict, num_classes: int, in_channels: int | None = None) -> dict:
    """The ``create_model`` keyword arguments of ``model_from_config`` (also what ``Classifier.from_pretrained``
    loads published weights into, so its model is the config's: compute dtype, stochastic depth, overrides)."""
    import jax.numpy as jnp

    overrides = dict(config.model_overrides)
    overrides.setdefault("num_classes", num_classes)
    if in_channels is not None:
        overrides.setdefault("in_channels", in_channels)
    overrides.update(dtype=jnp.dtype(config.dtype), remat=config.remat, zero_init_residual=config.zero_init_residual,
                     drop_path_rate=config.drop_path_rate)
    return overrides


def min_image_size(model) -> int:
    """Total downsampling of the feature stack, as the model itself lays it out (every stem, ``output_stride``):
    smaller inputs leave the last stage with less than one pixel."""
    return max(model.feature_strides(), default=1)


def normalization_stats(config: ml_collections.ConfigDict):
    """Per-channel mean/std for the inputs: ImageNet's for torchvision weights (``normalize="imagenet"``) and for
    datasets without known statistics, otherwise the dataset's own; the defaults fitted to the model's channel
    count as ``stats_for_channels`` says (a greyscale folder for an ``in_channels=1`` model had been refused
    ImageNet's three values and asked for ``mean``/``std``)."""
    from resnet_jax import data
    from resnet_jax.data.stats import known_stats

    if config.get("mean"):
        return tuple(config.mean), tuple(config.std)
    imagenet = (data.IMAGENET_MEAN, data.IMAGENET_STD)
    mean, std = imagenet if config.normalize == "imagenet" else known_stats(config.dataset) or imagenet
    channels = config.model_overrides.get("in_channels", 3)
    return stats_for_channels(mean, channels), stats_for_channels(std, channels)
