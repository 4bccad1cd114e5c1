"""Grain pipeline: same seed -> same batches, exact resume, disjoint covering shards, exact evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest

from resnet_jax import data


class IndexSource(data.Source):
    """Record i has label i and an image filled with i % 256, so batches reveal exactly which records they hold."""

    def __init__(self, n=50, shape=(8, 8, 3)):
        self.name, self.split, self.n = "index", "train", n
        self.num_classes, self.class_names, self.image_shape = n, [str(i) for i in range(n)], shape

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full(self.image_shape, i % 256, np.uint8), "label": int(i)}


STATS = dict(mean=(0.5,), std=(0.25,))


def take(iterator, k):
    return [next(iterator) for _ in range(k)]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[key], y[key]) for x, y in zip(a, b) for key in x)


def test_batches_have_the_contract_shapes_and_dtypes():
    src = data.get_source("digits", "train", image_size=16)
    batch = next(iter(data.train_loader(src, batch_size=8, image_size=12, augment="cifar", seed=0, channels=3,
                                        mean=(0.3,), std=(0.3,))))
    assert batch["image"].shape == (8, 12, 12, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert data.steps_per_epoch(len(src), 8) == len(src) // 8


@pytest.mark.parametrize("augment", ["cifar", "imagenet", "none"])
def test_same_seed_same_batches_other_seed_other_batches(augment):
    src = data.get_source("synthetic", "train", num_examples=40, image_shape=(20, 24, 3))
    run = lambda seed: take(iter(data.train_loader(src, batch_size=8, image_size=16, augment=augment, seed=seed)), 6)
    first, again, other = run(1), run(1), run(2)
    assert same(first, again)
    assert not same(first, other)


def test_each_epoch_is_a_new_permutation_of_the_split():
    src = IndexSource(40)
    batches = take(iter(data.train_loader(src, batch_size=10, image_size=8, seed=5, **STATS)), 8)
    epochs = [np.concatenate([b["label"] for b in batches[e * 4:(e + 1) * 4]]) for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])


def epoch_orders(seed, seeding, epochs=3, n=40):
    batches = take(iter(data.train_loader(IndexSource(n), batch_size=10, image_size=8, seed=seed,
                                          shuffle_seeding=seeding, **STATS)), epochs * n // 10)
    labels = np.concatenate([b["label"] for b in batches])
    return [tuple(labels[e * n:(e + 1) * n]) for e in range(epochs)]


def test_consecutive_seeds_shuffle_orders_of_their_own():
    """Grain shuffles epoch e with its seed + e: given the run's seed itself, seed 1 trained on seed 0's orders
    one epoch later (a sweep over seeds 0-7 saw shifted copies of one sequence). Every (seed, epoch) now has an
    order of its own; "offset", kept for runs saved before, still shows the overlap."""
    hashed = {seed: epoch_orders(seed, "hashed") for seed in range(4)}
    orders = [order for seed in hashed for order in hashed[seed]]
    assert len(set(orders)) == len(orders) == 12
    offset = {seed: epoch_orders(seed, "offset") for seed in (0, 1)}
    assert offset[1][:2] == offset[0][1:]
    assert data.pipeline.shuffle_seed(7, "offset") == 7
    with pytest.raises(ValueError, match=r"shuffle_seeding must be one of \('hashed', 'offset'\), not 'random'"):
        data.train_loader(IndexSource(40), batch_size=10, image_size=8, shuffle_seeding="random", **STATS)


def test_resume_from_saved_state_continues_the_same_stream():
    src = data.get_source("digits", "train", image_size=8)
    loader = lambda: data.train_loader(src, batch_size=16, image_size=8, augment="cifar", seed=3)
    uninterrupted = take(iter(loader()), 10)
    it = iter(loader())
    take(it, 4)
    state = it.get_state()
    resumed = iter(loader())
    resumed.set_state(state)
    assert same(take(resumed, 6), uninterrupted[4:])


def test_orbax_saves_and_restores_the_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    src = data.get_source("digits", "train", image_size=8)
    loader = lambda: data.train_loader(src, batch_size=16, image_size=8, augment="cifar", seed=3)
    uninterrupted = take(iter(loader()), 7)
    it = iter(loader())
    take(it, 3)
    with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    resumed = iter(loader())
    with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert same(take(resumed, 4), uninterrupted[3:])


@pytest.mark.parametrize("n,batch_size,count", [(48, 4, 2), (50, 6, 3), (7, 4, 4)])
def test_process_shards_are_disjoint_and_add_up_to_the_one_process_batches(n, batch_size, count):
    src = IndexSource(n)
    one = [b["label"] for b in data.train_loader(src, batch_size=batch_size, image_size=8, seed=0, num_epochs=2,
                                                 process_index=0, process_count=1, **STATS)]
    shards = [[b["label"] for b in data.train_loader(src, batch_size=batch_size, image_size=8, seed=0,
                                                     num_epochs=2, process_index=p, process_count=count, **STATS)]
              for p in range(count)]
    assert all(len(s) == len(one) for s in shards)
    for step, labels in enumerate(one):  # global step k: the processes' local batches, in process order
        assert np.concatenate([s[step] for s in shards]).tolist() == labels.tolist()
    first_epoch = [np.concatenate(s[:n // batch_size]).tolist() for s in shards]
    seen = [set(labels) for labels in first_epoch]
    assert sum(map(len, first_epoch)) == len(set().union(*seen)) == n // batch_size * batch_size


@pytest.mark.parametrize("n,batch_size,count", [(50, 8, 1), (50, 8, 2), (7, 4, 4), (3, 6, 3), (64, 16, 2)])
def test_evaluation_sees_each_example_exactly_once(n, batch_size, count):
    src = IndexSource(n)
    lengths, labels = set(), []
    for p in range(count):
        loader = data.eval_loader(src, batch_size=batch_size, image_size=8, process_index=p, process_count=count,
                                  **STATS)
        batches = list(loader)
        lengths.add(len(batches))
        assert len(batches) == len(loader) and all(b["mask"].shape == (batch_size // count,) for b in batches)
        labels += [lab for b in batches for lab in b["label"][b["mask"]].tolist()]
    assert len(lengths) == 1
    assert sorted(labels) == list(range(n))


def test_evaluation_is_reiterable_and_unaugmented():
    src = data.get_source("digits", "validation")
    loader = data.eval_loader(src, batch_size=64, image_size=32, channels=3)
    first, second = list(loader), list(loader)
    assert same(first, second) and len(first) == 6
    assert first[0]["image"].shape == (64, 32, 32, 3)
    assert not first[-1]["mask"][-1] and first[-1]["mask"].sum() == 360 - 5 * 64


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=10, process_count=3, process_index=0), "multiple of the number of processes"),
    (dict(batch_size=8, process_count=2, process_index=2), "process_index must be in"),
    (dict(batch_size=8, num_classes=5), "create the model with num_classes=10"),
    (dict(batch_size=8, channels=4), "only greyscale <-> RGB"),
    (dict(batch_size=8, augment="autoaugment"), "augment must be one of"),
    (dict(batch_size=4096), "larger than the dataset"),
    (dict(batch_size=8, mean=(0.1, 0.2, 0.3), std=(0.2, 0.2, 0.2)), "batches have 1 channels"),
    # each was taken: mean alone normalised by the dataset's mean and std, std 0 gave infinite batches, 2.5
    # repeats ran as 2, True as an erasing probability of 1, a crop fraction above 1 failed in Pillow's words
    (dict(batch_size=8, mean=(0.0,)), r"^mean= was given without std=; give both"),
    (dict(batch_size=8, std=(1.0,)), r"^std= was given without mean=; give both"),
    (dict(batch_size=8, mean=(0.1,), std=(0.0,)), "std positive"),
    (dict(batch_size=8, ra_reps=2.5), "ra_reps must be a whole number"),
    (dict(batch_size=8, random_erasing=True), "random_erasing is a probability"),
    (dict(batch_size=8, crop_fraction=1.5), r"crop_fraction is the share of the shorter side kept, in \(0, 1\]"),
    # RGB statistics for a one-channel model (the digits config on photos): the fix is in the model, say so
    (dict(batch_size=8, channels=1, mean=(0.1, 0.2, 0.3), std=(0.2, 0.2, 0.2), source="synthetic"),
     r"'synthetic' has 3, the model takes 1 \(its in_channels; config.model_overrides.in_channels"),
])
def test_misfits_fail_before_any_batch(kwargs, match):
    src = data.get_source(kwargs.pop("source", "digits"), "train")
    with pytest.raises(ValueError, match=match):
        data.train_loader(src, image_size=32, seed=0, **{"augment": "none", **kwargs})


@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_an_image_size_of_zero_is_refused(source):
    """0 was read as "unset" and gave 32 px images."""
    with pytest.raises(ValueError, match="image_size must be a positive number of pixels, not 0"):
        data.get_source(source, "train", image_size=0)


def test_unknown_stats_ask_for_mean_and_std():
    with pytest.raises(ValueError, match="pass mean= and std="):
        data.eval_loader(IndexSource(), batch_size=4, image_size=8)


@pytest.mark.long  # worker processes
@pytest.mark.slow
@pytest.mark.multiprocess
def test_worker_processes_give_the_same_batches_and_resume_exactly():
    src = data.get_source("digits", "train", image_size=8)
    loader = lambda workers: data.train_loader(src, batch_size=16, image_size=8, augment="cifar", seed=3,
                                               worker_count=workers)
    in_process = take(iter(loader(0)), 8)
    it = iter(loader(2))
    assert same(take(it, 5), in_process[:5])
    state = it.get_state()
    resumed = iter(loader(2))
    resumed.set_state(state)
    assert same(take(resumed, 3), in_process[5:])


CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from resnet_jax import data
from test_data_pipeline import IndexSource, STATS
p, count = int(sys.argv[1]), int(sys.argv[2])
src = IndexSource(101)
train = iter(data.train_loader(src, batch_size=4, image_size=8, seed=9, num_epochs=1, process_index=p,
                               process_count=count, **STATS))
ev = data.eval_loader(src, batch_size=6, image_size=8, process_index=p, process_count=count, **STATS)
print(json.dumps({{"train": [int(x) for b in train for x in b["label"]],
                  "eval": [int(x) for b in ev for x in b["label"][b["mask"]]], "eval_batches": len(list(ev))}}))
"""


