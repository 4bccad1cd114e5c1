"""Orbax checkpoints of a run: train state + data-iterator state + config + loop bookkeeping.

A checkpoint holds everything a run needs to continue exactly where it was: the ``TrainState`` arrays, each
process's Grain iterator position, the metric sums of the unfinished logging window and epoch, the number of
processes that wrote it, and a fingerprint and a checksum of the arrays.

Restoring tells two failures apart, because they need opposite answers:

- A checkpoint whose tree, shapes or dtypes differ from the state this config builds, or that another number
  of processes wrote, belongs to a *different run*: ``ConfigMismatch``, raised at once. Nothing is moved; the
  fix is the config or the workdir, not the checkpoint.
- A checkpoint that matches but cannot be read (a truncated file, flipped bits caught by the checksum) is
  *damaged*: the next older one is tried. Once one restores, the damaged newer ones are moved to
  ``checkpoints_damaged/`` (never deleted), so Orbax does not refuse the next saves for being older than them.
  When none restores, ``CheckpointError`` lists every checkpoint with its reason and nothing is moved, so the
  run never starts over silently.

Loading weights for inference (``load_variables``: ``Classifier.load``, ``train.evaluate``/``predict``/``export``,
``config.init_from`` a workdir) reads one checkpoint and checks it the same way, checksum included, but moves,
deletes and falls back to nothing: a damaged one is a ``CheckpointError`` naming the step, its folder and the
steps that could be loaded instead. A saved model (``save_variables``) carries a checksum too.

Saving fails as one ``CheckpointError`` too (a full disk): which step, why, and where the run would resume. The
reports of the reads and writes Orbax abandons when one fails are kept off stderr (``abandoned_io`` says why).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax import abandoned_io
from resnet_jax.atomic import replace_atomically
from resnet_jax.parallel import process_failures, sync_processes

try:
    from grain.checkpoint import (CheckpointHandler as _IterHandler, CheckpointRestore as _IterRestore,
                                  CheckpointSave as _IterSave)
except ImportError:  # older grain
    from grain.python import (PyGrainCheckpointHandler as _IterHandler,
                              PyGrainCheckpointRestore as _IterRestore, PyGrainCheckpointSave as _IterSave)

BEST_METRIC = "val_accuracy"
DAMAGED_DIR = "checkpoints_damaged"


def fingerprint(tree: Any) -> list[float]:
    """Per-leaf sums of |x| over the whole state, computed on device: a cheap check that restored arrays are
    the saved ones (Orbax notices a truncated file, but not flipped bytes inside one). A change in the low bits
    of one value is below its tolerance: ``checksum`` catches those."""
    return _sums(tree)[0]


def checksum(tree: Any) -> list[int]:
    """Per-leaf sums of the arrays' bits, each element's weighted by an odd number (2 * its flat index + 1),
    modulo 2**32, computed on device: exact integer arithmetic in any order and sharding, so any single flipped
    bit in a stored value changes its leaf's sum."""
    return _sums(tree)[1]


def _sums(tree: Any) -> tuple[list[float], list[int]]:
    """``(fingerprint, checksum)`` of ``tree`` in one compiled computation."""
    abs_sums, bit_sums = jax.device_get(_leaf_sums(jax.tree.leaves(tree)))
    return [float(s) for s in abs_sums], [int(s) for s in bit_sums]


@jax.jit
def _leaf_sums(leaves: list) -> tuple[list, list]:
    return [jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves], [_bit_sum(x) for x in leaves]


def _bit_sum(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32))
    # 8-byte values become two words each; the state is replicated (parallel.py), so flattening moves nothing
    bits = bits.astype(jnp.uint32).reshape(-1)
    return jnp.sum(bits * (jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1), dtype=jnp.uint32)


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


class NonFiniteState(ValueError):
    """The state to save holds NaN or infinity; it is not written, so every checkpoint can be resumed from."""


