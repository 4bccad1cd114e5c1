"""``StopOnSignal`` with real signals, in a child process (a test runner's worker may not own the main thread, and a
stray SIGTERM must not reach it). The end-to-end behaviour, a stopped run that saves and resumes bitwise, is in
test_training_resume.py and, across processes, test_training_distributed.py."""

import json
import subprocess
import sys

import pytest

from conftest import run_python
from training_helpers import worker_env

pytestmark = pytest.mark.long  # training runs interrupted by signals, in process groups

CHILD = """
import json, os, signal, time
from resnet_jax.parallel import make_mesh
from resnet_jax.training.preemption import StopOnSignal

# Ctrl-C as in a terminal, whatever this process inherited (a runner started with nohup or in the background
# passes SIGINT on ignored, and then the second Ctrl-C's "default action" is to ignore it too).
signal.signal(signal.SIGINT, signal.default_int_handler)
report = {}
before = signal.getsignal(signal.SIGTERM)
with StopOnSignal(make_mesh()) as stop:
    report["before_signal"] = stop.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # Python runs the handler between bytecodes
    report["after_signal"] = stop.requested()
    report["received"] = stop.received
report["handler_restored"] = signal.getsignal(signal.SIGTERM) is before
try:
    with StopOnSignal(make_mesh()) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        report["first_ctrl_c_requests_a_stop"] = stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        report["second_ctrl_c"] = "ignored"
except KeyboardInterrupt:
    report["second_ctrl_c"] = "KeyboardInterrupt"
print(json.dumps(report))
"""


def test_a_signal_requests_a_stop_and_a_second_one_acts_at_once():
    proc = run_python(CHILD, env=worker_env())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "before_signal": False, "after_signal": True, "received": "SIGTERM", "handler_restored": True,
        "first_ctrl_c_requests_a_stop": True, "second_ctrl_c": "KeyboardInterrupt"}


def test_ctrl_c_to_the_process_group_stops_cleanly_with_worker_processes(tmp_path):
    """Ctrl-C reaches every process of the terminal's group: the run saves and exits 75, and the Grain workers
    leave the signal to it (no worker tracebacks)."""
    import os
    import signal

    command = [sys.executable, "-m", "train", f"--workdir={tmp_path / 'run'}", "--config.num_workers=2",
               "--config.progress_bar=False", "--config.num_epochs=50"]
    proc = subprocess.Popen(command, env={**worker_env(), "RESNET_JAX_TCMALLOC": "0"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        for line in proc.stdout:  # signal once the workers have fed a whole epoch
            seen.append(line)
            if line.startswith("epoch 2/"):
                break
        os.killpg(proc.pid, signal.SIGINT)
        output = "".join(seen) + proc.stdout.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, output[-3000:]
    assert "stopped by SIGINT" in output and "checkpoint saved" in output
    assert "KeyboardInterrupt" not in output, output[-3000:]


STARTUP = """
import os, signal, sys, time
sys.path.insert(0, "tests")
from training_helpers import tiny_config
from resnet_jax.training import Preempted, train

workdir, when, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])

def log(line):
    print(line, flush=True)
    if line.startswith(when):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)

try:
    train(tiny_config(max_steps=steps, checkpoint_every_steps=2), workdir, log=log)
except Preempted as stopped:
    print("PREEMPTED", stopped.exit_code, stopped)
"""


def test_a_signal_during_start_up_stops_with_the_preemption_exit_not_a_kill(tmp_path):
    """The handlers were installed only when the loop began: a SIGTERM while the run opened its data, restored
    or compiled (minutes on ImageNet) killed the process silently with 143, which a job script that requeues on
    75 took for a failure. It now stops at the next point where nothing is half-done, with 75's message."""
    workdir = tmp_path / "run"
    first = run_python(STARTUP, args=[workdir, "resnet20 on", 4], env=worker_env(), timeout=600)
    assert ("PREEMPTED 75 stopped by SIGTERM before it started; nothing was written; run the same command again to "
            "resume (exit code 75)") in first.stdout, first.stdout[-3000:]
    assert not workdir.exists()
    run_python(STARTUP, args=[workdir, "never", 4], env=worker_env(), timeout=600)  # a run to resume
    resumed = run_python(STARTUP, args=[workdir, "resumed from the checkpoint", 8], env=worker_env(), timeout=600)
    assert ("PREEMPTED 75 stopped by SIGTERM before its first step; its checkpoints are as they were (step 4)"
            in resumed.stdout), resumed.stdout[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
