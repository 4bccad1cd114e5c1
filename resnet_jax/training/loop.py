"""``train(config, workdir)``: the whole training run, as one plain function the CLI and notebooks share.

Read top to bottom, one function per phase: ``setup`` validates the config (every error before anything compiles
or is written) and ``train`` checks it against the run already in the workdir (``workdir.py``); ``_start``
restores the newest good checkpoint or initialises (optionally from pretrained weights); ``_Loop.run`` steps
through the epochs: sharded step, metrics (``_write_train_row``), epoch-end evaluation (``_evaluate``),
checkpoints (``_save``), early stopping, and a clean stop on SIGTERM/SIGINT (``preemption.py``); ``close`` and
``result`` finish. Everything that decides a number (data order, the step, the
metric sums) is either seeded or saved, so a run stopped at any point and restarted ends bitwise identical to
one that never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from resnet_jax import data, ops
from resnet_jax.checkpoint import CheckpointError, Checkpointer, NonFiniteState, has_checkpoints
from resnet_jax.parallel import (check_batch_size, initialize_distributed, make_mesh, replicate, replicated,
                                 shard_batch, sync_processes)
from resnet_jax.training import workdir as run_dir
from resnet_jax.training.compile_cache import compilation_cache
from resnet_jax.training.ema import make_ema_update
from resnet_jax.training.config import (check_against_data, eval_transform, min_image_size, model_from_config,
                                        normalization_stats, validate)
from resnet_jax.training.metrics_log import MetricsLog, read_metrics
from resnet_jax.training.optim import make_optimizer, make_schedule
from resnet_jax.training.preemption import StopOnSignal
from resnet_jax.training.pretrained_init import initial_variables
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


def setup(config: ml_collections.ConfigDict, workdir: Path | None = None) -> RunSetup:
    """Validate and build the pieces of a run; every configuration error surfaces here, before compiling.
    ``workdir``: where the run will train; a run resuming there keeps the evaluation and normalisation keys, and
    those whose default came later, as its saved config holds them where ``config`` leaves them unset
    (``workdir.kept_values``)."""
    try:
        given, config = config, validate(config)
    except ValueError as err:
        run_dir.join_to_refuse(config if hasattr(config, "get") else {}, f"{type(err).__name__}: {err}")
        raise
    initialize_distributed(config.coordinator_address or None,
                           config.num_processes if config.num_processes > 0 else None,
                           config.process_id if config.process_id >= 0 else None)
    mesh = make_mesh()
    run_dir.check_processes_agree(config)  # first: a process that refused its config waits in this exchange
    if workdir is not None:
        run_dir.check_shared(workdir)  # before reading it: with local disks, each host would read other settings
        kept = run_dir.kept_values(given, config, workdir)
        if kept:  # the same on every process, read from the one shared workdir
            config = validate(ml_collections.ConfigDict({**dict(given.items()), **kept}))
    check_batch_size(config.batch_size, mesh)
    check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    if config.grad_accum_steps > 1:
        check_batch_size(config.batch_size, mesh, parts=config.grad_accum_steps)
    train_source, val_source = run_dir.agreed(lambda: _sources(config))
    data.check_same_classes(train_source, val_source)
    data.check_every_class(train_source)
    check_against_data(config, train_source.num_classes, train_source)
    model = model_from_config(config, train_source.num_classes)
    if not config.eval_crop_fraction:  # resolved here and saved with the config, so predict crops the same way
        config.eval_crop_fraction = data.default_crop_fraction(val_source, config.augment)
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


def _sources(config: ml_collections.ConfigDict) -> tuple[Any, Any, Any]:
    """``(train source, validation source, what every process must see alike)``: both splits' fingerprints where
    the dataset has them (class folders are each host's own copy)."""
    data_dir = config.data_dir or None
    train_source = data.get_source(config.dataset, config.train_split, data_dir=data_dir,
                                   image_size=config.image_size, seed=config.seed)
    val_source = data.get_source(config.dataset, config.val_split, data_dir=data_dir,
                                 image_size=config.image_size, seed=config.seed)
    return train_source, val_source, {"train": train_source.fingerprint(), "val": val_source.fingerprint()}


def train(config: ml_collections.ConfigDict, workdir: str | Path, log: Callable[[str], None] | None = None,
          start_from: dict[str, Any] | None = None) -> TrainResult:
    """Train (or resume training) in ``workdir``; returns the final state and the metrics history.
    ``start_from``: variables a new run starts from instead of ``config.init_from`` (a different head is
    initialised afresh, as there); a resumed run takes its checkpoint's.

    Raises ``ValueError`` for a bad config and ``ConfigMismatch`` for a config that changes the run already in
    ``workdir`` (nothing written in either case), ``CheckpointError`` when no checkpoint there restores, and
    ``Preempted`` after saving a checkpoint on SIGTERM/SIGINT. JAX's compilation-cache setting is changed only
    for the length of the call (``compile_cache.py``).
    """
    log = log or _print_on_main
    # from the start: a signal during start-up (opening data, restoring, compiling: minutes on ImageNet) killed
    # the process with no word and exit code 143, which a job script that requeues on 75 took for a failure
    with StopOnSignal() as stop:
        workdir = Path(workdir)
        run = setup(config, workdir)
        stop.mesh = run.mesh
        accepted: list[str] = []  # logged once the run holds the workdir: a run refused as in use continues nothing
        run_dir.check(workdir, run.config, accepted.append, run.train_source.fingerprint())
        log(f"{run.config.model} on {run.mesh.devices.size} {jax.default_backend()} device(s); convolutions: "
            f"{ops.describe(getattr(run.model, 'conv_impl', 'auto'))}")
        if stop.received_anywhere():
            _stopped_before_starting(stop, log, 0, "before it started", "nothing was written")
        with compilation_cache(run.config.compilation_cache_dir):
            loop = _start(run, workdir, log, start_from, stop, accepted)
            try:
                if stop.received_anywhere():
                    _stopped_before_starting(stop, log, loop.step, "before its first step",
                                             f"its checkpoints are as they were (step {loop.step})")
                stop_reason = loop.run()
            except BaseException:
                loop.close(failing=True)
                raise
            loop.close()
            return loop.result(stop_reason)


def _stopped_before_starting(stop: StopOnSignal, log: Callable[[str], None], step: int, when: str,
                             message: str) -> None:
    interrupted = stop.interrupted(step, message, when)
    log(str(interrupted))
    raise interrupted


def _start(run: RunSetup, workdir: Path, log: Callable[[str], None], start_from, stop: StopOnSignal,
           accepted: list[str] = ()) -> _Loop:
    """The setup/restore phase: the loaders and the state's structure, then the state restored (``_restore``)
    or initialised, and the loop's pieces. Separate from the loop because it alone decides where a run starts,
    and it is the first phase that writes: nothing before ``_restore``'s ``sync_processes`` changes the workdir,
    so every process has read it as it was. ``accepted``: what ``workdir.check`` accepted of a changed config,
    logged once the lock is held (it had announced "continuing the run" for a run then refused as in use)."""
    config, mesh, model = run.config, run.mesh, run.model
    num_classes = run.train_source.num_classes
    class_names = list(config.class_names or run.train_source.class_names) or [str(i) for i in range(num_classes)]
    spe = run.steps_per_epoch
    loader_args = dict(image_size=config.image_size, mean=run.mean, std=run.std, channels=model.in_channels)
    train_loader = data.train_loader(run.train_source, batch_size=config.batch_size, augment=config.augment,
                                     seed=config.seed, worker_count=config.num_workers,
                                     auto_augment=config.auto_augment, random_erasing=config.random_erasing,
                                     ra_reps=config.ra_reps, train_interpolation=config.train_interpolation,
                                     shuffle_seeding=config.shuffle_seeding,
                                     **loader_args)
    val_loader = data.eval_loader(run.val_source, batch_size=config.eval_batch_size,
                                  crop_fraction=config.eval_crop_fraction, transform=eval_transform(config),
                                  **loader_args)
    tx = make_optimizer(config, spe)
    input_shape = (1, config.image_size, config.image_size, model.in_channels)
    create = jax.jit(lambda v: create_train_state(model, tx, config.seed, input_shape, v, ema=config.model_ema),
                     out_shardings=replicated(mesh))
    shapes = jax.eval_shape(create, None)  # the state's structure, without computing it
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
                            shapes.arrays())

    # The starting weights are read (and checked) before anything in the workdir changes, and only by a run that
    # starts afresh: a bad file used to fail after restart had moved the old run aside (or after an empty
    # checkpoints/ was made), and a resumed fine-tune, which never reads them, was refused once they had moved.
    fresh = config.restart or not has_checkpoints(workdir)
    initial = initial_variables(config, model, input_shape, log, start_from) if fresh else None
    held = run_dir.lock(workdir)  # from the first write to the run's end
    for line in accepted:  # what ``check`` accepted of a changed config
        log(line)
    try:
        checkpoints, iterator, restored = _restore(config, workdir, train_loader, abstract, log)
    except BaseException:
        held.close()
        raise
    progress = {"window": None, "epoch": None, "best": -1.0, "bad_epochs": 0}
    if restored is None:
        step, resumed_from = 0, None
        if not fresh:  # its checkpoints went in the meantime (another process of this run moved them)
            initial = initial_variables(config, model, input_shape, log, start_from)
        state = create(initial)
    else:
        step, arrays, meta, _ = restored
        resumed_from = step
        state = shapes.with_arrays(arrays)
        progress = meta["loop"]
        log(f"resumed from the checkpoint at step {step} (epoch {step / spe:.2f}) in {checkpoints.directory}")
    run_dir.write_config(workdir, config, run.train_source.fingerprint())
    return _Loop(setup=run, workdir=workdir, log=log, held=held, class_names=class_names, checkpoints=checkpoints,
                 iterator=iterator, val_loader=val_loader,
                 metrics_log=MetricsLog(workdir, resume_step=resumed_from),
                 train_step=make_train_step(config, num_classes, mesh), eval_step=make_eval_step(mesh, model),
                 ema_update=make_ema_update(config, spe, replicated(mesh)) if config.model_ema else None,
                 schedule=make_schedule(config, spe), state=state, step=step, resumed_from=resumed_from,
                 window=None if progress["window"] is None else replicate(_as_f32(progress["window"]), mesh),
                 epoch_sums=None if progress["epoch"] is None else replicate(_as_f32(progress["epoch"]), mesh),
                 best=progress["best"], bad_epochs=progress["bad_epochs"], saved_step=step, stop=stop)