class ConfigMismatch(ValueError):
    """A workdir holds a run that differs from the one asked for (its config, state structure or processes)."""


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """A handler per item, known up front, so a checkpoint's metadata can be read without restoring it."""
    json_item = (ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    items = {"state": (ocp.args.StandardSave, ocp.args.StandardRestore, ocp.StandardCheckpointHandler),
             "data": (_IterSave, _IterRestore, _IterHandler), "meta": json_item, "config": json_item}
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for name, (save, restore, handler) in items.items():
        registry.add(name, save, handler)
        registry.add(name, restore, handler)
    return registry


class _Manager(ocp.CheckpointManager):
    """Orbax's manager, except that a checkpoint whose metrics file (its validation accuracy, which ranks the
    checkpoints) cannot be read is recorded in ``unreadable_metrics`` and ranked as saved without one.

    Why: Orbax reads every checkpoint's metrics while it opens the directory and lets a JSON error through (only a
    missing file is expected), so one truncated ``metrics`` file stopped every resume and evaluation of the
    workdir, older intact checkpoints included, with a bare JSON message. Recorded here, ``restore_latest`` treats
    that checkpoint as damaged like any other. ``_get_metrics`` is Orbax's private reader (checked with
    orbax-checkpoint 0.12.8; tests/test_training_loop.py damages a metrics file)."""

    def __init__(self, *args, **kwargs):
        self.unreadable_metrics: dict[int, str] = {}
        super().__init__(*args, **kwargs)

    def _get_metrics(self, step: int):
        try:
            return super()._get_metrics(step)
        except Exception as err:  # noqa: BLE001 - any unreadable metrics file is damage to that checkpoint
            self.unreadable_metrics[step] = f"its metrics file is unreadable ({type(err).__name__}: {err})"[:300]
            return None


class Checkpointer:
    """Save and restore a run's checkpoints under ``directory`` (usually ``workdir/checkpoints``).

    Keeps the ``keep`` latest checkpoints plus the one with the best validation accuracy.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, read_only: bool = False):
        """``read_only``: for reading only (``load_variables``): the directory is neither created nor cleaned of
        temporary directories, which may be the save a running training process is writing."""
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax write each checkpoint's metrics to disk, so a resumed run still knows (and keeps)
        # the best one; the policy above decides what is kept. cleanup_tmp_directories: a save cut short by a
        # crash leaves a temporary directory, not a checkpoint.
        self._options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_score,
                                                     cleanup_tmp_directories=not read_only, create=not read_only,
                                                     enable_async_checkpointing=async_save and not read_only)
        self._manager = self._open()
        self._unfinished: int | None = None  # the step an asynchronous save may still be writing
        if not read_only:  # a failing save reports itself from Orbax's threads before the save's caller hears
            abandoned_io.install()

    def _open(self) -> _Manager:
        manager = _Manager(self.directory, options=self._options, handler_registry=_registry())
        # Orbax removes unfinished saves of an earlier process in a background thread; waited for here, because a
        # run that stops with an error before its first save (a config problem found late) left that thread
        # running into interpreter shutdown, which added a traceback after the one-line error.
        getattr(manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        return manager

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state_arrays: Any, iterator: Any, meta: dict, config: dict,
             val_accuracy: float | None = None) -> None:
        sums, bits = _sums(state_arrays)
        if not np.isfinite(sums).all():
            raise NonFiniteState(f"the state at step {step} holds NaN or infinite values; not saved")
        meta = {**meta, "fingerprint": sums, "checksum": bits, "process_count": jax.process_count(),
                "saved_at": time.time()}
        items = {"state": ocp.args.StandardSave(state_arrays), "meta": ocp.args.JsonSave(meta),
                 "config": ocp.args.JsonSave(config)}
        if iterator is not None:
            items["data"] = _IterSave(iterator)
        metrics = {} if val_accuracy is None else {BEST_METRIC: float(val_accuracy)}  # {}: not evaluated
        self.wait()  # the previous save's failure is reported as that step's, not this one's
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
        except Exception as err:  # noqa: BLE001 - whatever stopped the write, the run needs the same answer
            raise self._save_failed(step, err) from None
        self._unfinished = step

    def _save_failed(self, step: int, err: Exception) -> CheckpointError:
        """One line for a save that did not finish: which step, why (the system's words where a write failed)
        and where the run would continue from."""
        self._unfinished = None
        saved = [s for s in self.steps() if s != step]
        resume = (f"it resumes from step {saved[-1]}, the last checkpoint saved" if saved else
                  "no checkpoint was saved before it, so it starts from the beginning")
        reason, advice = _write_failure(err)
        return CheckpointError(f"saving the checkpoint at step {step} in {self.directory} failed ({reason}); its "
                               f"unfinished files are removed when the run starts again. {advice} and run the same "
                               f"command again: {resume}")

    def restore_latest(self, abstract_arrays: Any, iterator: Any = None, log=print):
        """Restore the newest good checkpoint into the structure/shardings of ``abstract_arrays`` (and
        ``iterator``); returns ``(step, arrays, meta, config)`` (the config saved with it), or ``None`` when there
        is no checkpoint at all.

        Raises ``ConfigMismatch`` for a checkpoint of another structure and ``CheckpointError`` when every
        checkpoint is damaged (see the module docstring)."""
        failures = []
        for step in reversed(self.steps()):
            reason = self._manager.unreadable_metrics.get(step)
            if reason is None:
                self._check_fits(step, abstract_arrays)
                try:
                    arrays, meta, config = self._restore(step, abstract_arrays, iterator)
                except Exception as err:  # noqa: BLE001 - any failure means this checkpoint cannot be trusted
                    reason = _reason(err)[:300]
                    abandoned_io.install()
                else:
                    for bad, _ in failures:
                        log(f"moved the damaged checkpoint at step {bad} to {self._quarantine(bad)}")
                    return step, arrays, meta, config
            log(f"checkpoint at step {step} is damaged ({reason}); trying the previous one")
            failures.append((step, reason))
        if failures:
            listing = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored ({listing}); nothing was "
                                  "moved or changed. Restore the files from a copy, or pass "
                                  "--config.restart=True to move this run aside and start over")
        return None

    def _check_fits(self, step: int, abstract_arrays: Any) -> None:
        """``ConfigMismatch`` when the checkpoint's tree, shapes or dtypes, or its number of processes, are not
        those of this run. Unreadable metadata is left for the restore to report as damage."""
        try:
            saved = _leaf_specs(self._manager.item_metadata(step)["state"])
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 - unreadable: damage, reported by the restore itself
            return
        wanted = _leaf_specs(abstract_arrays)
        problems = [f"{k}: saved {_spec(saved.get(k))}, now {_spec(wanted.get(k))}"
                    for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
        where = f"the checkpoint at step {step} in {self.directory}"
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ConfigMismatch(f"{where} holds a state of another structure than this config builds "
                                 f"({'; '.join(problems[:5])}{more}), so it belongs to another run; use a new "
                                 "--workdir, or pass --config.restart=True to move the old run aside")
        processes = meta.get("process_count", jax.process_count())
        if processes != jax.process_count():
            raise ConfigMismatch(f"{where} was written by {processes} process(es) and this run has "
                                 f"{jax.process_count()}; resume with {processes} (each process saved its own data "
                                 "position), or pass --config.restart=True to start over")

    def _restore(self, step: int, abstract_arrays: Any, iterator: Any):
        if iterator is not None:
            self._restore_data_position(step, iterator)
        # the config is read with the state: the resume compares it next, and a damaged one (a cut JSON file) is
        # damage like any other, which the previous checkpoint survives; read after the choice, it stopped the resume
        items = {"state": ocp.args.StandardRestore(abstract_arrays), "meta": ocp.args.JsonRestore(),
                 "config": ocp.args.JsonRestore()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if not isinstance(restored["config"], dict):
            raise ValueError("the checkpoint's config is not a JSON object")
        meta = restored["meta"]
        if "fingerprint" not in meta:  # every checkpoint this module writes has one
            raise ValueError("the checkpoint's meta has no fingerprint of its arrays")
        if (record := _mismatch(meta, restored["state"])) is not None:
            raise ValueError(f"the restored arrays do not match the {record} saved with the checkpoint")
        return restored["state"], meta, restored["config"]

    def _restore_data_position(self, step: int, iterator: Any) -> None:
        """This process's data position (its own file), then every process's verdict on it: a file damaged for
        one process (truncated on one host) makes the checkpoint damaged for all, so they fall back to the same
        older step together instead of one going on alone into barriers the others never reach. Read by Grain's
        handler directly, without the manager's barriers, which a process that failed would skip."""
        reason = None
        try:
            _IterHandler().restore(self._step_dir(step) / "data", args=_IterRestore(iterator))
        except Exception as err:  # noqa: BLE001 - reported as damage, by every process
            reason = f"its data position: {_reason(err)}"
        if jax.process_count() > 1:
            failed = process_failures(reason)
            reason = "; ".join(f"process {i} cannot read {r}" for i, r in failed) if failed else None
        if reason is not None:
            raise ValueError(reason)

    def _step_dir(self, step: int) -> Path:
        """The folder of the checkpoint at ``step`` (Orbax may prefix its name); ``directory/step`` if none is."""
        return next((p for p in self.directory.iterdir() if p.name == str(step) or p.name.endswith(f"_{step}")),
                    self.directory / str(step))

    def _quarantine(self, step: int) -> Path:
        self._manager.wait_until_finished()
        source = self._step_dir(step)
        target = self.directory.parent / DAMAGED_DIR / f"{source.name}-{int(time.time())}"
        sync_processes("before_quarantine")  # every process is done reading it
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
        sync_processes("quarantine")
        self._manager.close()
        self._manager = self._open()
        return target

    def latest_step(self) -> int:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}: train first (python -m train "
                                  "--workdir=...) or point at the workdir of a finished run")
        return steps[-1]

    def val_accuracy(self, step: int) -> float | None:
        """The validation accuracy the checkpoint at ``step`` is ranked by (the EMA weights' where the run kept
        an EMA); None where it was saved without an evaluation."""
        metrics = self._manager.metrics(step)
        return metrics.get(BEST_METRIC) if metrics else None

    def best_step(self) -> int | None:
        """The kept step with the highest validation accuracy (the latest of equals, which is the one the
        preservation policy keeps); None when no checkpoint was saved with an evaluation."""
        scored = [(accuracy, step) for step in self.steps() if (accuracy := self.val_accuracy(step)) is not None]
        return max(scored)[1] if scored else None

    def config(self, step: int) -> dict:
        """The config saved with the checkpoint at ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        """Until the last asynchronous save is written; ``CheckpointError`` if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - as in save
            if self._unfinished is None:  # reported already (Orbax raises a failed save's error once per thread
                return                     # that waits: close() after the run's error, another thread's wait)
            raise self._save_failed(self._unfinished, err) from None
        self._unfinished = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _mismatch(saved: dict, tree: Any, ordered: bool = True) -> str | None:
    """``None`` when restored arrays are the ones saved with ``saved`` (a checkpoint's meta or a saved model's
    info), else the record they contradict: their ``checksum`` where one was saved, else their ``fingerprint``
    (files from before the checksum); with neither there is nothing to check. ``ordered=False`` compares per-leaf
    values as sorted lists, for a tree restored without the saved structure (Orbax gives tuples back as lists or
    dicts, whose leaves may come in another order); a changed value still changes its leaf's value."""
    key = "checksum" if "checksum" in saved else "fingerprint" if "fingerprint" in saved else None
    if key is None:
        return None
    expected, actual = list(saved[key]), _sums(tree)[key == "checksum"]
    if not ordered:
        expected, actual = sorted(expected), sorted(actual)
    if key == "checksum":
        same = [int(v) for v in expected] == actual
    else:
        same = len(expected) == len(actual) and bool(np.allclose(np.asarray(expected, np.float64), actual,
                                                                 rtol=1e-6, atol=0))
    return None if same else key


def _score(metrics: dict) -> float:
    """Validation accuracy, with checkpoints saved without an evaluation ranked below every evaluated one."""
    return metrics.get(BEST_METRIC, -1.0)


def _on_this_device(metadata: Any) -> Any:
    """The saved arrays' shapes and dtypes, placed on this process's first device: a restore target, so that
    loading for inference does not depend on how many devices trained the run (without one, Orbax asks for the
    saved topology)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=device), metadata)


def _leaf_specs(tree: Any) -> dict[str, tuple]:
    """``{"params/conv1/kernel": (shape, dtype)}`` for arrays or array metadata; path entries by name, so a
    saved tuple index and a live namedtuple field compare equal."""
    def name(entry) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(name(e) for e in path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves}


def _spec(spec) -> str:
    return "absent" if spec is None else f"{spec[1]}{list(spec[0])}"


MODEL_DIR, MODEL_INFO = "model", "model.json"


def has_checkpoints(directory: str | Path) -> bool:
    """Whether ``directory`` holds a training run's checkpoints (read without opening Orbax, whose manager would
    create the folder)."""
    checkpoints = Path(directory) / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def save_variables(directory: str | Path, variables: dict, config: dict, class_names: list[str]) -> Path:
    """An inference checkpoint (variables + config + class names, no optimizer state) in ``directory``; its
    ``model.json`` also holds the arrays' ``checksum``, which ``load_variables`` checks (files saved before it
    had one still load, unchecked)."""
    directory = Path(directory).absolute()
    if has_checkpoints(directory):  # load_variables reads those first
        raise ValueError(f"{directory} is a training run's workdir: loading it reads its checkpoints, which would "
                         "hide a model saved there; save into another directory")
    directory.mkdir(parents=True, exist_ok=True)
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    # a new arrays folder each time, and model.json, replaced whole, names it: a save that fails (a full disk)
    # leaves the model saved before it loadable (overwriting model/ in place had deleted it first)
    previous, name = _arrays_folder(directory), f"{MODEL_DIR}-{uuid.uuid4().hex[:12]}"
    try:
        with ocp.StandardCheckpointer() as saver:
            saver.save(directory / name, tree)
        info = {"config": config, "class_names": list(class_names), "checksum": checksum(tree), "arrays": name}
        replace_atomically(directory / MODEL_INFO, lambda path: path.write_text(json.dumps(info, indent=1)))
    except BaseException:
        for partial in directory.glob(f"{name}*"):  # the folder and Orbax's temporary one
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(directory / previous, ignore_errors=True)
    return directory


def _looks_saved(directory: Path) -> bool:
    """A ``save_variables`` directory, whole or damaged: its model.json, or an arrays folder (``model-*``, or
    ``model`` of the earlier layout) without it."""
    return (directory / MODEL_INFO).exists() or any(
        p.is_dir() and (p.name == MODEL_DIR or p.name.startswith(f"{MODEL_DIR}-")) for p in directory.iterdir())


def _arrays_folder(directory: Path) -> str | None:
    """The arrays folder a saved model's model.json names (``model`` before it named one), where it exists."""
    try:
        name = json.loads((directory / MODEL_INFO).read_text()).get("arrays", MODEL_DIR)
    except (OSError, ValueError, AttributeError):
        name = MODEL_DIR
    return name if _plain_name(name) and (directory / name).is_dir() else None


