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

import collections
import datetime
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections

from resnet_jax.atomic import replace_atomically
from resnet_jax.checkpoint import DAMAGED_DIR, Checkpointer, ConfigMismatch, has_checkpoints
from resnet_jax.parallel import initialize_distributed, process_failures, process_strings, sync_processes
from resnet_jax.training.config import (CONTINUABLE, FILLED_BY_WEIGHTS, PER_INVOCATION, STARTING_WEIGHTS,
                                        VALUE_BEFORE_ADDED, base_config,
                                        validate)
from resnet_jax.training.metrics_log import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"  # the training split's fingerprint, for datasets whose contents can change (folders)
CHECKPOINTS = "checkpoints"
PREVIOUS_RUNS = "previous_runs"
# Everything a run writes; what ``move_aside`` moves.
RUN_FILES = (CHECKPOINTS, DAMAGED_DIR, METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE, CONFIG_FILE, DATA_FILE)
HISTORY_FILES = (METRICS_FILE, TENSORBOARD_DIR, CURVES_FILE)
# The settings the processes of one run may hold differently: where this host keeps things, and who it is.
PER_PROCESS = ("process_id", "coordinator_address", "data_dir", "compilation_cache_dir", "progress_bar")


def check(workdir: Path, config: ml_collections.ConfigDict, log: Callable[[str], None],
          data: dict[str, Any] | None = None) -> None:
    """Refuse (``ConfigMismatch``) a config that changes the run saved in ``workdir``; log accepted changes.

    ``data``: the training split's fingerprint (``Source.fingerprint``), for datasets whose files can change.
    Against the one recorded (``DATA_FILE``): other files are refused (the rest of an epoch would mix two
    shuffles, some images seen twice and others never), and the same files at another path are the same run (a
    folder moved to node-local disk, a new mount), so ``dataset`` may then change.

    Reads only. With ``config.restart`` there is nothing to compare: the old run will be moved aside. Nor where
    the run has no checkpoint: it cannot be continued (stopped during start-up, or failed compiling, e.g. out of
    memory), its history is moved aside (``_restore``) and its config.json replaced; refusing a new config there
    kept a user from lowering the batch size of a run that never took a step.
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
    if not has_checkpoints(workdir):
        return
    changes = config_changes(saved, as_plain_dict(config))
    recorded = _saved_data(workdir)
    if recorded is not None and data is not None and recorded != data:
        raise ConfigMismatch(f"the training images of the run in {workdir} changed since it started "
                             f"({recorded['files']} files then, {data['files']} now, or other names): resuming "
                             f"would mix two orders within an epoch; set them back, use a new --workdir with "
                             f"--config.init_from={workdir} to start from its weights, or pass "
                             f"--config.restart=True")
    continuable = (CONTINUABLE + (("dataset",) if recorded is not None and recorded == data else ())
                   + STARTING_WEIGHTS)
    refused = {k: v for k, v in changes.items() if k.split(".")[0] not in continuable}
    if refused:
        raise ConfigMismatch(f"{workdir} holds a run with other settings, which cannot change within a run "
                             f"({_describe(refused)}); use a new --workdir, set them back, or pass "
                             "--config.restart=True to move the old run aside and start over")
    if recorded is None and data is not None:
        _check_unrecorded(workdir, saved, log)
    if changes:
        log(f"continuing the run in {workdir} with changed settings: {_describe(changes)}")


def check_restored(checkpoint_config: dict[str, Any], config: ml_collections.ConfigDict, step: int,
                   workdir: Path) -> None:
    """Refuse (``ConfigMismatch``) a restored checkpoint saved by another run: ``check`` compared the config with
    config.json, but the checkpoints carry their own config, and checkpoints copied in from another run (or a
    config.json edited by hand) resumed those weights under this config without a word. The keys a run may
    change are those ``check`` lets through; ``dataset`` among them, which ``check`` already held to the recorded
    training files."""
    changes = config_changes(checkpoint_config, as_plain_dict(config))
    kept = (*CONTINUABLE, *STARTING_WEIGHTS, "dataset")
    refused = {k: v for k, v in changes.items() if k.split(".")[0] not in kept}
    if refused:
        raise ConfigMismatch(f"the checkpoint at step {step} in {workdir} was saved by a run with other settings "
                             f"than {CONFIG_FILE} and this config ({_describe(refused)}); it belongs to another "
                             "run: use that run's workdir, a new --workdir, or pass --config.restart=True")


def check_processes_agree(config: ml_collections.ConfigDict) -> None:
    """Refuse a multi-process run whose processes were given different settings (a seed, a batch size): each
    would start from other weights or run another program while the state is declared replicated, and the
    checkpoint would hold process 0's copy. Raised on every process, naming each difference, before anything is
    compiled or written. Also refuses processes with different numbers of devices, which the batch split needs
    to be equal."""
    if jax.process_count() == 1:
        return
    devices = collections.Counter(d.process_index for d in jax.devices())
    if len(set(devices.values())) > 1:
        raise ValueError(f"the processes have different numbers of devices ({_by_process(devices)}); give every "
                         f"process the same number (CUDA_VISIBLE_DEVICES, TPU slice, or XLA device count)")
    mine = {k: v for k, v in _flatten(as_plain_dict(config)).items() if k.split(".")[0] not in PER_PROCESS}
    theirs = [json.loads(text) for text in process_strings(json.dumps(mine, sort_keys=True))]
    refused = [(i, other[_REFUSED]) for i, other in enumerate(theirs) if _REFUSED in other]
    if refused:
        listed = "; ".join(f"process {i}: {reason}" for i, reason in refused)
        raise ValueError(f"a process of this run refused its config ({listed}); fix it there and start every "
                         "process again")
    differing = {i: changes for i, other in enumerate(theirs) if (changes := _differences(theirs[0], other))}
    if differing:
        listed = "; ".join(f"process {i}: {_describe(changes)}" for i, changes in differing.items())
        raise ValueError(f"the processes of this run have different settings from process 0's ({listed}); start "
                         f"every process with the same config (only {', '.join(PER_PROCESS)} may differ)")


_REFUSED = "__refused__"  # the settings a process sends when its own config failed validation


def join_to_refuse(settings: Mapping[str, Any], reason: str) -> None:
    """A process that cannot take part in its run (its config failed validation, its command line was wrong)
    still joins the run's other processes, when ``settings`` (or the environment) say which run (address, count
    and id), and hands them ``reason`` in the settings exchange they wait in (``check_processes_agree``), so every
    other process raises naming it. It had exited without joining, and the others waited for it until JAX's
    five-minute timeout aborted them with a C++ trace. Nothing here raises: the caller's own error is what
    remains, the run cannot always be joined."""
    count, index = settings.get("num_processes", 0), settings.get("process_id", -1)
    try:
        if initialize_distributed(settings.get("coordinator_address", "") or None, count if count > 0 else None,
                                  index if index >= 0 else None):
            process_strings(json.dumps({_REFUSED: " ".join(reason.split())}))
    except Exception:  # noqa: BLE001 - the run cannot be joined: this process's own error is what remains
        pass


def agreed(build: Callable[[], tuple[Any, ...]]) -> tuple[Any, ...]:
    """``build()``'s result but its last item, once every process built it and got the same last item (JSON).
    Why: with several processes, a dataset only one host cannot read (its folder missing) raised there while the
    others waited in the next collective until JAX's timeout, and hosts whose copies of a folder differ trained
    on inconsistent shards; now every process raises, naming the processes and what they saw."""
    if jax.process_count() == 1:
        return tuple(build()[:-1])
    error = None
    try:
        *result, shared = build()
        failure, seen = None, json.dumps(shared, sort_keys=True)
    except Exception as err:  # noqa: BLE001 - any error: the other processes must hear of it, or they wait
        error, result, failure, seen = err, None, " ".join(f"{type(err).__name__}: {err}".split()), ""
    failed = process_failures(failure)
    if failed:
        everywhere = len(failed) == jax.process_count() and len({reason for _, reason in failed}) == 1
        if error is not None and everywhere:
            raise error  # the same error on every process: as it is
        listed = "; ".join(f"process {i}: {reason}" for i, reason in failed)
        raise ValueError(f"the data could not be opened on every process ({listed})") from error
    views = process_strings(seen)
    differing = [i for i, view in enumerate(views) if view != views[0]]
    if differing:
        raise ValueError(f"the processes see other images than process 0 (process(es) "
                         f"{', '.join(map(str, differing))}: {', '.join(views[i] for i in differing)}; process 0: "
                         f"{views[0]}); give every host the same copy of the data")
    return tuple(result)


def check_shared(workdir: Path, wait_s: float = 10.0) -> None:
    """With several processes, ``workdir`` must be one directory all of them see: Orbax writes every checkpoint
    from all processes together, and with a local directory per host the first save waits in a barrier for
    minutes and leaves nothing. Process 0 writes a probe file; each process looks for it (for up to ``wait_s``,
    as a network filesystem may show it late). Only that probe is written, and removed again."""
    if jax.process_count() == 1:
        return
    probe = workdir / f".shared-check-{process_strings(uuid.uuid4().hex)[0]}"
    created = False
    if jax.process_index() == 0:
        created = not workdir.exists()
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_text("written by process 0 to check that every process sees this directory\n")
    sync_processes("shared_probe_written")
    deadline = time.monotonic() + wait_s
    while not probe.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    missing = [i for i, _ in process_failures(None if probe.exists() else "does not see the probe")]
    if jax.process_index() == 0:
        probe.unlink()
    if missing and created and jax.process_index() == 0 and not any(workdir.iterdir()):
        workdir.rmdir()
    sync_processes("shared_probe_removed")
    if missing:
        raise ValueError(f"--workdir {workdir} is not one directory that all processes share: process(es) "
                         f"{', '.join(map(str, missing))} do not see a file process 0 wrote there; use a directory "
                         f"on a filesystem every host mounts (every process writes to each checkpoint)")


def saved_config(workdir: Path) -> dict[str, Any] | None:
    """The run's saved config: ``config.json``, else the one in its newest checkpoint, else None."""
    path = workdir / CONFIG_FILE
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):  # valid JSON of another shape: a TypeError traceback, or "no config"
                raise ValueError(f"it holds a JSON {type(saved).__name__}, not a config's keys")
            return saved
        except ValueError as err:  # json.JSONDecodeError is one
            kept = (" (the checkpoints keep the run's config: deleting it resumes from them)"
                    if (workdir / CHECKPOINTS).is_dir() else "")
            what = f"is not valid JSON ({err})" if isinstance(err, json.JSONDecodeError) else f"is damaged: {err}"
            raise ConfigMismatch(f"{path} {what}; restore it{kept}, use a new --workdir, or pass "
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


def kept_values(given: ml_collections.ConfigDict, validated: ml_collections.ConfigDict,
                workdir: Path) -> dict[str, Any]:
    """For a run that will resume in ``workdir``: the saved values of the keys the ``given`` config leaves unset
    where ``validated`` resolved them otherwise; ``{}`` for a new run or a restart. Two kinds of key:

    - those published weights fill in (``FILLED_BY_WEIGHTS``): ``init_from`` is read only by a run's first start,
      so a resume may drop or change it (STARTING_WEIGHTS), but validate fills these keys from the weights it
      names; without the name they fell back to their defaults, and the resume was refused as changing the run's
      evaluation and normalisation;
    - those added with a new default (``VALUE_BEFORE_ADDED``): a run saved before the key existed used the old
      value, and resumed under the new one it would change course mid-run (another order of the epoch's rest).

    A key the config sets is left to the comparison with the saved run (``check``), which refuses another value."""
    if given.get("restart") or not has_checkpoints(workdir):
        return {}
    saved = {**VALUE_BEFORE_ADDED, **(saved_config(workdir) or {})}
    defaults, resolved = as_plain_dict(base_config()), as_plain_dict(validated)
    kept = {}
    for key in (*FILLED_BY_WEIGHTS, *VALUE_BEFORE_ADDED):
        value = given.get(key, defaults[key])
        unset = (list(value) if isinstance(value, (list, tuple)) else value) == defaults[key]
        if unset and key in saved and saved[key] != resolved[key]:
            kept[key] = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
    return kept


def as_plain_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as JSON would hold it (tuples as lists), so a live config compares with a saved one."""
    return json.loads(config.to_json_best_effort())


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old, new)}`` for every compared key that differs. A key added to the library since the
    run started counts as unchanged unless set otherwise: the saved side takes the value its default resolves to
    under the new config's other settings (``validate`` turns ``eval_interpolation``'s "" into "bilinear" or
    the published weights' own; compared with the raw "", a run saved before the key existed was refused, and
    setting it back could not help). A key whose default changed what runs compute takes the value runs used
    before it existed (``VALUE_BEFORE_ADDED``), which ``kept_values`` gives the resumed run."""
    defaults = as_plain_dict(base_config())
    added = {key: value for key, value in defaults.items() if key not in old}
    completed = {**defaults, **old}
    if added:
        try:
            resolved = as_plain_dict(validate(ml_collections.ConfigDict({**new, **added})))
        except (ValueError, TypeError, OSError):  # they do not validate under the new settings: compare them raw
            resolved = defaults
        completed.update({key: VALUE_BEFORE_ADDED.get(key, resolved[key]) for key in added})
    changes = _differences(_flatten(completed), _flatten(new))
    return {key: change for key, change in changes.items() if key.split(".")[0] not in PER_INVOCATION}


def _differences(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (before, after)}`` for every key of two flattened configs whose values differ."""
    missing = object()
    changes = {}
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a != b:
            changes[key] = (None if a is missing else a, None if b is missing else b)
    return changes


LOCK_FILE = ".lock"


class _Unlocked:
    def close(self) -> None:
        pass


def lock(workdir: Path):
    """Hold ``workdir`` for this run until the returned handle is closed (process 0 takes a file lock in it; the
    kernel drops it when the process dies, kill -9 included). A second run started in the same workdir trained
    beside the first: both deleted each other's old checkpoints (one ended in a traceback) and their
    metrics.jsonl rows interleaved. It is refused now, on every process of its own, naming the holder."""
    failure, handle = None, _Unlocked()
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        handle = open(workdir / LOCK_FILE, "a")  # never written: a refused run leaves the workdir as it was
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            failure = (f"{workdir} is in use by another run ({_lock_holder(workdir / LOCK_FILE)}); wait for it to "
                       f"end (or stop it), or give another workdir")
    if jax.process_count() > 1:
        failure = next((reason for _, reason in process_failures(failure)), None)
    if failure is not None:
        handle.close()
        raise ValueError(failure)
    return handle


def _lock_holder(path: Path) -> str:
    """Who holds ``path``'s lock, from Linux's table of locks (``1: FLOCK ADVISORY WRITE <pid> <dev>:<inode> ...``)."""
    try:
        inode = str(os.stat(path).st_ino)
        with open("/proc/locks") as table:
            for fields in map(str.split, table):
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
                    return f"process {fields[4]} on this machine"
    except OSError:
        pass
    return "a process on another machine, or one this machine does not show"


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


def write_config(workdir: Path, config: ml_collections.ConfigDict, data: dict[str, Any] | None = None) -> None:
    """Record the run's config, and its training split's fingerprint where it has one (process 0); all
    processes continue once they are written."""
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_whole(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2))
        if data is not None:
            _write_whole(workdir / DATA_FILE, json.dumps({"train": data}, indent=2))
    sync_processes("write_config")


def _write_whole(path: Path, text: str) -> None:
    """Each start rewrites config.json: a crash mid-write must leave the old file or the new one, never half of
    one that would block the next resume."""
    replace_atomically(path, lambda partial: partial.write_text(text))


def _check_unrecorded(workdir: Path, saved: dict[str, Any], log: Callable[[str], None]) -> None:
    """A folder run from before its training files were recorded: a percentage slice of it was cut by an older
    rule (rounded down, not to the nearest image), so it now names other files and is refused; a whole folder
    is continued as it is now, said once."""
    from resnet_jax.data.folder import PREFIX, is_slice

    split = str(saved.get("train_split", ""))
    if is_slice(str(saved.get("dataset", "")).removeprefix(PREFIX), split):
        raise ConfigMismatch(f"the run in {workdir} predates the record of its training images, and its split "
                             f"{split!r} is now cut to the nearest image of each class (it was rounded down): "
                             f"resuming could read other files; pass --config.restart=True, or start a new run "
                             f"from its weights with --config.init_from={workdir}")
    log(f"the run in {workdir} predates the record of its training images; continuing with the files as they "
        f"are now, which are recorded from here on")


def _saved_data(workdir: Path) -> dict[str, Any] | None:
    """The training split's fingerprint the run recorded (``None`` for a dataset without one, or a run from
    before it was recorded)."""
    try:
        return json.loads((workdir / DATA_FILE).read_text())["train"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigMismatch(f"{workdir / DATA_FILE} cannot be read ({err}); it records the run's training "
                             f"images: restore it, or delete it to resume without that check") from None


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


def _by_process(counts: collections.Counter) -> str:
    return ", ".join(f"process {i}: {n}" for i, n in sorted(counts.items()))


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, (a, b) in changes.items())


def _show(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)
