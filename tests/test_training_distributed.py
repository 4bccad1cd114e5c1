"""Data parallelism gives the same training as one device: 1 vs 4 simulated devices, and 2 processes x 2
devices (``jax.distributed`` on 127.0.0.1) vs 1 process x 4 devices; the processes of a run stop together on a
signal and resume exactly. Real processes and real signals throughout."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax.traverse_util import unflatten_dict

from conftest import run_python
from resnet_jax.checkpoint import ConfigMismatch
from resnet_jax.training import train
from training_helpers import (direct_metrics, once_per_session, process_groups, run_worker, snapshot,  # noqa: F401
                              spawn, tiny_config, worker_command, worker_env)

pytestmark = pytest.mark.long  # multi-process training runs on 127.0.0.1

STEPS = 6  # device layouts are compared over the first steps (see the 2 x 2 vs 1 x 4 test for why)
PREEMPTED = 75


def config(**kw):
    # batch 32 over 4 devices: 8 images per device; BatchNorm statistics must still be over all 32. The run
    # ends mid-epoch, so it ends with an evaluation of the validation split.
    return tiny_config(**{"max_steps": STEPS, "log_every_steps": 1, "checkpoint_every_steps": 3, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(spawn, workdir, npz=None, **kw):
    """The two processes of one run (2 devices each), each in its own process group so a signal can reach one."""
    port = free_port()
    procs = []
    for pid in range(2):
        cfg = config(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid, **kw)
        command = worker_command(workdir, cfg) + ([str(npz)] if npz and pid == 0 else [])
        procs.append(spawn(command, worker_env(2)))
    return procs


def finish(procs, expected_code=0):
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == expected_code, err[-4000:]
    return [last_json(out) for out, _ in outs]


def last_json(out: str) -> dict | None:
    """The worker's JSON line (Gloo, the CPU collectives, prints its own lines on stdout too)."""
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def val_rows(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "accuracy", "top5")} for r in rows if r["split"] == "val"]


def load_variables_npz(path):
    with np.load(path) as f:
        return unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """1 process x 4 devices: (workdir, worker result, final variables .npz)."""
    def compute(directory):
        return run_worker(directory / "run", config(), devices=4, extra_args=[str(directory / "variables.npz")])

    directory, result = once_per_session(tmp_path_factory, "four-devices", compute)
    return directory / "run", result, directory / "variables.npz"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 processes x 2 devices: (workdir, process 0's result, final variables .npz)."""
    def compute(directory):
        with process_groups() as start:
            return finish(start_processes(start, directory / "run", directory / "variables.npz"))[0]

    directory, result = once_per_session(tmp_path_factory, "two-processes", compute)
    return directory / "run", result, directory / "variables.npz"


@pytest.mark.multiprocess
def test_one_and_four_devices_give_the_same_losses(four_devices, tmp_path):
    one = run_worker(tmp_path / "d1", config(), devices=1)
    _, four, _ = four_devices
    assert one["devices"] == 1 and four["devices"] == 4
    assert len(one["losses"]) == STEPS
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=2e-4)