def _plain_name(name: Any) -> bool:
    """A folder directly inside the model's directory: model.json is read from files anyone may hand over."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name


def load_variables(workdir: str | Path, step: int | str | None = None, use_ema: bool = False
                   ) -> tuple[dict, dict, list[str]]:
    """``(config, {"params", "batch_stats"}, class_names)`` from ``save_variables`` output or from a training
    run's checkpoints (latest, a ``step``, or ``"best"``), as host numpy arrays; with ``use_ema`` the moving
    average of the weights a run kept (``config.model_ema``) instead of the weights themselves.

    The arrays are checked against the checksum saved with them. A checkpoint or saved model that cannot be read
    or does not match is a ``CheckpointError`` naming it and what to do; nothing is moved or changed, and no other
    step is loaded in its place (a training run's resume does that, ``Checkpointer.restore_latest``)."""
    workdir = Path(workdir).absolute()
    if not workdir.exists():
        raise FileNotFoundError(f"{workdir} does not exist; give the workdir of a training run or a saved model")
    checkpoints = workdir / "checkpoints"
    saved_run = has_checkpoints(workdir)
    if not saved_run and _looks_saved(workdir):
        if step is not None:  # it was ignored: the one set of weights was loaded for any step asked
            raise ValueError(f"{workdir} is a saved model, which holds one set of weights and no steps; load it "
                             f"without step (asked: {step!r})")
        return _load_saved_model(workdir, use_ema)
    if not saved_run:  # said before opening Orbax's manager, which would create the directory: a read
        # changes nothing, and an empty checkpoints/ left behind had hidden a saved model from the next load
        raise CheckpointError(f"no checkpoint in {checkpoints}: train first (python -m train --workdir=...) or "
                              "point at the workdir of a finished run or a saved model")
    try:
        ckpt = Checkpointer(checkpoints, async_save=False, read_only=True)
    except Exception as err:  # noqa: BLE001 - whatever Orbax meets while listing the directory
        raise CheckpointError(f"cannot read the checkpoints in {checkpoints} ({_reason(err)}); nothing was changed. "
                              "Restore the directory from a copy, or point at another run") from None
    try:
        if step == "best":  # without an evaluation there is no best; the latest in its place went unsaid
            step = ckpt.best_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {ckpt.directory} was saved with an evaluation, so none is "
                                      f"the best; leave the step out for the latest ({ckpt.latest_step()}), or "
                                      f"give one of the steps {ckpt.steps()}")
        if isinstance(step, str) and not step.isdigit():
            raise ValueError(f"step {step!r} is neither a number nor 'best'")
        step = ckpt.latest_step() if step is None else int(step)
        if step not in ckpt.steps():
            raise CheckpointError(f"no checkpoint at step {step} in {ckpt.directory}; it has steps {ckpt.steps()}")
        try:
            restored = ckpt._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_on_this_device(ckpt._manager.item_metadata(step)["state"])),
                meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
            if (record := _mismatch(restored["meta"], restored["state"], ordered=False)) is not None:
                raise ValueError(f"its arrays do not match the {record} saved with them (changed bytes in a file)")
            state = jax.device_get(restored["state"])
            config, class_names = restored["config"], restored["meta"].get("class_names", [])
            has_ema = "ema" in state
            if not use_ema or has_ema:
                variables = state["ema"]["variables"] if use_ema else state
                variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        except Exception as err:  # noqa: BLE001 - any failure to read it: say which checkpoint, and what to do
            abandoned_io.install()
            raise _damaged(ckpt, step, err) from None
        if use_ema and not has_ema:
            raise ValueError(f"the run in {workdir} kept no moving average of its weights (config.model_ema was "
                             "False); load it without use_ema")
        return config, variables, class_names
    finally:
        ckpt.close()


