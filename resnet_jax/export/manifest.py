"""The JSON manifest written beside every exported artifact (``model.stablehlo`` -> ``model.stablehlo.json``).

The artifact holds the computation; the manifest holds what a runtime needs around it and cannot read from it:
the class names, how images were prepared before the model saw them (the resize and crop happen outside, the
mean/std normalisation inside the artifact), the input and output tensors, and the artifact's size and sha256,
so a truncated or replaced file is reported as such instead of failing somewhere inside a deserializer. It is
plain JSON on purpose: a serving process reads it without resnet_jax.

``FORMAT_VERSION`` grows when a reader of the previous version would misread a new artifact; a reader refuses
versions newer than its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from resnet_jax.pretrained import file_sha256

FORMAT_VERSION = 2  # 2: published weights' preprocessing (resize_size, interpolation, crop_mode); 1 without it
KIND = "resnet_jax exported classifier"
FORMATS = ("stablehlo", "onnx")
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ArtifactError(ValueError):
    """An exported artifact or its manifest that cannot be used as it is (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resize the shorter side to ``image_size / crop_fraction``
    (bilinear), take the central ``image_size`` square, convert to the model's channels, then
    ``(x / 255 - mean) / std`` per channel (done inside the exported artifacts).

    With ``resize_size`` set, the resize and crop are instead published weights' own (``EvalTransform``,
    equal per pixel to torchvision's/timm's): Pillow's ``interpolation`` to ``resize_size`` as ``crop_mode``
    reads it, then the central ``image_size`` square."""

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    crop_fraction: float = 1.0
    resize_size: int | None = None
    interpolation: str = "bilinear"
    crop_mode: str = "center"

    def __post_init__(self):
        """Checked when made, so an export refuses it before writing anything (a std of 0 had made every
        prediction NaN, an unknown interpolation failed only when the artifact was loaded)."""
        from resnet_jax.data.transforms import CROP_MODES, INTERPOLATIONS

        for name in ("image_size",) + (() if self.resize_size is None else ("resize_size",)):
            value = getattr(self, name)
            if _number(value, operator.index) is None or value <= 0:  # numpy's and jax's integer scalars too
                raise ValueError(f"Preprocessing's {name} must be a positive whole number of pixels, got {value!r}")
        fraction = _number(self.crop_fraction, float)
        if fraction is None or not (0 < fraction <= 1 or (self.resize_size is not None and 0 < fraction < np.inf)):
            raise ValueError(f"Preprocessing's crop_fraction must be a number in (0, 1] (the share of the resized "
                             f"image the centre crop keeps), got {self.crop_fraction!r}")
        # stored as Python numbers: the ONNX graph's shapes and the JSON manifest take nothing else
        object.__setattr__(self, "image_size", operator.index(self.image_size))
        object.__setattr__(self, "crop_fraction", fraction)
        if self.resize_size is not None:
            object.__setattr__(self, "resize_size", operator.index(self.resize_size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Preprocessing's interpolation {self.interpolation!r} is not one of "
                             f"{sorted(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"Preprocessing's crop_mode {self.crop_mode!r} is not one of {list(CROP_MODES)}")
        for name in ("mean", "std"):
            try:
                values = np.asarray(getattr(self, name), np.float64).reshape(-1)
            except (TypeError, ValueError):
                values = np.array([np.nan])
            if values.size == 0 or not np.isfinite(values).all() or (name == "std" and (values <= 0).any()):
                raise ValueError(f"Preprocessing's {name} must be finite numbers{', all above 0' * (name == 'std')}"
                                 f" (one per channel, or one for all), got {getattr(self, name)!r}")

    def transform(self):
        """The ``EvalTransform`` this preprocessing names, or ``None`` for the crop-fraction resize."""
        from resnet_jax.data.transforms import EvalTransform

        if self.resize_size is None:
            return None
        return EvalTransform(int(self.resize_size), int(self.image_size), tuple(self.mean), tuple(self.std),
                             self.interpolation, self.crop_mode)

    @classmethod
    def from_manifest(cls, prep: dict[str, Any]) -> "Preprocessing":
        """Read back from a manifest's ``"preprocessing"`` (version 1 ones have no ``resize_size``)."""
        return cls(int(prep["image_size"]), tuple(prep["mean"]), tuple(prep["std"]), float(prep["crop_fraction"]),
                   prep.get("resize_size"), prep.get("interpolation", "bilinear"), prep.get("crop_mode", "center"))

    def per_channel(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """``mean`` and ``std`` as float32 arrays of one value per channel (one value is repeated)."""
        out = []
        for name, values in (("mean", self.mean), ("std", self.std)):
            values = np.asarray(values, np.float32).reshape(-1)
            if values.size not in (1, channels):
                raise ValueError(f"{name} has {values.size} values but the model takes {channels} channels; give "
                                 "one value per channel (or one for all)")
            out.append(np.broadcast_to(values, (channels,)).copy())
        return out[0], out[1]


def _number(value: Any, kind: Callable[[Any], Any]) -> Any:
    """``kind(value)`` (``operator.index`` or ``float``) for a number of any library, else None: a bool or a text
    is not one."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def manifest_path(artifact: str | Path) -> Path:
    """Where the manifest of ``artifact`` lives: the same name with ``.json`` appended."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def manifest_text(artifact: Path, content: bytes, *, fmt: str, model_name: str, num_classes: int, channels: int,
                  preprocessing: Preprocessing, class_names: Sequence[str], extra: dict[str, Any]) -> str:
    """The JSON manifest of the artifact ``content`` that will be written at ``artifact`` (its name, size and
    sha256). Built, and serialized, before either file is written: an export that fails must fail while the
    previous artifact and manifest are still intact."""
    mean, std = preprocessing.per_channel(channels)
    size = preprocessing.image_size
    manifest = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "artifact": {"file": artifact.name, "bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()},
        "model": model_name,
        "class_names": list(class_names),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", size, size, channels]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", num_classes]},
        "preprocessing": {
            "resize": "bilinear, shorter side to image_size / crop_fraction", "image_size": size,
            "crop_fraction": float(preprocessing.crop_fraction), "channels": channels,
            "mean": mean.tolist(), "std": std.tolist(),
            "normalization": "inside the artifact: (x / 255 - mean) / std on the uint8 input",
        },
        **extra,
    }
    if preprocessing.resize_size is not None:  # a version 1 reader would crop these wrongly: it must refuse them
        manifest["format_version"] = 2
        manifest["preprocessing"].update(
            resize=f"{preprocessing.interpolation} (Pillow, antialiased), {_RESIZE_BY_MODE[preprocessing.crop_mode]}",
            resize_size=int(preprocessing.resize_size), interpolation=preprocessing.interpolation,
            crop_mode=preprocessing.crop_mode)
    else:
        manifest["format_version"] = 1  # unchanged from version 1: older readers keep reading it
    return json.dumps(manifest, indent=2) + "\n"


