"""Shared pieces of the training tests: a tiny but real config, and running training in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
    c.compilation_cache_dir = ""
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


def run_worker(workdir, config, devices: int | None = None, timeout: int = 600) -> dict:
    proc = subprocess.run(worker_command(workdir, config), env=worker_env(devices), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
