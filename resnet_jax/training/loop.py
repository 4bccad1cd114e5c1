"""``train(config, workdir)``: the whole training run, as one plain function the CLI and notebooks share.

Read top to bottom: validate the config (every error before anything compiles or is written), check it against
the run already in the workdir (``workdir.py``), restore the newest good checkpoint or initialise (optionally from
pretrained weights), then loop: sharded step, metrics, checkpoint, epoch-end evaluation, early stopping, and a
clean stop on SIGTERM/SIGINT (``preemption.py``). Everything that decides a number (data order, the step, the
metric sums) is either seeded or saved, so a run stopped at any point and restarted ends bitwise identical to
one that never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from resnet_jax import data, ops
from resnet_jax.checkpoint import Checkpointer, NonFiniteState
from resnet_jax.parallel import (check_batch_size, initialize_distributed, make_mesh, replicate, replicated,
                                 shard_batch, sync_processes)
from resnet_jax.training import workdir as run_dir
from resnet_jax.training.config import (check_against_data, min_image_size, model_from_config, normalization_stats,
                                        validate)
from resnet_jax.training.metrics_log import MetricsLog, read_metrics
from resnet_jax.training.optim import make_optimizer, make_schedule
from resnet_jax.training.preemption import StopOnSignal
from resnet_jax.training.pretrained_init import check_init_from, initial_variables
from resnet_jax.training.state import TrainState, create_train_state
from resnet_jax.training.steps import add_sums, make_eval_step, make_train_step, means


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint was written after it happened."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    history: list[dict[str, Any]]
    model: Any
    config: ml_collections.ConfigDict
    class_names: list[str]
    stop_reason: str
    resumed_from: int | None = None     # the checkpoint step this call continued from (None: it started at 0)

    @property
    def variables(self) -> dict[str, Any]:
        return jax.device_get(self.state.variables)


@dataclasses.dataclass
class RunSetup:
    """Everything built from a config before the first step; shared by ``train`` and ``evaluate``."""

    config: ml_collections.ConfigDict
    mesh: Any
    model: Any
    train_source: Any
    val_source: Any
    mean: Any
    std: Any
    steps_per_epoch: int
    total_steps: int


def setup(config: ml_collections.ConfigDict) -> RunSetup:
    """Validate and build the pieces of a run; every configuration error surfaces here, before compiling."""
    config = validate(config)
    initialize_distributed(config.coordinator_address or None,
                           config.num_processes if config.num_processes > 0 else None,
                           config.process_id if config.process_id >= 0 else None)
    mesh = make_mesh()
    check_batch_size(config.batch_size, mesh)
    check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    data_dir = config.data_dir or None
    train_source = data.get_source(config.dataset, config.train_split, data_dir=data_dir,
                                   image_size=config.image_size, seed=config.seed)
    val_source = data.get_source(config.dataset, config.val_split, data_dir=data_dir,
                                 image_size=config.image_size, seed=config.seed)
    check_against_data(config, train_source.num_classes)
    check_init_from(config)
    model = model_from_config(config, train_source.num_classes)
    if not config.eval_crop_fraction:  # resolved here and saved with the config, so predict crops the same way
        config.eval_crop_fraction = data.default_crop_fraction(val_source)
    if config.image_size < min_image_size(model):
        raise ValueError(f"config.image_size={config.image_size} is too small for {config.model}, which "
                         f"downsamples by {min_image_size(model)}; use at least {min_image_size(model)}")
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"the training split has {len(train_source)} examples, fewer than one batch of "
                         f"{config.batch_size}; lower config.batch_size")
    total = config.num_epochs * steps_per_epoch
    if config.max_steps > 0:
        total = min(total, config.max_steps)
    mean, std = normalization_stats(config)
    return RunSetup(config, mesh, model, train_source, val_source, mean, std, steps_per_epoch, total)


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache: a restarted or repeated run skips recompiling the train step."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def train(config: ml_collections.ConfigDict, workdir: str | Path, log: Callable[[str], None] | None = None
          ) -> TrainResult:
    """Train (or resume training) in ``workdir``; returns the final state and the metrics history.

    Raises ``ValueError`` for a bad config and ``ConfigMismatch`` for a config that changes the run already in
    ``workdir`` (nothing written in either case), ``CheckpointError`` when no checkpoint there restores, and
    ``Preempted`` after saving a checkpoint on SIGTERM/SIGINT.
    """
    log = log or _print_on_main
    run = setup(config)
    config, mesh, model = run.config, run.mesh, run.model
    workdir = Path(workdir)
    run_dir.check(workdir, config, log)
    log(f"{config.model} on {mesh.devices.size} {jax.default_backend()} device(s); convolutions: "
        f"{ops.describe(getattr(model, 'conv_impl', 'auto'))}")
    enable_compilation_cache(config.compilation_cache_dir)
    num_classes = run.train_source.num_classes
    class_names = list(run.train_source.class_names) or [str(i) for i in range(num_classes)]
    spe = run.steps_per_epoch

    loader_args = dict(image_size=config.image_size, mean=run.mean, std=run.std, channels=model.in_channels)
    train_loader = data.train_loader(run.train_source, batch_size=config.batch_size, augment=config.augment,
                                     seed=config.seed, worker_count=config.num_workers, **loader_args)
    val_loader = data.eval_loader(run.val_source, batch_size=config.eval_batch_size,
                                  crop_fraction=config.eval_crop_fraction, **loader_args)
    tx = make_optimizer(config, spe)
    input_shape = (1, config.image_size, config.image_size, model.in_channels)
    create = jax.jit(lambda v: create_train_state(model, tx, config.seed, input_shape, v),
                     out_shardings=replicated(mesh))
    shapes = jax.eval_shape(create, None)  # the state's structure, without computing it
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                            shapes.arrays())

    # Nothing above writes; from here on the workdir changes, once every process has read it as it was.
    sync_processes("workdir_checked")
    if config.restart:
        run_dir.move_aside(workdir, log, "config.restart=True")
    checkpoints = Checkpointer(workdir / run_dir.CHECKPOINTS, keep=config.keep_checkpoints)
    if not checkpoints.steps() and run_dir.has_history(workdir):
        run_dir.move_aside(workdir, log, "no checkpoint to resume from",
                           names=(*run_dir.HISTORY_FILES, run_dir.CONFIG_FILE))
    iterator = iter(train_loader)
    try:
        restored = checkpoints.restore_latest(abstract, iterator, log)
    except Exception:
        checkpoints.close()
        raise
    loop = {"window": None, "epoch": None, "best": -1.0, "bad_epochs": 0}
    if restored is None:
        step = 0
        state = create(initial_variables(config, model, input_shape, log))
    else:
        step, arrays, meta = restored
        state = shapes.with_arrays(arrays)
        loop = meta["loop"]
        log(f"resumed from the checkpoint at step {step} (epoch {step / spe:.2f}) in {checkpoints.directory}")
    run_dir.write_config(workdir, config)
    metrics_log = MetricsLog(workdir, resume_step=None if restored is None else step)
    window = None if loop["window"] is None else replicate(_as_f32(loop["window"]), mesh)
    epoch_sums = None if loop["epoch"] is None else replicate(_as_f32(loop["epoch"]), mesh)

    train_step = make_train_step(config, num_classes, mesh)
    eval_step = make_eval_step(mesh, model)
    schedule = make_schedule(config, spe)
    show_bar = config.progress_bar and jax.process_index() == 0
    bar, stop_reason, saved_step = None, "finished", step
    timer = _Throughput()

    def save(at_step: int, val_accuracy: float | None = None) -> None:
        nonlocal saved_step
        host = {"window": _to_host(window), "epoch": _to_host(epoch_sums), "best": loop["best"],
                "bad_epochs": loop["bad_epochs"]}
        try:
            checkpoints.save(at_step, state.arrays(), iterator, {"loop": host, "class_names": class_names},
                             config.to_dict(), val_accuracy)
        except NonFiniteState as err:  # the last update diverged; its loss is only seen at the next step
            raise TrainingDiverged(f"{err}; {_last_good(checkpoints)}. {_DIVERGED_HINT}") from None
        saved_step = at_step

    stop = StopOnSignal(mesh)
    try:
        with stop:
            while step < run.total_steps:
                epoch = step // spe
                if bar is None:
                    bar = tqdm(total=spe, initial=step % spe, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                               disable=not show_bar, leave=False, dynamic_ncols=True)
                batch = next(iterator)
                state, sums = train_step(state, shard_batch(batch, mesh))
                step += 1
                timer.add(config.batch_size, sums)
                window, epoch_sums = add_sums(window, sums), add_sums(epoch_sums, sums)
                bar.update(1)
                end_of_epoch = step % spe == 0 or step == run.total_steps

                if step % config.log_every_steps == 0 or end_of_epoch:
                    m = _checked_means(window, step, checkpoints)
                    metrics_log.write({"step": step, "epoch": step / spe, "split": "train", **m,
                                       "learning_rate": float(schedule(step - 1)),
                                       "images_per_second": timer.rate()})
                    bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}")
                    window = None

                if end_of_epoch:
                    bar.close()
                    bar = None
                    train_m = _checked_means(epoch_sums, step, checkpoints)
                    epoch_sums = None
                    summary = f"epoch {epoch + 1}/{config.num_epochs}: train loss {train_m['loss']:.4f} " \
                              f"acc {train_m['accuracy']:.4f}"
                    val_accuracy = None
                    if (epoch + 1) % config.eval_every_epochs == 0 or step == run.total_steps:
                        val_m = evaluate_loader(state, eval_step, val_loader, mesh)
                        val_accuracy = val_m["accuracy"]
                        metrics_log.write({"step": step, "epoch": epoch + 1, "split": "val", **val_m})
                        summary += f" | val loss {val_m['loss']:.4f} acc {val_accuracy:.4f} " \
                                   f"top5 {val_m['top5']:.4f}"
                        if val_accuracy > loop["best"]:
                            loop["best"], loop["bad_epochs"] = val_accuracy, 0
                        else:
                            loop["bad_epochs"] += 1
                    log(summary)
                    save(step, val_accuracy)
                    if config.early_stopping_patience and loop["bad_epochs"] >= config.early_stopping_patience:
                        stop_reason = (f"early stopping: no val-accuracy improvement for {loop['bad_epochs']} "
                                       f"evaluations (best {loop['best']:.4f})")
                        log(stop_reason)
                        break
                elif step % config.checkpoint_every_steps == 0:
                    _checked_means(epoch_sums, step, checkpoints)
                    save(step)

                if stop.requested():  # on every process at the same step (see preemption.py)
                    if saved_step != step:
                        if epoch_sums is not None:
                            _checked_means(epoch_sums, step, checkpoints)
                        save(step)
                    stop_reason = "preempted"
                    break
    finally:
        if bar is not None:
            bar.close()
        checkpoints.close()  # waits for the last asynchronous save
        metrics_log.close()
        if hasattr(iterator, "close"):  # Grain worker processes: stop them and release their shared memory
            iterator.close()
    if stop_reason == "preempted":
        interrupted = stop.interrupted(step, f"checkpoint saved in {checkpoints.directory}")
        log(str(interrupted))
        raise interrupted
    return TrainResult(state, read_metrics(workdir), model, config, class_names, stop_reason,
                       None if restored is None else restored[0])


def evaluate_loader(state: TrainState, eval_step, loader, mesh) -> dict[str, float]:
    """Loss / top-1 / top-5 over every example of ``loader`` exactly once (padding masked out)."""
    total = None
    for batch in loader:
        total = add_sums(total, eval_step(state, shard_batch(batch, mesh)))
    result = means(total)
    result.pop("count")
    return result


def _checked_means(sums, step: int, checkpoints: Checkpointer) -> dict[str, float]:
    m = means(sums)
    count = m.pop("count")
    if not math.isfinite(m["loss"]):
        raise TrainingDiverged(f"the training loss became {m['loss']} by step {step} (over {int(count)} "
                               f"examples); {_last_good(checkpoints)}. {_DIVERGED_HINT}")
    return m


_DIVERGED_HINT = "Lower config.learning_rate, add warm-up (config.warmup_epochs) or check the input data."


def _last_good(checkpoints: Checkpointer) -> str:
    checkpoints.wait()
    last = checkpoints.steps()
    return f"the last good checkpoint is step {last[-1]} in {checkpoints.directory}" if last else \
        "no checkpoint was written"


class _Throughput:
    """Images per second since the last ``rate()``, excluding the first step (it includes compilation)."""

    def __init__(self):
        self.start, self.images, self.first = None, 0, True

    def add(self, images: int, sums) -> None:
        if self.first:
            jax.block_until_ready(sums)
            self.start, self.first = time.perf_counter(), False
            return
        self.images += images

    def rate(self) -> float | None:
        if self.start is None or self.images == 0:
            return None
        now = time.perf_counter()
        rate = self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return rate


def _to_host(sums) -> dict[str, float] | None:
    return None if sums is None else {k: float(v) for k, v in jax.device_get(sums).items()}


def _as_f32(sums: dict[str, float]) -> dict[str, jax.Array]:
    return {k: np.float32(v) for k, v in sums.items()}


def _print_on_main(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A config saved by a run (``config.json`` or the checkpoint's copy), as a ConfigDict again."""
    values = json.loads(text) if isinstance(text, str) else dict(text)
    return validate(ml_collections.ConfigDict(values))
