"""The training loop in-process on real data: what a run leaves behind, resume, damage, divergence, errors.

The workdir contract (config changes, restart, history) has its own file, test_training_workdir.py.
"""

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax.checkpoint import CheckpointError, ConfigMismatch, load_variables
from resnet_jax.training import TrainingDiverged, train
from conftest import run_python
from training_helpers import count_compiles, direct_metrics, snapshot, tiny_config, worker_env

TESTS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    messages = []
    result = train(tiny_config(), workdir, log=messages.append)
    return workdir, result, messages


def test_run_leaves_metrics_events_plot_config_and_checkpoints(finished_run):
    workdir, result, messages = finished_run
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert {"step", "epoch", "split", "loss", "accuracy", "top5", "learning_rate",
            "images_per_second"} <= set(train_rows[-1])
    assert [r["epoch"] for r in val_rows] == [1, 2] and {"loss", "accuracy", "top5"} <= set(val_rows[0])
    assert train_rows[-1]["step"] == int(result.state.step) == 2 * (1437 // 32)
    assert val_rows[-1]["accuracy"] > 0.5  # ResNet-8 on 8x8 digits learns within two epochs
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "learning_curves.png").stat().st_size > 1000
    assert json.loads((workdir / "config.json").read_text())["model"] == "resnet20"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 88
    assert any(m.startswith("epoch 2/2: train loss") and "val loss" in m for m in messages)


def test_restart_of_a_finished_run_resumes_and_changes_nothing(finished_run, tmp_path):
    workdir, result, _ = finished_run
    messages = []
    again = train(tiny_config(), workdir, log=messages.append)
    assert any("resumed from the checkpoint at step 88" in m for m in messages)
    assert again.history == result.history
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.state.params),
                 jax.device_get(result.state.params))


def test_best_checkpoint_is_kept_and_loadable(finished_run):
    workdir, result, _ = finished_run
    config, variables, class_names = load_variables(workdir, "best")
    assert config["model"] == "resnet20" and class_names == [str(i) for i in range(10)]
    assert set(variables) == {"params", "batch_stats"}


def test_evaluation_counts_every_validation_example_once(finished_run):
    """The loop's evaluation (batches of 64 over 360 examples: the last one padded) against the model applied
    directly to the whole split at once."""
    from resnet_jax import data
    from resnet_jax.parallel import make_mesh
    from resnet_jax.training import evaluate_loader, make_eval_step
    from resnet_jax.training.config import normalization_stats

    _, result, _ = finished_run
    source = data.get_source("digits", "validation", image_size=8)
    mean, std = normalization_stats(result.config)
    loader = data.eval_loader(source, batch_size=64, image_size=8, mean=mean, std=std, channels=1)
    mesh = make_mesh()
    got = evaluate_loader(result.state, make_eval_step(mesh), loader, mesh)

    expected = direct_metrics(result.model, result.variables, source, mean, std)
    assert got == pytest.approx(expected, rel=1e-5)
    last_val = [r for r in result.history if r["split"] == "val"][-1]  # the loop's own pass, batches of 100
    assert {k: last_val[k] for k in expected} == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def short_run_and_cache(tmp_path_factory):
    """16 steps with checkpoints at 8 and 16, compiled into a cache directory of its own: (workdir, that
    directory, JAX's cache setting before the run, after it)."""
    root = tmp_path_factory.mktemp("short")
    before = jax.config.jax_compilation_cache_dir
    train(tiny_config(max_steps=16, compilation_cache_dir=str(root / "jit")), root / "run")
    return root / "run", root / "jit", before, jax.config.jax_compilation_cache_dir


@pytest.fixture(scope="module")
def short_run(short_run_and_cache):
    """The 16-step run; tests damage copies of it."""
    return short_run_and_cache[0]


