"""Orbax checkpoints of a run: train state + data-iterator state + config + loop bookkeeping.

A checkpoint holds everything a run needs to continue exactly where it was: the ``TrainState`` arrays, each
process's Grain iterator position, the metric sums of the unfinished logging window and epoch, and a
fingerprint of the parameters. On restart the newest checkpoint that restores *and* matches its fingerprint is
used; a damaged one is reported and moved aside to ``checkpoints_damaged/`` (never used, never deleted), so the
next saves are not refused by Orbax for being older than it.
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

try:
    from grain.checkpoint import CheckpointRestore as _IterRestore, CheckpointSave as _IterSave
except ImportError:  # older grain
    from grain.python import PyGrainCheckpointRestore as _IterRestore, PyGrainCheckpointSave as _IterSave

BEST_METRIC = "val_accuracy"


def fingerprint(tree: Any) -> list[float]:
    """Per-leaf sums of |x| over the whole state, computed on device: a cheap check that restored arrays are
    the saved ones (Orbax notices a truncated file, but not flipped bytes inside one)."""
    leaves = jax.tree.leaves(tree)
    sums = jax.jit(lambda ls: [jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in ls])(leaves)
    return [float(s) for s in jax.device_get(sums)]


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


class Checkpointer:
    """Save and restore a run's checkpoints under ``directory`` (usually ``workdir/checkpoints``).

    Keeps the ``keep`` latest checkpoints plus the one with the best validation accuracy.
    """

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        # cleanup_tmp_directories: a save cut short by a crash leaves a temporary directory, not a checkpoint
        self._options = ocp.CheckpointManagerOptions(preservation_policy=policy, cleanup_tmp_directories=True,
                                                     enable_async_checkpointing=async_save)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_names=("state", "data", "meta", "config"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state_arrays: Any, iterator: Any, meta: dict, config: dict,
             val_accuracy: float | None = None) -> None:
        meta = {**meta, "fingerprint": fingerprint(state_arrays), "saved_at": time.time()}
        items = {"state": ocp.args.StandardSave(state_arrays), "meta": ocp.args.JsonSave(meta),
                 "config": ocp.args.JsonSave(config)}
        if iterator is not None:
            items["data"] = _IterSave(iterator)
        metrics = None if val_accuracy is None else {BEST_METRIC: float(val_accuracy)}
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore_latest(self, abstract_arrays: Any, iterator: Any = None, log=print):
        """Restore the newest good checkpoint into the structure/shardings of ``abstract_arrays`` (and
        ``iterator``); returns ``(step, arrays, meta)`` or ``None`` when there is no checkpoint."""
        for step in reversed(self.steps()):
            try:
                arrays, meta = self._restore(step, abstract_arrays, iterator)
            except Exception as err:  # noqa: BLE001 - any failure means this checkpoint cannot be trusted
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                moved = self._quarantine(step)
                log(f"checkpoint at step {step} is damaged ({reason[:300]}); moved it to {moved} and "
                    "trying the previous one")
                continue
            return step, arrays, meta
        return None

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
        target = self.directory.parent / "checkpoints_damaged" / f"{source.name}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(target))
        _sync("quarantine")
        self._manager.close()
        self._manager = self._open()
        return target

    def latest_step(self) -> int:
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}: train first (python -m train "
                                  "--workdir=...) or point at the workdir of a finished run")
        return steps[-1]

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


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


def load_variables(workdir: str | Path, step: int | str | None = None) -> tuple[dict, dict, list[str]]:
    """``(config, {"params", "batch_stats"}, class_names)`` from ``save_variables`` output or from a training
    run's checkpoints (latest, a ``step``, or ``"best"``), as host numpy arrays."""
    workdir = Path(workdir).absolute()
    if not workdir.exists():
        raise FileNotFoundError(f"{workdir} does not exist; give the workdir of a training run or a saved model")
    if (workdir / MODEL_DIR).exists() and not (workdir / "checkpoints").exists():
        info = json.loads((workdir / MODEL_INFO).read_text())
        with ocp.StandardCheckpointer() as loader:
            variables = loader.restore(workdir / MODEL_DIR)
        return info["config"], jax.device_get(variables), info["class_names"]
    ckpt = Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        if step == "best":
            step = ckpt.best_step() or ckpt.latest_step()
        step = ckpt.latest_step() if step is None else int(step)
        restored = ckpt._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        state = jax.device_get(restored["state"])
        variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
        return restored["config"], variables, restored["meta"].get("class_names", [])
    finally:
        ckpt.close()
