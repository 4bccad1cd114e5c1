"""``python -m train``'s flags: a misspelt config key is one sentence naming the nearest valid keys with exit code
2 (not ml_collections' traceback), and every ResNet field is settable as ``--config.model_overrides.FIELD``.

``parse_flags`` is what ``app.run`` calls on the command line; it runs here in-process (it defines the flags
afresh each time), and once through a real ``python -m train`` (long)."""

import dataclasses
import importlib

import pytest
from absl import flags

from conftest import run_python
from resnet_jax.resnet import ResNet
from resnet_jax.training.config import model_from_config, validate
from training_helpers import worker_env

cli = importlib.import_module("train.__main__")


def parse(*args):
    flags.FLAGS.unparse_flags()
    return cli.parse_flags(["train", *args])


@pytest.mark.parametrize("arg,message", [
    ("--config.modle=resnet18", "--config.modle=resnet18 sets config.modle, which is not a config key; did you "
                                "mean 'model'?"),
    ("--config.lerning_rate=0.1", "did you mean 'learning_rate'?"),
    ("--config.model_overrides.conv_imp=xla", "names no ResNet field 'conv_imp'; did you mean 'conv_impl'?"),
    ("--config.model_overrides.groups=two", "groups takes a value of type int, e.g. --config.model_overrides.groups=2"),
    ("--config.optimizer.lr=3", "treats config.optimizer as a group of keys, but it is one value"),
    ("--config.batch_size=many", "--config.batch_size=many: invalid literal for int()"),
])
def test_a_bad_config_flag_is_one_sentence_and_exit_code_2(arg, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(arg)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_every_resnet_field_is_settable_from_the_command_line():
    parse("--config.model=resnet18", "--config.model_overrides.conv_impl=xla",
          "--config.model_overrides.stage_sizes=1,1,1,1", "--config.model_overrides.stem", "deep",
          "--config.model_overrides.bn_epsilon=1e-3", "--config.model_overrides.preact=True")
    config = validate(flags.FLAGS.config)
    model = model_from_config(config, 10)
    assert (model.conv_impl, tuple(model.stage_sizes), model.stem, model.bn_epsilon, model.preact) == (
        "xla", (1, 1, 1, 1), "deep", 1e-3, True)
    fields = {f.name for f in dataclasses.fields(ResNet)} - {"parent", "name"}
    assert set(cli._field_types()) == fields  # every field has a parser: none is left out


@pytest.mark.long
def test_the_command_exits_2_with_one_line():
    proc = run_python(module="train", args=["--workdir=unused", "--config.modle=resnet18"], env=worker_env(),
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --config.modle=resnet18 sets config.modle, which is not a config key; did you mean 'model'?"]
