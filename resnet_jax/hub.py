"""Any timm tag of an architecture we build, from the Hugging Face hub: ``pretrained("resnet50.fb_swsl_ig1b_ft_in1k")``.

timm publishes each weights file in a hub repository ``timm/<model>.<tag>`` beside a ``config.json`` whose
``pretrained_cfg`` says how the weights were evaluated (test size, crop, interpolation, mean and std) and how many
classes the head has. This module is the transport: ``hub_config`` and ``hub_file`` fetch through
``huggingface_hub`` (the optional ``hub`` extra), so its cache, its ``HF_HUB_OFFLINE``/``HF_ENDPOINT`` settings and
its tokens apply; ``pretrained.py`` turns the config into a ``Weights`` record and checks the file.

Integrity: the hub stores each weights file under its Git LFS sha256, and ``huggingface_hub`` names the cached
blob by that digest (the file's ETag) without hashing what it received. ``hub_file`` returns that name, and
``pretrained`` hashes the file and compares, so a truncated or altered download is refused. The tags pinned in
``pretrained.py`` keep their own digests and need no ``huggingface_hub``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from resnet_jax.errors import DownloadError

HUB_ORGANISATION = "timm"
HUB_ENDPOINT = "https://huggingface.co"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's preference order
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubUnavailable(DownloadError, RuntimeError):
    """``huggingface_hub`` is not installed, or the hub (or its cache, offline) does not have the file.

    A ``DownloadError`` as a failed torchvision download is, so one ``except DownloadError`` covers weights
    from either place; still a RuntimeError, as it was first."""


def repo_id(model: str, tag: str) -> str:
    return f"{HUB_ORGANISATION}/{model}.{tag}"


def file_url(model: str, tag: str, filename: str) -> str:
    import os

    endpoint = os.environ.get("HF_ENDPOINT", HUB_ENDPOINT).rstrip("/")
    return f"{endpoint}/{repo_id(model, tag)}/resolve/main/{filename}"


def hub_config(model: str, tag: str) -> dict:
    """The repository's ``config.json``: ``pretrained_cfg`` (how the weights were evaluated), ``num_classes``,
    and for heads other than ImageNet-1k's, ``label_names`` / ``label_descriptions``."""
    return json.loads(Path(_download(model, tag, "config.json")).read_text(encoding="utf-8"))


def label_names(config: dict, num_classes: int) -> tuple[str, ...] | None:
    """The classes in logit order from timm's ``label_names`` (a list, or a dict from index to name where there
    are gaps), each replaced by its ``label_descriptions`` entry (a readable name) where there is one."""
    names = config.get("label_names")
    if not names:
        return None
    if isinstance(names, dict):
        names = [names.get(str(i), names.get(i, f"class {i}")) for i in range(num_classes)]
    descriptions = config.get("label_descriptions") or {}
    return tuple(descriptions.get(name, name) for name in names)


def hub_file(model: str, tag: str) -> tuple[Path, str | None]:
    """The local copy of the weights file of ``timm/<model>.<tag>`` (safetensors where published) and the sha256
    the hub published for it (the name huggingface_hub gave the blob), or None where it gave none."""
    missing = None
    for index, filename in enumerate(WEIGHT_FILES):
        try:
            path = Path(_download(model, tag, filename))
        except FileNotFoundError as err:  # this repository publishes the other format
            missing = err
            continue
        except HubUnavailable:  # offline, the first name's miss is no answer: a later format may be cached
            path = _cached(model, tag, WEIGHT_FILES[index + 1:])
            if path is None:
                raise
        blob = path.resolve().name  # the snapshot's file links to blobs/<sha256>; keep the name (its suffix)
        return path, blob if _SHA256.fullmatch(blob) else None
    raise HubUnavailable(f"{repo_id(model, tag)} publishes none of {list(WEIGHT_FILES)}") from missing


