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

from resnet_jax.export.loader import ExportedModel, load_exported
from resnet_jax.export.manifest import FORMAT_VERSION, FORMATS, ArtifactError, Preprocessing, write_manifest

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's names for the backends a StableHLO artifact can serve

SUFFIXES = {".stablehlo": "stablehlo", ".onnx": "onnx"}


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
    num_classes = int(model.num_classes)
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a model with {num_classes} outputs; give one name per class")
    if platforms and fmt != "stablehlo":
        raise ValueError("platforms applies to StableHLO artifacts only; an ONNX model runs wherever onnxruntime "
                         "does")
    unknown = [p for p in platforms or () if p not in PLATFORMS]
    if unknown:  # jax.export lowers for any name, and the artifact then runs nowhere
        hint = " (NVIDIA GPUs are 'cuda', AMD's 'rocm')" if {"gpu", "GPU"} & set(unknown) else ""
        raise ValueError(f"unknown platform(s) {unknown}{hint}; choose from {list(PLATFORMS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "stablehlo":
        from resnet_jax.export.stablehlo import export_stablehlo

        extra = export_stablehlo(model, variables, path, preprocessing, platforms)
    else:
        from resnet_jax.export.onnx_graph import export_onnx

        extra = export_onnx(model, variables, path, preprocessing)
    write_manifest(path, fmt=fmt, model_name=model_name, num_classes=num_classes, channels=model.in_channels,
                   preprocessing=preprocessing, class_names=names, extra=extra)
    return path


__all__ = ["FORMATS", "FORMAT_VERSION", "ArtifactError", "ExportedModel", "Preprocessing", "export_model",
           "load_exported"]
