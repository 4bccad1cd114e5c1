"""``init_from=<a run's workdir>``: which of its weights (``init_from_step``, ``init_from_ema``, as
``train.export``'s ``--step``/``--use_ema`` choose), and an RGB run's first convolution adapted to a model of other
input channels as a torchvision file's is (timm's ``adapt_input_conv`` the reference)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from timm.models._manipulate import adapt_input_conv

from resnet_jax.checkpoint import CheckpointError, load_variables
from resnet_jax.training import train
from resnet_jax.training.config import model_from_config, validate
from resnet_jax.training.pretrained_init import initial_variables
from training_helpers import tiny_config


@pytest.fixture(scope="module")
def rgb_ema_run(tmp_path_factory):
    """Two epochs of the tiny RGB model with an EMA: checkpoints every 8 steps, evaluated at 44 and 88."""
    workdir = tmp_path_factory.mktemp("rgb_ema")
    train(tiny_config(model_overrides={"stage_sizes": (1, 1, 1), "in_channels": 3}, model_ema=True,
                      model_ema_steps=1, keep_checkpoints=20), workdir)
    return workdir


def start(workdir, in_channels=3, **keys):
    config = validate(tiny_config(init_from=str(workdir), model_overrides={"stage_sizes": (1, 1, 1),
                                                                           "in_channels": in_channels}, **keys))
    messages = []
    variables = initial_variables(config, model_from_config(config, 10), (1, 8, 8, in_channels), messages.append)
    return variables, messages[-1]


def assert_same_variables(got, expected):
    for collection in ("params", "batch_stats"):
        flat_got, flat_expected = (flatten_dict(tree[collection], sep="/") for tree in (got, expected))
        assert flat_got.keys() == flat_expected.keys()
        for key in flat_expected:
            np.testing.assert_array_equal(flat_got[key], flat_expected[key], err_msg=key)


def test_the_step_and_the_moving_average_are_chosen(rgb_ema_run):
    """Used to be: always the latest checkpoint's raw weights, though an EMA run's averaged weights are the ones
    it ranks and delivers (README), and the log named only the directory."""
    variables, message = start(rgb_ema_run)
    assert_same_variables(variables, load_variables(rgb_ema_run)[1])
    assert message.endswith("(the latest checkpoint)")

    variables, message = start(rgb_ema_run, init_from_step="44", init_from_ema=True)
    assert_same_variables(variables, load_variables(rgb_ema_run, step=44, use_ema=True)[1])
    assert message.endswith("(the step 44 checkpoint, its moving average)")
    raw_44 = load_variables(rgb_ema_run, step=44)[1]
    assert not np.array_equal(variables["params"]["fc"]["kernel"], raw_44["params"]["fc"]["kernel"])


def test_best_is_the_highest_validation_accuracy_the_run_logged(rgb_ema_run):
    rows = [json.loads(line) for line in (rgb_ema_run / "metrics.jsonl").read_text().splitlines()]
    ranked = [(row["accuracy"], row["step"]) for row in rows if row["split"] == "val_ema"]
    best_step = max(ranked)[1]
    variables, message = start(rgb_ema_run, init_from_step="best", init_from_ema=True)
    assert_same_variables(variables, load_variables(rgb_ema_run, step=best_step, use_ema=True)[1])
    assert "(the best checkpoint, its moving average)" in message


@pytest.mark.parametrize("in_channels", [1, 4])
def test_an_rgb_runs_first_convolution_is_adapted_as_timm_adapts_it(rgb_ema_run, in_channels):
    """Used to be refused ("source (3, 3, 3, 16), model (3, 3, 1, 16)") while the same weights as a .pth loaded."""
    variables, message = start(rgb_ema_run, in_channels=in_channels)
    rgb = np.asarray(load_variables(rgb_ema_run)[1]["params"]["conv1"]["kernel"])  # (kh, kw, 3, O)
    expected = adapt_input_conv(in_channels, torch.from_numpy(rgb.transpose(3, 2, 0, 1).copy())).numpy()
    np.testing.assert_allclose(variables["params"]["conv1"]["kernel"], expected.transpose(2, 3, 1, 0), rtol=1e-6,
                               atol=1e-7)
    assert f"the first convolution adapted to {in_channels} input channels" in message
    assert variables["params"]["conv1"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("keys,message", [
    ({"init_from_step": "worst"}, "init_from_step='worst' is not a step"),
    ({"init_from_step": "3"}, "no checkpoint at step 3"),
])
def test_a_step_the_run_does_not_have_is_refused(rgb_ema_run, keys, message):
    with pytest.raises((ValueError, CheckpointError), match=message):
        start(rgb_ema_run, **keys)


@pytest.mark.parametrize("init_from,keys", [
    ("FILE", {"init_from_step": "best"}),
    ("FILE", {"init_from_ema": True}),
    ("", {"init_from_ema": True}),
])
def test_the_choice_is_refused_where_there_is_no_run_to_choose_in(tmp_path, init_from, keys):
    """Set for a file or for no init_from at all, they would have been ignored without a word."""
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"unread")
    config = validate(tiny_config(init_from=str(weights) if init_from == "FILE" else "", **keys))
    with pytest.raises(ValueError, match="init_from_step/init_from_ema choose among"):
        initial_variables(config, model_from_config(config, 10), (1, 8, 8, 1), lambda _: None)
