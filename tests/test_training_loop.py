"""The training loop in-process on real data: what a run leaves behind, resume, damage, divergence, errors."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax.checkpoint import load_variables
from resnet_jax.training import TrainingDiverged, train
from training_helpers import tiny_config


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


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_is_reported_skipped_and_kept(tmp_path, damage):
    workdir = tmp_path / "run"
    train(tiny_config(num_epochs=1, max_steps=24), workdir)
    latest = workdir / "checkpoints" / "24"
    files = sorted((p for p in latest.rglob("*") if p.is_file() and "state" in p.parts),
                   key=lambda p: p.stat().st_size)
    biggest = files[-1]
    raw = bytearray(biggest.read_bytes())
    if damage == "truncate":
        biggest.write_bytes(raw[: len(raw) // 2])
    else:
        for i in range(len(raw) // 3, len(raw) // 3 + 64):
            raw[i] ^= 0xFF
        biggest.write_bytes(bytes(raw))
    messages = []
    result = train(tiny_config(num_epochs=1, max_steps=32), workdir, log=messages.append)
    assert any("checkpoint at step 24 is damaged" in m for m in messages), messages
    assert any("resumed from the checkpoint at step 16" in m for m in messages), messages
    assert int(result.state.step) == 32
    kept = list((workdir / "checkpoints_damaged").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("24-")


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    train(tiny_config(max_steps=8), workdir)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf).*last good checkpoint is step 8"):
        train(tiny_config(max_steps=40, learning_rate=float("inf")), workdir)
    _, variables, _ = load_variables(workdir)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("overrides,message", [
    ({"modle": "resnet20"}, "unknown config key.*'modle'.*did you mean 'model'"),
    ({"model": "resnet5O"}, "unknown model 'resnet5O'"),
    ({"optimizer": "lamb"}, "config.optimizer='lamb' is not one of"),
    ({"schedule": "cosin"}, "did you mean 'cosine'"),
    ({"image_size": 2}, "image_size=2 is too small for resnet20.*at least 4"),
    ({"dataset": "no_such_dataset_xyz"}, "no_such_dataset_xyz"),
    ({"batch_size": 5000}, "fewer than one batch"),
])
def test_bad_configs_fail_before_compiling_with_one_sentence(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(_with(tiny_config(), overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _with(config, overrides):
    import ml_collections

    values = config.to_dict()
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def test_fine_tune_from_another_run(finished_run, tmp_path):
    source_dir, source, _ = finished_run
    messages = []
    result = train(tiny_config(init_from=str(source_dir), max_steps=4, learning_rate=1e-9, num_epochs=1),
                   tmp_path / "ft", log=messages.append)
    assert any(m.startswith(f"initialised from {source_dir}") for m in messages)
    # a learning rate of ~0 keeps the source's weights
    np.testing.assert_allclose(jax.device_get(result.state.params["conv1"]["kernel"]),
                               jax.device_get(source.state.params["conv1"]["kernel"]), atol=1e-6)


def test_init_from_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_config(init_from=str(tmp_path / "nope.pth")), tmp_path / "run")


def test_fine_tune_from_a_torchvision_file_with_another_head(tmp_path):
    """A .pth for 5 classes starts a 10-class digits run: backbone taken, head initialised afresh."""
    import jax.numpy as jnp

    from resnet_jax import create_model
    from resnet_jax.torchvision import save_torchvision

    model = create_model("resnet20", stage_sizes=(1, 1, 1), in_channels=1, num_classes=5)
    variables = jax.device_get(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 8, 8, 1))))
    save_torchvision(variables, tmp_path / "five.pth")
    messages = []
    result = train(tiny_config(init_from=str(tmp_path / "five.pth"), max_steps=2, learning_rate=1e-9),
                   tmp_path / "ft", log=messages.append)
    assert any(m.startswith("initialised from") for m in messages)
    params = jax.device_get(result.state.params)
    np.testing.assert_allclose(params["conv1"]["kernel"], variables["params"]["conv1"]["kernel"], atol=1e-6)
    assert params["fc"]["kernel"].shape == (64, 10)
