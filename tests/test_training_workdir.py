"""A workdir is the record of one run: a changed config is refused with nothing written, safe changes continue,
starting over is explicit and moves the old run aside, and no history is ever truncated by a fresh start."""

import contextlib
import copy
import json
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from resnet_jax.checkpoint import ConfigMismatch
from resnet_jax.training import base_config, train, validate
from resnet_jax.training.config import CONTINUABLE, PER_INVOCATION, STARTING_WEIGHTS
from resnet_jax.training.workdir import CONFIG_FILE, check, write_config
from training_helpers import count_compiles, snapshot, tiny_config

# The parametrisations below derive their keys from config.py, so a new key is covered the day it is added; these
# names are fixed here as well, so that moving one of them to the other list fails a test. DEFINES_THE_RUN: keys
# whose change would make the checkpoints describe another run (README: "Any other change is refused").
# CONTINUES: README's list of safe changes.
DEFINES_THE_RUN = ("model", "model_overrides", "dtype", "remat", "zero_init_residual", "init_from", "dataset",
                   "train_split", "image_size", "augment", "normalize", "num_workers", "batch_size", "optimizer",
                   "learning_rate", "lr_scaling", "momentum", "weight_decay", "schedule", "milestones",
                   "warmup_epochs", "label_smoothing", "class_weights", "mixup_alpha", "cutmix_alpha", "seed")
CONTINUES = ("num_epochs", "max_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
             "eval_every_epochs", "eval_batch_size", "early_stopping_patience", "progress_bar",
             "compilation_cache_dir", "data_dir")
# once the run has a checkpoint (only then is a config compared), the starting weights may change too
REFUSED = sorted(((set(base_config()) - set(CONTINUABLE) - set(PER_INVOCATION)) | set(DEFINES_THE_RUN))
                 - set(STARTING_WEIGHTS))


def config(**kw):
    return tiny_config(**{"max_steps": 8, "checkpoint_every_steps": 4, "log_every_steps": 2, **kw})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("base") / "run"
    train(config(), workdir)
    return workdir


