"""Input-pipeline throughput: our Grain pipeline vs the same work in tf.data or torchvision, images/s here.

    python -m benchmarks.input_pipeline                 # CIFAR and ImageNet recipes vs tf.data
    python -m benchmarks.input_pipeline --recipes v2    # the V2 training transform vs torchvision's DataLoader
    python -m benchmarks.input_pipeline --quick         # smoke test, a few batches

CIFAR recipe: 32x32 uint8 images in memory -> shuffle -> zero-pad 4 + random 32 crop + flip -> normalise -> batch.
ImageNet recipe: JPEG bytes in memory (ImageNet-like sizes, 300..500 px a side) -> decode -> random-resized crop
to 224 + flip -> normalise -> batch. Our side decodes the whole image in the source, as `tfds.data_source`
does; tf.data is timed twice: its idiomatic `decode_and_crop_jpeg` (decodes only the crop window, the reference
for the ratios) and "full decode" (decode_jpeg, then crop: the same work as ours). Each pipeline is rebuilt every round,
warmed up, then timed; rounds alternate between pipelines so a busy shared machine slows all alike, and the
median round is reported. Writes benchmarks/results/input_pipeline.json.

V2 recipe (torchvision's ResNet-50 V2 training transform, train/configs/imagenet_resnet50_tv2.py): the same JPEGs
-> decode -> random-resized crop 176 + flip -> TrivialAugmentWide -> normalise -> RandomErasing(0.1) -> batch
(mixup/cutmix run on the device, outside the host pipeline). Ours is `data.train_loader` called with the V2
config's keys, as the training loop calls it; torchvision's is `torch.utils.data.DataLoader` over a Dataset of the
same JPEG bytes with torchvision's `presets.py` transforms (Pillow backend), at the same number of worker
processes. Per core = images/s / worker processes; "cores for 5,000 img/s" = 5000 / that. torch and torchvision
are imported here only, never by the library.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_jax import data

CIFAR_MEAN, CIFAR_STD = data.DATASET_STATS["cifar10"]


class ArraySource(data.Source):
    """Decoded images held in memory (what a prepared CIFAR split amounts to)."""

    def __init__(self, images, labels, name="bench_array"):
        self.images, self.labels, self.name, self.split = images, labels, name, "train"
        self.num_classes, self.class_names = 10, [str(i) for i in range(10)]
        self.image_shape = images.shape[1:]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


class JpegSource(ArraySource):
    """JPEG bytes held in memory, decoded on read with Pillow, as a TFDS ImageNet data source does."""

    def __init__(self, jpegs, labels):
        super().__init__(np.zeros((1, 1, 1, 3), np.uint8), labels, "bench_jpeg")
        self.jpegs, self.image_shape = jpegs, (None, None, 3)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.jpegs[i])) as image:
            return {"image": np.asarray(image.convert("RGB")), "label": int(self.labels[i])}


def make_cifar(n, rng):
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def make_jpegs(n, rng):
    """Photo-like JPEGs (smooth structure plus grain, quality 90) so decode cost and file size are realistic."""
    jpegs = []
    for _ in range(n):
        h, w = rng.integers(300, 501, size=2)
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((int(w), int(h)),
                                                                                         Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs, rng.integers(0, 10, n)


def grain_pipeline(src, recipe, batch, workers):
    size, augment = (32, "cifar") if recipe == "cifar" else (224, "imagenet")
    mean, std = (CIFAR_MEAN, CIFAR_STD) if recipe == "cifar" else (data.IMAGENET_MEAN, data.IMAGENET_STD)
    return lambda: iter(data.train_loader(src, batch_size=batch, image_size=size, augment=augment, mean=mean,
                                          std=std, seed=0, worker_count=workers))


def v2_config():
    """The V2 recipe's config (train/configs/imagenet_resnet50_tv2.py), loaded from its file like `python -m train`."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "train" / "configs" / "imagenet_resnet50_tv2.py"
    spec = importlib.util.spec_from_file_location("imagenet_resnet50_tv2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def grain_v2_pipeline(src, batch, workers):
    """The training loop's call (resnet_jax/training/loop.py) with the V2 config's keys; batch and workers ours."""
    from resnet_jax.training.config import normalization_stats

    c = v2_config()
    mean, std = normalization_stats(c)
    return lambda: iter(data.train_loader(src, batch_size=batch, augment=c.augment, seed=c.seed, worker_count=workers,
                                          auto_augment=c.auto_augment, random_erasing=c.random_erasing,
                                          ra_reps=c.ra_reps, image_size=c.image_size, mean=mean, std=std,
                                          channels=3))


class TorchJpegDataset:
    """The same JPEG bytes as a map-style torch Dataset: decode with Pillow, then torchvision's transform."""

    def __init__(self, jpegs, labels, transform):
        self.jpegs, self.labels, self.transform = jpegs, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        with Image.open(io.BytesIO(self.jpegs[i])) as image:
            return self.transform(image.convert("RGB")), int(self.labels[i])


def torchvision_v2_pipeline(jpegs, labels, batch, workers):
    """torchvision's references/classification/presets.py ClassificationPresetTrain for the V2 command (crop 176,
    ta_wide, random_erase 0.1, bilinear, Pillow backend, transforms.v2), in a DataLoader with `workers` processes."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision.transforms import InterpolationMode, v2

    c = v2_config()
    bilinear = InterpolationMode.BILINEAR
    transform = v2.Compose([
        v2.RandomResizedCrop(c.image_size, interpolation=bilinear, antialias=True), v2.RandomHorizontalFlip(0.5),
        v2.TrivialAugmentWide(interpolation=bilinear), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(data.IMAGENET_MEAN), std=list(data.IMAGENET_STD)),
        v2.RandomErasing(p=c.random_erasing), v2.ToPureTensor()])
    dataset = TorchJpegDataset(jpegs, labels, transform)

    def build():
        sampler = RandomSampler(dataset, num_samples=1 << 30)  # an endless shuffled stream, epoch after epoch
        return iter(DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True))
    return build


def tf_pipeline(recipe, batch, inputs, labels, crop_while_decoding=True):
    import tensorflow as tf

    if recipe == "cifar":
        mean, std = tf.constant(CIFAR_MEAN), tf.constant(CIFAR_STD)

        def augment(image, label):
            image = tf.image.random_crop(tf.pad(image, [[4, 4], [4, 4], [0, 0]]), [32, 32, 3])
            image = tf.image.random_flip_left_right(image)
            return (tf.cast(image, tf.float32) / 255.0 - mean) / std, tf.cast(label, tf.int32)
    else:
        mean, std = tf.constant(data.IMAGENET_MEAN), tf.constant(data.IMAGENET_STD)
        whole = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])

        def augment(jpeg, label):
            begin, crop, _ = tf.image.sample_distorted_bounding_box(
                tf.io.extract_jpeg_shape(jpeg), whole, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
            if crop_while_decoding:
                window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
                image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
            else:  # the same work as the Grain side: decode the whole image, then crop
                image = tf.slice(tf.io.decode_jpeg(jpeg, channels=3), begin, crop)
            image = tf.image.resize(image, [224, 224], method="bilinear", antialias=True)
            image = tf.image.random_flip_left_right(image)
            return (image / 255.0 - mean) / std, tf.cast(label, tf.int32)

    def build():
        ds = tf.data.Dataset.from_tensor_slices((inputs, labels)).repeat().shuffle(len(labels), seed=0)
        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True)
        return iter(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator())
    return build


def time_round(build, batch, warmup, steps):
    iterator = build()
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    rate = steps * batch / (time.perf_counter() - start)
    del iterator
    return rate


def environment(argv, recipes=()):
    import grain
    import jax
    import PIL
    import tensorflow as tf
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "versions": {"jax": jax.__version__, "grain": getattr(grain, "__version__", _version("grain")),
                         "tensorflow": tf.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
                         **({"torch": _version("torch"), "torchvision": _version("torchvision")}
                            if "v2" in recipes else {})},
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "command": "python -m benchmarks.input_pipeline " + " ".join(argv)}


def _version(dist):
    from importlib.metadata import version
    return version(dist)


def v2_pipelines(jpegs, labels, batch, worker_counts):
    """Ours and torchvision's V2 transform at each worker count, alternating in the timing order."""
    src = JpegSource(jpegs, labels)
    pipelines = {}
    for w in worker_counts:
        pipelines[f"grain workers={w}"] = grain_v2_pipeline(src, batch, w)
        pipelines[f"torchvision workers={w}"] = torchvision_v2_pipeline(jpegs, labels, batch, w)
    return pipelines


def measure(pipelines, batch, warmup, steps, rounds):
    """Median images/s of each pipeline; each round builds every pipeline anew, in alternating order."""
    rates = {name: [] for name in pipelines}
    for r in range(rounds):
        for name in (list(pipelines) if r % 2 == 0 else list(reversed(pipelines))):
            rates[name].append(time_round(pipelines[name], batch, warmup, steps))
    return {name: (statistics.median(values), values) for name, values in rates.items()}


def v2_rows(measured, batch, worker_counts):
    rows = []
    for w in worker_counts:
        ours, theirs = measured[f"grain workers={w}"][0], measured[f"torchvision workers={w}"][0]
        for side, rate in (("grain", ours), ("torchvision", theirs)):
            per_core = rate / w
            rows.append({"recipe": "v2", "pipeline": f"{side} workers={w}", "workers": w, "batch": batch,
                         # unrounded: a smoke run's single batch can come prefetched, at 1e5 img/s and more
                         "images_per_s": rate, "rounds": measured[f"{side} workers={w}"][1],
                         "images_per_s_per_core": per_core, "cores_for_5000": 5000 / per_core,
                         "ratio_to_torchvision": rate / theirs})
    return rows


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # v2 only when asked: torch's DataLoader forks in a process that has loaded TensorFlow (the tf.data recipes),
    # which crashed (SIGSEGV) in CI; each side in a run of its own is how it is timed
    p.add_argument("--recipes", nargs="+", default=["cifar", "imagenet"], choices=["cifar", "imagenet", "v2"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="Grain worker_count values to time")
    p.add_argument("--v2-workers", type=int, nargs="+", default=[1, 2],
                   help="worker processes for the V2 recipe, the same on both sides")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 small batches")
    p.add_argument("--json", default=None, help="where to write the results (default: benchmarks/results/"
                   "input_pipeline.json, input_pipeline_quick.json for --quick: a smoke run keeps the real results)")
    args = p.parse_args(argv)
    args.json = args.json or str(Path(__file__).parent / "results" /
                                 f"input_pipeline{'_quick' if args.quick else ''}.json")
    rng = np.random.default_rng(0)
    rounds = 1 if args.quick else args.rounds
    results = []
    for recipe in args.recipes:
        if recipe == "v2":
            batch, warmup, steps = (4, 1, 1) if args.quick else (32, 3, 12)
            # V2 repeats each image 4 times (ra_reps): an epoch must still hold a batch of distinct images
            jpegs, labels = make_jpegs(16 if args.quick else 256, rng)
            measured = measure(v2_pipelines(jpegs, labels, batch, args.v2_workers), batch, warmup, steps, rounds)
            results.extend(v2_rows(measured, batch, args.v2_workers))
            continue
        if recipe == "cifar":
            batch, warmup, steps = (16, 1, 1) if args.quick else (256, 3, 30)
            images, labels = make_cifar(512 if args.quick else 10_000, rng)
            src, tf_inputs = ArraySource(images, labels), images
        else:
            batch, warmup, steps = (4, 1, 1) if args.quick else (32, 2, 12)
            jpegs, labels = make_jpegs(8 if args.quick else 256, rng)
            src, tf_inputs = JpegSource(jpegs, labels), np.array(jpegs, dtype=object)
        pipelines = {f"grain workers={w}": grain_pipeline(src, recipe, batch, w) for w in args.workers}
        if recipe == "imagenet":
            pipelines["tf.data full decode"] = tf_pipeline(recipe, batch, tf_inputs, labels, False)
        reference = "tf.data" if recipe == "cifar" else "tf.data crop-decode"
        pipelines[reference] = tf_pipeline(recipe, batch, tf_inputs, labels)
        measured = measure(pipelines, batch, warmup, steps, rounds)
        reference_rate = measured[reference][0]
        for name, (median, values) in measured.items():
            results.append({"recipe": recipe, "pipeline": name, "batch": batch, "images_per_s": round(median, 1),
                            "rounds": [round(v, 1) for v in values], "ratio_to_tf_data": round(median / reference_rate, 2)})
    report = {**environment(argv, args.recipes), "results": results}
    tf_rows = [row for row in results if row["recipe"] != "v2"]
    if tf_rows:
        print(f"{'recipe':10} {'pipeline':22} {'batch':>5} {'images/s':>10} {'vs tf.data':>10}")
        for row in tf_rows:
            print(f"{row['recipe']:10} {row['pipeline']:22} {row['batch']:5d} {row['images_per_s']:10.1f} "
                  f"{row['ratio_to_tf_data']:9.2f}x")
    v2 = [row for row in results if row["recipe"] == "v2"]
    if v2:
        print("\nV2 training transform (crop 176, flip, TrivialAugmentWide, normalise, RandomErasing 0.1):")
        print(f"{'pipeline':24} {'batch':>5} {'images/s':>10} {'per core':>9} {'cores/5k':>9} {'vs torchvision':>15}")
        for row in v2:
            print(f"{row['pipeline']:24} {row['batch']:5d} {row['images_per_s']:10.1f} "
                  f"{row['images_per_s_per_core']:9.1f} {row['cores_for_5000']:9.1f} {row['ratio_to_torchvision']:14.2f}x")
    print(f"load average at the end: {report['load_average']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
