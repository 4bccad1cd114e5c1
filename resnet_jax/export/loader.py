"""``load_exported(path)``: an exported artifact (StableHLO or ONNX) as a callable classifier.

It needs neither the training code nor the model code: the StableHLO artifact runs through
``jax.export.deserialize``, the ONNX one through onnxruntime, and the manifest says how to prepare images and
what the classes are called. Images go through the same ``prepare_batch`` as ``Classifier.predict``, so both
accept the same inputs and give the same top-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from resnet_jax.data.images import check_top_k, in_chunks, prepare_batch, top_classes
from resnet_jax.export.manifest import ArtifactError, Preprocessing, read_manifest


class ExportedModel:
    """An exported classifier: ``model(images)`` -> logits ``(N, classes)``; ``predict`` -> top-k names.

    ``images`` take every form ``Classifier.predict`` accepts and are resized and cropped as the manifest says;
    ``run(batch)`` takes an already prepared uint8 ``(N, S, S, C)`` batch and checks it.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], runner: Callable[[np.ndarray], np.ndarray]):
        self.path, self.manifest, self._runner = path, manifest, runner
        prep = manifest["preprocessing"]
        self.format: str = manifest["format"]
        self.class_names: list[str] = list(manifest["class_names"])
        self.image_size: int = int(prep["image_size"])
        self.channels: int = int(prep["channels"])
        self.crop_fraction: float = float(prep["crop_fraction"])
        try:
            self.transform = Preprocessing.from_manifest(prep).transform()  # published weights' resize, or None
        except (ValueError, TypeError) as err:
            raise ArtifactError(f"{path}'s manifest holds invalid preprocessing ({err}): it was edited or damaged; "
                                "copy it again or export the model again") from None

    def __call__(self, images: Any) -> np.ndarray:
        return self.run(self.prepare(images))

    def prepare(self, images: Any, first: int = 0) -> np.ndarray:
        """Images as the artifact takes them: uint8 ``(N, S, S, C)``, resized, cropped, channels converted (with
        the published weights' own resize when the manifest names one); ``first`` numbers them in messages."""
        if self.transform is not None:
            return self.transform.prepare(images, self.channels, first)
        return prepare_batch(images, size=self.image_size, crop_fraction=self.crop_fraction,
                             channels=self.channels, first=first)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Logits of a prepared batch; a batch of another size, channel count or dtype is refused."""
        batch = np.asarray(batch)
        want = (self.image_size, self.image_size, self.channels)
        if batch.ndim != 4 or batch.shape[1:] != want:
            raise ValueError(f"{self.path.name} takes uint8 batches of shape (N, {want[0]}, {want[1]}, {want[2]}), "
                             f"got {batch.shape}; call the model on the images themselves (it resizes them and "
                             "converts channels) or prepare them with .prepare(images)")
        if batch.dtype != np.uint8:
            raise ValueError(f"{self.path.name} takes uint8 images (0..255), got {batch.dtype}; convert with "
                             "np.clip(x * 255, 0, 255).astype(np.uint8) if they are floats in [0, 1]")
        if len(batch) == 0:  # no logits to compute; StableHLO's symbolic batch starts at 1, onnxruntime's at 0
            return np.zeros((0, len(self.class_names)), np.float32)
        return self._runner(np.ascontiguousarray(batch))

    def predict(self, images: Any, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k ``(class name, probability)`` per image, as ``Classifier.predict`` gives them (a piece at a time)."""
        check_top_k(top_k)
        return [top for first, chunk in in_chunks(images)
                for top in top_classes(self.run(self.prepare(chunk, first)), self.class_names, top_k)]

    def __repr__(self) -> str:
        return (f"ExportedModel({self.path.name!r}, format={self.format}, model={self.manifest.get('model')}, "
                f"{len(self.class_names)} classes, input (N, {self.image_size}, {self.image_size}, {self.channels}))")


def load_exported(path: str | Path) -> ExportedModel:
    """Load ``path`` (a ``.stablehlo`` or ``.onnx`` file written by export) with the manifest beside it."""
    path = Path(path)
    data = path.read_bytes() if path.is_file() else None  # read_manifest says what is wrong with anything else
    manifest = read_manifest(path, data)  # its size and sha256 checks run on the bytes that will be loaded
    if manifest["format"] == "stablehlo":
        from resnet_jax.export.stablehlo import run_serialized

        _check_platform(path, manifest.get("platforms"))

        try:
            runner, signature = run_serialized(data)
        except Exception as err:  # noqa: BLE001 - jax raises assorted types for a module it cannot read
            raise ArtifactError(f"{path} could not be deserialized by this jax ({err}); it was exported with jax "
                                f"{manifest.get('jax_version')}: use that version or newer, or export again") from None
    elif manifest["format"] == "onnx":
        runner, signature = _onnx_runner(path, data)
    else:
        raise ArtifactError(f"{path}'s manifest names format {manifest['format']!r}; this resnet_jax reads "
                            "'stablehlo' and 'onnx' artifacts")
    _check_signature(path, manifest, signature)
    return ExportedModel(path, manifest, runner)


def _check_signature(path: Path, manifest: dict[str, Any], signature: tuple[tuple, tuple]) -> None:
    """The manifest's image size, channels and class names against what the artifact itself takes and returns
    (its checksum covers the artifact, not the manifest): a mismatch had loaded, then failed inside the runtime
    or mislabelled the classes."""
    prep = manifest["preprocessing"]
    said = (prep["image_size"], prep["image_size"], prep["channels"]), (len(manifest["class_names"]),)
    if tuple(map(tuple, signature)) != said:
        (inputs, outputs), ((size, _, channels), (names,)) = signature, said
        raise ArtifactError(f"{path}'s manifest does not describe it: the artifact takes (N, "
                            f"{', '.join(map(str, inputs))}) images and returns {', '.join(map(str, outputs))} "
                            f"logits, the manifest says {size}x{size} images of {channels} channels and {names} class "
                            "names; it was edited or belongs to another export: copy both files again or export "
                            "again")


def _check_platform(path: Path, platforms: list[str] | None) -> None:
    """A StableHLO artifact runs only on the backends it was lowered for (its manifest lists them): say so at
    load, not as jax's error at the first call (an artifact exported on a GPU machine, served on CPU)."""
    import jax

    backend = jax.default_backend()
    names = {"gpu": ("cuda", "rocm")}.get(backend, (backend,))
    if platforms and not set(names) & set(platforms):
        raise ArtifactError(f"{path} was exported for {', '.join(platforms)} only and this process runs on "
                            f"{backend}; export it again including {names[0]!r} (export_model(..., platforms=...), "
                            f"python -m train.export --platforms={','.join([*platforms, names[0]])})")


def _onnx_runner(path: Path, data: bytes) -> Callable[[np.ndarray], np.ndarray]:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"running {path.name} needs onnxruntime: pip install -e '.[export]' in the clone (or "
                          "pip install onnxruntime)") from None
    try:
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime's own exception types
        raise ArtifactError(f"onnxruntime cannot load {path} ({err}); export it again") from None
    name = session.get_inputs()[0].name
    signature = tuple(session.get_inputs()[0].shape[1:]), tuple(session.get_outputs()[0].shape[1:])
    return (lambda batch: session.run(None, {name: batch})[0]), signature
