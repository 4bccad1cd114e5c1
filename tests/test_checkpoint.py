"""The checkpoint module with real Orbax on disk: which step "best" means, that keep-last-N keeps it, and that a
damaged checkpoint or saved model is one clear error from ``load_variables`` that changes nothing."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from resnet_jax.checkpoint import Checkpointer, CheckpointError, load_variables

ACCURACIES = {1: 0.30, 2: 0.90, 3: 0.50, 4: 0.20, 5: 0.60}  # the best, step 2, is not among the last two


def arrays(step):
    """A state whose every value is its step, so a restored state tells which checkpoint it came from."""
    return {"params": {"fc": {"kernel": jnp.full((2, 3), float(step))}},
            "batch_stats": {"bn": {"mean": jnp.full((3,), float(step))}}, "step": jnp.asarray(step)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Steps 1-3 in one session, 4-6 in a second one (a resumed run), keeping the last two plus the best."""
    workdir = tmp_path_factory.mktemp("run")
    for steps in ((1, 2, 3), (4, 5, 6)):
        checkpoints = Checkpointer(workdir / "checkpoints", keep=2)
        for step in steps:
            checkpoints.save(step, arrays(step), None, {"class_names": ["a", "b", "c"]}, {"model": "m"},
                             ACCURACIES.get(step))  # step 6: saved without an evaluation
        checkpoints.close()
    return workdir


def test_keep_last_n_also_keeps_the_best_across_sessions(workdir):
    checkpoints = Checkpointer(workdir / "checkpoints", keep=2)
    try:
        assert checkpoints.steps() == [2, 5, 6]
        assert checkpoints.best_step() == 2
        assert [checkpoints.val_accuracy(s) for s in (2, 5, 6)] == [0.90, 0.60, None]  # 6: not evaluated
    finally:
        checkpoints.close()


def test_step_best_loads_the_best_checkpoint_and_a_number_that_one(workdir):
    _, best, names = load_variables(workdir, "best")
    np.testing.assert_array_equal(best["params"]["fc"]["kernel"], 2.0)
    np.testing.assert_array_equal(best["batch_stats"]["bn"]["mean"], 2.0)
    assert names == ["a", "b", "c"]
    _, latest, _ = load_variables(workdir)
    np.testing.assert_array_equal(latest["params"]["fc"]["kernel"], 6.0)
    _, fifth, _ = load_variables(workdir, "5")
    np.testing.assert_array_equal(fifth["params"]["fc"]["kernel"], 5.0)


def test_best_of_a_run_never_evaluated_is_a_clear_error(tmp_path):
    """It loaded the latest instead, unsaid (train.init_from_step="best" then logged "the best checkpoint")."""
    checkpoints = Checkpointer(tmp_path / "checkpoints", keep=2)
    for step in (1, 2):
        checkpoints.save(step, arrays(step), None, {"class_names": ["a", "b", "c"]}, {"model": "m"}, None)
    checkpoints.close()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* was saved with an evaluation, so none is the "
                                              r"best; leave the step out for the latest \(2\), or give one of "
                                              r"the steps \[1, 2\]"):
        load_variables(tmp_path, "best")


def test_a_step_that_was_not_kept_is_a_clear_error(workdir):
    with pytest.raises(CheckpointError, match=r"no checkpoint at step 3 .* it has steps \[2, 5, 6\]"):
        load_variables(workdir, 3)


def test_reading_a_directory_without_checkpoints_changes_nothing(tmp_path):
    """Orbax's manager creates the directory it opens: a failed read (train.predict/evaluate/export pointed at the
    wrong place) left an empty checkpoints/ behind, which then hid a saved model there from the next load."""
    from resnet_jax.checkpoint import save_variables

    with pytest.raises(CheckpointError, match="no checkpoint in .*checkpoints: train first"):
        load_variables(tmp_path)
    assert list(tmp_path.iterdir()) == []
    save_variables(tmp_path, {k: v for k, v in arrays(7).items() if k != "step"}, {"model": "m"}, ["a", "b", "c"])
    (tmp_path / "checkpoints").mkdir()  # as the failed read used to leave it
    _, variables, names = load_variables(tmp_path)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], 7.0)
    assert names == ["a", "b", "c"]


# --- damaged checkpoints and saved models: load_variables says which, why and what to do, and changes nothing ----