def test_a_run_with_its_own_cache_dir_leaves_jax_config_as_it_was(short_run_and_cache):
    """config.compilation_cache_dir named a directory: JAX opened its cache there for the run, and once the run
    returned the process compiles as before (the test session's own cache, from conftest.py)."""
    _, cache, before, after = short_run_and_cache
    assert cache.is_dir()
    assert after == before


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def damage(checkpoint, how):
    """Truncate, or flip bytes inside, the largest array file of a checkpoint; or cut its metrics file short."""
    if how == "metrics":  # Orbax reads every checkpoint's metrics when it opens the directory
        (checkpoint / "metrics" / "metrics").write_text('{"val_acc')
        return
    if how == "config":  # the run's config, compared with this run's once a checkpoint is chosen
        (checkpoint / "config" / "metadata").write_text('{"model": "res')
        return
    biggest = max((p for p in checkpoint.rglob("*") if p.is_file() and "state" in p.parts),
                  key=lambda p: p.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    if how == "truncate":
        biggest.write_bytes(raw[: len(raw) // 2])
    else:
        for i in range(len(raw) // 3, len(raw) // 3 + 64):
            raw[i] ^= 0xFF
        biggest.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncate", "flip", "metrics", "config"])
def test_damaged_latest_checkpoint_is_reported_skipped_and_kept(short_run, tmp_path, how):
    workdir = copy_of(short_run, tmp_path)
    damage(workdir / "checkpoints" / "16", how)
    messages = []
    result = train(tiny_config(max_steps=20), workdir, log=messages.append)
    assert any("checkpoint at step 16 is damaged" in m for m in messages), messages
    assert any("resumed from the checkpoint at step 8" in m for m in messages), messages
    assert int(result.state.step) == 20 and result.resumed_from == 8
    kept = list((workdir / "checkpoints_damaged").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("16-")


def test_no_restorable_checkpoint_stops_with_each_reason_and_moves_nothing(short_run, tmp_path):
    workdir = copy_of(short_run, tmp_path)
    damage(workdir / "checkpoints" / "16", "flip")
    damage(workdir / "checkpoints" / "8", "truncate")
    before = snapshot(workdir)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* could be restored \(step 16: ValueError: the "
                                              r"restored arrays do not match .*; step 8: .*\); nothing was moved"):
        train(tiny_config(max_steps=16), workdir)
    assert snapshot(workdir) == before


def test_a_checkpoint_of_another_structure_is_a_config_mismatch_not_damage(short_run, tmp_path):
    """config.json edited by hand (or a library that builds the model differently): the config check passes,
    the checkpoint's tree does not match, and nothing is called damaged or moved."""
    from resnet_jax.training import setup

    workdir = copy_of(short_run, tmp_path)
    other = tiny_config(max_steps=16)
    other.model_overrides.stage_sizes = (2, 1, 1)
    (workdir / "config.json").write_text(setup(other).config.to_json_best_effort(indent=2))
    before = snapshot(workdir)
    with pytest.raises(ConfigMismatch, match=r"step 16 .* another structure than this config builds "
                                             r"\(batch_stats/layer1_1/bn1/mean: saved absent, now float32\[16\]"):
        train(other, workdir)
    assert snapshot(workdir) == before


def test_a_checkpoint_that_differs_only_in_a_shape_is_a_config_mismatch_not_damage(short_run, tmp_path):
    """The same tree, every key present, but conv1 takes three channels where the saved run had one: refused
    before anything is restored, naming each array whose shape differs (the kernel and its momentum) and no
    missing key; nothing is called damaged or moved."""
    from resnet_jax.training import setup

    workdir = copy_of(short_run, tmp_path)
    other = tiny_config(max_steps=16)
    other.model_overrides.in_channels = 3
    (workdir / "config.json").write_text(setup(other).config.to_json_best_effort(indent=2))
    before = snapshot(workdir)
    with pytest.raises(ConfigMismatch) as refused:
        train(other, workdir)
    found = re.fullmatch(r"the checkpoint at step 16 in \S+ holds a state of another structure than this config "
                         r"builds \((.*)\), so it belongs to another run; use a new --workdir, or pass "
                         r"--config.restart=True to move the old run aside", str(refused.value))
    assert found, str(refused.value)
    problems = found.group(1).split("; ")
    assert "params/conv1/kernel: saved float32[3, 3, 1, 16], now float32[3, 3, 3, 16]" in problems
    assert all(p.endswith("conv1/kernel: saved float32[3, 3, 1, 16], now float32[3, 3, 3, 16]") for p in problems)
    assert snapshot(workdir) == before


COUNT_CHILD = """
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, sys.argv[1])
from training_helpers import count_compiles

x = jnp.ones((3, 7, 11))
with count_compiles() as compiles:
    fresh = jax.jit(lambda a: a * 3.0 + 1.0)
    fresh(x).block_until_ready()
    first = list(compiles)
    fresh(x).block_until_ready()  # this process has it now: nothing to build
    again = list(compiles)
jax.jit(lambda a: a - 2.0)(x).block_until_ready()  # after the block
print(json.dumps({"first": first, "again": again, "after_the_block": list(compiles)}))
"""


def test_count_compiles_counts_compilations_and_cache_hits(tmp_path):
    """The positive control of the zero-compile assertions (here and in test_training_workdir.py), in two
    processes sharing a fresh persistent compilation cache: in the first the function is compiled, in the second
    it comes from the cache, and both count one. Calling it again builds nothing, and the counter stops at the
    block's end."""
    env = worker_env()
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    counts = [json.loads(run_python(COUNT_CHILD, args=[TESTS], env=env).stdout.splitlines()[-1]) for _ in range(2)]
    assert counts[0] == {"first": [1, 0], "again": [1, 0], "after_the_block": [1, 0]}  # compiled
    assert counts[1] == {"first": [1, 1], "again": [1, 1], "after_the_block": [1, 1]}  # read from the cache


@pytest.mark.long  # whole training runs
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """The learning rate jumps 1e30-fold after the first epoch: the epoch-end checkpoint is the last good one."""
    workdir = tmp_path / "run"
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*last good checkpoint is step 44"):
        train(tiny_config(schedule="step", step_epochs=1, lr_decay=1e30,
                          compilation_cache_dir=str(tmp_path / "jit")), workdir)
    assert jax.config.jax_compilation_cache_dir == before  # a failed run sets it back too
    _, variables, _ = load_variables(workdir)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


def test_a_diverged_update_is_never_saved(tmp_path):
    """The largest float32 learning rate (an infinite one is refused up front): step 1's loss is still finite (it
    is computed before the update), but the state it leaves overflows, and a checkpoint due at step 1 must not
    keep it."""
    with pytest.raises(TrainingDiverged, match="state at step 1 holds NaN or infinite values.*no checkpoint"):
        train(tiny_config(learning_rate=3.4e38, checkpoint_every_steps=1), tmp_path / "run")


def test_the_divergence_advice_names_a_way_that_is_taken(tmp_path):
    """Used to be: "Lower config.learning_rate ...", which the same workdir then refused (settings are fixed
    within a run). The advice names restart (or a new workdir); following it with a lower rate trains."""
    config = tiny_config(learning_rate=3.4e38, checkpoint_every_steps=1)
    with pytest.raises(TrainingDiverged, match=r"Lower config.learning_rate.*in a new run: --config.restart=True"):
        train(config, tmp_path / "run")
    config.learning_rate, config.restart, config.max_steps = 0.05, True, 2
    train(config, tmp_path / "run")
    _, variables, _ = load_variables(tmp_path / "run")
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("overrides,message", [
    ({"modle": "resnet20"}, "unknown config key.*'modle'.*did you mean 'model'"),
    ({"model": "resnet5O"}, "unknown model 'resnet5O'"),
    ({"optimizer": "lion"}, "config.optimizer='lion' is not one of"),
    ({"schedule": "cosin"}, "did you mean 'cosine'"),
    ({"image_size": 2}, "image_size=2 is too small for resnet20.*at least 4"),
    ({"dataset": "no_such_dataset_xyz"}, "no_such_dataset_xyz"),
    ({"batch_size": 5000}, "fewer than one batch"),
    ({"class_weights": (1.0, 2.0, 3.0)}, "class_weights has 3 entries but digits has 10 classes"),
    ({"model_overrides": {"in_channels": 1, "stage_size": (1, 1, 1)}},
     "model_overrides has unknown key 'stage_size' \\(did you mean 'stage_sizes'"),
    ({"model_overrides": {"in_channels": 1, "dtype": "bfloat16"}}, "model_overrides.dtype is set by config.dtype"),
    ({"model_overrides": {"in_channels": 1, "num_classes": 12}},
     "^config.model_overrides.num_classes=12 but digits has 10 classes"),
    ({"class_names": ("a", "b", "c")}, "^config.class_names has 3 names but digits has 10 classes"),
    ({"eval_every_epochs": 0}, "eval_every_epochs must be at least 1"),
    ({"schedule": "step", "step_epochs": 0}, "step_epochs must be at least 1"),
    ({"max_steps": 0}, "max_steps must be positive, or -1"),
    ({"warmup_epochs": -1}, "warmup_epochs must be 0 or more"),
    ({"weight_decay": -1e-4}, "weight_decay must be 0 or more"),
    ({"mixup_alpha": -0.2}, "mixup_alpha must be 0 or more"),
    ({"momentum": 1.5}, "momentum must be in \\[0, 1\\)"),
    ({"schedule": "multistep", "milestones": (60, 30)}, "milestones must be increasing"),
    # were int()'s TypeError naming no key, a True taken as a 1 px resize, and str/int comparisons in the schedule
    ({"num_epochs": None}, "config.num_epochs must be a number, got None"),
    ({"num_epochs": 2.5}, "a config value has the wrong type: .*'num_epochs'"),  # was ml_collections' TypeError
    ({"eval_resize": True}, "config.eval_resize must be a number, got True"),
    ({"schedule": "multistep", "milestones": ("30", "60")}, "milestones must be whole numbers of epochs"),
])
def test_bad_configs_fail_before_compiling_with_nothing_written(tmp_path, overrides, message):
    with count_compiles() as compiles, pytest.raises(ValueError, match=message):
        train(_with(tiny_config(), overrides), tmp_path / "run")
    assert compiles[0] == 0
    assert not (tmp_path / "run").exists()


def _with(config, overrides):
    import ml_collections

    values = config.to_dict()
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def fine_tune_config(init_from):
    """Two steps at a learning rate of ~0, which keeps the weights it starts from. Both fine-tuning tests use it,
    so they compile the same programs (the second finds them in the session's compilation cache)."""
    return tiny_config(init_from=init_from, max_steps=2, learning_rate=1e-9, num_epochs=1)


@pytest.mark.long  # whole training runs
def test_fine_tune_from_another_run(finished_run, tmp_path):
    source_dir, source, _ = finished_run
    messages = []
    result = train(fine_tune_config(init_from=str(source_dir)), tmp_path / "ft", log=messages.append)
    assert any(m.startswith(f"initialised from {source_dir}") for m in messages)
    np.testing.assert_allclose(jax.device_get(result.state.params["conv1"]["kernel"]),
                               jax.device_get(source.state.params["conv1"]["kernel"]), atol=1e-6)


def test_init_from_missing_file_is_a_clear_error_with_nothing_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_config(init_from=str(tmp_path / "nope.pth")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_init_from_reads_a_safetensors_file_under_another_name(tmp_path):
    """``init_from`` chose its reader by suffix, so a safetensors file saved as ``.bin`` (as hubs name them) was
    refused as "not a PyTorch .pth file", while load_torchvision and pretrained(file=) read it by its header."""
    import jax.numpy as jnp

    from resnet_jax.torch_file import write_safetensors
    from resnet_jax.torchvision import to_torchvision
    from resnet_jax.training.config import model_from_config, validate
    from resnet_jax.training.pretrained_init import initial_variables

    config = validate(tiny_config(init_from=str(tmp_path / "weights.bin")))
    model = model_from_config(config, 10)
    variables = jax.device_get(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 16, 16, 1))))
    write_safetensors(tmp_path / "weights.bin", to_torchvision(variables))
    loaded = initial_variables(config, model, (1, 16, 16, 1), log=lambda _: None)
    np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])


@pytest.mark.long  # whole training runs
def test_fine_tune_from_a_torchvision_file_with_another_head(tmp_path):
    """A .pth for 5 classes starts a 10-class digits run: backbone taken, head initialised afresh."""
    import jax.numpy as jnp

    from resnet_jax import create_model
    from resnet_jax.torchvision import save_torchvision

    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=5)
    variables = jax.device_get(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 1))))
    save_torchvision(variables, tmp_path / "five.pth")
    messages = []
    result = train(fine_tune_config(init_from=str(tmp_path / "five.pth")), tmp_path / "ft", log=messages.append)
    assert any(m.startswith("initialised from") for m in messages)
    params = jax.device_get(result.state.params)
    np.testing.assert_allclose(params["conv1"]["kernel"], variables["params"]["conv1"]["kernel"], atol=1e-6)
    assert params["fc"]["kernel"].shape == (64, 10)


