"""Grain pipelines: a checkpointable, sharded, shuffled training stream and an exact, padded evaluation pass.

Built with Grain's dataset API (MapDataset -> IterDataset), which costs a quarter of `grain.DataLoader`'s
per-record overhead (no per-record Philox construction, no sampler metadata) and keeps the batch order the
same whatever the number of worker processes.

Training: the split shuffled with `seed` anew each epoch and a seeded per-example crop/flip on uint8 images,
the same global stream on every process; each process takes its local batches (batch_size // process_count
examples) of each global batch, then channel conversion and normalisation once per batch (vectorised). `iter(loader).get_state()` is a small dict (the position in
the stream), so checkpointing it resumes the exact stream.

Evaluation: each process takes a contiguous slice of the split, padded to the same number of batches on every
process; padded rows carry mask=False so metrics count every example exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import signal

import grain
import jax
import numpy as np

from resnet_jax.data import augment as aug
from resnet_jax.data.autoaugment import policy
from resnet_jax.data.erasing import draw_erasing
from resnet_jax.data.source import Source
from resnet_jax.data.stats import known_stats

AUGMENTS = ("cifar", "crop", "imagenet", "none")  # crop: CIFAR's shift without the flip (digits, text)
TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")  # the random-resized crop's; random: timm's per-image pick


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full global batches in one pass over `num_examples` (training drops the remainder)."""
    return num_examples // batch_size


def _processes(process_index, process_count) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, process_count), got {index} of {count}.")
    return index, count


def _local_batch(batch_size: int, count: int) -> int:
    if batch_size < 1 or batch_size % count:
        raise ValueError(f"The global batch_size ({batch_size}) must be a positive multiple of the number of "
                         f"processes ({count}); each process loads batch_size // process_count examples.")
    return batch_size // count


def _in_workers(ds: grain.IterDataset, options) -> grain.IterDataset:
    """``ds`` produced by Grain worker processes that leave Ctrl-C to the training process.

    Ctrl-C in a terminal sends SIGINT to the whole process group. The training process stops at the end of its
    step and saves a checkpoint (``training/preemption.py``); workers that took the signal too died with a
    traceback each. (Grain versions without ``worker_init_fn`` keep that behaviour.)
    """
    _absl_flags_parsed()
    if "worker_init_fn" in inspect.signature(ds.mp_prefetch).parameters:
        return ds.mp_prefetch(options, worker_init_fn=functools.partial(_worker_setup, parent=os.getpid()))
    return ds.mp_prefetch(options)


def _worker_setup(worker_index: int, worker_count: int, parent: int) -> None:
    """Leave Ctrl-C to the training process, and end with it: a trainer killed by SIGKILL or the OOM killer runs
    no clean-up, and Grain's workers (each holding the file list and its batches) lived on for good. As
    PyTorch's DataLoader workers do, each watches its parent (``parent``: the training process's id, given
    before the worker started, since a worker still importing when the trainer died finds another parent) and
    exits once it is gone."""
    import threading
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="resnet_jax-parent-watch", daemon=True).start()


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app (pytest, notebooks, plain scripts) nobody
    parsed them, and the first batch would fail. Marking them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _stats(src: Source, mean, std, channels: int | None):
    """The mean/std to normalise with: as given, else the dataset's (by base name: "imagenette/320px" ->
    "imagenette"); checked against the channel count now rather than at the first batch. One of the two alone is
    refused: the other was replaced with the dataset's without a word (``mean=(0.0,)`` normalised by the dataset's
    mean as well)."""
    if (mean is None) != (std is None):
        given, missing = ("mean", "std") if std is None else ("std", "mean")
        raise ValueError(f"{given}= was given without {missing}=; give both (per channel, 0..1 units), or neither "
                         f"for the dataset's own.")
    if mean is None:
        stats = known_stats(src.name)
        if stats is None:
            raise ValueError(f"No known mean/std for dataset {src.name!r}; pass mean= and std= "
                             f"(per channel, 0..1 units).")
        mean, std = stats
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(np.asarray(std) > 0)):
        raise ValueError(f"mean/std must be finite and std positive (0..1 units), got {mean} and {std}.")
    out = channels or src.image_shape[2]
    if np.size(mean) not in (1, out) or np.size(std) not in (1, out):
        model = (f"the model takes {out} (its in_channels; config.model_overrides.in_channels in a config), "
                 if channels and channels != src.image_shape[2] else "")
        raise ValueError(f"mean/std have {np.size(mean)}/{np.size(std)} values but the batches have {out} "
                         f"channels: {src.name!r} has {src.image_shape[2]}, {model}so give one mean/std value per "
                         f"channel (or one for all){' or set in_channels to match the data' if model else ''}.")
    return mean, std


