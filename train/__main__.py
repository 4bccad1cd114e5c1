"""``python -m train --workdir=DIR --config=train/configs/default.py [--config.key=value ...]``

Trains (or resumes, when DIR already holds checkpoints) and leaves in DIR: checkpoints/, metrics.jsonl,
tensorboard/, learning_curves.png and config.json. A config that changes the run already in DIR is refused
(exit code 1, nothing written); ``--config.restart=True`` moves that run aside to DIR/previous_runs/ first.
SIGTERM or SIGINT finishes the current step, saves a checkpoint and exits with code 75 (EX_TEMPFAIL): run the
same command again to resume. Multi-host: pass ``--config.coordinator_address=HOST:PORT
--config.num_processes=N --config.process_id=I`` to each process (or set RESNET_JAX_COORDINATOR,
RESNET_JAX_NUM_PROCESSES, RESNET_JAX_PROCESS_ID); under SLURM, Open MPI or on a TPU pod,
``--config.coordinator_address=auto`` takes them from the cluster. Where Debian's libtcmalloc-minimal4 (or
another tcmalloc) is installed the command runs under it (``resnet_jax/allocator.py``; ``RESNET_JAX_TCMALLOC=0``
turns that off).

Any ResNet field is settable as ``--config.model_overrides.FIELD=VALUE`` (``conv_impl=xla``,
``stage_sizes=1,1,1``) but the four that are config keys of their own (dtype, remat, zero_init_residual,
drop_path_rate); a misspelt key (``--config.modle=resnet18``) is one line naming the nearest valid keys,
exit code 2, like every other usage error (a ``--config`` file that is missing or fails to load included).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import os
import sys
import traceback
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from train.usage import no_arguments, usage_error, workdir_problem

DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "default.py")
flags.DEFINE_string("workdir", "runs/default", "directory for checkpoints, metrics and plots (resumes if present)")
# --config is defined by parse_flags, from the command line it is given: ml_collections reads the
# --config.* overrides while defining it, so a misspelt key fails there, where parse_flags can report it.


OVERRIDES = "--config.model_overrides."


class UsageError(ValueError):
    """A command line that names an unknown config key or gives a value of the wrong type."""


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with the config's mistakes as one sentence and exit code 2 instead of a traceback, and
    ``--config.model_overrides.FIELD=VALUE`` for every ResNet field: ``model_overrides`` starts empty, so
    ml_collections has no key (and no type) to override; these are taken out, checked against ``ResNet``'s
    fields and converted here, then set on the parsed config."""
    try:
        rest, overrides = _take_model_overrides(_listed_names(_installed_recipes(argv)))
        try:
            _define_config_flag(rest)
            remaining = flags.FLAGS(rest)
            config = flags.FLAGS.config
            config.keys()  # a config file ml_collections could not read fails here, at first use, not while parsing
        except flags.Error as err:
            raise UsageError(_flag_error_message(err)) from None
        except OSError as err:
            raise UsageError(_unreadable_config_message(rest, err)) from None
        except (AttributeError, KeyError, TypeError, ValueError) as err:  # the file's own first (a typo in it)
            raise UsageError(_broken_config_message(rest, err) or _unknown_key_message(rest)
                             or f"cannot apply the --config flags: {err}") from None
        except Exception as err:  # noqa: BLE001 - re-raised below unless the config file itself raised it
            message = _broken_config_message(rest, err)
            if message is None:
                raise
            raise UsageError(message) from None
        if not isinstance(config, ml_collections.ConfigDict):  # a dict had met config.unlocked() as a traceback
            raise UsageError(f"the config file's get_config() returned a {type(config).__name__}; return an "
                             "ml_collections.ConfigDict, e.g. resnet_jax.training.base_config() with changes")
        if problem := workdir_problem(flags.FLAGS.workdir):
            raise UsageError(problem)
    except UsageError as err:
        message = str(err)
        usage_error(message, before_exit=lambda: _join_to_refuse(argv, message))
    with config.unlocked():
        for key, value in overrides.items():
            config.model_overrides[key] = value
    return remaining


_RUN_KEYS = {"coordinator_address": str, "num_processes": int, "process_id": int}
_RUN_VARIABLES = ("RESNET_JAX_COORDINATOR", "RESNET_JAX_NUM_PROCESSES", "RESNET_JAX_PROCESS_ID")


def _join_to_refuse(argv: list[str], message: str) -> None:
    """A command line mistake in one process of a multi-process run (the flags or environment name the run): the
    process joins the others only to hand it over, or they would wait for it until JAX's timeout
    (``workdir.join_to_refuse``). A one-process command line imports nothing more."""
    settings = {}
    for key, kind in _RUN_KEYS.items():
        for _, _, value in _flag_values(argv, f"--config.{key}"):
            with contextlib.suppress(ValueError):  # a count that is no number names no run
                settings[key] = kind(value)
    if settings or any(os.environ.get(name) for name in _RUN_VARIABLES):
        from resnet_jax.training.workdir import join_to_refuse

        join_to_refuse(settings, f"its command line: {message}")


