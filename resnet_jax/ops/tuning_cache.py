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

from resnet_jax.atomic import replace_atomically

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
    """This machine's measured choices ({} when there are none); a damaged file is reported once and ignored."""
    path = cache_file()
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get(machine, {})
    except (OSError, ValueError, AttributeError) as err:
        logger.warning("resnet_jax: ignoring the convolution tuning file %s (%s); delete it or run the tuning "
                       "again (python -m resnet_jax.ops.tuning)", path, err)
        return {}


def store(machine: str, new: dict[str, Any]) -> Path:
    """Merge ``new`` into this machine's entries on disk (atomically); returns the file."""
    path = cache_file()
    if path is None:
        raise ValueError(f"{ENV_VAR}=0 turns tuning off; unset it to tune")
    everything = {}
    if path.exists():
        try:
            everything = json.loads(path.read_text())
        except ValueError:
            everything = {}  # a damaged file is replaced by the new measurements
    everything.setdefault(machine, {}).update(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda partial: partial.write_text(json.dumps(everything, indent=1)))
    entries.cache_clear()
    return path