def _restore(config: ml_collections.ConfigDict, workdir: Path, train_loader, abstract, log: Callable[[str], None]):
    """The workdir made ready and the newest checkpoint that restores read into ``abstract``'s structure, with
    the data iterator's position: ``(checkpoints, iterator, (step, arrays, meta) or None)``. Earlier files are
    moved aside, never deleted: on ``config.restart``, or when a history has no checkpoint to continue it."""
    sync_processes("workdir_checked")
    if config.restart:
        run_dir.move_aside(workdir, log, "config.restart=True")
    checkpoints = Checkpointer(workdir / run_dir.CHECKPOINTS, keep=config.keep_checkpoints)
    if not checkpoints.steps() and run_dir.has_history(workdir):
        run_dir.move_aside(workdir, log, "no checkpoint to resume from",
                           names=(*run_dir.HISTORY_FILES, run_dir.CONFIG_FILE, run_dir.DATA_FILE))
    iterator = iter(train_loader)
    try:
        restored = checkpoints.restore_latest(abstract, iterator, log)
        if restored is not None:  # None: a new run (config.restart has moved the old checkpoints aside)
            step, _, _, saved_config = restored
            run_dir.check_restored(saved_config, config, step, workdir)
        return checkpoints, iterator, restored
    except Exception:
        checkpoints.close()
        raise


