"""The per-machine file of measured algorithm choices: where it is, reading it, adding to it.

A leaf: it knows JSON and paths, nothing of convolutions. ``rules.py`` reads it, ``tuning.py`` writes it. The
file maps a machine key to ``{spec key: {"auto": [three names], "jax": [three names], "seconds": ...}}``, so one
file can serve several machines without one ever reading another's measurements.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from resnet_jax.atomic import one_at_a_time, replace_atomically

ENV_VAR = "RESNET_JAX_CONV_TUNING"  # a file to use instead of the default; "0" ignores any tuning
logger = logging.getLogger("resnet_jax")


def cache_file() -> Path | None:
    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() in ("0", "off", "false", "no"):
        return None
    if choice:
        return Path(choice)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "resnet_jax" / "conv_tuning.json"


@functools.cache
def entries(machine: str) -> dict[str, Any]:
    """This machine's measured choices ({} when there are none). A damaged file, or entries not of the form
    ``{"auto": [3 names], "jax": [3 names]}``, are reported once and left out: a file of valid JSON in another
    shape had made every convolution fail (AttributeError, KeyError) and a two-name entry passed as a choice."""
    path = cache_file()
    if path is None or not path.exists():
        return {}
    try:
        mine = _read(path).get(machine, {})
        if not isinstance(mine, dict):
            raise ValueError(f"its entry for this machine is a {type(mine).__name__}, not a mapping")
    except (OSError, ValueError) as err:
        logger.warning("resnet_jax: ignoring the convolution tuning file %s (%s); delete it or run the tuning "
                       "again (python -m resnet_jax.ops.tuning)", path, err)
        return {}
    good = {key: entry for key, entry in mine.items() if _well_formed(entry)}
    if len(good) < len(mine):
        logger.warning("resnet_jax: ignoring %d malformed entries of the convolution tuning file %s; run the tuning "
                       "again (python -m resnet_jax.ops.tuning)", len(mine) - len(good), path)
    return good


def _well_formed(entry: Any) -> bool:
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), list) and len(entry[k]) == 3 and all(isinstance(n, str) for n in entry[k])
        for k in ("auto", "jax"))


def _read(path: Path) -> dict[str, Any]:
    """The whole file as a mapping; ValueError where it is not one."""
    everything = json.loads(path.read_text())
    if not isinstance(everything, dict):
        raise ValueError(f"it holds a {type(everything).__name__}, not a mapping")
    return everything


def store(machine: str, new: dict[str, Any]) -> Path:
    """Merge ``new`` into this machine's entries on disk (atomically, one writer at a time: two tunings at once
    each read the file before the other wrote and lost the other's entries); returns the file."""
    path = cache_file()
    if path is None:
        raise ValueError(f"{ENV_VAR}=0 turns tuning off; unset it to tune")
    with one_at_a_time(path.with_name(f".{path.name}.lock")):
        try:
            everything = _read(path) if path.exists() else {}
        except (OSError, ValueError):
            everything = {}  # a damaged file is replaced by the new measurements
        mine = everything.get(machine)
        everything[machine] = {**(mine if isinstance(mine, dict) else {}), **new}
        replace_atomically(path, lambda partial: partial.write_text(json.dumps(everything, indent=1)))
    entries.cache_clear()
    return path