@pytest.fixture
def run_copy(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("change,described", [
    ({"model": "resnet32"}, 'model: "resnet20" -> "resnet32"'),
    ({"batch_size": 64}, "batch_size: 32 -> 64"),
    ({"seed": 1}, "seed: 0 -> 1"),
])
def test_changing_what_defines_the_run_is_refused_with_nothing_written(base_run, change, described):
    before = snapshot(base_run)
    with count_compiles() as compiles, pytest.raises(ConfigMismatch) as refused:
        train(config(**change), base_run)
    assert described in str(refused.value)
    assert compiles[0] == 0 and snapshot(base_run) == before


def test_the_refusal_names_every_changed_key_and_what_to_do(base_run):
    changed = config(seed=1, learning_rate=0.8, max_steps=12)  # max_steps alone would be fine
    changed.model_overrides.stage_sizes = (2, 1, 1)
    with pytest.raises(ConfigMismatch) as refused:
        train(changed, base_run)
    message = str(refused.value)
    assert ("(learning_rate: 1.6 -> 0.8, model_overrides.stage_sizes: [1, 1, 1] -> [2, 1, 1], seed: 0 -> 1); "
            "use a new --workdir, set them back, or pass --config.restart=True") in message
    assert "max_steps" not in message


def test_extending_max_steps_continues_the_run_and_logs_the_change(base_run, run_copy):
    messages = []
    result = train(config(max_steps=12, log_every_steps=4), run_copy, log=messages.append)
    assert result.resumed_from == 8 and int(result.state.step) == 12
    assert any("with changed settings: log_every_steps: 2 -> 4, max_steps: 8 -> 12" in m for m in messages)
    assert rows(run_copy)[:len(rows(base_run))] == rows(base_run)  # the history up to step 8 is kept
    assert [r["step"] for r in rows(run_copy)][-1] == 12
    assert json.loads((run_copy / "config.json").read_text())["max_steps"] == 12


def test_restart_moves_the_old_run_aside_and_starts_over(run_copy):
    old = snapshot(run_copy)
    messages = []
    result = train(config(restart=True, model="resnet32", max_steps=4), run_copy, log=messages.append)
    assert result.resumed_from is None and int(result.state.step) == 4
    (aside,) = (run_copy / "previous_runs").iterdir()
    old.pop(".lock")  # the workdir's lock stays with the workdir (held by the new run), not with the run's files
    assert snapshot(aside) == old  # checkpoints, metrics, config, TensorBoard, curves: all of it, unchanged
    assert {"checkpoints", "metrics.jsonl", "config.json", "tensorboard", "learning_curves.png"} <= \
        {p.name for p in aside.iterdir()}
    assert any(m.startswith("config.restart=True: moved checkpoints, metrics.jsonl") for m in messages)
    assert json.loads((run_copy / "config.json").read_text())["model"] == "resnet32"
    assert rows(run_copy)[0]["step"] == 2 and rows(run_copy)[-1]["step"] == 4


def test_a_history_without_a_checkpoint_is_moved_aside_not_truncated(base_run, run_copy):
    """A run stopped before its first checkpoint leaves rows but nothing to resume: a fresh start keeps them."""
    shutil.rmtree(run_copy / "checkpoints")
    messages = []
    result = train(config(), run_copy, log=messages.append)
    assert result.resumed_from is None
    (aside,) = (run_copy / "previous_runs").iterdir()
    assert rows(aside) == rows(base_run)
    assert any(m.startswith("no checkpoint to resume from: moved metrics.jsonl") for m in messages)


def test_without_config_json_the_checkpoints_config_is_the_contract(run_copy):
    (run_copy / "config.json").unlink()
    with pytest.raises(ConfigMismatch, match="seed: 0 -> 1"):
        train(config(seed=1), run_copy)
    shutil.rmtree(run_copy / "checkpoints")
    before = snapshot(run_copy)
    with pytest.raises(ConfigMismatch, match=r"holds files of a run \(metrics.jsonl, .*\) but no config.json"):
        train(config(), run_copy)
    assert snapshot(run_copy) == before


def test_a_half_written_config_json_says_the_checkpoints_keep_the_config_and_deleting_it_resumes(run_copy):
    """config.json is rewritten at each start; cut short, it blocked the run with "restore it" although the
    checkpoints hold the config: the sentence now says so, and it is written by renaming a whole copy over it."""
    text = (run_copy / "config.json").read_text()
    (run_copy / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ConfigMismatch, match=r"not valid JSON .*the checkpoints keep the run's config: deleting it "
                                             r"resumes from them"):
        train(config(), run_copy)
    (run_copy / "config.json").unlink()
    train(config(max_steps=12), run_copy)
    assert json.loads((run_copy / "config.json").read_text())["max_steps"] == 12
    assert not list(run_copy.glob(".config.json.*"))  # no partial copy left beside it


@pytest.mark.parametrize("text,kind", [("[]", "list"), ("null", "NoneType"), ('"x"', "str")])
def test_a_config_json_of_another_json_shape_is_named_damaged(run_copy, text, kind):
    """Valid JSON but no mapping: a TypeError traceback ("'list' object is not a mapping"), or for null "no
    config.json" though there was one."""
    (run_copy / "config.json").write_text(text)
    with pytest.raises(ConfigMismatch, match=rf"config.json is damaged: it holds a JSON {kind}, not a config's keys; "
                                             r"restore it \(the checkpoints keep the run's config"):
        train(config(), run_copy)


def test_checkpoints_of_another_run_are_refused_though_config_json_agrees(run_copy, tmp_path):
    """The checkpoints carry their own config. Copied in from a run with another learning rate (config.json kept,
    so ``check`` saw no change), they were resumed under this config without a word."""
    other = tmp_path / "other"
    train(config(learning_rate=0.2), other)
    shutil.rmtree(run_copy / "checkpoints")
    shutil.copytree(other / "checkpoints", run_copy / "checkpoints")
    before = snapshot(run_copy)
    with pytest.raises(ConfigMismatch, match=r"the checkpoint at step 8 .* was saved by a run with other settings "
                                             r".*learning_rate: 0\.2 -> 1\.6"):
        train(config(max_steps=12), run_copy)
    assert snapshot(run_copy) == before


# --------------------------------------------------------------------------- the contract, key by key


def changed(config, key):
    """A copy of ``config`` with ``key`` set to another value of its type (in a nested dict such as
    model_overrides, its first entry), and the change as the workdir's messages write it."""
    config = copy.deepcopy(config)
    holder, name = config, key
    if isinstance(config[key], ml_collections.ConfigDict):
        assert config[key], f"give tiny_config a value in {key} to change"
        holder, name = config[key], next(iter(config[key]))
    old = holder[name]
    if isinstance(old, bool):
        new = not old
    elif isinstance(old, (int, float)):
        new = old + 1
    elif isinstance(old, str):
        new = old + "-changed"
    elif isinstance(old, tuple):
        new = (*old, old[-1] if old else 1.0)
    else:
        raise TypeError(f"teach this test to change {key}={old!r}")
    holder[name] = new
    dotted = key if holder is config else f"{key}.{name}"
    return config, f"{dotted}: {shown(old)} -> {shown(new)}"


def shown(value):
    return json.dumps(list(value) if isinstance(value, tuple) else value)


@pytest.fixture
def saved(tmp_path):
    """A workdir whose config.json records the tiny run, with a checkpoint: what ``train`` compares a resumed run's
    config with."""
    write_config(tmp_path, config())
    return with_checkpoint(tmp_path)


@contextlib.contextmanager
def held_elsewhere(workdir):
    """Another process holding ``workdir`` with the run's own lock; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from resnet_jax.training.workdir import lock
        held = lock(Path({str(workdir)!r}))
        print("held", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_workdir_in_use_by_another_run_is_refused_naming_it(tmp_path):
    """Two runs in one workdir trained side by side: each deleted the other's old checkpoints (one ended in a
    traceback) and their metrics.jsonl rows interleaved. While a process holds the workdir (here another process
    running the run's own lock), a run there is refused, writing nothing; once it is gone, the run starts."""
    workdir = tmp_path / "run"
    with held_elsewhere(workdir) as pid:
        with pytest.raises(ValueError, match=rf"{workdir} is in use by another run \(process {pid} on this machine\)"):
            train(config(), workdir)
        assert [p.name for p in workdir.iterdir()] == [".lock"]
    assert train(config(max_steps=2), workdir).stop_reason


def test_a_changed_config_refused_as_in_use_does_not_say_it_continues(run_copy):
    """The accepted change was logged ("continuing the run ... with changed settings") before the lock refused
    the run: it now comes once the run holds the workdir."""
    said = []
    with held_elsewhere(run_copy):
        with pytest.raises(ValueError, match="is in use by another run"):
            train(config(max_steps=12), run_copy, log=said.append)
    assert said and not any("continuing" in line for line in said), said


def test_every_key_is_refused_continuable_or_per_invocation():
    keys = set(base_config())
    assert set(CONTINUABLE) <= keys and set(PER_INVOCATION) <= keys and not set(CONTINUABLE) & set(PER_INVOCATION)
    assert set(DEFINES_THE_RUN) <= keys and not set(DEFINES_THE_RUN) & (set(CONTINUABLE) | set(PER_INVOCATION))
    assert set(CONTINUES) <= set(CONTINUABLE)


@pytest.mark.parametrize("key", REFUSED)
def test_changing_a_key_that_defines_the_run_is_refused(saved, key):
    """``workdir.check``, which ``train`` calls before writing anything (the tests above show that, end to end,
    for a few keys): each such key alone is refused, named with its old and new value, and nothing is logged."""
    new, described = changed(config(), key)
    messages = []
    with pytest.raises(ConfigMismatch) as refused:
        check(saved, new, messages.append)
    assert f"cannot change within a run ({described}); use a new --workdir" in str(refused.value)
    assert not messages


@pytest.mark.parametrize("key", sorted(set(CONTINUABLE) | set(CONTINUES)))
def test_changing_a_continuable_key_continues_and_logs_the_change(saved, key):
    """Accepted, and the change logged (train then records the new config.json, as the max_steps test shows)."""
    new, described = changed(config(), key)
    messages = []
    check(saved, new, messages.append)
    assert messages == [f"continuing the run in {saved} with changed settings: {described}"]


def test_a_run_saved_before_a_key_existed_resumes_at_the_value_its_default_resolves_to(tmp_path):
    """Runs saved before ``eval_interpolation``/``eval_crop_mode`` existed were refused ('eval_interpolation: ""
    -> "bilinear"'): the saved side was completed with the raw default "", which validate turns into "bilinear"
    (or, for published weights in init_from, which came with these keys, the weights' own). Setting such a key
    otherwise is still a change."""
    c = validate(config())  # train compares the validated config
    write_config(with_checkpoint(tmp_path), c)
    recorded = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("eval_interpolation", "eval_crop_mode"):
        del recorded[key]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(recorded))
    messages = []
    check(tmp_path, c, messages.append)
    assert messages == []
    other = copy.deepcopy(c)
    other.eval_crop_mode = "squash"
    with pytest.raises(ConfigMismatch, match='eval_crop_mode: "center" -> "squash"'):
        check(tmp_path, other, messages.append)