def two_checkpoints(directory):
    """Steps 1 and 2, the state's values drawn at random (so a flipped low bit changes a value by little)."""
    rng = np.random.default_rng(0)
    checkpoints = Checkpointer(directory / "checkpoints", async_save=False)
    for step in (1, 2):
        state = {"params": {"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)},
                 "batch_stats": {"m": jnp.ones(3)}, "step": jnp.asarray(step)}
        checkpoints.save(step, state, None, {"class_names": ["a"]}, {"model": "m"})
    checkpoints.close()
    return directory / "checkpoints" / "2"


def biggest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_one_bit(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def files_of(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage,reason", [
    (lambda d: flip_one_bit(biggest_file(d / "state")), "do not match the checksum saved with them"),
    (lambda d: biggest_file(d / "state").write_bytes(biggest_file(d / "state").read_bytes()[:100]), "Error"),
    (lambda d: (d / "meta" / "metadata").write_text("{"), "JSONDecodeError"),
    (lambda d: shutil.rmtree(d / "state"), "Unknown key: state"),  # Orbax, reading the missing item's metadata
    (lambda d: (d / "state" / "_METADATA").write_text("xx"), "JSONDecodeError"),
    (lambda d: [shutil.rmtree(p) for p in d.iterdir() if p.is_dir()], "KeyError"),
], ids=["one-flipped-bit", "truncated-array-file", "garbage-meta", "state-deleted", "garbage-array-metadata",
        "empty-step-folder"])
def test_a_damaged_checkpoint_is_one_clear_error_naming_it_and_nothing_moves(tmp_path, damage, reason):
    """Used to be: a flipped bit served as the weights (no check of what was saved), and the rest raw KeyError,
    JSON or TensorStore messages naming no checkpoint."""
    step_dir = two_checkpoints(tmp_path)
    damage(step_dir)
    before = files_of(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_variables(tmp_path)
    message = str(error.value)
    assert message.startswith(f"the checkpoint at step 2 ({step_dir}) is damaged or incomplete: "), message
    assert reason in message and "Nothing was changed or moved" in message, message
    assert "--step=1" in message and "steps there: [1, 2]" in message, message
    assert "\n" not in message and "TensorStore(" not in message and len(message) < 1000, message
    assert files_of(tmp_path) == before
    _, variables, _ = load_variables(tmp_path, step=1)  # the step the message suggests loads
    assert variables["params"]["w"].shape == (64, 64)


def test_the_only_checkpoint_damaged_says_to_restore_it(tmp_path):
    step_dir = two_checkpoints(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "1")
    flip_one_bit(biggest_file(step_dir / "state"))
    with pytest.raises(CheckpointError, match=r"it is the only checkpoint there: restore .*/2 from a copy"):
        load_variables(tmp_path)


def test_every_single_bit_flip_changes_the_checksum():
    """The fingerprint (sums of |x|) missed a flipped low mantissa bit; the checksum weighs each element's bits
    by an odd number, so no single flip leaves it unchanged, whatever the dtype."""
    from resnet_jax.checkpoint import checksum

    rng = np.random.default_rng(1)
    for dtype, bits in ((np.float32, np.uint32), (jnp.bfloat16, np.uint16), (np.int8, np.uint8)):
        x = np.asarray(rng.standard_normal((5, 7)) * 3).astype(dtype)
        base = checksum({"x": x})
        for index in (0, 17, 34):
            for bit in range(8 * np.dtype(bits).itemsize):
                flipped = x.copy().reshape(-1).view(bits)
                flipped[index] ^= bits(1 << bit)
                assert checksum({"x": flipped.view(x.dtype).reshape(x.shape)}) != base, (dtype, index, bit)


def test_reading_leaves_a_running_save_in_progress_alone(tmp_path):
    """Orbax's manager deletes unfinished (temporary) step directories when it opens: an evaluation started while
    training was saving deleted the save in progress. load_variables opens the directory read-only."""
    two_checkpoints(tmp_path)
    in_progress = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    (in_progress / "state").mkdir(parents=True)
    (in_progress / "state" / "partial").write_bytes(b"x" * 10)
    load_variables(tmp_path)
    assert (in_progress / "state" / "partial").exists()


def saved_model(directory):
    from resnet_jax.checkpoint import save_variables

    rng = np.random.default_rng(2)
    variables = {"params": {"fc": {"kernel": rng.standard_normal((32, 32)).astype(np.float32)}},
                 "batch_stats": {"bn": {"mean": np.ones(3, np.float32)}}}
    save_variables(directory, variables, {"model": "m"}, ["a", "b"])
    return variables


def arrays_of(directory):
    """The arrays folder a saved model's model.json names."""
    return directory / json.loads((directory / "model.json").read_text())["arrays"]


def test_a_saved_model_is_checked_and_a_damaged_one_is_a_clear_error(tmp_path):
    saved_model(tmp_path)
    assert "checksum" in json.loads((tmp_path / "model.json").read_text())
    flip_one_bit(biggest_file(arrays_of(tmp_path)))
    before = files_of(tmp_path)
    with pytest.raises(CheckpointError, match=r"the saved model in .* is incomplete or damaged: its arrays in "
                                              r".*model-\w+ cannot be used \(ValueError: they do not match the checksum"):
        load_variables(tmp_path)
    assert files_of(tmp_path) == before


@pytest.mark.parametrize("damage,reason", [
    (lambda d: (d / "model.json").unlink(), "FileNotFoundError"),
    (lambda d: (d / "model.json").write_text("{"), "JSONDecodeError"),
    (lambda d: (d / "model.json").write_text("{}"), "ValueError: it has no 'config' or 'class_names'"),
    (lambda d: (d / "model.json").write_text('{"config": "x", "class_names": []}'),  # was an AttributeError
     "ValueError: its config is a JSON str, not a config's keys"),
], ids=["deleted", "garbage", "without-keys", "config-not-a-mapping"])
def test_a_saved_model_without_a_readable_model_json_is_a_clear_error(tmp_path, damage, reason):
    saved_model(tmp_path)
    damage(tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_variables(tmp_path)
    message = str(error.value)
    assert "its model.json (config and class names) cannot be read" in message and reason in message, message
    assert "Save the model again (Classifier.save) or restore the directory from a copy" in message


def test_a_saved_model_without_its_arrays_is_a_clear_error(tmp_path):
    saved_model(tmp_path)
    shutil.rmtree(arrays_of(tmp_path))
    with pytest.raises(CheckpointError, match="the saved model in .* is incomplete or damaged: its arrays"):
        load_variables(tmp_path)


def test_a_saved_model_of_the_earlier_layout_still_loads(tmp_path):
    """Before model.json named its arrays folder, the arrays were always in model/."""
    variables = saved_model(tmp_path)
    arrays_of(tmp_path).rename(tmp_path / "model")
    info = json.loads((tmp_path / "model.json").read_text())
    del info["arrays"]
    (tmp_path / "model.json").write_text(json.dumps(info))
    _, loaded, _ = load_variables(tmp_path)
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    saved_model(tmp_path)  # saved again: the old folder goes once the new one is in place
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.json", arrays_of(tmp_path).name])


def test_a_save_that_fails_leaves_the_model_saved_before_it(tmp_path):
    """Saving over a saved model deleted its arrays first: a full disk in the second save (here a file-size limit)
    left neither. The old model stays loadable until model.json names the new arrays."""
    from conftest import run_python

    first = saved_model(tmp_path)
    proc = run_python(f"""
        import resource
        import numpy as np
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))
        from resnet_jax.checkpoint import save_variables
        kernel = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)  # incompressible
        big = {{"params": {{"fc": {{"kernel": kernel}}}}, "batch_stats": {{}}}}
        save_variables({str(tmp_path)!r}, big, {{"model": "other"}}, ["x"])
    """, check=False)
    assert proc.returncode != 0
    config, loaded, names = load_variables(tmp_path)
    assert (config, names) == ({"model": "m"}, ["a", "b"])
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], first["params"]["fc"]["kernel"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.json", arrays_of(tmp_path).name])


def test_a_model_json_naming_a_folder_outside_the_model_is_refused(tmp_path):
    saved_model(tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**info, "arrays": "../elsewhere"}))
    with pytest.raises(CheckpointError, match=r"arrays entry '\.\./elsewhere' is not a folder of the model's"):
        load_variables(tmp_path)


def test_a_saved_model_from_before_the_checksum_still_loads(tmp_path):
    variables = saved_model(tmp_path)
    info = json.loads((tmp_path / "model.json").read_text())
    del info["checksum"]
    (tmp_path / "model.json").write_text(json.dumps(info))
    config, loaded, names = load_variables(tmp_path)
    np.testing.assert_array_equal(loaded["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"])
    assert (config, names) == ({"model": "m"}, ["a", "b"])


def test_a_checkpoint_from_before_the_checksum_is_checked_by_its_fingerprint(tmp_path):
    """Older checkpoints carry only the fingerprint: they load, and one changed value is still caught."""
    step_dir = two_checkpoints(tmp_path)
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    del meta["checksum"]
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))
    load_variables(tmp_path)
    meta["fingerprint"][0] += 1.0
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the fingerprint saved with them"):
        load_variables(tmp_path)


