"""Orbax checkpoints of a run: train state + data-iterator state + config + loop bookkeeping.

A checkpoint holds everything a run needs to continue exactly where it was: the ``TrainState`` arrays, each
process's Grain iterator position, the metric sums of the unfinished logging window and epoch, the number of
processes that wrote it, and a fingerprint of the parameters.

Restoring tells two failures apart, because they need opposite answers:

- A checkpoint whose tree, shapes or dtypes differ from the state this config builds, or that another number
  of processes wrote, belongs to a *different run*: ``ConfigMismatch``, raised at once. Nothing is moved; the
  fix is the config or the workdir, not the checkpoint.
- A checkpoint that matches but cannot be read (a truncated file, flipped bytes caught by the fingerprint) is
  *damaged*: the next older one is tried. Once one restores, the damaged newer ones are moved to
  ``checkpoints_damaged/`` (never deleted), so Orbax does not refuse the next saves for being older than them.
  When none restores, ``CheckpointError`` lists every checkpoint with its reason and nothing is moved, so the
  run never starts over silently.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax.parallel import sync_processes

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
    the saved ones (Orbax notices a truncated file, but not flipped bytes inside one)."""
    leaves = jax.tree.leaves(tree)
    sums = jax.jit(lambda ls: [jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in ls])(leaves)
    return [float(s) for s in jax.device_get(sums)]


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

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax write each checkpoint's metrics to disk, so a resumed run still knows (and keeps)
        # the best one; the policy above decides what is kept. cleanup_tmp_directories: a save cut short by a
        # crash leaves a temporary directory, not a checkpoint.
        self._options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_score,
                                                     cleanup_tmp_directories=True,
                                                     enable_async_checkpointing=async_save)
        self._manager = self._open()

    def _open(self) -> _Manager:
        return _Manager(self.directory, options=self._options, handler_registry=_registry())

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state_arrays: Any, iterator: Any, meta: dict, config: dict,
             val_accuracy: float | None = None) -> None:
        sums = fingerprint(state_arrays)
        if not np.isfinite(sums).all():
            raise NonFiniteState(f"the state at step {step} holds NaN or infinite values; not saved")
        meta = {**meta, "fingerprint": sums, "process_count": jax.process_count(), "saved_at": time.time()}
        items = {"state": ocp.args.StandardSave(state_arrays), "meta": ocp.args.JsonSave(meta),
                 "config": ocp.args.JsonSave(config)}
        if iterator is not None:
            items["data"] = _IterSave(iterator)
        metrics = {} if val_accuracy is None else {BEST_METRIC: float(val_accuracy)}  # {}: not evaluated
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore_latest(self, abstract_arrays: Any, iterator: Any = None, log=print):
        """Restore the newest good checkpoint into the structure/shardings of ``abstract_arrays`` (and
        ``iterator``); returns ``(step, arrays, meta)``, or ``None`` when there is no checkpoint at all.

        Raises ``ConfigMismatch`` for a checkpoint of another structure and ``CheckpointError`` when every
        checkpoint is damaged (see the module docstring)."""
        failures = []
        for step in reversed(self.steps()):
            reason = self._manager.unreadable_metrics.get(step)
            if reason is None:
                self._check_fits(step, abstract_arrays)
                try:
                    arrays, meta = self._restore(step, abstract_arrays, iterator)
                except Exception as err:  # noqa: BLE001 - any failure means this checkpoint cannot be trusted
                    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                else:
                    for bad, _ in failures:
                        log(f"moved the damaged checkpoint at step {bad} to {self._quarantine(bad)}")
                    return step, arrays, meta
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
        items = {"state": ocp.args.StandardRestore(abstract_arrays), "meta": ocp.args.JsonRestore()}
        if iterator is not None:
            items["data"] = _IterRestore(iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
        saved, actual = np.asarray(meta["fingerprint"]), np.asarray(fingerprint(restored["state"]))
        if saved.shape != actual.shape or not np.allclose(saved, actual, rtol=1e-6, atol=0):
            raise ValueError("the restored arrays do not match the fingerprint saved with the checkpoint")
        return restored["state"], meta

    def _quarantine(self, step: int) -> Path:
        self._manager.wait_until_finished()
        source = next(p for p in self.directory.iterdir() if p.name == str(step) or p.name.endswith(f"_{step}"))
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
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _score(metrics: dict) -> float:
    """Validation accuracy, with checkpoints saved without an evaluation ranked below every evaluated one."""
    return metrics.get(BEST_METRIC, -1.0)


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


def save_variables(directory: str | Path, variables: dict, config: dict, class_names: list[str]) -> Path:
    """An inference checkpoint (variables + config + class names, no optimizer state) in ``directory``."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as saver:
        saver.save(directory / MODEL_DIR, {"params": variables["params"],
                                           "batch_stats": variables.get("batch_stats", {})}, force=True)
    (directory / MODEL_INFO).write_text(json.dumps({"config": config, "class_names": list(class_names)}, indent=1))
    return directory


def load_variables(workdir: str | Path, step: int | str | None = None, use_ema: bool = False
                   ) -> tuple[dict, dict, list[str]]:
    """``(config, {"params", "batch_stats"}, class_names)`` from ``save_variables`` output or from a training
    run's checkpoints (latest, a ``step``, or ``"best"``), as host numpy arrays; with ``use_ema`` the moving
    average of the weights a run kept (``config.model_ema``) instead of the weights themselves."""
    workdir = Path(workdir).absolute()
    if not workdir.exists():
        raise FileNotFoundError(f"{workdir} does not exist; give the workdir of a training run or a saved model")
    checkpoints = workdir / "checkpoints"
    has_checkpoints = checkpoints.is_dir() and any(checkpoints.iterdir())
    if (workdir / MODEL_DIR).exists() and not has_checkpoints:
        if use_ema:
            raise ValueError(f"{workdir} is a saved model, which holds one set of weights and no moving average; "
                             "load it without use_ema")
        info = json.loads((workdir / MODEL_INFO).read_text())
        with ocp.StandardCheckpointer() as loader:
            variables = loader.restore(workdir / MODEL_DIR)
        return info["config"], jax.device_get(variables), info["class_names"]
    if not has_checkpoints:  # said before opening Orbax's manager, which would create the directory: a read
        # changes nothing, and an empty checkpoints/ left behind had hidden a saved model from the next load
        raise CheckpointError(f"no checkpoint in {checkpoints}: train first (python -m train --workdir=...) or "
                              "point at the workdir of a finished run or a saved model")
    ckpt = Checkpointer(checkpoints, async_save=False)
    try:
        if step == "best":
            step = ckpt.best_step() or ckpt.latest_step()  # no evaluation saved: the latest
        if isinstance(step, str) and not step.isdigit():
            raise ValueError(f"step {step!r} is neither a number nor 'best'")
        step = ckpt.latest_step() if step is None else int(step)
        if step not in ckpt.steps():
            raise CheckpointError(f"no checkpoint at step {step} in {ckpt.directory}; it has steps {ckpt.steps()}")
        restored = ckpt._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        state = jax.device_get(restored["state"])
        if use_ema and "ema" not in state:
            raise ValueError(f"the run in {workdir} kept no moving average of its weights (config.model_ema was "
                             "False); load it without use_ema")
        variables = state["ema"]["variables"] if use_ema else state
        variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        return restored["config"], variables, restored["meta"].get("class_names", [])
    finally:
        ckpt.close()
