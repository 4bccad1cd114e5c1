"""Input-pipeline throughput: our Grain pipeline vs the same work in tf.data, images/s on this machine.

    python -m benchmarks.input_pipeline                 # CIFAR recipe + ImageNet recipe on JPEGs
    python -m benchmarks.input_pipeline --quick         # smoke test, a few batches

CIFAR recipe: 32x32 uint8 images in memory -> shuffle -> zero-pad 4 + random 32 crop + flip -> normalise -> batch.
ImageNet recipe: JPEG bytes in memory (ImageNet-like sizes, 300..500 px a side) -> decode -> random-resized crop
to 224 + flip -> normalise -> batch. Our side decodes the whole image in the source, as `tfds.data_source`
does; tf.data is timed twice: its idiomatic `decode_and_crop_jpeg` (decodes only the crop window, the reference
for the ratios) and "full decode" (decode_jpeg, then crop: the same work as ours). Each pipeline is rebuilt every round,
warmed up, then timed; rounds alternate between pipelines so a busy shared machine slows all alike, and the
median round is reported. Writes benchmarks/results/input_pipeline.json.
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


def environment(argv):
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
                         "tensorflow": tf.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
            "command": "python -m benchmarks.input_pipeline " + " ".join(argv)}


def _version(dist):
    from importlib.metadata import version
    return version(dist)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["cifar", "imagenet"], choices=["cifar", "imagenet"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="Grain worker_count values to time")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke test: 1 round of 2 small batches")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "input_pipeline.json"))
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rounds = 1 if args.quick else args.rounds
    results = []
    for recipe in args.recipes:
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
        rates = {name: [] for name in pipelines}
        for r in range(rounds):
            order = list(pipelines) if r % 2 == 0 else list(reversed(pipelines))
            for name in order:
                rates[name].append(time_round(pipelines[name], batch, warmup, steps))
        reference_rate = statistics.median(rates[reference])
        for name, values in rates.items():
            median = statistics.median(values)
            results.append({"recipe": recipe, "pipeline": name, "batch": batch, "images_per_s": round(median, 1),
                            "rounds": [round(v, 1) for v in values], "ratio_to_tf_data": round(median / reference_rate, 2)})
    report = {**environment(argv), "results": results}
    print(f"{'recipe':10} {'pipeline':22} {'batch':>5} {'images/s':>10} {'vs tf.data':>10}")
    for row in results:
        print(f"{row['recipe']:10} {row['pipeline']:22} {row['batch']:5d} {row['images_per_s']:10.1f} "
              f"{row['ratio_to_tf_data']:9.2f}x")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
