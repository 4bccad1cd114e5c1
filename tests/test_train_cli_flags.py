"""``python -m train``'s flags: a misspelt config key, or a config file that is missing or fails to load, is one
sentence with exit code 2 (not ml_collections' traceback), every ResNet field is settable as
``--config.model_overrides.FIELD``, and a path the run cannot use is one line with exit code 1.

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


@pytest.mark.parametrize("args,names", [
    (["--config.class_names=zero,one, two"], ("zero", "one", "two")),            # used to be one name
    (["--config.class_names", "a,b"], ("a", "b")),
    (["--config.class_names=('tiger, cat', 'dog')"], ("tiger, cat", "dog")),     # a name holding a comma
    (["--config.class_names=cat"], ("cat",)),
])
def test_class_names_are_listed_with_commas_as_numbers_are(args, names):
    """Used to be: ``--config.class_names=zero,one,...,nine`` was one name, and the error said "has 1 names"."""
    parse(*args)
    assert tuple(flags.FLAGS.config.class_names) == names


def test_class_names_without_a_value_is_still_absls_missing_value(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("--config.class_names")
    assert exit_.value.code == 2 and "Missing value for flag --config.class_names" in capsys.readouterr().err


@pytest.mark.long
def test_the_command_exits_2_with_one_line():
    proc = run_python(module="train", args=["--workdir=unused", "--config.modle=resnet18"], env=worker_env(),
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --config.modle=resnet18 sets config.modle, which is not a config key; did you mean 'model'?"]


def broken_configs(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise RuntimeError('no data here')\n")
    (tmp_path / "typo.py").write_text("from resnet_jax.training import base_config\n\n\ndef get_config():\n"
                                      "    c = base_config()\n    c.learning_rate = c.lr * 2\n    return c\n")
    (tmp_path / "key.py").write_text("def get_config():\n    return {}['missing']\n")
    (tmp_path / "plain_dict.py").write_text("def get_config():\n    return {'model': 'resnet20'}\n")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("value,message", [
    ("/nonexistent/cfg.py", "--config=/nonexistent/cfg.py: no such file; give a config file, e.g. "
                            "--config=train/configs/default.py (the recipes are in {recipes})"),
    ("{tmp}/folder", "--config={tmp}/folder: {tmp}/folder is a directory, not a config file; give a config file, "
                     "e.g. --config=train/configs/default.py"),
    ("", "--config= names no file; give a config file, e.g. --config=train/configs/default.py"),
    ("{tmp}/syntax.py", "--config={tmp}/syntax.py: the config file failed at line 1 of {tmp}/syntax.py "
                        "(SyntaxError: invalid syntax"),
    ("{tmp}/raises.py", "--config={tmp}/raises.py: the config file failed at line 2 of {tmp}/raises.py "
                        "(RuntimeError: no data here); a config file is Python whose get_config() returns the config"),
    ("train/configs/imagenet_resnet50.py:cosin",
     "flag --config=train/configs/imagenet_resnet50.py:cosin: the config file raised ValueError: unknown variant "
     "'cosin' of imagenet_resnet50"),
    # a typo inside the file (an AttributeError or KeyError of its own) had been "cannot apply the --config flags"
    ("{tmp}/typo.py", "--config={tmp}/typo.py: the config file failed at line 6 of {tmp}/typo.py (AttributeError: "),
    ("{tmp}/key.py", "--config={tmp}/key.py: the config file failed at line 2 of {tmp}/key.py (KeyError: 'missing')"),
    # a dict had met config.unlocked() as a traceback
    ("{tmp}/plain_dict.py", "the config file's get_config() returned a dict; return an ml_collections.ConfigDict"),
], ids=["missing", "directory", "empty", "syntax-error", "get_config-raises", "unknown-variant", "attribute-typo",
        "key-error", "returns-a-dict"])
def test_a_config_file_that_cannot_be_loaded_is_one_sentence_and_exit_code_2(tmp_path, value, message, capsys):
    """Used to be: ml_collections' OSError traceback (38 lines) for a missing file, the config file's own traceback
    for one that raises, and "Error whilst parsing config file:" without the error for an unknown variant."""
    tmp = broken_configs(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        parse(f"--config={value.format(tmp=tmp)}")
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"error: {message.format(tmp=tmp, recipes=cli.RECIPES)}" in err and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_the_readmes_recipe_paths_work_from_any_directory_and_a_local_file_wins(tmp_path, monkeypatch):
    """After ``pip install`` (Colab's) the recipes are in site-packages: ``--config=train/configs/X.py`` failed in
    every directory but a clone's. It now reads the installed recipe, unless the working directory has that file."""
    monkeypatch.chdir(tmp_path)
    parse("--config=train/configs/imagenet_resnet50.py:cosine")
    assert flags.FLAGS.config.model == "resnet50" and flags.FLAGS.config.schedule == "cosine"
    parse("--config", "train/configs/finetune.py")
    assert flags.FLAGS.config.model == "resnet18"
    own = tmp_path / "train" / "configs"
    own.mkdir(parents=True)
    (own / "finetune.py").write_text("from resnet_jax.training import base_config\n"
                                     "def get_config():\n    c = base_config()\n    c.model = 'resnet34'\n    return c\n")
    parse("--config=train/configs/finetune.py")
    assert flags.FLAGS.config.model == "resnet34"


@pytest.mark.parametrize("error,line", [
    (NotADirectoryError("the weights cache /x/cache is a file; give cache_dir= or $RESNET_JAX_CACHE a directory"),
     "error: the weights cache /x/cache is a file; give cache_dir= or $RESNET_JAX_CACHE a directory"),
    (FileExistsError(17, "File exists", "/x/cache"), "error: FileExistsError: [Errno 17] File exists: '/x/cache'"),
    (PermissionError(13, "Permission denied", "/x/run"), "error: PermissionError: [Errno 13] Permission denied: "
                                                          "'/x/run'"),
])
def test_a_path_the_run_cannot_use_is_one_line_and_exit_code_1(error, line, monkeypatch, capsys):
    """Only FileNotFoundError was caught: any other OSError (a weights cache that is a file, a workdir that cannot
    be written) was a traceback."""
    from absl import logging

    import resnet_jax.training

    def train(config, workdir):
        raise error

    parse("--workdir=unused")
    monkeypatch.setattr(resnet_jax.training, "train", train)
    monkeypatch.setattr(cli, "show_library_info", lambda: None)  # leaves the session's loggers as they are
    verbosity = logging.get_verbosity()
    try:
        assert cli.main(["train"]) == 1
    finally:
        logging.set_verbosity(verbosity)
    assert capsys.readouterr().err.strip().splitlines() == [line]


@pytest.mark.parametrize("module,args,message", [
    ("train", ["--workdir=unused", "runs/x"], "error: unexpected arguments ['runs/x']; options are --workdir and "
                                              "--config[.key=value]"),
    ("train.evaluate", ["runs/x"], "error: flag --workdir=None: Flag --workdir must have a value other than None; "
                                   "--helpshort lists the flags"),
    ("train.evaluate", ["--workdir=unused", "runs/x"], "error: unexpected arguments ['runs/x']; the options are flags"),
    ("train.export", ["--workdir=unused", "--outptu=a.onnx"], "error: Unknown command line flag 'outptu'. Did you "
                                                              "mean: output ?; --helpshort lists the flags"),
    ("train.export", ["--workdir=unused", "--output=a.onnx", "b.onnx"], "error: unexpected arguments ['b.onnx']"),
    ("train.predict", ["--workdir=unused"], "error: give one or more image files (or .npy arrays) after the flags"),
    ("train.predict", ["x.png"], "error: give exactly one of --workdir (a training run), --artifact"),
    ("train.predict", ["--workdir=a", "--artifact=b", "x.png"], "error: give exactly one of --workdir"),
    ("train.predict", ["--pretrained=resnet18", "--step=1", "x.png"], "error: --step picks a checkpoint of a workdir"),
    ("train.predict", ["--workdir=unused", "--top_k=0", "x.png"], "error: top_k must be a positive integer"),
    # an empty workdir was the current directory (a run's files loose there); a file failed in the system's words
    ("train", ["--workdir="], "error: --workdir is empty; give a run's directory, e.g. --workdir=runs/default"),
    ("train", ["--workdir=/etc/passwd"], "error: --workdir=/etc/passwd is a file, not a directory"),
    ("train.evaluate", ["--workdir="], "error: --workdir is empty"),
    ("train.evaluate", ["--workdir=/etc/passwd"], "error: --workdir=/etc/passwd is a file, not a directory"),
    ("train.export", ["--workdir=", "--output=a.onnx"], "error: --workdir is empty"),
])
def test_every_command_s_usage_mistake_is_one_line_and_exit_code_2(module, args, message):
    """absl would print the whole help and exit 1 (the code of a run that failed), and evaluate/export would
    drop a stray argument unread: a path without ``--workdir=`` then evaluated nothing the user named."""
    proc = run_python(module=module, args=args, env={**worker_env(), "RESNET_JAX_TCMALLOC": "0"}, check=False,
                      timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr[-3000:]