def default_crop_fraction(src: Source, augment: str = "imagenet") -> float:
    """The evaluation crop that shows what training showed: fixed-size datasets (CIFAR, digits) are evaluated
    whole; so is any data trained with the pad-crop augmentations (``"cifar"``, ``"crop"``), which see the whole
    central square of each image; photos of varying size trained with random-resized crops (``"imagenet"``) or
    without augmentation get the 87.5% centre, as torchvision's recipes evaluate them."""
    return 1.0 if None not in src.image_shape[:2] or augment in ("cifar", "crop") else 0.875


def check_compatible(src: Source, *, num_classes: int | None = None, channels: int | None = None) -> None:
    """Fail before training starts when the data cannot fit the model: empty split, labels beyond the model's
    classes, channels that cannot be converted, or records that are not uint8 HWC images with an int label."""
    if len(src) == 0:
        raise ValueError(f"{src!r} has no examples; check the split name and slicing.")
    if num_classes is not None and src.num_classes > num_classes:
        raise ValueError(f"The dataset has {src.num_classes} classes but the model outputs {num_classes}; "
                         f"create the model with num_classes={src.num_classes}.")
    have = src.image_shape[2]
    if channels is not None and channels != have and {channels, have} != {1, 3}:
        raise ValueError(f"The dataset's images have {have} channels and the model expects {channels}; "
                         f"only greyscale <-> RGB can be converted.")
    record = src[0]
    image, label = np.asarray(record["image"]), record["label"]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != have:
        raise ValueError(f"{src!r} yields images of dtype {image.dtype} and shape {image.shape}; "
                         f"expected uint8 (H, W, {have}).")
    if np.ndim(label) != 0 or not 0 <= int(label) < max(src.num_classes, num_classes or 0):
        raise ValueError(f"{src!r} yields label {label!r}; expected one integer in [0, {src.num_classes}).")


