"""Published ImageNet weights (torchvision's and timm's): where each file is, its digest, how to feed it, and a
cached download.

``pretrained("resnet50")`` fetches the file once into a cache directory, checks its sha256, and converts it
with ``load_torchvision`` or ``load_timm`` (``Weights.naming``). The download goes to a temporary file beside
the target and is renamed only once complete and verified, so an interrupted or tampered transfer never leaves
a file that looks valid. Without network the error names the file, where to get it and where to put it, so it
can be copied in by hand; a file in the cache with the wrong digest is moved aside (``<name>.sha256-mismatch``),
never deleted. A server that answers with an HTTP error is reported as such, not as a missing network.

Digests: torchvision puts the first 8 hex digits of each file's sha256 in its name (``resnet50-0676ba61.pth``)
and publishes nothing longer. Where independent public copies agree on the full 64-digit sha256 it is pinned
here; for the other files the check is the 8-digit prefix, exactly the check torch.hub itself makes. timm's
files live on the Hugging Face hub, whose Git LFS pointers publish each file's full sha256; ``_timm_rows`` cites
the page each digest was read from.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import hashlib
import http.client
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from resnet_jax.atomic import give_ordinary_permissions
from resnet_jax.errors import DownloadError

OFFICIAL_BASE = "https://download.pytorch.org/models"
CACHE_ENV, MIRROR_ENV = "RESNET_JAX_CACHE", "RESNET_JAX_WEIGHTS_MIRROR"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Weights:
    """One published weights file and the preprocessing its accuracy was measured with.

    Images: resize the short side to ``resize_size`` (``interpolation``, antialiased), centre-crop ``crop_size``,
    scale to [0, 1], subtract ``mean`` and divide by ``std`` per RGB channel; the model takes NHWC.
    ``transforms()`` is that preprocessing as code, equal per pixel to the publisher's own.
    """

    model: str
    tag: str
    filename: str  # the name in the cache and on a mirror
    sha256: str  # the full digest, or the 8-digit prefix in the filename where no full one is published
    acc1: float | None  # ImageNet-1k top-1 (%) at crop_size, as reported by torchvision or timm; None: unpublished
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    naming: str = "torchvision"  # whose parameter names the file uses: "torchvision" or "timm"
    origin: str | None = None  # where it is published; None: torchvision's download.pytorch.org/models/<filename>
    crop_mode: str = "center"  # timm's: "center", "squash" or "border" (resnet_jax.data.transforms.CROP_MODES)
    num_classes: int = 1000  # the head's size: ImageNet-1k, unless a hub config says otherwise
    label_names: tuple[str, ...] | None = None  # the classes in logit order, where not ImageNet-1k's

    @property
    def url(self) -> str:
        return self.origin or f"{OFFICIAL_BASE}/{self.filename}"

    @property
    def categories(self) -> list[str]:
        if self.label_names:
            return list(self.label_names)
        if self.num_classes == 1000:
            return imagenet_classes()
        return [f"class {i}" for i in range(self.num_classes)]  # the publisher named none

    def transforms(self):
        """The evaluation preprocessing these weights were measured with, as a callable ``EvalTransform``: a PIL
        image or uint8 HWC array in, the normalised float32 HWC array out; equal per pixel to torchvision's
        ``weights.transforms()`` or timm's ``create_transform(**resolve_data_config(..., use_test_size=True))``."""
        from resnet_jax.data.transforms import EvalTransform

        return EvalTransform(self.resize_size, self.crop_size, self.mean, self.std, self.interpolation,
                             self.crop_mode)


