"""``python -m train.predict --workdir=DIR IMAGE [IMAGE ...]`` (or ``--artifact=FILE``, or
``--pretrained=resnet50``): top-5 classes with probabilities per image.

``--pretrained`` takes published ImageNet weights by name (``resnet50``, ``resnet50.IMAGENET1K_V1``,
``resnet50.a1_in1k``), downloaded once (or ``--weights_file``, a local copy), and prepares each photo exactly as
the weights' accuracy was measured (``Classifier.from_pretrained``).

``--artifact`` takes a file written by ``python -m train.export --format=stablehlo|onnx``: it runs without the
training run's checkpoints. An IMAGE is an image file, or a ``.npy`` array holding one image or a batch in any
form ``Classifier.predict`` accepts (``(H, W)``, ``(H, W, C)``, ``(N, H, W, C)``, greyscale ``(N, H, W)``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from train.usage import parse_flags, usage_error

flags.DEFINE_string("workdir", None, "workdir of a training run (or a Classifier.save directory)")
flags.DEFINE_string("artifact", None, "an exported model (.stablehlo or .onnx, its .json manifest beside it)")
flags.DEFINE_string("pretrained", None, "published weights, e.g. resnet50, resnet50.IMAGENET1K_V1, resnet50.a1_in1k")
flags.DEFINE_string("weights_file", None, "with --pretrained: a local copy of those weights (no download)")
flags.DEFINE_string("step", None, "checkpoint step, or 'best' (default: the latest); with --workdir only")
flags.DEFINE_integer("top_k", 5, "how many classes to show per image")


def check_sources(workdir: str | None, artifact: str | None, step: str | None, pretrained: str | None = None,
                  weights_file: str | None = None) -> None:
    """ValueError where the flags do not name one model to load: a usage mistake, said before anything loads."""
    if sum(map(bool, (workdir, artifact, pretrained))) != 1:
        raise ValueError("give exactly one of --workdir (a training run), --artifact (an exported model) and "
                         "--pretrained (published weights, e.g. resnet50)")
    if weights_file and not pretrained:
        raise ValueError("--weights_file is a local copy of the weights --pretrained names; give --pretrained too")
    if step and pretrained:
        raise ValueError("--step picks a checkpoint of a workdir; published weights have no steps")
    if step and artifact:
        raise ValueError("--step picks a checkpoint of a workdir; an exported artifact has only its own weights")


def load_model(workdir: str | None, artifact: str | None, step: str | None, pretrained: str | None = None,
               weights_file: str | None = None):
    """``(model, channels it takes)``: a ``Classifier`` or an ``ExportedModel``, both with ``predict``; the flags
    already passed ``check_sources`` (``main`` checks them before anything loads)."""
    if pretrained:
        from resnet_jax.training.classifier import Classifier

        clf = Classifier.from_pretrained(pretrained, file=weights_file or None)
        return clf, clf.model.in_channels
    if artifact:
        from resnet_jax.export import load_exported

        exported = load_exported(artifact)
        return exported, exported.channels
    if Path(workdir).is_file():
        raise ValueError(f"--workdir {workdir} is a file; pass an exported model with --artifact={workdir}")
    from resnet_jax.training.classifier import Classifier

    clf = Classifier.load(workdir, step)
    return clf, clf.model.in_channels


def read_input(path: str, channels: int) -> tuple[list[str], list]:
    """(labels, images) of one argument: an image file read, or a ``.npy`` array split into its images, labelled
    ``file.npy[i]`` when it holds a batch."""
    import numpy as np

    from resnet_jax.data.images import read_image, split_images

    if Path(path).suffix != ".npy":
        return [path], [read_image(path)]
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as err:  # EOFError: an empty file
        raise ValueError(f"{path} is not a numeric .npy array ({err or 'the file is empty'}); save images with "
                         "np.save") from None
    try:
        parts = split_images(array, channels)
    except ValueError as err:  # the array's dtype or shape: said with the file it came from
        raise ValueError(f"{path}: {err}") from None
    return ([path] if len(parts) == 1 else [f"{path}[{i}]" for i in range(len(parts))]), parts


def predict_files(model, paths: list[str], channels: int, top_k: int) -> int:
    """Print each input's top-k, a piece of ``PREDICT_CHUNK`` files at a time (memory stays that of one piece,
    and results appear as they come); a file that cannot be read is said on stderr and the others still run.
    Returns how many inputs failed."""
    from resnet_jax.data.images import PREDICT_CHUNK

    failed = 0
    for start in range(0, len(paths), PREDICT_CHUNK):
        labels, images = [], []
        for path in paths[start:start + PREDICT_CHUNK]:
            try:
                more_labels, more_images = read_input(path, channels)
            except (ValueError, OSError) as err:
                print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
                failed += 1
                continue
            labels += more_labels
            images += more_images
        if not images:
            continue
        for label, top in zip(labels, model.predict(images, top_k=top_k)):
            print(label)
            for name, prob in top:
                print(f"  {prob:7.2%}  {name}")
        sys.stdout.flush()
    return failed


def main(argv: list[str]) -> int:
    paths = argv[1:]
    if not paths:
        usage_error("give one or more image files (or .npy arrays) after the flags")
    logging.set_verbosity(logging.WARNING)
    from resnet_jax.data.images import check_top_k

    try:  # flags that name no single model, or no valid top-k: a usage mistake (exit 2), before anything loads
        check_top_k(flags.FLAGS.top_k)
        check_sources(flags.FLAGS.workdir, flags.FLAGS.artifact, flags.FLAGS.step, flags.FLAGS.pretrained,
                      flags.FLAGS.weights_file)
    except ValueError as err:
        usage_error(str(err))
    try:
        model, channels = load_model(flags.FLAGS.workdir, flags.FLAGS.artifact, flags.FLAGS.step,
                                     flags.FLAGS.pretrained, flags.FLAGS.weights_file)
        failed = predict_files(model, paths, channels, flags.FLAGS.top_k)
    except (ValueError, OSError, RuntimeError, ImportError) as err:  # CheckpointError is a RuntimeError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the message
        return 1
    if failed:
        print(f"error: {failed} of the inputs could not be read (said above); the others were predicted",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