RECIPES = Path(__file__).parent / "configs"
CONFIG_EXAMPLE = f"e.g. --config=train/configs/default.py (the recipes are in {RECIPES})"


def _installed_recipes(argv: list[str]) -> list[str]:
    """``--config=train/configs/X.py`` as the README writes it, read from the installed package where the working
    directory has no such file: after ``pip install`` (Colab's) the recipes live in site-packages, and the
    command would fail in any directory but a clone's. A file of that name in the working directory wins."""
    def installed(value: str) -> str:
        file, colon, arg = value.partition(":")
        path = Path(file)
        if path.exists() or path.is_absolute() or path.parts[:2] != ("train", "configs"):
            return value
        candidate = RECIPES.joinpath(*path.parts[2:])
        return f"{candidate}{colon}{arg}" if candidate.is_file() else value

    out = list(argv)
    for i, prefix, value in _flag_values(argv):
        out[i] = prefix + installed(value)
    return out


def _flag_values(argv: list[str], flag: str = "--config"):
    """``(index, prefix, value)`` of every ``FLAG=VALUE`` (prefix "FLAG=") or ``FLAG VALUE`` (the value's own item,
    prefix "") in ``argv``: ``argv[index] == prefix + value``. ``--config=FILE[:ARG]`` by default."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"{flag}="):
            yield i, f"{flag}=", arg[len(flag) + 1:]
        elif arg == flag and i + 1 < len(argv):
            yield i + 1, "", argv[i + 1]


def _config_argument(argv: list[str]) -> str:
    """The value of the last ``--config=FILE[:ARG]`` (or ``--config FILE``) in ``argv``; the default config's path
    when there is none."""
    values = [value for _, _, value in _flag_values(argv)]
    return values[-1] if values else DEFAULT_CONFIG


def _unreadable_config_message(argv: list[str], err: OSError) -> str:
    """ml_collections' multi-line "Failed loading config file config_config / Attempted ..." as one sentence."""
    value = _config_argument(argv)
    path = Path(value.split(":", 1)[0]).expanduser()
    if not value.split(":", 1)[0]:
        return f"--config= names no file; give a config file, {CONFIG_EXAMPLE}"
    if not path.exists():
        where = "" if path.is_absolute() else f" (in {Path.cwd()})"
        return f"--config={value}: no such file{where}; give a config file, {CONFIG_EXAMPLE}"
    if path.is_dir():
        return f"--config={value}: {path} is a directory, not a config file; give a config file, {CONFIG_EXAMPLE}"
    cause = err.__cause__ or err
    detail = [line.strip() for line in str(cause).splitlines() if line.strip()][-1:] or [type(cause).__name__]
    return f"--config={value}: cannot load {path} ({detail[0]}); give a readable config file, {CONFIG_EXAMPLE}"


def _broken_config_message(argv: list[str], err: Exception) -> str | None:
    """For an error raised while the config file ran (a syntax error, a failed import, its own ``get_config``):
    one sentence naming the file, the line and the error; ``None`` for any other error."""
    value = _config_argument(argv)
    path = Path(value.split(":", 1)[0]).expanduser()
    try:
        target = path.resolve()
    except OSError:
        return None
    lines = [(Path(frame.filename), frame.lineno) for frame in traceback.extract_tb(err.__traceback__)]
    if isinstance(err, SyntaxError) and err.filename:
        lines.append((Path(err.filename), err.lineno))
    lines = [line for file, line in lines if _same_file(file, target)]
    if not lines:
        return None
    what = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    return (f"--config={value}: the config file failed at line {lines[-1]} of {path} ({what}); a config file is "
            f"Python whose get_config() returns the config, {CONFIG_EXAMPLE}")


def _same_file(file: Path, target: Path) -> bool:
    try:
        return file.resolve() == target
    except OSError:
        return False


def _flag_error_message(err: Exception) -> str:
    """absl's flag error as one line. ml_collections puts an exception the config file raised (an unknown variant,
    a wrong number of arguments) on the last line of a traceback below "Error whilst parsing config file:"."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith("Error whilst parsing config file:"):
        return f"{lines[0].removesuffix(' Error whilst parsing config file:')} the config file raised {lines[-1]}"
    return lines[0] if lines else type(err).__name__


def _define_config_flag(argv: list[str]) -> None:
    """(Re)define --config and its --config.* override flags for ``argv`` (again on a second parse, in tests)."""
    for name in [n for n in list(flags.FLAGS) if n == "config" or n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "training config file", lock_config=True,
                                    sys_argv=argv)


NAME_LISTS = ("--config.class_names",)


def _listed_names(argv: list[str]) -> list[str]:
    """``--config.class_names=zero,one,two`` as the tuple of names it lists, as ``1,2`` lists numbers: ml_collections
    reads text that is no Python literal as one string, so ten names became one ("has 1 names"). A literal
    (``"('a, b', 'c')"``) is kept, for names that hold a comma."""
    out, args = [], iter(argv)
    for arg in args:
        key, has_value, text = arg.partition("=")
        if key not in NAME_LISTS:
            out.append(arg)
            continue
        if not has_value:
            text = next(args, None)
            if text is None:  # absl's own "Missing value for flag", as before
                out.append(arg)
                continue
        if text.strip() and not text.strip().startswith(("(", "[")):
            text = repr(tuple(name.strip() for name in text.split(",")))
        out.append(f"{key}={text}")
    return out


def _take_model_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """``argv`` without its ``--config.model_overrides.*`` flags, and those flags' values by ResNet field."""
    rest, overrides, args = [], {}, iter(argv)
    for arg in args:
        if not arg.startswith(OVERRIDES):
            rest.append(arg)
            continue
        key, has_value, text = arg[len(OVERRIDES):].partition("=")
        if not has_value:
            text = next(args, None)
            if text is None:
                raise UsageError(f"{arg} needs a value, e.g. {arg}=VALUE")
        overrides[key] = _resnet_field_value(key, text, arg)
    return rest, overrides