def check_same_classes(train: Source, other: Source) -> None:
    """A label is an index into the class list, so a split whose class list differs (a class folder missing
    from ``val/``) would score every later class as another one; refused rather than shifted silently."""
    if list(train.class_names) != list(other.class_names):
        missing = sorted(set(train.class_names) - set(other.class_names))
        extra = sorted(set(other.class_names) - set(train.class_names))
        diff = "; ".join(f"{what}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                         for what, names in (("missing", missing), ("extra", extra)) if names) or "another order"
        raise ValueError(f"{other!r} has other classes than {train!r} ({diff}), so the same label would mean "
                         f"another class in each; give both splits the same class folders (an empty folder is "
                         f"fine for a class without validation images).")


def check_every_class(train: Source) -> None:
    """A training split with no image of some class (an empty class folder, or a percentage slice of a tiny
    class) would train a head that never sees it; refused, naming the classes. Only sources that count their
    classes (``class_counts``: class folders) can say."""
    counts = getattr(train, "class_counts", None)
    if counts is None:
        return
    empty = [name for name, n in zip(train.class_names, counts) if n == 0]
    if empty:
        skipped = getattr(train, "skipped_files", {})
        other = {name: skipped[name] for name in empty if name in skipped}
        formats = ""
        if other:  # files are there, of formats that are not read
            from resnet_jax.data.folder import IMAGE_EXTENSIONS

            shown = "; ".join(f"{name}: {', '.join(files)}" for name, files in list(other.items())[:3])
            formats = (f" The folder(s) of {', '.join(other)} hold only files of other formats ({shown}), which "
                       f"are skipped, as torchvision's ImageFolder skips them: convert them to one of "
                       f"{' '.join(IMAGE_EXTENSIONS)}.")
        raise ValueError(f"{train!r} has no image of the class(es) {', '.join(empty[:5])}"
                         f"{', ...' if len(empty) > 5 else ''} ({len(empty)} of {len(counts)}), which the model "
                         f"could then never learn; add images there or remove those class folders.{formats}")


class _Crop:
    """Per example, uint8 in and out: the recipe's crop/flip (seeded) or the evaluation resize + centre crop."""

    def __init__(self, augment: str, image_size: int, crop_fraction: float, interpolation: str = "bilinear"):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, not {augment!r}.")
        if interpolation not in TRAIN_INTERPOLATIONS:
            raise ValueError(f"train_interpolation must be one of {TRAIN_INTERPOLATIONS}, not {interpolation!r}.")
        if image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, not {image_size!r}.")
        if crop_fraction is not None and not 0.0 < crop_fraction <= 1.0:  # Pillow's "box offset can't be negative"
            raise ValueError(f"crop_fraction is the share of the shorter side kept, in (0, 1], not {crop_fraction!r}.")
        self.augment, self.size, self.crop_fraction = augment, int(image_size), crop_fraction
        self.interpolation = interpolation

    def __call__(self, record: dict, rng: np.random.Generator | None) -> dict:
        image = np.asarray(record["image"])
        if image.ndim == 2:
            image = image[:, :, None]
        if self.augment in ("cifar", "crop") and rng is not None:
            padding = max(1, self.size // 8)  # 4 pixels at CIFAR's 32: the same relative shift at any size
            image = aug.random_crop_flip(image, rng, self.size, padding, flip=self.augment == "cifar")
        elif self.augment == "imagenet" and rng is not None:
            image = aug.random_resized_crop_flip(image, rng, self.size, interpolation=self.interpolation)
        else:
            image = aug.resize_center_crop(image, self.size, self.crop_fraction)
        return {"image": image, "label": np.int32(record["label"])}


class _TrainCrop(grain.transforms.RandomMap):
    """Per example, in torchvision's order: the crop/flip, the auto-augmentation policy, and the rectangle random
    erasing will blank once the batch is normalised (``"erase"``: top, left, height, width; zeros for none)."""

    def __init__(self, crop: _Crop, auto_augment: str = "", erasing: float = 0.0, mean=(0.5,)):
        self.crop, self.erasing = crop, float(erasing)
        self.policy = policy(auto_augment, mean, crop.interpolation)

    def random_map(self, element, rng: np.random.Generator):
        record = self.crop(element, rng)
        if self.policy is not None:
            record["image"] = self.policy(record["image"], rng)
        if self.erasing:
            box = draw_erasing(*record["image"].shape[:2], rng, self.erasing)
            record["erase"] = np.array(box or (0, 0, 0, 0), np.int32)
        return record


class _RepeatedAugmentation(grain.MapDataset):
    """torchvision's ``RASampler`` order on one global stream: in each epoch, each position ``i`` takes the
    shuffled record ``i // reps`` of that epoch, so the epoch keeps its length and its first ``len / reps``
    records come ``reps`` times in a row, each copy at its own position and so with its own augmentation. A
    global batch holds the same records as torchvision's, whose ranks take every ``world_size``-th of this list.
    Positions alone decide everything, so resuming and any number of processes work as without repeats."""

    def __init__(self, parent: grain.MapDataset, reps: int):
        super().__init__(parent)
        self.reps = int(reps)

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"_RepeatedAugmentation(reps={self.reps})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, len(self._parent))  # the shuffle below re-draws its order per epoch
        return self._parent[epoch * len(self._parent) + position // self.reps]


class _Normalize(grain.transforms.Map):
    """Per batch: greyscale <-> RGB and (x / 255 - mean) / std in one vectorised pass over uint8 images."""

    def __init__(self, mean, std, channels: int | None):
        self.mean, self.std = tuple(np.ravel(mean).tolist()), tuple(np.ravel(std).tolist())
        self.channels = channels

    def map(self, batch):
        batch = dict(batch)
        image = aug.normalize(aug.to_channels(batch["image"], self.channels), self.mean, self.std)
        for example, (top, left, height, width) in zip(image, batch.pop("erase", ())):
            example[top:top + height, left:left + width] = 0.0  # torchvision's RandomErasing value: the mean
        return {**batch, "image": image}


def _read_options(read_threads: int | None, worker_count: int = 0) -> grain.ReadOptions:
    """Threads that build batches ahead, each holding one. Grain's default of 16 fights over the GIL on small
    machines (3x slower on 2 cores); one per core keeps the Python parts serial and lets JPEG decoding and
    resizing (which release the GIL) overlap. With worker processes the cores are shared among them: 16 threads
    in each of 16 workers held ~33 batches per worker (~200 GB for the V2 recipe's 1024 images at 176 px),
    where PyTorch's DataLoader holds 2."""
    cores = min(16, os.cpu_count() or 1)
    threads = max(1, cores // max(1, worker_count)) if read_threads is None else int(read_threads)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))


def train_loader(src: Source, *, batch_size: int, image_size: int, augment: str = "none", mean=None, std=None,
                 seed: int = 0, channels: int | None = None, num_epochs: int | None = None, worker_count: int = 0,
                 process_index: int | None = None, process_count: int | None = None,
                 num_classes: int | None = None, crop_fraction: float | None = None,
                 worker_buffer_size: int = 2, read_threads: int | None = None, auto_augment: str = "",
                 random_erasing: float = 0.0, ra_reps: int = 1,
                 train_interpolation: str = "bilinear", shuffle_seeding: str = "hashed") -> grain.IterDataset:
    """A Grain IterDataset of {"image": float32 (local_batch, S, S, C), "label": int32 (local_batch,)}.

    batch_size is global. All processes agree on one stream: the whole split shuffled anew each epoch (with
    ``shuffle_seed(seed, shuffle_seeding)``), augmented per position, cut into local batches of batch_size //
    process_count; process p takes local batches p, p + process_count, ... So global step k is the same examples,
    with the same augmentations, in the same order, for any number of processes: N processes train exactly as one
    process would on the same devices. Grain's datasets are lazy, so each process reads and decodes only the records
    of its own batches. The last partial batch is dropped. num_epochs=None streams forever (batches then straddle
    epoch boundaries; count steps with `steps_per_epoch`); with num_epochs set, the stream is cut to whole global
    batches so every process yields the same number of batches. `iter(loader)` has `get_state()` / `set_state()`;
    save it with `grain.checkpoint.CheckpointHandler`. Batches are the same for any worker_count (workers build
    alternate batches, read back in order), but a saved state is Grain's for one kind of loader: with workers or
    without (its ``set_state`` raises KeyError on the other kind's; the training CLI refuses a resume that changes
    ``num_workers``).

    auto_augment (``autoaugment.policy``: torchvision's "ta_wide" or "ra", timm's "rand-m7-mstd0.5-inc1") runs
    after the crop, random_erasing (a probability, torchvision's RandomErasing) after normalisation; ra_reps > 1
    is repeated augmentation (``_RepeatedAugmentation``, torchvision's RASampler). train_interpolation is the
    random-resized crop's filter ("bilinear", "bicubic", or timm's "random" choice of the two per image).
    """
    index, count = _processes(process_index, process_count)
    local = _local_batch(batch_size, count)
    check_compatible(src, num_classes=num_classes, channels=channels)
    if batch_size > len(src):
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(src)} examples); "
                         f"use a smaller batch or a larger split.")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), not {seed!r}.")
    mean, std = _stats(src, mean, std, channels)
    crop = _Crop(augment, image_size, crop_fraction or default_crop_fraction(src, augment), train_interpolation)
    if isinstance(random_erasing, bool) or not 0.0 <= random_erasing <= 1.0:
        raise ValueError(f"random_erasing is a probability in [0, 1], not {random_erasing!r}.")
    if isinstance(ra_reps, bool) or ra_reps != int(ra_reps) or int(ra_reps) < 1:  # 2.5 was taken as 2
        raise ValueError(f"ra_reps must be a whole number, at least 1 (1: no repeated augmentation), not {ra_reps!r}.")
    distinct = -(-len(src) // int(ra_reps))  # the records an epoch holds, each ra_reps times
    if distinct < batch_size:
        raise ValueError(f"ra_reps={ra_reps} leaves {distinct} distinct examples per epoch of the {len(src)}, fewer "
                         f"than one batch of {batch_size}: every batch would repeat the same few; lower ra_reps.")
    ds = grain.MapDataset.source(src).shuffle(seed=shuffle_seed(int(seed), shuffle_seeding))
    if ra_reps > 1:
        ds = _RepeatedAugmentation(ds, ra_reps)
    ds = (ds.repeat(num_epochs)
          .random_map(_TrainCrop(crop, auto_augment, random_erasing, mean), seed=int(seed))
          .batch(local, drop_remainder=True))
    if num_epochs is not None:
        ds = ds[:len(ds) // count * count]
    ds = (ds[index::count]
          .map(_Normalize(mean, std, channels))
          .to_iter_dataset(_read_options(read_threads, worker_count)))
    if worker_count:
        ds = _in_workers(ds, grain.MultiprocessingOptions(num_workers=worker_count,
                                                          per_worker_buffer_size=worker_buffer_size))
    return ds


SHUFFLE_SEEDINGS = ("hashed", "offset")


def shuffle_seed(seed: int, seeding: str = "hashed") -> int:
    """The seed Grain's shuffle is given for the run's ``seed``. Grain shuffles epoch e with its seed + e, so
    handing it ``seed`` itself ("offset", how runs saved before 2026-12-08 were shuffled) gave seed s + 1 the orders
    of seed s one epoch later: a sweep over consecutive seeds trained on shifted copies of one sequence. "hashed"
    gives each seed orders of its own: the first 32 bits of BLAKE2b of it (hashlib's digests are fixed for good,
    so a saved run resumes in the same order under any later numpy or Grain)."""
    if seeding not in SHUFFLE_SEEDINGS:
        raise ValueError(f"shuffle_seeding must be one of {SHUFFLE_SEEDINGS}, not {seeding!r}.")
    if seeding == "offset":
        return seed
    digest = hashlib.blake2b(f"resnet_jax shuffle {seed}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class _PaddedShard:
    """This process's slice [start, stop) of the source, padded with masked rows to `length` records."""

    def __init__(self, src: Source, start: int, stop: int, length: int):
        self.src, self.start, self.stop, self.length = src, start, stop, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.start + i < self.stop:
            return {**self.src[self.start + i], "mask": True}
        return {"image": None, "label": 0, "mask": False}

    def __repr__(self) -> str:
        return f"_PaddedShard({self.src!r}, start={self.start}, stop={self.stop}, length={self.length})"


class _TransformCrop:
    """Per example, uint8 in and out: a published preprocessing (``EvalTransform.crop``: Pillow resize of the
    short side, truncated as torchvision does, then the centre crop), RGB out; channels are fixed per batch."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, record: dict, rng=None) -> dict:
        return {"image": self.transform.crop(np.asarray(record["image"])), "label": np.int32(record["label"])}


class _EvalCrop(grain.transforms.Map):
    def __init__(self, crop: _Crop, pad_shape: tuple[int, int, int]):
        self.crop, self.pad_shape = crop, pad_shape

    def map(self, element):
        if not element["mask"]:
            return {"image": np.zeros(self.pad_shape, np.uint8), "label": np.int32(0), "mask": np.False_}
        return {**self.crop(element, None), "mask": np.True_}


class EvalLoader:
    """Re-iterable, finite: `len(loader)` batches of {"image", "label", "mask"}, the same count on every process."""

    def __init__(self, dataset: grain.IterDataset, num_batches: int, start: int, stop: int):
        self._dataset, self.num_batches, self.start, self.stop = dataset, num_batches, start, stop

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        return iter(self._dataset)


def eval_loader(src: Source, *, batch_size: int, image_size: int, mean=None, std=None,
                channels: int | None = None, process_index: int | None = None, process_count: int | None = None,
                num_classes: int | None = None, crop_fraction: float | None = None,
                worker_count: int = 0, read_threads: int | None = None, transform=None) -> EvalLoader:
    """Every example exactly once across processes, in order, resized and centre-cropped (no randomness).

    ``transform``: an ``EvalTransform`` (``resnet_jax.data.transforms``; ``config.eval_transform``) to resize
    and crop with instead of ``image_size``/``crop_fraction``: the batched form of published weights'
    preprocessing, equal per pixel to torchvision's/timm's, normalised with the transform's mean/std unless
    ``mean``/``std`` are given (it used the dataset's: a batch then differed from ``transform.batch``).
    ``crop_fraction`` defaults to the fraction for ``augment="imagenet"`` training (``default_crop_fraction``);
    a model trained with "cifar" or "crop" on photos is evaluated on the whole square (pass 1.0).

    Process p reads the contiguous slice p of ceil(len / process_count) examples; the last batch is padded with
    blank images, label 0 and mask False, and shorter slices get extra padded batches, so all processes run the
    same number of steps (a multi-host eval step never waits on a process that has finished).
    """
    index, count = _processes(process_index, process_count)
    local = _local_batch(batch_size, count)
    check_compatible(src, num_classes=num_classes, channels=channels)
    if transform is not None and mean is None and std is None:
        mean, std = transform.mean, transform.std
    mean, std = _stats(src, mean, std, channels)
    if transform is None:
        crop = _Crop("none", image_size, crop_fraction or default_crop_fraction(src))
        pad_shape = (int(image_size), int(image_size), src.image_shape[2])
    else:
        crop, pad_shape = _TransformCrop(transform), (transform.crop_size, transform.crop_size, 3)
    per_process = math.ceil(len(src) / count)
    start, stop = min(index * per_process, len(src)), min((index + 1) * per_process, len(src))
    num_batches = math.ceil(per_process / local)
    dataset = (grain.MapDataset.source(_PaddedShard(src, start, stop, num_batches * local))
               .map(_EvalCrop(crop, pad_shape))
               .batch(local)
               .map(_Normalize(mean, std, channels))
               .to_iter_dataset(_read_options(read_threads, worker_count)))
    if worker_count:
        dataset = _in_workers(dataset, grain.MultiprocessingOptions(num_workers=worker_count))
    return EvalLoader(dataset, num_batches, start, stop)