# The entries a reader uses, by section: "" is the manifest itself
_REQUIRED = {"": {"format": str, "class_names": list, "artifact": dict, "preprocessing": dict},
             "artifact": {"bytes": int, "sha256": str},
             "preprocessing": {"image_size": int, "channels": int, "crop_fraction": (int, float), "mean": list,
                               "std": list}}


def _check_entries(manifest: dict[str, Any], path: Path) -> None:
    """``ArtifactError`` naming the first entry a reader needs that is missing or of another kind (a hand-edited
    or partly copied manifest had failed later, as a bare ``KeyError``)."""
    for section, entries in _REQUIRED.items():
        where = manifest[section] if section else manifest
        for key, kind in entries.items():
            value = where.get(key)
            if isinstance(value, bool) or not isinstance(value, kind):
                name = f"{section}.{key}" if section else key
                raise ArtifactError(f"{path} has no valid {name!r} entry (got {value!r}): the manifest was edited or "
                                    "damaged; copy it again or export the model again")
    if not all(isinstance(name, str) for name in manifest["class_names"]):
        raise ArtifactError(f"{path}'s class_names are not all text (export writes every name as a string): the "
                            "manifest was edited or damaged; copy it again or export the model again")


# What a serving process must do for each crop mode (data.transforms.EvalTransform.crop), said in the manifest's
# text as its fields say it: the one sentence for every mode had described "center" for all three.
_RESIZE_BY_MODE = {
    "center": ("center mode: shorter side to resize_size (the longer one truncated, as torchvision does), then "
               "the centre image_size x image_size"),
    "squash": "squash mode: both sides to resize_size (aspect ratio not kept), then the centre image_size square",
    "border": ("border mode: longer side to resize_size (keeping the aspect ratio, rounded), then the centre "
               "image_size square, padded with round(255 * mean) where the image is smaller"),
}


def read_manifest(artifact: str | Path, content: bytes | None = None) -> dict[str, Any]:
    """The manifest of ``artifact``, after checking that this version can read it and that the artifact is the
    very file it describes (same size, same sha256). Raises ``ArtifactError``/``FileNotFoundError`` saying why.
    ``content``: the artifact's bytes when the caller has read them already (hashed instead of read again)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        raise ArtifactError(f"{artifact} is a directory; give the exported file itself (e.g. model.stablehlo or "
                            "model.onnx), with its .json manifest beside it")
    if not artifact.exists():
        raise FileNotFoundError(f"exported model {artifact} does not exist")
    path = manifest_path(artifact)
    if not path.exists():
        raise ArtifactError(f"{artifact} has no manifest {path.name} beside it; export writes both files, so copy "
                            "them together (or export again)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); it may be truncated: copy it again or export "
                            "again") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise ArtifactError(f"{path} is not a resnet_jax export manifest (no \"kind\": \"{KIND}\"); give the "
                            "file written by resnet_jax export")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{path} has format_version {version!r}, not a version number resnet_jax writes: the "
                            "manifest was edited or damaged; export the model again")
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{artifact} was written in export format version {version}, newer than the version "
                            f"{FORMAT_VERSION} this resnet_jax reads; upgrade resnet-jax, or export the model again "
                            "with this version")
    _check_entries(manifest, path)
    expected, actual = manifest["artifact"]["bytes"], artifact.stat().st_size
    if actual != expected:
        raise ArtifactError(f"{artifact} is {actual} bytes but its manifest says {expected}: the file is "
                            f"{'truncated' if actual < expected else 'not the one exported'}; copy it again "
                            "or export again")
    digest = file_sha256(artifact) if content is None else hashlib.sha256(content).hexdigest()
    if digest != manifest["artifact"]["sha256"]:
        raise ArtifactError(f"{artifact} does not match the sha256 in its manifest: the file was changed or "
                            "damaged after export; copy it again or export again")
    return manifest

