"""``python -m train.predict --workdir=DIR IMAGE [IMAGE ...]``: top-5 classes with probabilities per image."""

from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "workdir of a training run (or a Classifier.save directory)", required=True)
flags.DEFINE_string("step", None, "checkpoint step, or 'best' (default: the latest)")
flags.DEFINE_integer("top_k", 5, "how many classes to show per image")


def main(argv: list[str]) -> int:
    images = argv[1:]
    if not images:
        raise app.UsageError("give one or more image files after the flags")
    logging.set_verbosity(logging.WARNING)
    from resnet_jax.training.classifier import Classifier

    try:
        clf = Classifier.load(flags.FLAGS.workdir, flags.FLAGS.step)
        predictions = clf.predict(images, top_k=flags.FLAGS.top_k)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path, top in zip(images, predictions):
        print(path)
        for name, prob in top:
            print(f"  {prob:7.2%}  {name}")
    return 0


if __name__ == "__main__":
    app.run(main)
