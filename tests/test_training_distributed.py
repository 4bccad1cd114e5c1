"""Data parallelism gives the same training as one device: 1 vs 4 simulated devices, and 2 processes x 2
devices (``jax.distributed`` on 127.0.0.1) vs 1 process x 4 devices. Real processes throughout."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from training_helpers import run_worker, tiny_config, worker_command, worker_env

STEPS = 6


def config(**kw):
    # batch 32 over 4 devices: 8 images per device; BatchNorm statistics must still be over all 32
    return tiny_config(max_steps=STEPS, log_every_steps=1, checkpoint_every_steps=3, **kw)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("d4"), config(), devices=4)


@pytest.mark.multiprocess
def test_one_and_four_devices_give_the_same_losses(four_devices, tmp_path):
    one = run_worker(tmp_path / "d1", config(), devices=1)
    assert one["devices"] == 1 and four_devices["devices"] == 4
    assert len(one["losses"]) == STEPS
    np.testing.assert_allclose(four_devices["losses"], one["losses"], rtol=2e-4)


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_the_same_devices(four_devices, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        cfg = config(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
        procs.append(subprocess.Popen(worker_command(tmp_path / "mp", cfg), env=worker_env(2),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    result = json.loads(outs[0][0].strip().splitlines()[-1])
    assert result["devices"] == 4
    np.testing.assert_allclose(result["losses"], four_devices["losses"], rtol=2e-4)


@pytest.mark.multiprocess
def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
    proc = subprocess.run(worker_command(tmp_path / "bad", config(batch_size=30)), env=worker_env(4),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "batch_size 30 must be divisible by the number of devices (4)" in proc.stderr


AUTO_CHILD = """
import jax
from resnet_jax.parallel import initialize_distributed
started = initialize_distributed("auto")
print(started, jax.process_index(), jax.process_count(), len(jax.devices()), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.multiprocess
def test_auto_address_takes_the_processes_from_the_cluster_environment(tmp_path):
    """What `srun -n 2` gives each task (job id, node list, task count and rank): JAX's own SLURM detection
    finds the coordinator, so the same command runs unchanged on every task."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = worker_env(2)
    base.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2", SLURM_LOCALID="0",
                SLURM_STEP_NUM_NODES="1", JAX_COORDINATOR_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, "-c", AUTO_CHILD], env={**base, "SLURM_PROCID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = sorted(out.split() for out, _ in outs)
    assert lines == [["True", "0", "2", "4"], ["True", "1", "2", "4"]]


def test_auto_address_refuses_an_explicit_process_count():
    from resnet_jax.parallel import initialize_distributed

    with pytest.raises(ValueError, match="from the cluster"):
        initialize_distributed("auto", num_processes=2)