def test_evaluation_runs_the_folded_model_with_the_same_metrics(finished_run):
    """Given the model, the eval step folds BatchNorm into the convolutions: no per-activation normalisation is
    left in the step (no rank-4 subtraction of a mean), and the metrics equal the unfolded step's."""
    from resnet_jax import data
    from resnet_jax.parallel import make_mesh, shard_batch
    from resnet_jax.training import evaluate_loader, make_eval_step
    from resnet_jax.training.config import normalization_stats

    _, result, _ = finished_run
    source = data.get_source("digits", "validation", image_size=8)
    mean, std = normalization_stats(result.config)
    loader = data.eval_loader(source, batch_size=64, image_size=8, mean=mean, std=std, channels=1)
    mesh = make_mesh()
    folded, unfolded = make_eval_step(mesh, result.model), make_eval_step(mesh)
    assert evaluate_loader(result.state, folded, loader, mesh) == pytest.approx(
        evaluate_loader(result.state, unfolded, loader, mesh), rel=1e-5)

    batch = shard_batch(next(iter(loader)), mesh)

    def normalising_subtractions(step):
        jaxpr = jax.make_jaxpr(step)(result.state, batch)
        return sum(1 for eq in _equations(jaxpr.jaxpr) if eq.primitive.name == "sub" and eq.outvars[0].aval.ndim == 4)

    assert normalising_subtractions(unfolded) > 0 and normalising_subtractions(folded) == 0