def test_a_run_saved_before_its_shuffle_was_hashed_resumes_in_its_own_order(tmp_path):
    """``shuffle_seeding`` came with a new default ("hashed"); a run saved before it was shuffled "offset". Resumed
    as is, the rest of its epoch would follow another order (images seen twice, others never): ``setup`` keeps
    "offset" for it (``VALUE_BEFORE_ADDED``) and ``check`` finds no change; asking for "hashed" there is refused,
    a restart or a new run takes "hashed"."""
    from resnet_jax.training.loop import setup

    write_config(with_checkpoint(tmp_path), setup(config()).config)  # as train records it
    recorded = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert recorded.pop("shuffle_seeding") == "hashed"
    (tmp_path / CONFIG_FILE).write_text(json.dumps(recorded))
    resumed = setup(config(), tmp_path).config
    assert resumed.shuffle_seeding == "offset"
    messages = []
    check(tmp_path, resumed, messages.append)
    assert messages == []
    with pytest.raises(ConfigMismatch, match='shuffle_seeding: "offset" -> "hashed"'):
        check(tmp_path, setup(config(shuffle_seeding="hashed")).config, messages.append)
    assert setup(config(restart=True), tmp_path).config.shuffle_seeding == "hashed"
    assert setup(config(), tmp_path / "new").config.shuffle_seeding == "hashed"