@pytest.mark.multiprocess
def test_two_processes_read_disjoint_shards_and_evaluate_everything_once():
    code = CHILD.format(tests=str(Path(__file__).parent))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(p), "2"], stdout=subprocess.PIPE, text=True)
             for p in range(2)]
    outs = [json.loads(proc.communicate(timeout=120)[0].strip().splitlines()[-1]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    train = [set(o["train"]) for o in outs]
    # One epoch of 101 examples over 2 processes: 50 each (one left out so both run 25 steps), disjoint.
    assert not train[0] & train[1] and len(outs[0]["train"]) == len(outs[1]["train"]) == len(train[0]) == 50
    assert outs[0]["eval_batches"] == outs[1]["eval_batches"]
    assert sorted(outs[0]["eval"] + outs[1]["eval"]) == list(range(101))


def test_worker_processes_share_the_cores_for_the_batches_they_hold_ahead(monkeypatch):
    """Each read thread holds one batch ahead: 16 threads in each of 16 workers held ~33 batches per worker (the
    V2 recipe's 1024 images at 176 px: ~200 GB); with workers the cores are split among them."""
    from resnet_jax.data.pipeline import _read_options

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert _read_options(None, 0).num_threads == 16  # in-process: one per core, as before
    for workers in (2, 16):
        options = _read_options(None, workers)
        assert options.num_threads * workers == 16 and options.prefetch_buffer_size == max(2, 16 // workers)
    assert _read_options(3, 16).num_threads == 3  # as given


WORKERS_THEN_WAIT = """
import sys, time
from resnet_jax import data
src = data.get_source("digits", "train", image_size=8)
it = iter(data.train_loader(src, batch_size=16, image_size=8, augment="cifar", worker_count=2))
next(it)
print("running", flush=True)
time.sleep(600)
"""


@pytest.mark.long  # worker processes
@pytest.mark.multiprocess
def test_worker_processes_end_when_the_training_process_is_killed():
    """SIGKILL or the OOM killer runs no clean-up: Grain's workers (with their file lists and batches) lived on
    for good; like PyTorch's DataLoader workers, they now end with their parent."""
    import os
    import signal

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", WORKERS_THEN_WAIT], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    workers = []
    try:
        assert proc.stdout.readline().strip() == "running"
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) >= 2, [p.cmdline() for p in workers]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=90)  # one may still be importing JAX (a loaded CI)
        assert not alive, f"{len(alive)} worker(s) still running 90 s after their parent was killed"
    finally:
        proc.kill()
        for p in workers:
            if p.is_running():
                p.kill()