def _equations(jaxpr):
    """Every equation of a jaxpr, inside nested calls and custom derivatives too."""
    for eq in jaxpr.eqns:
        yield eq
        for value in eq.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_with_an_ema_its_accuracy_ranks_checkpoints_and_stops_early(tmp_path, monkeypatch):
    """timm's train.py ranks by its EMA's metrics when it keeps one. Decay 1 freezes the average at its first
    copy, so the EMA's accuracy never improves while the raw weights' does: patience 1 stops after the second
    evaluation, and each checkpoint is ranked by the EMA's accuracy."""
    from matplotlib.figure import Figure

    from resnet_jax.checkpoint import Checkpointer
    from resnet_jax.training.metrics_log import plot_learning_curves

    messages = []
    config = tiny_config(num_epochs=4, warmup_epochs=0, early_stopping_patience=1, model_ema=True,
                         model_ema_decay=1.0, model_ema_steps=1, checkpoint_every_steps=1000)
    result = train(config, tmp_path, log=messages.append)
    val = [r["accuracy"] for r in result.history if r["split"] == "val"]
    ema = [r["accuracy"] for r in result.history if r["split"] == "val_ema"]
    assert len(val) == len(ema) == 2 and val[1] > val[0]  # the raw weights improved: they alone would go on
    assert ema[0] == ema[1] != val[1]
    assert int(result.state.step) == 2 * 44
    assert any("no improvement of the EMA's val accuracy for 1 evaluations" in m for m in messages)
    again = train(config, tmp_path)  # started again (a requeued job): it stopped, so it stays stopped
    assert int(again.state.step) == 2 * 44 and again.stop_reason.startswith("early stopping")
    assert again.history == result.history
    checkpoints = Checkpointer(tmp_path / "checkpoints", async_save=False)
    try:
        assert checkpoints.steps() == [44, 88]  # the epochs' ends only
        ranked = [checkpoints.val_accuracy(step) for step in (44, 88)]
        assert ranked == pytest.approx(ema)
        assert checkpoints.best_step() == 88  # the latest of equals
    finally:
        checkpoints.close()
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *args, **kwargs: drawn.append(fig))
    plot_learning_curves(tmp_path)
    assert [ax.get_legend_handles_labels()[1] for ax in drawn[0].axes] == [["train", "val", "val_ema"]] * 2


