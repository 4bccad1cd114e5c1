"""A workdir is the record of one run, and ``config.json`` in it is the contract.

Before a run writes anything, ``check`` compares its config with the one saved in the workdir:

- keys in ``config.CONTINUABLE`` (how long, how often, how fast) may change: the run continues and the changes
  are logged;
- keys in ``config.PER_INVOCATION`` (this command's options, not the run's) are not compared;
- any other change would make the checkpoints, the metrics and the config describe different runs, so it is
  refused in one message that names every changed key (old -> new) and says what to do.

Starting over in the same workdir is explicit (``config.restart=True``): ``move_aside`` moves the old run's files
into ``previous_runs/<date-time>/``. The same happens when a workdir holds a history but no checkpoint to resume
from. Nothing here ever deletes a file.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections

from resnet_jax.checkpoint import DAMAGED_DIR, Checkpointer, ConfigMismatch
from resnet_jax.parallel import sync_processes
from resnet_jax.training.config import CONTINUABLE, PER_INVOCATION, base_config
from resnet_jax.training.metrics_log import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
PREVIOUS_RUNS = "previous_runs"
# Everything a run writes; what ``move_aside`` moves.
RUN_FILES = (CHECKPOINTS, DAMAGED_DIR, METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE, CONFIG_FILE)
HISTORY_FILES = (METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE)


def check(workdir: Path, config: ml_collections.ConfigDict, log: Callable[[str], None]) -> None:
    """Refuse (``ConfigMismatch``) a config that changes the run saved in ``workdir``; log accepted changes.

    Reads only. With ``config.restart`` there is nothing to compare: the old run will be moved aside.
    """
    if config.restart:
        return
    saved = saved_config(workdir)
    if saved is None:
        if _present(workdir):
            raise ConfigMismatch(f"{workdir} holds files of a run ({', '.join(_present(workdir))}) but no "
                                 f"{CONFIG_FILE} to compare with; use a new --workdir, or pass "
                                 "--config.restart=True to move them aside and start over")
        return
    changes = config_changes(saved, as_plain_dict(config))
    refused = {k: v for k, v in changes.items() if k.split(".")[0] not in CONTINUABLE}
    if refused:
        raise ConfigMismatch(f"{workdir} holds a run with other settings, which cannot change within a run "
                             f"({_describe(refused)}); use a new --workdir, set them back, or pass "
                             "--config.restart=True to move the old run aside and start over")
    if changes:
        log(f"continuing the run in {workdir} with changed settings: {_describe(changes)}")


def saved_config(workdir: Path) -> dict[str, Any] | None:
    """The run's saved config: ``config.json``, else the one in its newest checkpoint, else None."""
    path = workdir / CONFIG_FILE
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigMismatch(f"{path} is not valid JSON ({err}); restore it, use a new --workdir, or pass "
                                 "--config.restart=True to move the old run aside") from None
    if not (workdir / CHECKPOINTS).is_dir():
        return None
    checkpoints = Checkpointer(workdir / CHECKPOINTS, async_save=False)
    try:
        for step in reversed(checkpoints.steps()):
            try:
                return checkpoints.config(step)
            except Exception:  # noqa: BLE001 - a damaged checkpoint: try the one before
                continue
        return None
    finally:
        checkpoints.close()


def as_plain_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON would hold it (tuples as lists), so a live config compares with a saved one."""
    return json.loads(config.to_json_best_effort())


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every compared key that differs. The saved side is completed with
    today's defaults, so a key added to the library since the run started counts as unchanged at its default."""
    before = _flatten({**as_plain_dict(base_config()), **old})
    after = _flatten(new)
    missing = object()
    changes = {}
    for key in sorted(set(before) | set(after)):
        if key.split(".")[0] in PER_INVOCATION:
            continue
        a, b = before.get(key, missing), after.get(key, missing)
        if a != b:
            changes[key] = (None if a is missing else a, None if b is missing else b)
    return changes


def move_aside(workdir: Path, log: Callable[[str], None], why: str, names: tuple[str, ...] = RUN_FILES
               ) -> Path | None:
    """Move the run's files (those of ``names`` present) into ``previous_runs/<date-time>/``; process 0 moves,
    all processes wait for it."""
    present = _present(workdir, names)
    target = None
    if present:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        target = workdir / PREVIOUS_RUNS / stamp
        if jax.process_index() == 0:
            suffix = 1
            while target.exists():
                suffix += 1
                target = workdir / PREVIOUS_RUNS / f"{stamp}_{suffix}"
            target.mkdir(parents=True)
            for name in present:
                shutil.move(str(workdir / name), str(target / name))
            log(f"{why}: moved {', '.join(present)} to {target}")
    sync_processes("move_aside")
    return target


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Record the run's config (process 0); all processes continue once it is written."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
    sync_processes("write_config")


def has_history(workdir: Path) -> bool:
    return bool(_present(workdir, HISTORY_FILES))


def _present(workdir: Path, names: tuple[str, ...] = RUN_FILES) -> list[str]:
    """Those of ``names`` in ``workdir``, ignoring empty folders (an interrupted start may leave one)."""
    return [name for name in names if (workdir / name).is_file() or any((workdir / name).glob("*"))]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):  # an empty one (no model_overrides) adds no key
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, (a, b) in changes.items())


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)