@pytest.mark.multiprocess
def test_a_run_resumes_on_another_number_of_devices(tmp_path):
    """README: "The number of devices may change". Half the steps on 4 devices, the rest on 1 (the checkpoint
    at step 3 restored onto one device, the data position with it) ends as a 1-device run that never stopped,
    to float32 rounding (the gradient's all-reduce sums in another order: see the 2 x 2 test for the bound). A
    constant rate: the cosine's length follows max_steps, which the two halves set differently."""
    # conv_impl "onednn": the same kernels whatever the per-device batch ("auto" picks by it, and on an AVX2 CPU
    # the 8-image and 32-image choices differed enough to move step 6's loss by 1.5e-3)
    constant = {"schedule": "constant", "learning_rate": 0.4,
                "model_overrides": {"stage_sizes": (1, 1, 1), "in_channels": 1, "conv_impl": "onednn"}}
    workdir = tmp_path / "run"
    first = run_worker(workdir, config(max_steps=STEPS // 2, **constant), devices=4)
    assert first["devices"] == 4 and first["step"] == STEPS // 2
    resumed = run_worker(workdir, config(**constant), devices=1, extra_args=[str(tmp_path / "resumed.npz")])
    assert resumed["devices"] == 1 and resumed["resumed_from"] == STEPS // 2 and resumed["step"] == STEPS
    whole = run_worker(tmp_path / "whole", config(**constant), devices=1, extra_args=[str(tmp_path / "whole.npz")])
    np.testing.assert_allclose(resumed["losses"], whole["losses"], rtol=1e-4)  # a lost data position: 5e-2
    ones, wholes = np.load(tmp_path / "resumed.npz"), np.load(tmp_path / "whole.npz")
    assert sorted(ones.files) == sorted(wholes.files)
    for name in wholes.files:
        np.testing.assert_allclose(ones[name], wholes[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_the_same_devices(four_devices, two_processes):
    """Same batches, same devices, same programs. Only the gradient all-reduce differs (Gloo across processes,
    XLA's own within one), summing in another order, so results agree to float32 rounding rather than bit for
    bit. Training this small model amplifies rounding step after step (losses 1e-7 apart over the first steps,
    1e-3 by step 15), so the layouts are compared after 6 steps, where a real fault (a wrong data shard,
    per-process BatchNorm statistics, unaveraged gradients) shows at 1e-2 or more."""
    one_dir, one, one_npz = four_devices
    two_dir, two, two_npz = two_processes
    assert two["devices"] == 4
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    ones, twos = np.load(one_npz), np.load(two_npz)
    assert sorted(ones.files) == sorted(twos.files)
    for name in ones.files:  # parameters and BatchNorm statistics
        np.testing.assert_allclose(twos[name], ones[name], rtol=1e-4, atol=1e-5, err_msg=name)
    one_val, two_val = val_rows(one_dir), val_rows(two_dir)
    assert [r["step"] for r in two_val] == [r["step"] for r in one_val] == [STEPS]
    assert two_val[0] == pytest.approx(one_val[0], rel=1e-5)


@pytest.mark.multiprocess
def test_evaluation_over_devices_and_processes_counts_every_example_once(four_devices, two_processes):
    """The last validation row of each run against its final variables applied directly to the whole split."""
    from resnet_jax import data
    from resnet_jax.training.config import model_from_config, normalization_stats, validate

    cfg = validate(config())
    model = model_from_config(cfg, 10)
    source = data.get_source("digits", "validation", image_size=8)
    mean, std = normalization_stats(cfg)
    for workdir, _, npz in (four_devices, two_processes):
        expected = direct_metrics(model, load_variables_npz(npz), source, mean, std)
        got = val_rows(workdir)[-1]
        assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-5), workdir


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step_and_they_resume_exactly(tmp_path, spawn):
    """SIGINT (Ctrl-C) reaches process 1 only; process 0 learns of it through the per-step agreement. Both save
    one checkpoint, exit with the preemption code, and a restart of both ends bitwise where an uninterrupted
    two-process run ends: a multi-process save and resume."""
    long = dict(max_steps=16, checkpoint_every_steps=4)
    uninterrupted = finish(start_processes(spawn, tmp_path / "uninterrupted", **long))[0]
    workdir = tmp_path / "mp"
    procs = start_processes(spawn, workdir, **long)
    deadline = time.monotonic() + 600
    while not (workdir / "checkpoints" / "4").exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
        time.sleep(0.02)
    assert all(p.poll() is None for p in procs), "the run ended before it could be interrupted"
    assert (workdir / "checkpoints" / "4").exists(), "the run did not get there within 10 minutes"
    os.killpg(procs[1].pid, signal.SIGINT)
    stops = finish(procs, expected_code=PREEMPTED)
    assert stops[0]["preempted_at"] == stops[1]["preempted_at"]
    stopped = stops[0]["preempted_at"]
    assert 4 <= stopped < 16
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == stopped

    before = snapshot(workdir)  # one process (this one) cannot take over: each process saved its own data position
    with pytest.raises(ConfigMismatch, match=r"was written by 2 process\(es\) and this run has 1"):
        train(config(**long), workdir)
    assert snapshot(workdir) == before

    resumed = finish(start_processes(spawn, workdir, **long))[0]
    assert resumed["resumed_from"] == stopped
    assert resumed["params_digest"] == uninterrupted["params_digest"]


NOT_DIVISIBLE_CHILD = """
import json, sys
import ml_collections
sys.path.insert(0, sys.argv[3])
from resnet_jax.training import train
from training_helpers import count_compiles

report = {}
for key, values in json.loads(sys.argv[1]).items():
    with count_compiles() as compiles:
        try:
            train(ml_collections.ConfigDict(values), sys.argv[2] + "/" + key)
            report[key] = "trained"
        except ValueError as err:
            report[key] = str(err)
    report[key + " compiles"] = compiles[0]
print(json.dumps(report))
"""


@pytest.mark.multiprocess
def test_a_batch_not_divisible_by_devices_fails_before_compiling_with_nothing_written(tmp_path):
    """batch_size, then eval_batch_size, 30 on 4 devices: one 4-device process tries both."""
    keys = ("batch_size", "eval_batch_size")
    configs = {key: config(**{key: 30}).to_dict() for key in keys}
    # micro-batches of 10 on 4 devices: the hint named a micro-batch size (which no setting takes), 9 then 2
    configs["accumulated"] = config(batch_size=40, grad_accum_steps=4).to_dict()
    proc = run_python(NOT_DIVISIBLE_CHILD, args=[json.dumps(configs), tmp_path, Path(__file__).parent],
                      env=worker_env(4))
    report = json.loads(proc.stdout.splitlines()[-1])
    for key in keys:
        assert (f"{key} 30 must split evenly over the devices (4) and processes (1): a multiple of 4; try "
                f"{key}=28") in report[key], report
        assert report[f"{key} compiles"] == 0
    assert ("batch_size 40 in 4 micro-batches (grad_accum_steps) must split evenly over the devices (4) and "
            "processes (1): a multiple of 16; try batch_size=32") in report["accumulated"], report
    assert report["accumulated compiles"] == 0
    assert not any(tmp_path.iterdir())


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
    port = free_port()
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


@pytest.mark.parametrize("count, index", [(1, 5), (2, 2), (2, -1), (0, 0)])
def test_an_impossible_process_id_is_refused_before_anything_starts(count, index):
    """Used to be: with a count of 1 the id was ignored (process 5 of 1 trained alone: a launcher that gave every
    host the count 1 started N separate runs), and the others reached jax's own message."""
    from resnet_jax.parallel import initialize_distributed

    with pytest.raises(ValueError, match=rf"^process id {index} of {count} processes is impossible"):
        initialize_distributed("127.0.0.1:1", count, index)


def test_one_process_of_one_needs_nothing_else(monkeypatch):
    """RESNET_JAX_NUM_PROCESSES=1 alone asked for a coordinator address and a process id, which one process
    does not use."""
    from resnet_jax.parallel import initialize_distributed

    monkeypatch.setenv("RESNET_JAX_NUM_PROCESSES", "1")
    assert initialize_distributed() is False
    assert initialize_distributed(num_processes=1, process_id=0) is False


def test_a_process_count_that_is_not_a_number_names_its_variable(monkeypatch):
    """int()'s own message ("invalid literal for int() with base 10: 'abc'") named neither the variable nor its
    use."""
    from resnet_jax.parallel import initialize_distributed

    monkeypatch.setenv("RESNET_JAX_NUM_PROCESSES", "abc")
    with pytest.raises(ValueError, match=r"^the environment variable RESNET_JAX_NUM_PROCESSES='abc' must be a whole"):
        initialize_distributed()


def run_both(spawn, workdirs, **kw):
    """Both processes of one run, process i in ``workdirs[i]`` with the settings ``kw[key][i]``; (returncode,
    stderr) of each."""
    port = free_port()
    procs = []
    for pid in range(2):
        cfg = config(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                     **{key: values[pid] for key, values in kw.items()})
        procs.append(spawn(worker_command(workdirs[pid], cfg), worker_env(1)))
    return [(p.returncode, err) for p, (_, err) in ((p, p.communicate(timeout=300)) for p in procs)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("key, values, named", [("seed", [0, 1], "seed: 0 -> 1"),
                                                ("restart", [False, True], "restart: false -> true")])
def test_processes_given_different_settings_refuse_to_start_and_write_nothing(tmp_path, spawn, key, values, named):
    """A replicated state assumes one config: with another seed a process would train other weights, silently
    (process 0's copy alone is checkpointed). Both processes refuse, naming the setting, also one the workdir
    comparison leaves out (restart: only process 0 would move the old run aside)."""
    results = run_both(spawn, [tmp_path / "run"] * 2, **{key: values})
    for code, err in results:
        assert code != 0 and f"different settings from process 0's (process 1: {named})" in err, err[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_a_process_whose_config_is_refused_stops_the_others_with_its_reason(tmp_path, spawn):
    """Process 1's config failed validation and it exited without joining: process 0 waited for it until JAX's
    five-minute timeout aborted it with a C++ trace. Process 1 now joins to hand over its reason, and both stop."""
    start = time.monotonic()
    results = run_both(spawn, [tmp_path / "run"] * 2, max_steps=[STEPS, 0])
    assert time.monotonic() - start < 120
    (code0, err0), (code1, err1) = results
    assert code1 != 0 and "config.max_steps must be positive" in err1, err1[-3000:]
    assert code0 != 0 and ("a process of this run refused its config (process 1: ValueError: config.max_steps must "
                           "be positive") in err0, err0[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_a_command_line_mistake_in_one_process_stops_the_others_with_it(tmp_path, spawn):
    """``python -m train`` itself, one process's command line misspelt: it exited 2 before joining, and the other
    waited for it until JAX's timeout. It now says its error, joins only to hand it over, and both stop."""
    port = free_port()
    run = [sys.executable, "-m", "train", f"--workdir={tmp_path / 'run'}", "--config.max_steps=2",
           f"--config.coordinator_address=127.0.0.1:{port}", "--config.num_processes=2"]
    start = time.monotonic()
    procs = [spawn(run + ["--config.process_id=0"], worker_env(1)),
             spawn(run + ["--config.process_id", "1", "--config.lerning_rate=0.1"], worker_env(1))]
    err0, err1 = [p.communicate(timeout=300)[1] for p in procs]
    code0, code1 = [p.returncode for p in procs]
    assert time.monotonic() - start < 120
    assert code1 == 2 and err1.startswith("error: --config.lerning_rate=0.1 sets config.lerning_rate, which is "
                                          "not a config key; did you mean 'learning_rate'?"), err1[-3000:]
    assert code0 == 1 and ("a process of this run refused its config (process 1: its command line: "
                           "--config.lerning_rate=0.1 sets") in err0, err0[-3000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("leftover", [False, True])
def test_a_workdir_not_shared_by_the_processes_is_refused_before_anything_is_saved(tmp_path, spawn, leftover):
    """Two hosts with local disks: Orbax's first save would wait in a barrier for minutes and leave nothing. With
    an old file in one host's directory only, that host's own workdir check must not run first (it refused
    alone while the other waited in a barrier: both hung)."""
    if leftover:
        (tmp_path / "host1").mkdir()
        (tmp_path / "host1" / "metrics.jsonl").write_text("")
    results = run_both(spawn, [tmp_path / "host0", tmp_path / "host1"], seed=[0, 0])
    for code, err in results:
        assert code != 0 and "is not one directory that all processes share: process(es) 1 do not see" in err, \
            err[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == (["host1"] if leftover else [])


DISTRIBUTED_TWICE_CHILD = """
import json, sys
import jax, jax.numpy as jnp
from resnet_jax.parallel import initialize_distributed
address, pid = sys.argv[1], int(sys.argv[2])
if pid < 0:  # a single-process computation first: too late to join
    jnp.ones(2).block_until_ready()
    try:
        initialize_distributed(address, 2, 0)
    except ValueError as err:
        print(json.dumps({"late": str(err)}), flush=True)
    sys.exit()
report = {"first": initialize_distributed(address, 2, pid), "second": initialize_distributed(address, 2, pid)}
try:
    initialize_distributed(address, 3, pid)
except ValueError as err:
    report["other count"] = str(err)
report["processes"] = jax.process_count()
print(json.dumps(report), flush=True)
jax.distributed.shutdown()
"""


@pytest.mark.multiprocess
def test_joining_twice_in_one_program_and_joining_too_late(tmp_path):
    """A second train() in the same script (a sweep) finds the processes joined; a program that computed
    before joining gets one sentence."""
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", DISTRIBUTED_TWICE_CHILD, address, str(pid)], env=worker_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1, -1)]
    outs = [p.communicate(timeout=120) for p in procs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for report in reports[:2]:
        assert report["first"] and report["second"] and report["processes"] == 2
        assert "already runs as process" in report["other count"]
    assert "must start before the program's first JAX computation" in reports[2]["late"]


PORT_TAKEN_CHILD = """
import socket, sys
from resnet_jax.parallel import initialize_distributed
holder = socket.socket()
holder.bind(("127.0.0.1", 0))
holder.listen()
port = holder.getsockname()[1]
try:
    initialize_distributed(f"127.0.0.1:{port}", 2, 0)
except ValueError as err:
    print(err)
"""


def test_a_coordinator_port_already_taken_is_said_not_crashed_on():
    """Process 0's coordinator service listens on the address's port; where another program holds it, jax 0.10's
    service ends the process with SIGSEGV. The run says which port is taken instead, and the process lives on."""
    proc = run_python(PORT_TAKEN_CHILD, timeout=120)
    assert "is already in use on this host" in proc.stdout and "choose a free port" in proc.stdout


@pytest.mark.multiprocess
def test_a_checkpoint_damaged_in_one_processs_part_is_skipped_by_both(two_processes, tmp_path, spawn):
    """Process 1's data position in the newest checkpoint is truncated (a crash mid-copy on one host). Process 0
    reads its own part fine; both must still agree that the checkpoint is damaged and resume from the one before
    it together (they had gone separate ways: one restored, the other fell back, and both failed in barriers)."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(two_processes[0], workdir)
    newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    (workdir / "checkpoints" / str(newest) / "data" / "process_1-of-2.json").write_text('{\n    "next_in')
    results = finish(start_processes(spawn, workdir, max_steps=STEPS + 3))
    assert results[0]["resumed_from"] == newest - 3 and results[0]["step"] == STEPS + 3
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_damaged").iterdir()] == [str(newest)]


AGREED_CHILD = """
import json, sys
from resnet_jax.parallel import initialize_distributed
from resnet_jax.training.workdir import agreed
address, pid = sys.argv[1], int(sys.argv[2])
initialize_distributed(address, 2, pid)

def differing_copies():
    return "source", {"files": 8 + pid, "sha256": "ab"[pid] * 64}

def missing_on_one_host():
    if pid == 1:
        raise ValueError("image folder '/data/photos' does not exist")
    return "source", None

def any_error_on_one_host():  # e.g. TFDS's DownloadError, which is no ValueError: the other process waited
    if pid == 0:
        raise RuntimeError("download failed")
    return "source", None

report = {"same": agreed(lambda: ("source", {"files": 8}))[0]}
for name, build in (("differ", differing_copies), ("missing", missing_on_one_host), ("other", any_error_on_one_host)):
    try:
        agreed(build)
    except ValueError as err:
        report[name] = str(err)
print(json.dumps(report), flush=True)
"""


@pytest.mark.multiprocess
def test_processes_that_see_other_data_refuse_together():
    """Each host reads its own copy of a folder. A copy that differs (an rsync cut short) trained inconsistent
    shards, and a folder missing on one host raised there while the other waited for JAX's timeout; now both
    processes raise, naming the process."""
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", AGREED_CHILD, address, str(pid)], env=worker_env(1),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    for out, err in outs:
        report = json.loads(out.strip().splitlines()[-1])
        assert report["same"] == "source"
        assert report["differ"].startswith("the processes see other images than process 0 (process(es) "
                                           '1: {"files": 9, "sha256": "bbbb')
        assert report["missing"] == ("the data could not be opened on every process (process 1: ValueError: image "
                                     "folder '/data/photos' does not exist)")
        assert report["other"] == "the data could not be opened on every process (process 0: RuntimeError: download failed)"