@pytest.mark.slow
def test_a_run_stopped_by_max_steps_inside_an_epoch_continues_that_epoch(tmp_path):
    """Stopped at step 50 of 88 (44 per epoch) and continued: its epoch-2 summary is the mean of all 44 of the
    epoch's steps, as the train rows of metrics.jsonl give them (the stop ended the epoch: "epoch 2/2" was
    printed twice, the second covering steps 51-88 alone), and the stop's evaluation is labelled as the step it
    was (it was "epoch 2")."""
    said = []
    first = train(tiny_config(max_steps=50), tmp_path, log=said.append)
    assert len([line for line in said if line.startswith("epoch 2/2 (to step 50): train loss")]) == 1, said
    assert [r["epoch"] for r in first.history if r["split"] == "val"] == [1, pytest.approx(50 / 44)]
    loop = [json.loads((tmp_path / "checkpoints" / str(step) / "meta" / "metadata").read_text())["loop"]
            for step in (44, 50)]
    assert [(m["best"], m["bad_epochs"]) for m in loop] == [(loop[0]["best"], loop[0]["bad_epochs"])] * 2
    second = train(tiny_config(max_steps=-1), tmp_path, log=said.append)
    assert second.resumed_from == 50 and int(second.state.step) == 88
    summary = [line for line in said if line.startswith("epoch 2/2:")]
    assert len(summary) == 1, said
    rows = [r for r in second.history if r["split"] == "train"]
    steps = [r["step"] for r in rows]
    window = {r["step"]: r["step"] - before for r, before in zip(rows, [0, *steps])}  # steps each row averages
    epoch2 = [r for r in rows if 44 < r["step"] <= 88]
    assert sum(window[r["step"]] for r in epoch2) == 44
    mean = {k: sum(r[k] * window[r["step"]] for r in epoch2) / 44 for k in ("loss", "accuracy")}
    assert summary[0].startswith(f"epoch 2/2: train loss {mean['loss']:.4f} acc {mean['accuracy']:.4f} | val")