def test_opening_waits_until_orbax_has_removed_unfinished_saves(tmp_path, monkeypatch):
    """Orbax removes an earlier process's unfinished saves in a background thread. A run that stopped with an error
    before its first save (a weights cache that is a file) left that thread running into interpreter shutdown,
    whose traceback followed the CLI's one-line error. Opening now waits for it. (The removal is slowed down here so
    that a Checkpointer that does not wait would be seen returning before it; only the order is checked.)"""
    import asyncio

    from orbax.checkpoint._src.path import temporary_paths

    original = temporary_paths.cleanup_temporary_paths

    async def slow(*args, **kwargs):
        await asyncio.sleep(1.0)
        return await original(*args, **kwargs)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow)
    unfinished = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567"
    unfinished.mkdir(parents=True)
    checkpoints = Checkpointer(tmp_path / "checkpoints")
    try:
        assert not unfinished.exists()
    finally:
        checkpoints.close()


SAVE_ON_TWO_DEVICES = """
import sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from resnet_jax.checkpoint import Checkpointer, save_variables
replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
variables = {"params": {"w": jnp.arange(6.0).reshape(3, 2), "h": jnp.ones(3, jnp.bfloat16)},
             "batch_stats": {"var": jnp.full(2, 2.0)}}
state = jax.device_put({"step": jnp.int32(4), **variables}, replicated)
ckpt = Checkpointer(sys.argv[1] + "/run/checkpoints", async_save=False)
ckpt.save(4, state, None, {"class_names": ["a", "b"]}, {"model": "resnet18"})
ckpt.close()
save_variables(sys.argv[1] + "/saved", jax.device_put(variables, replicated), {"model": "resnet18"}, ["a", "b"])
print(len(jax.devices()))
"""