def _resnet_field_value(key: str, text: str, arg: str):
    """``text`` as the type of ResNet's field ``key``: int, float, bool, a sequence of ints, or a string."""
    fields = _field_types()
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"the fields are {', '.join(fields)}"
        raise UsageError(f"{arg} names no ResNet field {key!r}; {hint}")
    kind = fields[key]
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind in ("int", "float"):
            return {"int": int, "float": float}[kind](text)
        if kind.startswith("Sequence"):
            value = ast.literal_eval(text if text.strip().startswith(("(", "[")) else f"({text},)")
            return tuple(int(v) for v in value)
    except (ValueError, SyntaxError, TypeError):
        example = {"bool": "True", "int": "2", "float": "0.1"}.get(kind, "1,1,1")
        raise UsageError(f"{arg}: {key} takes a value of type {kind}, e.g. {OVERRIDES}{key}={example}") from None
    return text


def _field_types() -> dict[str, str]:
    """ResNet's fields and their annotated types, as strings ("int", "Sequence[int]", ...)."""
    from resnet_jax.resnet import ResNet

    return {f.name: str(f.type) for f in dataclasses.fields(ResNet) if f.name not in ("parent", "name")}


def _unknown_key_message(argv: list[str]) -> str | None:
    """The first ``--config.a.b=...`` whose key the configs do not have (every recipe starts from
    ``base_config``), with the nearest valid names; ``None`` when every key exists."""
    from resnet_jax.training.config import base_config

    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = base_config()
        for depth, key in enumerate(path):
            where = ".".join(["config", *path[:depth]])
            if not hasattr(node, "keys"):
                return f"{arg} treats {where} as a group of keys, but it is one value; set it as --{where}=VALUE"
            if key not in node.keys():
                close = difflib.get_close_matches(key, list(node.keys()), n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(map(repr, close))}?" if close else (
                    "see resnet_jax/training/config.py for every key")
                return f"{arg} sets {where}.{key}, which is not a config key; {hint}"
            node = node[key]
    return None


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its lines joined), with its type where the message alone says little
    (``[Errno 17] File exists: '/x'``)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, OSError) and err.errno is not None:  # the system's words ("[Errno 17] ..."), not ours
        text = f"{type(err).__name__}: {text}"
    return text or type(err).__name__


def show_library_info() -> None:
    """resnet_jax's own INFO lines on stderr: that the oneDNN extension is being built (a minute, once), or why
    it is off and what to run. Other libraries' INFO stays hidden."""
    import logging

    library = logging.getLogger("resnet_jax")
    if not library.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # not again through absl's handler on the root logger


def main(argv: list[str]) -> int:
    no_arguments(argv, "options are --workdir and --config[.key=value]")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax reports every save at INFO
    show_library_info()
    from resnet_jax.checkpoint import CheckpointError
    from resnet_jax.hub import HubUnavailable
    from resnet_jax.pretrained import DownloadError
    from resnet_jax.training import Preempted, TrainingDiverged, train

    try:
        result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except Preempted as stopped:  # the run has logged where its checkpoint is and how to resume
        return stopped.exit_code
    except (ValueError, OSError, TrainingDiverged, CheckpointError, DownloadError, HubUnavailable) as err:
        # OSError: a path of the config that cannot be used (a weights cache_dir that is a file, a workdir that
        # cannot be written), as FileNotFoundError always was; DownloadError is one too
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    val = [r for r in result.history if r["split"] == "val"]
    final = f"; final val accuracy {val[-1]['accuracy']:.4f}" if val else ""
    print(f"{result.stop_reason}: step {int(result.state.step)}{final}; outputs in {flags.FLAGS.workdir}")
    return 0


if __name__ == "__main__":
    from resnet_jax.allocator import preload_tcmalloc

    preload_tcmalloc()  # re-execs under tcmalloc when installed (faster CPU steps); before jax is imported
    app.run(main, flags_parser=parse_flags)
