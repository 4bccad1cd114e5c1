"""A run stopped mid-epoch by SIGKILL or SIGTERM and started again ends bitwise identical to one that never stopped.

Real processes and real signals. Every config here has mixup and CutMix on (they draw random numbers every step)
and pad-crop-flip augmentation (random per example), so a resume that replayed the wrong step, batch or random
stream shows in the parameters. Checkpoints every 11 steps and log rows every 20 never coincide within the run
(88 steps), so any checkpoint restored is mid logging window (the restored metric sums are exercised), and the
row at step 60 comes 5 steps after the checkpoint at 55 and 6 before the next one: a kill right after that row
leaves a row the resumed run must drop. The runs also keep an EMA of the weights (updated every 3 steps of each
epoch from the first, no warm-up, so that every stop falls where the average holds several updates; evaluated as
"val_ema" rows), repeat each image twice with independent augmentations and erase rectangles at random: a resumed
run must end with the same average too.
"""

import json
import os
import signal
import time

import pytest

from training_helpers import (once_per_session, run_worker, spawn, tiny_config,  # noqa: F401
                              worker_command, worker_env)

pytestmark = pytest.mark.long  # training runs interrupted by signals and resumed, in subprocesses

STEPS_PER_EPOCH = 1437 // 32  # 44
TOTAL = 2 * STEPS_PER_EPOCH
LOG_EVERY, CHECKPOINT_EVERY = 20, 11
PREEMPTED = 75


def config(**kw):
    return tiny_config(**{"num_epochs": 2, "checkpoint_every_steps": CHECKPOINT_EVERY, "log_every_steps": LOG_EVERY,
                          "augment": "cifar", "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "model_ema": True,
                          "model_ema_steps": 3, "ra_reps": 2, "random_erasing": 0.25, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory, result = once_per_session(tmp_path_factory, "resume-reference",
                                         lambda d: run_worker(d / "run", config()))
    return directory / "run", result


def metric_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("images_per_second", None)  # wall-clock, the one field that may differ
    return rows


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def wait_for(ready, proc):
    deadline = time.monotonic() + 600
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stderr.read()[-3000:]
    assert ready(), "the run did not get there within 10 minutes"


def logged_step(workdir, step):
    path = workdir / "metrics.jsonl"
    return lambda: path.exists() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()
                                         if line.endswith("}"))


@pytest.mark.slow
def test_sigkill_mid_logging_window_with_data_workers_resumes_bitwise(reference, tmp_path, spawn):
    ref_dir, ref = reference
    workdir = tmp_path / "killed"
    cfg = config(num_workers=2)  # batches do not depend on the worker count; the iterator state does
    proc = spawn(worker_command(workdir, cfg), worker_env())
    row_60, checkpoint_55 = logged_step(workdir, 60), workdir / "checkpoints" / "55"
    wait_for(lambda: row_60() and checkpoint_55.exists(), proc)  # the save is asynchronous: either comes first
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, data workers too, like a VM going away
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    last_checkpoint = checkpoint_steps(workdir)[-1]
    assert max(r["step"] for r in metric_rows(workdir)) > last_checkpoint  # rows the resume must drop

    resumed = run_worker(workdir, cfg)
    assert resumed["resumed_from"] == last_checkpoint
    assert STEPS_PER_EPOCH < last_checkpoint < TOTAL
    assert last_checkpoint % LOG_EVERY and last_checkpoint % STEPS_PER_EPOCH  # mid window, mid epoch
    assert not (workdir / "checkpoints_damaged").exists() and not (workdir / "previous_runs").exists()
    assert resumed["step"] == ref["step"] == TOTAL
    assert resumed["params_digest"] == ref["params_digest"] and resumed["ema_digest"] == ref["ema_digest"]
    assert metric_rows(workdir) == metric_rows(ref_dir)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_a_checkpoint_and_resumes_bitwise(reference, tmp_path, spawn):
    ref_dir, ref = reference
    workdir = tmp_path / "preempted"
    cfg = config(checkpoint_every_steps=1000)  # no periodic checkpoint: the one found after the stop is its own
    proc = spawn(worker_command(workdir, cfg), worker_env())
    wait_for(logged_step(workdir, LOG_EVERY), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == PREEMPTED, err[-3000:]
    stopped = json.loads(out.strip().splitlines()[-1])["preempted_at"]
    assert f"stopped by SIGTERM at step {stopped}; checkpoint saved in" in out + err
    assert LOG_EVERY <= stopped < STEPS_PER_EPOCH, stopped
    assert checkpoint_steps(workdir) == [stopped]

    resumed = run_worker(workdir, cfg)
    assert resumed["resumed_from"] == stopped
    assert ref["ema_digest"] and any(r["split"] == "val_ema" for r in metric_rows(ref_dir))
    assert resumed["params_digest"] == ref["params_digest"] and resumed["ema_digest"] == ref["ema_digest"]
    assert metric_rows(workdir) == metric_rows(ref_dir)