def test_a_fine_tune_resumes_after_its_starting_file_moved_and_a_bad_one_changes_nothing(tmp_path):
    """Used to be: (1) once the .pth a fine-tune started from had moved, the run could not continue (missing with
    the old path, a refused change with the new one), though a resume never reads it; (2) an unreadable file
    failed only after restart=True had moved the old run aside (the same command then started afresh)."""
    import shutil

    import jax.numpy as jnp

    from resnet_jax import create_model
    from resnet_jax.torchvision import save_torchvision

    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=10)
    save_torchvision(jax.device_get(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 1)))),
                     tmp_path / "start.pth")
    run = tmp_path / "ft"
    train(fine_tune_config(init_from=str(tmp_path / "start.pth")), run, log=lambda _: None)
    shutil.move(tmp_path / "start.pth", tmp_path / "moved.pth")
    for more, path in enumerate(("start.pth", "moved.pth"), 1):  # the old path (gone) and the new one
        settings = fine_tune_config(init_from=str(tmp_path / path))
        settings.max_steps += more
        result = train(settings, run, log=lambda _: None)
        assert result.resumed_from == settings.max_steps - 1 and int(result.state.step) == settings.max_steps
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    (tmp_path / "bad.pth").write_bytes(b"not a weights file")
    restart = fine_tune_config(init_from=str(tmp_path / "bad.pth"))
    restart.restart = True
    with pytest.raises(ValueError, match="bad.pth"):
        train(restart, run, log=lambda _: None)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing moved aside
    with pytest.raises(ValueError, match="bad.pth"):
        train(fine_tune_config(init_from=str(tmp_path / "bad.pth")), tmp_path / "fresh", log=lambda _: None)
    assert not (tmp_path / "fresh").exists()


def test_a_data_parallel_or_headless_file_gets_a_new_head(tmp_path):
    """Used to be: the head was looked up as "fc.weight" before the "module." prefix of a DataParallel/DDP (or
    "_orig_mod." of a compiled) model's file came off, so a 5-class file into a 10-class run was refused as
    mis-shaped, with advice no config could follow. torchvision's way: strip the prefix, replace fc."""
    import jax.numpy as jnp

    from resnet_jax import create_model
    from resnet_jax.torch_file import save_state_dict
    from resnet_jax.torchvision import to_torchvision
    from resnet_jax.training.config import model_from_config, validate
    from resnet_jax.training.pretrained_init import initial_variables

    five = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=5)
    variables = jax.device_get(five.init(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 1))))
    state = to_torchvision(variables)
    save_state_dict(tmp_path / "ddp.pth", {f"module._orig_mod.{k}": v for k, v in state.items()})
    # and a backbone saved without its head (torch loads it with strict=False): it had been "2 missing: fc..."
    save_state_dict(tmp_path / "backbone.pth", {k: v for k, v in state.items() if not k.startswith("fc.")})
    for name in ("ddp.pth", "backbone.pth"):
        config = validate(tiny_config(init_from=str(tmp_path / name)))
        model = model_from_config(config, 10)
        loaded = initial_variables(config, model, (1, 8, 8, 1), log=lambda _: None)
        np.testing.assert_array_equal(loaded["params"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])
        assert loaded["params"]["fc"]["kernel"].shape == (64, 10), name


def test_init_from_an_existing_path_is_kept_absolute(tmp_path, monkeypatch):
    """A fine-tune's config recorded init_from="srcrun" as given: read later from another directory (train.evaluate
    from /), or after the source run moved, it was taken for a published weights name and the finished run could
    not be loaded, evaluated or resumed."""
    from resnet_jax.training.config import validate

    (tmp_path / "srcrun").mkdir()
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    config = validate(tiny_config(init_from="srcrun"))
    assert config.init_from == str(tmp_path / "srcrun")
    monkeypatch.chdir("/")
    assert validate(config).init_from == str(tmp_path / "srcrun")  # as Classifier.load reads it back
    (tmp_path / "srcrun").rename(tmp_path / "moved")
    assert validate(config).init_from == str(tmp_path / "srcrun")
