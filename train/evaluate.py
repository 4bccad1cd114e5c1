"""``python -m train.evaluate --workdir=DIR [--step=N|best] [--dataset=NAME] [--split=NAME] [--use_ema]``: loss /
top-1 / top-5 of a run's checkpoint on its validation split, another split, or another dataset of its classes (a
held-out test folder, or the run's image folder after it moved: ``--dataset=folder:NEW/PATH``)."""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from train.usage import no_arguments, parse_flags, usage_error, workdir_problem

flags.DEFINE_string("workdir", None, "workdir of a training run (or a Classifier.save directory)", required=True)
flags.DEFINE_string("step", None, "checkpoint step, or 'best' (default: the latest)")
flags.DEFINE_bool("use_ema", False, "the run's moving average of the weights (config.model_ema) instead")
flags.DEFINE_string("dataset", None, "dataset to evaluate on, of the model's classes (default: the run's "
                    "config.dataset), e.g. folder:PATH")
flags.DEFINE_string("split", None, "split to evaluate (default: the run's config.val_split)")
flags.DEFINE_integer("batch_size", 256, "evaluation batch size")


def main(argv: list[str]) -> int:
    no_arguments(argv, "the options are flags, e.g. --workdir=DIR (--helpshort lists them)")
    if problem := workdir_problem(flags.FLAGS.workdir):
        usage_error(problem)
    logging.set_verbosity(logging.WARNING)
    from resnet_jax.training.classifier import Classifier

    try:
        clf = Classifier.load(flags.FLAGS.workdir, flags.FLAGS.step, use_ema=flags.FLAGS.use_ema)
        metrics = clf.evaluate(flags.FLAGS.dataset, flags.FLAGS.split, batch_size=flags.FLAGS.batch_size)
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError is a RuntimeError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the message
        return 1
    print(json.dumps({"dataset": flags.FLAGS.dataset or clf.config.dataset,
                      "split": flags.FLAGS.split or clf.config.val_split,
                      **metrics}))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