@pytest.mark.parametrize("key", PER_INVOCATION)
def test_a_per_invocation_key_is_not_compared(saved, key):
    """This command's options (restart, the processes): neither refused nor logged as a change of the run."""
    new, _ = changed(config(), key)
    messages = []
    check(saved, new, messages.append)
    assert messages == []


def with_checkpoint(workdir):
    (workdir / "checkpoints" / "8").mkdir(parents=True)
    (workdir / "checkpoints" / "8" / "x").write_text("")
    return workdir


def test_a_run_without_a_checkpoint_takes_any_new_config(tmp_path):
    """A run stopped during start-up, or one that failed compiling (out of memory), leaves config.json but never
    took a step: a lower batch size, another seed was refused as changing the run. It cannot be continued, so a
    new config is taken (its history, if any, moved aside: the test above) and logged as nothing."""
    write_config(tmp_path, config())
    said = []
    check(tmp_path, config(batch_size=8, seed=1), said.append)
    assert said == []
    with pytest.raises(ConfigMismatch, match="batch_size: 32 -> 8"):
        check(with_checkpoint(tmp_path), config(batch_size=8), said.append)


def test_images_changed_before_the_first_checkpoint_are_no_mixed_epoch(tmp_path):
    """A run that died on an unreadable image before its first save: the image fixed, the same command was
    refused as a "mixed epoch" (with advice to start from weights it never saved). With a checkpoint, refused."""
    write_config(tmp_path, config(), {"files": 8, "sha256": "a" * 64})
    check(tmp_path, config(), lambda _: None, {"files": 7, "sha256": "b" * 64})
    with pytest.raises(ConfigMismatch, match=r"\(8 files then, 7 now, or other names\)"):
        check(with_checkpoint(tmp_path), config(), lambda _: None, {"files": 7, "sha256": "b" * 64})


@pytest.mark.parametrize("split, refused", [("train[:90%]", True), ("train", False), ("train [90%:]", False)])
def test_a_folder_run_from_before_the_record_of_its_images(tmp_path, split, refused):
    """Its percentage slice was cut rounded down, which now names other files (an 11-image class gains one):
    refused; a whole folder (also one whose name has brackets) continues, said once, and is recorded from then
    on."""
    (tmp_path / "photos" / "train [90%:]").mkdir(parents=True)
    run = with_checkpoint(tmp_path / "run")
    settings = config(dataset=f"folder:{tmp_path / 'photos'}", train_split=split)
    write_config(run, settings)
    data = {"files": 8, "sha256": "a" * 64}
    said = []
    if refused:
        with pytest.raises(ConfigMismatch, match=r"predates the record of its training images, and its split "
                                                 r"'train\[:90%\]' is now cut to the nearest image of each class"):
            check(run, settings, said.append, data)
    else:
        check(run, settings, said.append, data)
        assert said == [f"the run in {run} predates the record of its training images; continuing with the "
                        f"files as they are now, which are recorded from here on"]


@pytest.mark.parametrize("key", ["init_from", "weights_file"])
def test_the_starting_weights_may_move_once_the_run_has_saved(tmp_path, key):
    """Used to be: a fine-tune whose .pth had moved (off node-local disk, out of /tmp) could not continue: the old
    path was refused as missing, the new one as a change of the run. They are read only by a run's first start:
    with a checkpoint, a change continues and is logged."""
    write_config(tmp_path, config(**{key: "/old/start.pth"}))
    said = []
    check(with_checkpoint(tmp_path), config(**{key: "/new/start.pth"}), said.append)
    assert said == [f'continuing the run in {tmp_path} with changed settings: {key}: "/old/start.pth" -> '
                    f'"/new/start.pth"']
