"""``python -m train.export --workdir=DIR --output=model.pth``: a torchvision state_dict (``.pth`` or
``.safetensors``) of a run's checkpoint, loadable with ``torchvision.models.<model>(num_classes=N)``."""

from __future__ import annotations

import sys

from absl import app, flags, logging

flags.DEFINE_string("workdir", None, "workdir of a training run (or a Classifier.save directory)", required=True)
flags.DEFINE_string("output", None, "file to write (.pth or .safetensors)", required=True)
flags.DEFINE_string("step", None, "checkpoint step, or 'best' (default: the latest)")


def main(argv: list[str]) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)
    from resnet_jax.training.classifier import Classifier

    try:
        clf = Classifier.load(flags.FLAGS.workdir, flags.FLAGS.step)
        path = clf.export_torchvision(flags.FLAGS.output)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({clf.config.model}, {clf.num_classes} classes)")
    return 0


if __name__ == "__main__":
    app.run(main)