def _cached(model: str, tag: str, filenames) -> Path | None:
    """The first of ``filenames`` in huggingface_hub's cache. Why: offline, ``hf_hub_download`` of
    ``model.safetensors`` fails as a cache miss, not as the missing file it is for a repository that publishes
    only ``pytorch_model.bin``, so its cached copy was never tried and the advice said to go online."""
    try:
        import huggingface_hub
    except ImportError:  # nothing is cached without it; the caller's "pip install huggingface_hub" stands
        return None
    for filename in filenames:
        found = huggingface_hub.try_to_load_from_cache(repo_id(model, tag), filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _download(model: str, tag: str, filename: str) -> str:
    """``huggingface_hub.hf_hub_download``, with its failures turned into one sentence each."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError as err:
        raise HubUnavailable(f"timm's {model}.{tag} is not pinned in resnet_jax; fetching it from the hub needs "
                             f"huggingface_hub: pip install huggingface_hub (or the hub extra of resnet-jax), or "
                             f"download {file_url(model, tag, WEIGHT_FILES[0])} by hand and pass file=PATH.") from err
    try:
        return huggingface_hub.hf_hub_download(repo_id(model, tag), filename)
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as err:  # before EntryNotFound: a subclass
        answered = _http_error(err)  # huggingface_hub reports a server's 403 or 500 as "no local copy" too
        if answered is not None:
            raise HubUnavailable(_http_message(model, tag, filename, answered)) from err
        raise HubUnavailable(_offline_message(model, tag, filename, err)) from err
    except errors.RepositoryNotFoundError as err:
        raise ValueError(f"the hub has no repository {repo_id(model, tag)}: timm publishes no weights "
                         f"{tag!r} for {model} (see its tags at {HUB_ENDPOINT}/{HUB_ORGANISATION}).") from err
    except errors.EntryNotFoundError as err:
        raise FileNotFoundError(f"{repo_id(model, tag)} has no {filename}") from err
    except errors.HfHubHTTPError as err:  # the server answered (401 and others): not a missing network
        if getattr(err, "response", None) is None:
            raise HubUnavailable(_offline_message(model, tag, filename, err)) from err
        raise HubUnavailable(_http_message(model, tag, filename, err)) from err
    except OSError as err:  # the network, a proxy, a full disk
        raise HubUnavailable(_offline_message(model, tag, filename, err)) from err


def _offline_message(model: str, tag: str, filename: str, error: Exception) -> str:
    url = file_url(model, tag, filename)
    why = "HF_HUB_OFFLINE is set" if _offline_mode() else f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return (f"could not fetch {url} ({why}) and huggingface_hub's cache has no copy; run once with network "
            f"access so that huggingface_hub caches {repo_id(model, tag)}, or {_by_hand(filename)}")


def _by_hand(filename: str) -> str:
    """What to do without the hub's copy of ``filename``."""
    if filename == "config.json":  # with file= the weights are local; the tag's preprocessing and names are not
        return ("download the weights file by other means and pass file=PATH to pretrained, which loads the model "
                "without it; Classifier.from_pretrained, even with file=, needs this config.json for the weights' "
                "preprocessing and class names.")
    return "download the weights file by other means and pass file=PATH (to pretrained or Classifier.from_pretrained)."


def _http_error(error: BaseException):
    """The ``HfHubHTTPError`` (with the server's response) behind ``error``, if a server answered at all."""
    from huggingface_hub import errors

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, errors.HfHubHTTPError) and getattr(error, "response", None) is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


def _http_message(model: str, tag: str, filename: str, error) -> str:
    """A server was reached and answered with an HTTP error: say which, and what to check."""
    import os
    from urllib.parse import urlsplit

    url, code = file_url(model, tag, filename), error.response.status_code
    host = urlsplit(str(error.response.url)).netloc or urlsplit(url).netloc
    what = http_status_meaning(code)
    if code in (401, 403):
        what += "; check your token (HF_TOKEN, or `hf auth login`) and its permissions"
    endpoint = os.environ.get("HF_ENDPOINT")
    check = (f"check that HF_ENDPOINT (now {endpoint!r}) is a Hugging Face hub or a mirror of one" if endpoint else
             "if you use a mirror, point HF_ENDPOINT at it")
    return (f"the server at {host} answered HTTP {code} for {url}: {what}. It is reachable, so this is not a "
            f"missing network; {check}, or {_by_hand(filename)}")


def http_status_meaning(code: int) -> str:
    """What an HTTP error status says about a download, for the messages of both download paths (ours and the
    hub's): the user's next step differs for a missing file, a refusal and a server that is failing."""
    if 300 <= code < 400:
        return "it redirects in a loop, or without a usable Location"
    if code in (404, 410):
        return "it has no such file"
    if code in (401, 403):
        return "it refuses access (it may need credentials, or block this client or network)"
    if code >= 500 or code in (408, 429):
        return "it is failing or busy (it may be down or overloaded: try again later)"
    return "it refused the request"


def _offline_mode() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
