"""Deploy a trained classifier without the training code: StableHLO and ONNX artifacts, BatchNorm folded.

    from resnet_jax.export import Preprocessing, export_model, load_exported

    export_model(model, variables, "digits.stablehlo", preprocessing=Preprocessing(16, mean, std),
                 class_names=names)                              # also "digits.onnx" (format from the suffix)
    model = load_exported("digits.stablehlo")                     # no resnet_jax model code runs in there
    model.predict(images)                                         # [[("3", 0.98), ...], ...]

Each artifact takes uint8 NHWC images at the model's size with a free batch size and returns float32 logits;
the normalisation is inside, the resize/crop and the class names are in the JSON manifest beside it
(``<file>.json``). ``Classifier.export`` and ``python -m train.export --format=...`` fill the preprocessing in
from the training run's config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from resnet_jax.atomic import replace_together
from resnet_jax.export.loader import ExportedModel, load_exported
from resnet_jax.export.manifest import (FORMAT_VERSION, FORMATS, ArtifactError, Preprocessing, manifest_path,
                                        manifest_text)

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's names for the backends a StableHLO artifact can serve

SUFFIXES = {".stablehlo": "stablehlo", ".onnx": "onnx"}
STATE_DICT_SUFFIXES = (".pth", ".pt", ".safetensors")  # the weights alone: save_torchvision / export_state_dict


def export_model(model, variables: dict[str, Any], path: str | Path, *, preprocessing: Preprocessing,
                 class_names: Sequence[str] | None = None, format: str | None = None, model_name: str = "",
                 platforms: Sequence[str] | None = None) -> Path:
    """Write ``model`` with ``variables`` (``{"params", "batch_stats"}``, unfolded) as an inference artifact at
    ``path`` plus its manifest; returns ``path``.

    ``format`` is "stablehlo" or "onnx" (default: from the suffix, ``.stablehlo`` or ``.onnx``). ``platforms``
    (StableHLO only) lists the backends to lower for, e.g. ``("cpu", "cuda")``; default: this process's.
    """
    path = Path(path)
    fmt = format or SUFFIXES.get(path.suffix)
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {format or path.suffix!r} for {path.name}; choose one of "
                         f"{list(FORMATS)} (or name the file .stablehlo / .onnx)")
    if format and SUFFIXES.get(path.suffix, format) != format:  # runtimes go by the name: onnxruntime on a .onnx
        raise ValueError(f"{path.name}'s suffix says {SUFFIXES[path.suffix]} but format={format!r}; name it "
                         f"{path.stem}.{format} (or leave the format to the suffix)")
    if path.suffix in STATE_DICT_SUFFIXES:
        raise ValueError(f"{path.name}'s suffix is a PyTorch state_dict's, which loaders would read as weights; "
                         f"name the {fmt} artifact {path.stem}.{fmt} (save_torchvision / save_timm write weights)")
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a resnet_jax.export.Preprocessing, got {type(preprocessing).__name__}")
    num_classes = int(model.num_classes)
    names = _class_names(class_names, num_classes)
    platforms = (platforms,) if isinstance(platforms, str) else platforms  # "cpu" is one platform, not three
    if platforms and fmt != "stablehlo":
        raise ValueError("platforms applies to StableHLO artifacts only; an ONNX model runs wherever onnxruntime "
                         "does")
    unknown = [p for p in platforms or () if p not in PLATFORMS]
    if unknown:  # jax.export lowers for any name, and the artifact then runs nowhere
        hint = " (NVIDIA GPUs are 'cuda', AMD's 'rocm')" if {"gpu", "GPU"} & set(unknown) else ""
        raise ValueError(f"unknown platform(s) {unknown}{hint}; choose from {list(PLATFORMS)}")
    _check_variables_fit(model, variables, (1, preprocessing.image_size, preprocessing.image_size,
                                            model.in_channels))
    if fmt == "stablehlo":
        from resnet_jax.export.stablehlo import export_stablehlo

        content, extra = export_stablehlo(model, variables, preprocessing, platforms)
    else:
        from resnet_jax.export.onnx_graph import export_onnx

        content, extra = export_onnx(model, variables, preprocessing)
    text = manifest_text(path, content, fmt=fmt, model_name=model_name, num_classes=num_classes,
                         channels=model.in_channels, preprocessing=preprocessing, class_names=names, extra=extra)
    # both built, then both written, before either replaces its file: a failed export (a full disk) leaves the
    # previous artifact and manifest as they were, a pair that still loads
    replace_together({path: lambda partial: partial.write_bytes(content),
                      manifest_path(path): lambda partial: partial.write_text(text)})
    return path


def _check_variables_fit(model, variables: dict[str, Any], input_shape: tuple[int, ...]) -> None:
    """Refuse variables of another model (another class count, the params alone) before folding, which would
    have blamed the model's BatchNorm placement or failed on a bare KeyError."""
    from resnet_jax.variable_fit import differences, listed, model_shapes, shapes_of

    wrong = differences(model_shapes(model, input_shape), shapes_of(variables))
    if wrong:
        raise ValueError(f"these variables do not fit the model: {listed(wrong)}; pass the model's own variables, "
                         "{'params': ..., 'batch_stats': ...}, as it was made")


def _class_names(class_names: Sequence[Any] | None, num_classes: int) -> list[str]:
    """One string per output: the names given (any sequence, numpy's included; labels such as numpy ints become
    their text, as ``Classifier`` names index-labelled classes), else the output indices."""
    if isinstance(class_names, (str, bytes)):  # a string is a sequence of one-letter names
        raise ValueError(f"class_names must be a list of names, one per class, not the single string {class_names!r}")
    names = [str(i) for i in range(num_classes)] if class_names is None else [
        n if isinstance(n, str) else str(n.item() if hasattr(n, "item") else n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} outputs; give one name per class")
    return names


__all__ = ["FORMATS", "FORMAT_VERSION", "ArtifactError", "ExportedModel", "Preprocessing", "export_model",
           "load_exported"]