def _table() -> dict[str, dict[str, Weights]]:
    rows = [  # model, tag, ImageNet top-1, resize size, sha256 (full, or the 8-digit prefix in the file name)
        ("resnet18", "V1", 69.758, 256, "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
        ("resnet34", "V1", 73.314, 256, "b627a593bcbe140c234610266fe4f8ae95ea42fc881d091c9b6052e6b1d0590f"),
        ("resnet50", "V1", 76.130, 256, "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
        ("resnet50", "V2", 80.858, 232, "11ad3fa62ca79e40addfd354a8ec4b7c75143b3038b8d2a807fbc68deab379ca"),
        ("resnet101", "V1", 77.374, 256, "63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a"),
        ("resnet101", "V2", 81.886, 232, "cd907fc2a0de2292b2ba2b27d2216bc672d84632d1cf20058d01c0c03b5e020e"),
        ("resnet152", "V1", 78.312, 256, "394f9c45966e3651a89bbb78a48410a6755854ce4a5ab64927cf1c7247f85e58"),
        ("resnet152", "V2", 82.284, 232, "f82ba261"),
        ("resnext50_32x4d", "V1", 77.618, 256, "7cdf4587"),
        ("resnext50_32x4d", "V2", 81.198, 232, "1a0047aa"),
        ("resnext101_32x8d", "V1", 79.312, 256, "8ba56ff5"),
        ("resnext101_32x8d", "V2", 82.834, 232, "110c445d"),
        ("resnext101_64x4d", "V1", 83.246, 232, "173b62eb"),
        ("wide_resnet50_2", "V1", 78.468, 256, "95faca4d11227dddf8633dbb5ff6c8a9003c1aa5b8945c73834b8007b10950b8"),
        ("wide_resnet50_2", "V2", 81.602, 232, "9ba9bcbe"),
        ("wide_resnet101_2", "V1", 78.848, 256, "32ee1156"),
        ("wide_resnet101_2", "V2", 82.510, 232, "d733dc28"),
    ]
    table: dict[str, dict[str, Weights]] = {}
    for model, version, acc1, resize, digest in rows:
        entry = Weights(model, f"IMAGENET1K_{version}", f"{model}-{digest[:8]}.pth", digest, acc1, resize)
        table.setdefault(model, {})[entry.tag] = entry
        table[model]["DEFAULT"] = entry  # the last row of each model is the best, torchvision's DEFAULT
    for entry in _timm_rows():
        table.setdefault(entry.model, {})[entry.tag] = entry
        table[entry.model].setdefault("DEFAULT", entry)  # torchvision's stays the default where it has one
    return table


HF_BASE = "https://huggingface.co/timm"
_HALF = (0.5, 0.5, 0.5)  # timm's ra4 recipe normalises to [-1, 1]


def _timm_rows() -> list[Weights]:
    """timm's strongest ImageNet-1k weights for the architectures it shares with us (``TIMM_MODELS``).

    Each sha256 is the Git LFS pointer's, as shown on the file's page
    ``https://huggingface.co/timm/<model>.<tag>/blob/<revision>/<file>``; top-1, evaluation size and crop are
    the rows of timm's ``results/results-imagenet.csv`` (github.com/huggingface/pytorch-image-models), which
    match the weights' ``test_input_size``/``test_crop_pct`` in timm's pretrained configs. Where the page shows
    the safetensors file's digest it is used, else the pickle's (read by the restricted unpickler).
    """
    rows = [  # model, tag, file, revision, sha256, top-1, eval size, crop fraction[, mean = std when not ImageNet's]
        ("resnet18", "a1_in1k", "model.safetensors", "ebd61f9c7420e5b5b53262b8ce6bbe311e1e872a",
         "80c49dee3da4822c009c5a7fe591e9223c5a2cfcf95a4067ca4dfb5a7b89c612", 73.158, 288, 1.0),
        ("resnet18d", "ra2_in1k", "model.safetensors", "main",
         "0ad5d924c4269ad863590b6ccdd19f5fb48d0bae695c1dd6751de0b0282d8361", 73.794, 288, 0.95),
        ("resnet50", "a1_in1k", "model.safetensors", "5d9e13b8fdab4d9718bcf2c8f5c3af01878367e8",
         "773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb", 81.214, 288, 1.0),
        ("resnet50d", "a1_in1k", "model.safetensors", "main",
         "0b4f757b0732eb4c6584d2c3692923c3b92efe116b8a383fd4b5eb62fda660cb", 81.450, 288, 1.0),
        ("resnet101", "a1h_in1k", "model.safetensors", "21721ac354aff8c4fbc371f3c4e46fa8832d4d68",
         "1a076c0384295e7d3704f201c5711ff245507db934230bab72ff3014a95f90fe", 82.778, 288, 1.0),
        ("resnet101d", "ra2_in1k", "model.safetensors", "main",
         "c2192596da2e8d652cbf0465b8694704247b524efb68ed194504af453830709c", 83.016, 320, 1.0),
        ("resnet152d", "ra2_in1k", "pytorch_model.bin", "3566144f955888325a551683389ff25932c9861a",
         "7c7de686c9c6cb38399f4200a4f78286658d57013939afa083db19bf87b78243", 83.684, 320, 1.0),
        ("resnext50_32x4d", "a1h_in1k", "model.safetensors", "8af8dd95e2a7538fad74714fc76507d9de9de33c",
         "b952952a7b3e856b16ebf82fb44d2aa8c502e73ec678976c9e3b970fcd530bd5", 82.014, 288, 1.0),
        ("wide_resnet50_2", "racm_in1k", "pytorch_model.bin", "main",
         "ffcad4ccf5c7181ca88301c2377dc6dd0b5ec1f39958d66adab829f218220f31", 82.280, 288, 0.95),
        # pre-activation (ResNetV2): results-imagenet.csv as read here predates these, so no top-1 is pinned
        ("resnetv2_18", "ra4_e3600_r224_in1k", "model.safetensors", "02ed8c49a18955e211656f6411af5474f99993b0",
         "8cbd1843d961f937eed89815af452c0dcc63f0bb5c54b60a4cd8ed5fc66ffb3e", None, 288, 1.0, _HALF),
        ("resnetv2_34", "ra4_e3600_r224_in1k", "model.safetensors", "0fd7b0a907df18c2347f5622a84dc839153bd156",
         "248e47c20c4e9b995099b5e39d8fb3396efd01d8b4befa2567eebcfa55ab5601", None, 288, 1.0, _HALF),
    ]
    out = []
    for model, tag, file, revision, digest, acc1, size, crop, *normalisation in rows:
        suffix = ".safetensors" if file.endswith(".safetensors") else ".pth"
        mean_std = dict(mean=normalisation[0], std=normalisation[0]) if normalisation else {}
        out.append(Weights(model, tag, f"{model}.{tag}{suffix}", digest, acc1, resize_size=math.floor(size / crop),
                           crop_size=size, interpolation="bicubic", naming="timm", **mean_std,
                           origin=f"{HF_BASE}/{model}.{tag}/resolve/{revision}/{file}"))
    return out


WEIGHTS: dict[str, dict[str, Weights]] = _table()


@functools.cache
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in logit order (as torchvision's weights metadata lists them)."""
    return (Path(__file__).with_name("imagenet_classes.txt")).read_text(encoding="utf-8").splitlines()


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids (``n01440764``...) in logit order, which is their sorted order: the folder
    names of the extracted ILSVRC2012 archives (as TFDS's and timm's synset lists give them)."""
    return (Path(__file__).with_name("imagenet_wnids.txt")).read_text(encoding="utf-8").split()


def same_classes(names: list[str], model_names: list[str]) -> bool:
    """Whether a dataset's class names, in label order, are the model's: equal, or ImageNet's WordNet-id folders
    for a model with ImageNet's class names (the same classes in the same order, by other names)."""
    names, model_names = list(names), list(model_names)
    return names == model_names or (names == imagenet_wnids() and model_names == imagenet_classes())


def weights_info(name: str, weights: Any = "DEFAULT") -> Weights:
    """The ``Weights`` record for a model and tag: torchvision's ``"IMAGENET1K_V1"``/``"IMAGENET1K_V2"``, timm's
    (``"a1_in1k"``...), or ``"DEFAULT"`` (torchvision's best where it has weights for the model, else timm's).
    timm's ``"resnet50.a1_in1k"`` names both at once. A timm tag not pinned here, of an architecture timm shares
    with us, is read from its hub repository's ``config.json`` (``resnet_jax.hub``; needs huggingface_hub)."""
    from resnet_jax.torchvision import TIMM_MODELS

    model, tag = _model_and_tag(name, weights)
    if tag in WEIGHTS.get(model, {}):
        return WEIGHTS[model][tag]
    meant = [t for t in WEIGHTS.get(model, {}) if t.lower() == tag.lower() or t.lower().endswith("_" + tag.lower())]
    if meant:  # "imagenet1k_v2", "V2": torchvision's tags, misspelt, went to the hub as timm tags
        raise ValueError(f"{model} has no weights {tag!r}; did you mean {meant[0]!r} (tags are case-sensitive, "
                         f"as torchvision's)?")
    if _on_the_hub(model, tag):
        return _hub_weights(model, tag)
    if model not in WEIGHTS and model in TIMM_MODELS:
        raise ValueError(f"{model} has no weights {tag!r}: only timm publishes weights for it; give one of timm's "
                         f"tags, e.g. {model}.<tag> for the hub repository timm/{model}.<tag>")
    if model not in WEIGHTS:
        from resnet_jax.resnet import MODEL_CONFIGS

        close = difflib.get_close_matches(model, sorted({*WEIGHTS, *TIMM_MODELS}), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        other = ("any other model of resnet_jax (list_models()) can load a file of its own weights with "
                 "load_torchvision" if model in MODEL_CONFIGS else
                 f"{model!r} is not a model resnet_jax builds (list_models() lists them), so no file of it loads "
                 f"here either")
        raise ValueError(f"no published weights for {model!r}.{hint} Models with weights: {sorted(WEIGHTS)}, and "
                         f"any timm tag of {sorted(set(TIMM_MODELS) - set(WEIGHTS))}; {other}.")
    more = " or any of timm's tags (hub repositories timm/<model>.<tag>)" if model in TIMM_MODELS else ""
    raise ValueError(f"{model} has no weights {tag!r}; choose one of {sorted(WEIGHTS[model])}{more}")


def _model_and_tag(name: str, weights: Any) -> tuple[str, str]:
    """``("resnet50", "a1_in1k")`` from timm's ``"resnet50.a1_in1k"``, or from the name and torchvision's
    ``ResNet50_Weights.IMAGENET1K_V2`` (the enum member or its string) / a plain tag. A qualified tag must be
    the model's own: ``resnet18`` with ``ResNet50_Weights.IMAGENET1K_V1`` would else load resnet18's V1."""
    weights = _tag_of(weights)
    owner, _, tag = weights.rpartition(".")
    model = name
    if "." in name:
        model, named = name.split(".", 1)
        if tag not in ("DEFAULT", named):
            raise ValueError(f"{name!r} already names the weights {named!r}; drop weights={weights!r}, or give "
                             f"the model name alone")
        tag = named
    if owner and owner.lower() not in (model, f"{model}_weights"):
        raise ValueError(f"weights={weights!r} are not {model}'s; give {model}'s own, e.g. the tag {tag!r} alone")
    if not tag.strip():  # would have asked the hub for the repository "timm/resnet50."
        raise ValueError(f"the weights' tag is empty in {name!r} (weights={weights!r}); give {model!r} alone for its "
                         f"default weights, or a tag, e.g. {model}.<tag>")
    return model, tag


def _tag_of(weights: Any) -> str:
    """The tag string of ``weights``. torchvision's weights enum members (``ResNet18_Weights.IMAGENET1K_V1``) are
    read by duck typing, an Enum whose class is named ``*_Weights``, so that torch is never imported here."""
    if isinstance(weights, enum.Enum) and type(weights).__name__.endswith("_Weights"):
        return f"{type(weights).__name__}.{weights.name}"  # as the string spelling, checked the same way
    if not isinstance(weights, str):
        raise TypeError(f"weights must be a tag string (\"DEFAULT\", \"IMAGENET1K_V2\", \"a1_in1k\") or a "
                        f"torchvision weights enum member such as ResNet50_Weights.IMAGENET1K_V2, got "
                        f"{type(weights).__name__} {weights!r}")
    return weights


def _on_the_hub(model: str, tag: str) -> bool:
    """A timm tag not pinned here, of an architecture timm shares with us: its repository is timm/<model>.<tag>."""
    from resnet_jax.torchvision import TIMM_MODELS

    pinned = tag in WEIGHTS.get(model, {})
    return model in TIMM_MODELS and not pinned and tag != "DEFAULT" and not tag.startswith("IMAGENET1K_")


@functools.cache
def _hub_weights(model: str, tag: str) -> Weights:
    """timm's ``<model>.<tag>`` from its hub repository's ``config.json``, read as timm's
    ``resolve_data_config(..., use_test_size=True)`` reads it."""
    from resnet_jax import hub
    from resnet_jax.data.transforms import EvalTransform

    config = hub.hub_config(model, tag)
    pretrained_cfg = config.get("pretrained_cfg", config)
    t = EvalTransform.from_timm_config(pretrained_cfg)
    num_classes = int(config.get("num_classes", pretrained_cfg.get("num_classes", 1000)))
    names = None if num_classes == 1000 else hub.label_names(config, num_classes)  # 1000: ImageNet's own names
    return Weights(model, tag, f"{model}.{tag}", sha256="", acc1=None, resize_size=t.resize_size,
                   crop_size=t.crop_size, mean=t.mean, std=t.std, interpolation=t.interpolation,
                   crop_mode=t.crop_mode, naming="timm", origin=f"{hub.HUB_ENDPOINT}/{hub.repo_id(model, tag)}",
                   num_classes=num_classes, label_names=names)


def _verified_hub_file(model: str, tag: str) -> Path:
    """The weights of a hub tag, refused if they are not what the hub published.

    A damaged cached copy is moved aside (``<blob>.sha256-mismatch``, never deleted, as ``download`` does) and
    fetched once more: huggingface_hub keeps the bytes in ``blobs/<sha256>`` behind a snapshot link, so deleting
    the link (what the message used to advise) only made it link the same damaged blob again."""
    from resnet_jax.hub import HubUnavailable, hub_file

    path, sha256 = hub_file(model, tag)
    if sha256 is None or (found := file_sha256(path)) == sha256:
        return path
    moved = _move_aside(path.resolve(), found, sha256)
    path.unlink(missing_ok=True)  # the snapshot's link to the damaged blob
    what = f"the cached copy of timm/{model}.{tag}'s weights did not have the sha256 the hub published.{moved}"
    try:
        path, sha256 = hub_file(model, tag)
    except HubUnavailable as err:
        raise HubUnavailable(f"{what} Fetching it again failed: {err}") from err
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{what} The copy fetched again at {path} differs too: the hub (or a proxy) serves other "
                         "bytes than it lists; try later, or download the file by other means and pass file=PATH.")
    warnings.warn(f"{what} A verified copy was fetched again to {path}.", stacklevel=3)
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "resnet_jax").expanduser()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB blocks (weights and artifacts run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, sha256: str, *, filename: str | None = None, cache_dir: str | os.PathLike | None = None,
             progress: bool = True) -> Path:
    """The verified local copy of ``url``: from the cache if present and intact, else downloaded into it.

    ``sha256`` is the full hex digest or a prefix of it (at least 8 digits). Raises ``DownloadError`` when the
    file cannot be fetched (the message says where to put a copy fetched by hand) and ``ValueError`` when the
    downloaded bytes have the wrong digest; in both cases nothing downloaded is left in the cache. A file already
    in the cache under that name with another digest (a copy put there by hand, say) is never deleted: it is
    moved aside to ``<name>.sha256-mismatch`` (replacing an older one), and the error or warning says so.
    """
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{8,64}", sha256.lower()):  # before any traffic
        raise ValueError(f"a sha256 of at least 8 hex digits (and at most 64) is needed to verify {url}, got "
                         f"{sha256!r}")
    sha256 = sha256.lower()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / (filename or url.rstrip("/").rsplit("/", 1)[-1])
    moved = ""  # what became of a mismatching file found at target, for the messages
    if target.is_file():
        found = file_sha256(target)
        if found.startswith(sha256):
            return target
        moved = _move_aside(target, found, sha256)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((p for p in (cache, *cache.parents) if p.exists() and not p.is_dir()), cache)
        where = "is a file" if blocker == cache else f"cannot be a directory: {blocker} is a file"
        raise NotADirectoryError(f"the weights cache {cache} {where}; give cache_dir= or ${CACHE_ENV} a directory, "
                                 f"or move that file away.") from e
    except OSError as e:  # read-only, no permission
        raise _unwritable(cache, target, e) from e
    _remove_stale_parts(cache, target.name)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{target.name}.", suffix=".part")
    except OSError as e:
        raise _unwritable(cache, target, e) from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                digest = _fetch(url, out, target, progress)
            except DownloadError as e:
                raise DownloadError(f"{e}{moved}") from e.__cause__
            except _WriteFailed as e:
                raise _unwritable(cache, target, e.__cause__) from e.__cause__
        if not digest.startswith(sha256):
            raise ValueError(f"the file downloaded from {url} has sha256 {digest}, expected {sha256}; it was "
                             f"discarded. The download was corrupted or the server (or mirror) serves a different "
                             f"file: try again, or fetch {url} by hand and put it at {target}.{moved}")
        give_ordinary_permissions(tmp)  # mkstemp's 0600 would hide a shared cache's weights from other users
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if moved:
        warnings.warn(f"downloaded a verified copy of {target.name} to {target}.{moved}", stacklevel=2)
    return target


_MISMATCH_SUFFIX = ".sha256-mismatch"


class _WriteFailed(Exception):
    """Writing the download failed (a full disk), not the network: told apart from ``_fetch``'s network errors."""


def _unwritable(cache: Path, target: Path, error: OSError) -> OSError:
    return OSError(f"cannot write into the weights cache {cache} ({error.strerror or error}); nothing was kept. "
                   f"Free space there, or give cache_dir= or ${CACHE_ENV} a writable directory, or put a copy of "
                   f"the file fetched by other means at {target} (a read-only cache holding it is fine).")


def _move_aside(target: Path, found: str, sha256: str) -> str:
    """Move a cached file with the wrong digest to ``<name>.sha256-mismatch`` (it may be someone's own copy, put
    there by hand); the sentence that says so."""
    aside = target.with_name(target.name + _MISMATCH_SUFFIX)
    expected = sha256 if len(sha256) == 64 else f"one starting with {sha256}"
    try:
        os.replace(target, aside)
    except FileNotFoundError:  # another process moved it aside first
        return ""
    except OSError as e:
        raise ValueError(f"the file at {target} has sha256 {found}, not the expected {expected}, and could not be "
                         f"moved aside to make room for a verified copy ({e}); move or delete it yourself.") from e
    return (f" The file that was already at {target} has sha256 {found}, not the expected {expected}: it was "
            f"not deleted but moved to {aside}.")


_PART = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.part")  # tempfile.mkstemp(prefix=".<name>.", suffix=".part")
_STALE_PART_S = 24 * 3600  # a live download writes its part file at least every minute (socket timeout, stall check)


def _remove_stale_parts(cache: Path, name: str) -> None:
    """Delete this file's temporary ``.<name>.XXXXXXXX.part`` files left by a killed download (SIGKILL, power
    loss): those untouched for a day. A running download writes to its own far more often than that."""
    now = time.time()
    for entry in os.scandir(cache):
        match = _PART.fullmatch(entry.name)
        if not match or match["name"] != name:
            continue
        try:
            stale = now - entry.stat(follow_symlinks=False).st_mtime > _STALE_PART_S
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:  # gone already (another process cleaned it) or not ours to delete: leave it
            pass


# A transfer is abandoned when fewer than _STALL_MIN_BYTES arrive in _STALL_WINDOW_S seconds: the socket timeout
# alone only bounds each read, and a server that trickles a byte a minute would hold the download for ever.
_STALL_WINDOW_S, _STALL_MIN_BYTES = 120.0, 64 * 1024
_READ_TIMEOUT_S = 60


def _fetch(url: str, out, target: Path, progress: bool) -> str:
    """Stream ``url`` into ``out`` with a progress bar; the sha256 of what arrived. Complete or raise."""
    digest, received, expected = hashlib.sha256(), 0, None
    try:
        with urllib.request.urlopen(url, timeout=_READ_TIMEOUT_S) as response:
            expected = _content_length(response.headers.get("Content-Length"))
            read = getattr(response, "read1", response.read)  # read1: what has arrived, so the stall check runs
            window_start, window_bytes = time.monotonic(), 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                for chunk in iter(lambda: read(1 << 20), b""):
                    try:
                        out.write(chunk)
                    except OSError as e:
                        raise _WriteFailed() from e
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    window_bytes += len(chunk)
                    now = time.monotonic()
                    if now - window_start >= _STALL_WINDOW_S:
                        if window_bytes < _STALL_MIN_BYTES:
                            raise DownloadError(
                                f"the download of {url} stalled: only {window_bytes} bytes arrived in the last "
                                f"{now - window_start:.0f} s ({received} of {expected or '?'} in all); nothing was "
                                f"kept. Try again later, or point mirror= or ${MIRROR_ENV} at a faster server, or "
                                f"fetch the file by other means and put it at {target}.")
                        window_start, window_bytes = now, 0
            try:
                out.flush()  # here, where a full disk is told apart from the network
            except OSError as e:
                raise _WriteFailed() from e
    except (DownloadError, _WriteFailed):
        raise
    except urllib.error.HTTPError as e:  # the server answered, with an error or a redirect loop
        raise DownloadError(_http_error_message(url, target, e)) from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if received:
            raise DownloadError(f"the download of {url} was interrupted after {received} of {expected or '?'} "
                                f"bytes ({e}); nothing was kept. Try again.") from e
        raise DownloadError(_offline_message(url, target, e)) from e
    if expected is not None and received != expected:
        raise DownloadError(f"the download of {url} was interrupted after {received} of {expected} bytes; nothing "
                            "was kept. Try again.")
    return digest.hexdigest()


def _content_length(value: str | None) -> int | None:
    """The Content-Length header as a byte count; None (read to the end) where absent or not a number."""
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _offline_message(url: str, target: Path, error: Exception) -> str:
    return (f"could not download {url} ({getattr(error, 'reason', error)}). Without network access, fetch that "
            f"file by other means and put it at {target} (keep the file name; its sha256 is checked). Or point "
            f"mirror= or ${MIRROR_ENV} at a server holding a copy, or ${CACHE_ENV} at a directory that has it.")


def _http_error_message(url: str, target: Path, error: urllib.error.HTTPError) -> str:
    """A server was reached and refused: say which, what it answered, and what to check."""
    host = urllib.parse.urlsplit(url).netloc or url
    reason = str(error.reason).splitlines()[0] if error.reason else ""
    from resnet_jax.hub import http_status_meaning

    what = http_status_meaning(error.code)
    mirror = os.environ.get(MIRROR_ENV)
    now = f" (now {mirror!r})" if mirror else ""
    return (f"the server at {host} answered HTTP {error.code}{f' ({reason})' if reason else ''} for {url}: "
            f"{what}. If that address is a mirror (mirror= or ${MIRROR_ENV}{now}), check that it serves the file "
            f"under the name {target.name} directly below the base URL given. Otherwise fetch the file by other "
            f"means and put it at {target} (keep the file name; its sha256 is checked).")


def pretrained(name: str, weights: Any = "DEFAULT", *, file: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None = None, mirror: str | None = None, progress: bool = True,
               **overrides: Any):
    """``(model, variables)`` with published ImageNet weights, e.g. ``pretrained("resnet50")``,
    ``pretrained("resnet50d", "a1_in1k")`` or ``pretrained("resnet50.fb_swsl_ig1b_ft_in1k")``.

    ``weights``: ``"DEFAULT"``, a torchvision tag (``"IMAGENET1K_V2"``, or torchvision's own
    ``ResNet50_Weights.IMAGENET1K_V2``) or a timm tag (``"a1_in1k"``); see
    ``weights_info`` for the preprocessing and class names. The file is cached in ``cache_dir`` (default
    ``$RESNET_JAX_CACHE`` or ``~/.cache/resnet_jax``) and fetched from ``mirror`` (a base URL, or a directory,
    holding the files under ``Weights.filename``; default ``$RESNET_JAX_WEIGHTS_MIRROR``, else the publisher's
    URL); timm tags not pinned here come through huggingface_hub and its cache. ``file``: a local copy of the weights to use instead
    (no download and no digest check: the file is the user's). ``overrides`` go to
    ``load_torchvision``/``load_timm``, e.g. ``num_classes=10, new_head=True`` for fine-tuning or
    ``features_only=True`` for a backbone.
    """
    from resnet_jax.torchvision import load_timm, load_torchvision

    if file is not None and _on_the_hub(*_model_and_tag(name, weights)):
        # the user's copy of a hub tag's weights: timm's names and the file's own head size; the repository's
        # config.json (the preprocessing) is not needed to load it, so this works offline
        path = _existing(file, name)
        if not overrides.get("new_head") and not overrides.get("features_only"):
            overrides.setdefault("num_classes", _head_size(path))
        return load_timm(_model_and_tag(name, weights)[0], path, **overrides)
    info = weights_info(name, weights)
    if file is not None:
        path = _existing(file, info.url)
    elif not info.sha256:  # a hub tag: huggingface_hub fetches, the hub's own digest checks
        path = _verified_hub_file(info.model, info.tag)
    else:
        base = mirror or os.environ.get(MIRROR_ENV)
        if base and "://" not in base:  # a directory holding the files (a shared drive): read as a file:// URL
            base = Path(base).expanduser().resolve().as_uri()
        url = f"{base.rstrip('/')}/{info.filename}" if base else info.url
        path = download(url, info.sha256, filename=info.filename, cache_dir=cache_dir, progress=progress)
    if info.num_classes != 1000 and not overrides.get("new_head"):
        overrides.setdefault("num_classes", info.num_classes)
    load = load_timm if info.naming == "timm" else load_torchvision
    return load(info.model, path, **overrides)


def _head_size(path: Path) -> int:
    """The classes of a weights file's head (``fc.weight``, timm's ``head.fc.weight``; 1000 when it has none): a
    hub tag's head size is otherwise read from its config.json, which a local copy is loaded without."""
    from resnet_jax.torchvision import load_state_dict

    rows = [v.shape[0] for k, v in load_state_dict(path).items() if k == "fc.weight" or k.endswith(".fc.weight")]
    return rows[0] if len(rows) == 1 else 1000


def _existing(file: str | os.PathLike, what: str) -> Path:
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"file={str(file)!r} is not a file; give the path of a local copy of {what}")
    return path
