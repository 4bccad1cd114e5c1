"""A run killed with SIGKILL mid-epoch and started again ends bitwise identical to one that never stopped."""

import json
import signal
import subprocess
import time

from training_helpers import run_worker, tiny_config, worker_command, worker_env

KILL_AFTER_CHECKPOINT = 56  # 44 steps per epoch: the kill lands in the second epoch


def config():
    return tiny_config(num_epochs=3, checkpoint_every_steps=8, log_every_steps=4, augment="cifar")


def metric_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("images_per_second", None)  # wall-clock, the one field that may differ
    return rows


def test_sigkill_mid_epoch_then_restart_is_bitwise_identical(tmp_path):
    reference = run_worker(tmp_path / "reference", config())

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(worker_command(workdir, config()), env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    target = workdir / "checkpoints" / str(KILL_AFTER_CHECKPOINT)
    deadline = time.monotonic() + 600
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert KILL_AFTER_CHECKPOINT <= saved < 132 and saved % 44 != 0

    resumed = run_worker(workdir, config())
    assert resumed["step"] == reference["step"] == 132
    assert resumed["params_digest"] == reference["params_digest"]
    assert metric_rows(workdir) == metric_rows(tmp_path / "reference")
