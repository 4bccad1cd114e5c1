"""``train`` uses JAX's persistent compilation cache for the length of the run only: the directory the caller
chose (``JAX_COMPILATION_CACHE_DIR``) is kept unless the config names another, and JAX's setting is what it was
once the run returns or fails. The end-to-end checks on ``train`` itself are in test_training_loop.py
(``test_a_run_with_its_own_cache_dir_leaves_jax_config_as_it_was``)."""

import json
from pathlib import Path

from conftest import run_python
from resnet_jax.training.compile_cache import DEFAULT_DIR, directory_for
from training_helpers import worker_env

CHILD = """
import json, sys
from pathlib import Path
import jax, jax.numpy as jnp
from resnet_jax.training.compile_cache import compilation_cache

session, ours = sys.argv[1], sys.argv[2]
x = jnp.ones((2, 9, 5))

def entries(directory):
    return sorted(p.name for p in Path(directory).glob("*") if p.name.startswith("jit_"))

def compile_new(scale):
    jax.jit(lambda a: a * scale + 1.0)(x).block_until_ready()

report = {"before": jax.config.jax_compilation_cache_dir}
compile_new(2.0)
with compilation_cache("auto") as used:
    report["auto"] = [used, jax.config.jax_compilation_cache_dir]
with compilation_cache("") as used:
    report["off"] = [used, jax.config.jax_compilation_cache_dir]
session_entries = entries(session)
try:
    with compilation_cache(ours) as used:
        report["explicit"] = [used, jax.config.jax_compilation_cache_dir]
        compile_new(3.0)
        raise RuntimeError("the run failed")
except RuntimeError:
    pass
report["after"] = jax.config.jax_compilation_cache_dir
ours_entries = entries(ours)
compile_new(4.0)
report["ours_during"] = len(ours_entries)
report["ours_after"] = len(entries(ours))
report["session_gained"] = len(entries(session)) - len(session_entries)
print(json.dumps(report))
"""


def test_the_callers_cache_is_kept_an_explicit_one_is_used_during_the_block_only(tmp_path):
    """In a fresh process whose environment chose a cache (as conftest.py does for the test session), with every
    program written to it: "auto" and "" keep that directory; an explicit one receives what compiles inside the
    block, and after the block (left by an exception, as a failed run leaves it) the setting is back and new
    programs go to the caller's directory again, not to the run's."""
    session, ours = tmp_path / "session", tmp_path / "ours"
    env = worker_env()
    env.update(JAX_COMPILATION_CACHE_DIR=str(session), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    report = json.loads(run_python(CHILD, args=[session, ours], env=env).stdout.splitlines()[-1])
    assert report["before"] == str(session)
    assert report["auto"] == [str(session), str(session)]
    assert report["off"] == [str(session), str(session)]
    assert report["explicit"] == [str(ours), str(ours)]
    assert report["after"] == str(session)
    assert report["ours_during"] == 1  # the one program compiled inside the block
    assert report["ours_after"] == 1 and report["session_gained"] == 1


def test_auto_is_the_callers_directory_or_the_default_and_paths_expand(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert directory_for("auto", "/callers/cache") == "/callers/cache"
    assert directory_for("auto", None) == str(Path(DEFAULT_DIR).expanduser()) == \
        str(tmp_path / ".cache" / "resnet_jax" / "jit")
    assert directory_for("~/jit", "/callers/cache") == str(tmp_path / "jit")
    assert directory_for("", "/callers/cache") is None and directory_for("", None) is None
