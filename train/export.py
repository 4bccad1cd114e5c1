"""``python -m train.export --workdir=DIR --output=FILE [--format=...] [--use_ema]``: a run's checkpoint as a file to deploy.

- ``stablehlo`` (``.stablehlo``): a ``jax.export`` artifact of the inference function, BatchNorm folded, batch
  size free; runs with ``jax`` alone (``jax.export.deserialize``) or ``resnet_jax.export.load_exported``.
- ``onnx`` (``.onnx``): the same folded graph as ONNX, batch size free; runs in onnxruntime.
- ``torchvision`` (``.pth``) / ``safetensors`` (``.safetensors``): the state_dict, in the names of the PyTorch
  library that has the architecture (``--naming=auto``): ``torchvision.models.<model>(num_classes=N)`` where
  torchvision has it, else ``timm.create_model(<model>, num_classes=N)`` (ResNet-D, SE, ECA, ResNetV2, other
  input channels). Architectures neither has (the CIFAR ResNets) get torchvision's naming rules, which
  ``resnet_jax.load_torchvision`` reads back; the line printed says which.

The two inference formats get a JSON manifest beside them (``FILE.json``: class names, preprocessing). The
format defaults to the one the output's suffix names.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

from train.usage import no_arguments, parse_flags, usage_error, workdir_problem

FORMATS = {"stablehlo": ".stablehlo", "onnx": ".onnx", "torchvision": ".pth", "safetensors": ".safetensors"}

flags.DEFINE_string("workdir", None, "workdir of a training run (or a Classifier.save directory)", required=True)
flags.DEFINE_string("output", None, "file to write (.stablehlo, .onnx, .pth or .safetensors)", required=True)
flags.DEFINE_string("step", None, "checkpoint step, or 'best' (default: the latest)")
flags.DEFINE_bool("use_ema", False, "the run's moving average of the weights (config.model_ema) instead")
flags.DEFINE_enum("format", None, list(FORMATS), "what to write (default: from the output's suffix)")
flags.DEFINE_enum("naming", "auto", ["auto", "torchvision", "timm"],
                  ".pth/.safetensors: whose parameter names (auto: the library that has the architecture)")
flags.DEFINE_list("platforms", None, "stablehlo only: backends to lower for, e.g. cpu,cuda (default: this one's)")


def output_format(output: Path, fmt: str | None) -> str:
    """The format to write: the one asked for, else the one the suffix names. torchvision and safetensors files
    are told apart by their suffix alone, so theirs must match."""
    by_suffix = {suffix: name for name, suffix in FORMATS.items()}
    fmt = fmt or by_suffix.get(output.suffix)
    if fmt is None:
        raise ValueError(f"cannot tell the format from {output.name}; pass --format={'|'.join(FORMATS)} or name "
                         f"the file {', '.join(FORMATS.values())}")
    if fmt in ("torchvision", "safetensors") and output.suffix != FORMATS[fmt]:
        raise ValueError(f"a {fmt} file must end in {FORMATS[fmt]}, got {output.name}")
    if by_suffix.get(output.suffix, fmt) != fmt:  # a .pth holding ONNX: torch.load, onnxruntime go by the name
        raise ValueError(f"{output.name}'s suffix says {by_suffix[output.suffix]} but --format={fmt}; name it "
                         f"{output.stem}{FORMATS[fmt]} (or leave the format to the suffix)")
    return fmt


def main(argv: list[str]) -> int:
    no_arguments(argv, "the options are flags, e.g. --workdir=DIR --output=FILE (--helpshort lists them)")
    logging.set_verbosity(logging.WARNING)
    from resnet_jax.training.classifier import Classifier

    output, platforms = Path(flags.FLAGS.output), flags.FLAGS.platforms
    try:  # a format the flags cannot name is a usage mistake (exit 2), found before the checkpoint is read
        if problem := workdir_problem(flags.FLAGS.workdir):
            raise ValueError(problem)
        fmt = output_format(output, flags.FLAGS.format)
        if platforms and fmt != "stablehlo":
            raise ValueError("--platforms applies to --format=stablehlo only")
    except ValueError as err:
        usage_error(str(err))
    try:
        clf = Classifier.load(flags.FLAGS.workdir, flags.FLAGS.step, use_ema=flags.FLAGS.use_ema)
        if fmt in ("torchvision", "safetensors"):
            path, described = clf.export_state_dict(output, flags.FLAGS.naming)
        else:
            path = clf.export(output, format=fmt, platforms=platforms)
            described = f"{fmt}, {clf.config.model}, {clf.num_classes} classes"
    except (ValueError, OSError, RuntimeError, ImportError) as err:  # CheckpointError is a RuntimeError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever the message
        return 1
    manifest = " and its manifest " + path.name + ".json" if fmt in ("stablehlo", "onnx") else ""
    print(f"wrote {path}{manifest} ({described})")
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
