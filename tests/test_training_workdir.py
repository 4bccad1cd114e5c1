"""A workdir is the record of one run: a changed config is refused with nothing written, safe changes continue,
starting over is explicit and moves the old run aside, and no history is ever truncated by a fresh start."""

import json
import shutil

import pytest

from resnet_jax.checkpoint import ConfigMismatch
from resnet_jax.training import train
from training_helpers import count_compiles, snapshot, tiny_config


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