LOAD_ON_ONE_DEVICE = """
import json, sys
import jax, numpy as np
from resnet_jax.checkpoint import load_variables
out = {}
for name in ("run", "saved"):
    _, variables, names = load_variables(sys.argv[1] + "/" + name)
    out[name] = [len(jax.devices()), names, np.asarray(variables["params"]["w"]).tolist()]
print(json.dumps(out))
"""


def test_a_run_trained_on_more_devices_loads_for_inference_on_one(tmp_path):
    """Evaluating, predicting or exporting on a smaller machine (or one GPU of several): the arrays are placed on
    this process's device, not on the saved topology (Orbax refused it, and the message called the checkpoint
    damaged)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    saved = run_python(SAVE_ON_TWO_DEVICES, args=[tmp_path], env={
        **env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert saved.stdout.strip().splitlines()[-1] == "2"
    loaded = json.loads(run_python(LOAD_ON_ONE_DEVICE, args=[tmp_path], env=env).stdout.strip().splitlines()[-1])
    for name in ("run", "saved"):
        assert loaded[name] == [1, ["a", "b"], [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]], name


def test_a_damaged_checkpoint_leaves_no_tracebacks_of_abandoned_reads_on_stderr(tmp_path):
    """Used to be: after the one line saying a checkpoint was damaged, 200-4000 lines of "Event loop is closed" and
    "Exception ignored in: <coroutine ... _read_array_index_and_device_put>" tracebacks (Orbax abandons the
    reads still in flight when one fails; ``abandoned_io`` says why). They only come when a read is in flight
    as another fails, a race: the child damages one data file after another until one restore has left such reads
    behind (the filter counts them), then the parent checks that none of it reached stderr, and that another
    report still does."""
    proc = run_python("""
        import gc, shutil, sys, time
        from pathlib import Path
        import jax, jax.numpy as jnp, numpy as np
        from resnet_jax import abandoned_io
        from resnet_jax.checkpoint import Checkpointer

        root = Path(sys.argv[1])
        rng = np.random.default_rng(0)
        saver = Checkpointer(root / "pristine", async_save=False)
        for step in (1, 2):
            state = {"params": {f"w{i}": jnp.asarray(rng.standard_normal((256, 1024)), jnp.float32)
                                for i in range(16)}, "step": jnp.asarray(step)}
            saver.save(step, state, None, {}, {})
        saver.close()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        for attempt in range(24):
            work = root / f"attempt{attempt}"
            shutil.copytree(root / "pristine", work)
            files = sorted((p for p in (work / "2" / "state").rglob("*") if p.is_file()),
                           key=lambda p: -p.stat().st_size)
            victim = files[attempt % min(4, len(files))]
            victim.write_bytes(victim.read_bytes()[:100])
            checkpoints = Checkpointer(work)
            step, *_ = checkpoints.restore_latest(abstract, log=lambda line: None)
            checkpoints.close()
            gc.collect(); time.sleep(0.3); gc.collect()
            if abandoned_io.hidden:
                break
        print("attempts", attempt + 1, "hidden", abandoned_io.hidden)

        class Other:  # any other unraisable report still reaches stderr
            def __del__(self):
                raise ValueError("an unrelated report, kept")
        Other()
    """, args=[tmp_path])
    assert "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    assert "_read_array_index_and_device_put" not in proc.stderr, proc.stderr[-3000:]
    assert "ValueError: an unrelated report, kept" in proc.stderr, proc.stderr[-3000:]
    hidden = int(proc.stdout.split()[-1])
    assert hidden > 0, f"no restore left an abandoned read behind, so nothing was checked: {proc.stdout}"


def test_a_model_is_not_saved_where_a_runs_checkpoints_would_hide_it_nor_loaded_by_a_step(workdir, tmp_path):
    """Used to be: Classifier.save(dir) into a training run's workdir was accepted, and every later load read the
    run's checkpoints instead (the saved model was never seen again); and a step asked of a saved model, which
    has none, was ignored."""
    from resnet_jax.checkpoint import save_variables

    before = files_of(workdir)
    with pytest.raises(ValueError, match="is a training run's workdir: loading it reads its checkpoints"):
        save_variables(workdir, {k: v for k, v in arrays(9).items() if k != "step"}, {"model": "m"}, ["a", "b", "c"])
    assert files_of(workdir) == before
    saved = save_variables(tmp_path / "model", {k: v for k, v in arrays(9).items() if k != "step"}, {"model": "m"},
                           ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"is a saved model, which holds one set of weights and no steps; load it "
                                         r"without step \(asked: 999\)"):
        load_variables(saved, 999)
    np.testing.assert_array_equal(load_variables(saved)[1]["params"]["fc"]["kernel"], 9.0)


def test_a_save_that_cannot_be_written_is_one_error_naming_its_step_and_where_the_run_resumes(tmp_path):
    """Used to be: a full disk (here a file-size limit) in an asynchronous save came out at the next save as
    Orbax's raw exception, after ~450 lines of its threads' reports ("_SignalingThread.run() raised an
    exception", "Event loop is closed", "Task exception was never retrieved"). Now one ``CheckpointError`` names
    the step, the system's reason and the step a restart resumes from, once, and stderr stays clean; another
    error report still gets through."""
    proc = run_python("""
        import gc, resource, sys, time
        import jax.numpy as jnp, numpy as np
        from absl import logging
        from resnet_jax.checkpoint import CheckpointError, Checkpointer

        ckpt = Checkpointer(sys.argv[1])
        ckpt.save(1, {"w": jnp.zeros(4)}, None, {}, {})
        ckpt.wait()
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
        rng = np.random.default_rng(0)  # incompressible, several arrays: several writes in flight
        big = {f"w{i}": jnp.asarray(rng.standard_normal((256, 256)), jnp.float32) for i in range(16)}
        try:
            ckpt.save(2, big, None, {}, {})
            ckpt.wait()
        except CheckpointError as err:
            print("ERROR", err)
        ckpt.close()  # waits again: reported once
        gc.collect(); time.sleep(0.5); gc.collect()
        print("UNRELATED REPORTS FROM HERE", file=sys.stderr, flush=True)
        logging.error("an unrelated report, kept")

        import asyncio
        closed = asyncio.new_event_loop()
        closed.close()

        class Late:  # Python code meeting a closed loop is not TensorStore's abandoned write: reported
            def __del__(self):
                closed.call_soon_threadsafe(print)
        Late()
    """, args=[tmp_path])
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, proc.stdout
    assert re.search(r"saving the checkpoint at step 2 in \S+ failed \(a file-size limit was reached: \[Errno 27\] "
                     r"File too large\).* resumes from step 1, the last checkpoint saved", errors[0]), errors[0]
    saving, unrelated = proc.stderr.split("UNRELATED REPORTS FROM HERE")
    for noise in ("Traceback", "Event loop is closed", "never retrieved", "raised an exception", "failed."):
        assert noise not in saving, saving[-3000:]
    assert "an unrelated report, kept" in unrelated
    assert "Event loop is closed" in unrelated and "Late.__del__" in unrelated, unrelated[-3000:]
    assert Checkpointer(tmp_path).steps() == [1]
