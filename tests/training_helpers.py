"""Shared pieces of the training tests: a tiny but real config, and running training in a subprocess."""

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("train_worker.py"))


def tiny_config(**overrides):
    """ResNet-8 (one block per stage) on the real digits at 8x8: compiles in seconds, still learns."""
    from resnet_jax.training import base_config

    c = base_config()
    c.model = "resnet20"
    c.model_overrides.stage_sizes = (1, 1, 1)
    c.model_overrides.in_channels = 1
    c.dataset = "digits"
    c.image_size = 8
    c.batch_size = 32
    c.eval_batch_size = 100
    c.num_epochs = 2
    c.augment = "none"            # pad-4 crops would erase most of an 8x8 digit
    c.learning_rate = 1.6
    c.schedule = "cosine"
    c.log_every_steps = 4
    c.checkpoint_every_steps = 8
    c.progress_bar = False
    c.update(overrides)
    return c


def worker_env(devices: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def worker_command(workdir, config) -> list[str]:
    return [sys.executable, WORKER, str(workdir), json.dumps(config.to_dict())]


@contextlib.contextmanager
def process_groups():
    """``start(command, env)`` runs a command in its own process group, so a signal can reach one run and its
    data workers together (as a terminal's Ctrl-C or a scheduler's kill does) or one process of several.
    Whatever is still running when the block ends, passed or failed, is killed with its group."""
    started = []

    def start(command, env):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.fixture
def spawn():
    """``process_groups`` for one test."""
    with process_groups() as start:
        yield start


def once_per_session(tmp_path_factory, name, compute):
    """``compute(directory)`` (a JSON-able result) run once per test session, not once per pytest-xdist worker
    (each builds its own module fixtures): the first worker to ask computes under a file lock in the folder the
    workers share, the others wait for it and read the same result and files."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory, done = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            directory.mkdir(exist_ok=True)
            done.write_text(json.dumps(compute(directory)))
    return directory, json.loads(done.read_text())


def run_worker(workdir, config, devices: int | None = None, timeout: int = 600, extra_args=()) -> dict:
    proc = subprocess.run(worker_command(workdir, config) + list(extra_args), env=worker_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def snapshot(directory) -> dict[str, str]:
    """Every file and folder under ``directory`` with a checksum of its content: equal snapshots mean nothing
    was written, moved or deleted."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.rglob("*"))}


# JAX's monitoring events (jax 0.10.2). BACKEND_COMPILE times ``compiler.compile_or_get_cached``: it fires once
# for every executable JAX needs, compiled or read from the persistent compilation cache. CACHE_HIT fires, in
# addition, for those read from the cache.
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def count_compiles():
    """Counts the executables JAX builds inside the block, whether XLA compiles them or the persistent
    compilation cache (conftest.py gives the session one) supplies them: ``with count_compiles() as n:`` then
    ``n[0]`` (all of them) and ``n[1]`` (how many of those were cache hits).

    Why hits count: "nothing compiles" must mean that no program was built, also when an earlier test or process
    left the same program in the cache. Both events are counted, each under its name, because in jax 0.10.2 a hit
    fires both (counting them into one number would count a hit twice);
    ``test_count_compiles_counts_compilations_and_cache_hits`` fails if a jax version stops timing hits."""
    import jax.monitoring

    count = [0, 0]

    def durations(name, *_, **__):
        if name == BACKEND_COMPILE:
            count[0] += 1

    def events(name, *_, **__):
        if name == CACHE_HIT:
            count[1] += 1

    jax.monitoring.register_event_duration_secs_listener(durations)
    jax.monitoring.register_event_listener(events)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(durations)
        jax.monitoring.unregister_event_listener(events)


def direct_metrics(model, variables, source, mean, std) -> dict[str, float]:
    """Loss, top-1 and top-5 of one ``model.apply`` over every example of ``source``, in float64 numpy."""
    import numpy as np

    from resnet_jax import data

    images = np.stack([data.normalize(source[i]["image"], mean, std) for i in range(len(source))])
    labels = np.array([source[i]["label"] for i in range(len(source))])
    logits = np.asarray(model.apply(variables, images, train=False), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    rank = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1)
    return {"loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "accuracy": float((rank < 1).mean()), "top5": float((rank < 5).mean())}


def trained_like(variables, seed=0):
    """``conftest.random_batch_stats(variables, seed)``, under the name some tests import it by."""
    from conftest import random_batch_stats

    return random_batch_stats(variables, seed)