def _load_saved_model(workdir: Path, use_ema: bool) -> tuple[dict, dict, list[str]]:
    """A ``save_variables`` directory, checked against its checksum where it has one."""
    if use_ema:
        raise ValueError(f"{workdir} is a saved model, which holds one set of weights and no moving average; "
                         "load it without use_ema")
    advice = ("nothing was changed. Save the model again (Classifier.save) or restore the directory from a copy")
    info_path, arrays_path = workdir / MODEL_INFO, workdir / MODEL_DIR
    try:
        info = json.loads(info_path.read_text())
        missing = [key for key in ("config", "class_names") if not isinstance(info, dict) or key not in info]
        if missing:
            raise ValueError(f"it has no {' or '.join(map(repr, missing))}")
        config, class_names = info["config"], list(info["class_names"])
        if not isinstance(config, dict):  # Classifier.load met it as an AttributeError
            raise ValueError(f"its config is a JSON {type(config).__name__}, not a config's keys")
        arrays = info.get("arrays", MODEL_DIR)
        if not _plain_name(arrays):
            raise ValueError(f"its arrays entry {arrays!r} is not a folder of the model's directory")
        arrays_path = workdir / arrays
    except Exception as err:  # noqa: BLE001 - missing, unreadable, not JSON, or without its keys
        raise CheckpointError(f"the saved model in {workdir} is incomplete or damaged: its {MODEL_INFO} (config and "
                              f"class names) cannot be read ({_reason(err)}); {advice}") from None
    try:
        with ocp.StandardCheckpointer() as loader:
            metadata = loader.metadata(arrays_path)
            variables = loader.restore(arrays_path, _on_this_device(getattr(metadata, "item_metadata", metadata)))
        if (record := _mismatch(info, variables, ordered=False)) is not None:
            raise ValueError(f"they do not match the {record} saved with them (changed bytes in a file)")
        variables = jax.device_get(variables)
        variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    except Exception as err:  # noqa: BLE001 - missing, truncated or changed arrays
        abandoned_io.install()
        raise CheckpointError(f"the saved model in {workdir} is incomplete or damaged: its arrays in {arrays_path} "
                              f"cannot be used ({_reason(err)}); {advice}") from None
    return config, variables, class_names