@dataclasses.dataclass
class _Loop:
    """A run between its steps: the state, where it is, and the metric sums not yet written. Everything here
    that decides a number goes into each checkpoint (``_save``), which is what makes a resumed run bitwise equal
    to one that never stopped."""

    setup: RunSetup
    workdir: Path
    log: Callable[[str], None]
    held: Any  # the workdir's lock (workdir.lock), released by close
    stop: StopOnSignal  # train()'s, whose signal handlers cover the start-up too
    class_names: list[str]
    checkpoints: Checkpointer
    iterator: Any
    val_loader: Any
    metrics_log: MetricsLog
    train_step: Callable
    eval_step: Callable
    ema_update: Callable | None     # the weights' moving average, after each step (config.model_ema)
    schedule: Callable
    state: TrainState
    step: int
    resumed_from: int | None
    window: Any                     # the metric sums since the last train row
    epoch_sums: Any                 # the metric sums since the epoch began
    best: float                     # the best ranking accuracy (the EMA's with one), for early stopping
    bad_epochs: int                 # evaluations since it last improved
    saved_step: int
    bar: Any = None
    timer: _Throughput = dataclasses.field(default_factory=lambda: _Throughput())

    def run(self) -> str:
        """The epoch loop: steps until the last one, early stopping or a stop signal; returns why it stopped.
        A stop signal is acted on only between steps, and on every process at the same step (see
        preemption.py), so the checkpoint it leaves is one that every process agrees on."""
        config, spe, total = self.setup.config, self.setup.steps_per_epoch, self.setup.total_steps
        if self._early_stop_due():  # it stopped early before: run again (a requeued job), it stays stopped
            return self._early_stop_reason()
        while self.step < total:  # the signal handlers are train()'s, installed before the run's start-up
            self._one_step()
            end_of_epoch = self.step % spe == 0 or self.step == total
            if self.step % config.log_every_steps == 0 or end_of_epoch:
                self._write_train_row()
            if end_of_epoch and self._end_epoch():
                return self._early_stop_reason()
            if not end_of_epoch and self.step % config.checkpoint_every_steps == 0:
                _checked_means(self.epoch_sums, self.step, self.checkpoints)
                self._save()
            if self.stop.requested():
                self._save_before_stopping()
                return "preempted"
        return "finished"

    def _one_step(self) -> None:
        """One training step on the next batch, its metric sums added to the window's and the epoch's."""
        config, spe = self.setup.config, self.setup.steps_per_epoch
        if self.bar is None:
            self.bar = tqdm(total=spe, initial=self.step % spe,
                            desc=f"epoch {self.step // spe + 1}/{config.num_epochs}",
                            disable=not (config.progress_bar and jax.process_index() == 0), leave=False,
                            dynamic_ncols=True)
        batch = next(self.iterator)
        self.state, sums = self.train_step(self.state, shard_batch(batch, self.setup.mesh))
        if self.ema_update is not None:
            self.state = self.ema_update(self.state, self.step)
        self.step += 1
        self.timer.add(config.batch_size, sums)
        self.window, self.epoch_sums = add_sums(self.window, sums), add_sums(self.epoch_sums, sums)
        self.bar.update(1)

    def _write_train_row(self) -> None:
        """A train row of metrics.jsonl from the window's sums; reading them is also where a NaN loss stops the
        run (the sums stay on the devices between rows, so a step never waits for the host)."""
        m = _checked_means(self.window, self.step, self.checkpoints)
        self.metrics_log.write({"step": self.step, "epoch": self.step / self.setup.steps_per_epoch,
                                "split": "train", **m, "learning_rate": float(self.schedule(self.step - 1)),
                                "images_per_second": self.timer.rate()})
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}")
        self.window = None

    def _end_epoch(self) -> bool:
        """The epoch's summary line, its evaluation when due, and its checkpoint (every epoch ends with one, so
        the best-checkpoint record and early stopping see every evaluation); True when early stopping is due."""
        config = self.setup.config
        epoch = (self.step - 1) // self.setup.steps_per_epoch  # the epoch this step belonged to, from 0
        # the run's last step inside an epoch (max_steps): evaluated, but the epoch goes on if the run is
        # continued, so its sums are kept (saved with the checkpoint) and this evaluation is no epoch's for early
        # stopping (it printed the epoch twice, the second half alone, and counted one evaluation too many)
        partial = self.step % self.setup.steps_per_epoch != 0
        self.bar.close()
        self.bar = None
        train_m = _checked_means(self.epoch_sums, self.step, self.checkpoints)
        if not partial:
            self.epoch_sums = None
        summary = f"epoch {epoch + 1}/{config.num_epochs}{f' (to step {self.step})' if partial else ''}: train " \
                  f"loss {train_m['loss']:.4f} acc {train_m['accuracy']:.4f}"
        val_accuracy = None
        if (epoch + 1) % config.eval_every_epochs == 0 or self.step == self.setup.total_steps:
            val_accuracy, shown = self._evaluate(self.step / self.setup.steps_per_epoch if partial else epoch + 1,
                                                 counts=not partial)
            summary += shown
        self.log(summary)
        self._save(val_accuracy)
        return self._early_stop_due()

    def _early_stop_due(self) -> bool:
        """Whether the evaluations since the last improvement reach the patience (the saved count, so a run that
        stopped early and is started again stops at once, unless the patience was raised since)."""
        patience = self.setup.config.early_stopping_patience
        return bool(patience) and self.bad_epochs >= patience

    def _evaluate(self, epoch: float, counts: bool = True) -> tuple[float, str]:
        """The validation pass: a val row in metrics.jsonl (and a val_ema row with ``model_ema``) at ``epoch`` and,
        where it ``counts`` (an epoch's end), the early-stopping count updated; returns the accuracy that ranks
        this checkpoint and the summary's text.

        With an EMA, the averaged weights are the ones a run delivers, so their accuracy ranks the checkpoints
        and drives early stopping, as timm's train.py ranks by its EMA's metrics when it keeps one."""
        val_m = evaluate_loader(self.state, self.eval_step, self.val_loader, self.setup.mesh)
        self.metrics_log.write({"step": self.step, "epoch": epoch, "split": "val", **val_m})
        shown = f" | val loss {val_m['loss']:.4f} acc {val_m['accuracy']:.4f} top5 {val_m['top5']:.4f}"
        ranked = val_m
        if self.state.ema is not None:
            ranked = evaluate_loader(self.state.ema_view(), self.eval_step, self.val_loader, self.setup.mesh)
            self.metrics_log.write({"step": self.step, "epoch": epoch, "split": "val_ema", **ranked})
            shown += f" | ema acc {ranked['accuracy']:.4f}"
        if counts and ranked["accuracy"] > self.best:
            self.best, self.bad_epochs = ranked["accuracy"], 0
        elif counts:
            self.bad_epochs += 1
        return ranked["accuracy"], shown

    def _early_stop_reason(self) -> str:
        which = "the EMA's val accuracy" if self.state.ema is not None else "val accuracy"
        reason = (f"early stopping: no improvement of {which} for {self.bad_epochs} evaluations "
                  f"(best {self.best:.4f})")
        self.log(reason)
        return reason

    def _save_before_stopping(self) -> None:
        """On a stop signal: a checkpoint at this step unless one was just written, its sums checked first so a
        diverged state is not the one a restart resumes from."""
        if self.saved_step != self.step:
            if self.epoch_sums is not None:
                _checked_means(self.epoch_sums, self.step, self.checkpoints)
            self._save()

    def _save(self, val_accuracy: float | None = None) -> None:
        """A checkpoint at this step: the state, the data iterator's position and the unwritten metric sums, so
        a run resumed from it continues the same batches and writes the same rows."""
        progress = {"window": _to_host(self.window), "epoch": _to_host(self.epoch_sums), "best": self.best,
                    "bad_epochs": self.bad_epochs}
        try:
            self.checkpoints.save(self.step, self.state.arrays(), self.iterator,
                                  {"loop": progress, "class_names": self.class_names},
                                  self.setup.config.to_dict(), val_accuracy)
        except NonFiniteState as err:  # the last update diverged; its loss is only seen at the next step
            raise TrainingDiverged(f"{err}; {_last_good(self.checkpoints)}. {_DIVERGED_HINT}") from None
        self.saved_step = self.step

    def close(self, failing: bool = False) -> None:
        """Passed or failed: the last asynchronous save finished first (it may still be writing this run's
        state), then the metrics' files and plot, then the Grain worker processes stopped and their shared
        memory released. Each step runs even if one before it fails; the first failure is raised after all of
        them, or none when the run is ``failing`` already: its own error says what happened, and the same cause
        (a full disk) failing the plot's write as well had replaced it."""
        steps = [self.checkpoints.close, self.metrics_log.close, getattr(self.iterator, "close", None),
                 self.held.close]
        if self.bar is not None:
            steps.insert(0, self.bar.close)
        first = None
        for step in filter(None, steps):
            try:
                step()
            except Exception as err:  # noqa: BLE001 - the others still run; raised below
                first = first or err
        if first is not None and not failing:
            raise first

    def result(self, stop_reason: str) -> TrainResult:
        """The finish: ``Preempted`` once everything is closed (its message says where the checkpoint is and
        how to resume), else the final state with the whole history as metrics.jsonl has it."""
        if stop_reason == "preempted":
            interrupted = self.stop.interrupted(self.step, f"checkpoint saved in {self.checkpoints.directory}")
            self.log(str(interrupted))
            raise interrupted
        return TrainResult(self.state, read_metrics(self.workdir), self.setup.model, self.setup.config,
                           self.class_names, stop_reason, self.resumed_from)


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


# settings are fixed within a run (workdir.py): the advice names the ways that take a changed one
_DIVERGED_HINT = ("Lower config.learning_rate, add warm-up (config.warmup_epochs) or check the input data, in a new "
                  "run: --config.restart=True (the old run is moved aside) or a new --workdir, where "
                  "--config.init_from=<this workdir> starts from the last good checkpoint's weights; resuming "
                  "here with the same settings diverges again.")


def _last_good(checkpoints: Checkpointer) -> str:
    try:
        checkpoints.wait()
    except CheckpointError:  # the last save failed too; the divergence is what the run reports
        pass
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