def _reason(err: BaseException) -> str:
    """An exception as one short line: its type and first line, without TensorStore's multi-kilobyte spec, with
    the underlying cause where the message itself says little."""
    keyed = isinstance(err, KeyError) and err.args and isinstance(err.args[0], str)  # str() would quote it
    text = err.args[0] if keyed else str(err)
    text = (text.splitlines() or [""])[0].split(" See full TensorStore details")[0].strip()
    reason = f"{type(err).__name__}: {text}" if text else type(err).__name__
    cause = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    if cause is not None and type(err) is Exception:  # Orbax's bare wrapper around TensorStore's error
        reason += f" ({_reason(cause)})"
    return reason[:400]


_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EFBIG: "a file-size limit was reached",
            errno.EDQUOT: "the disk quota is used up"}


def _write_errno(err: BaseException) -> int | None:
    """The system error behind a failed write: an ``OSError``'s, or the code TensorStore's message carries
    (``[os_error_code='28']``), anywhere in the exception's chain."""
    while err is not None:
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno
        found = re.search(r"os_error_code='(\d+)'", str(err))
        if found:
            return int(found.group(1))
        err = err.__cause__ or err.__context__
    return None


def _write_failure(err: BaseException) -> tuple[str, str]:
    """Why a write failed (the system's words where it says) and what to do about it."""
    code = _write_errno(err)
    reason = _reason(err) if code is None else f"{_NO_ROOM.get(code, 'a write failed')}: [Errno {code}] " \
                                               f"{os.strerror(code)}"
    if code in _NO_ROOM:
        return reason, "Free space there (older runs' workdirs, or a smaller config.keep_checkpoints)"
    return reason, "Fix the cause"


def _damaged(ckpt: Checkpointer, step: int, err: BaseException) -> CheckpointError:
    """The error for a checkpoint that cannot be loaded: which one, why, and the steps that could be instead."""
    folder = ckpt._step_dir(step)
    others = [s for s in ckpt.steps() if s != step]
    earlier = [s for s in others if s < step]
    if others:
        pick = (earlier or others)[-1]
        advice = (f"load another step (--step={pick}, or step={pick} from Python; steps there: {ckpt.steps()}), or "
                  f"restore {folder} from a copy")
    else:
        advice = f"it is the only checkpoint there: restore {folder} from a copy, or train again"
    return CheckpointError(f"the checkpoint at step {step} ({folder}) is damaged or incomplete: {_reason(err)}. "
                           f"Nothing was changed or moved; {advice}")
