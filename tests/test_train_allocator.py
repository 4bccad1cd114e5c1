"""resnet_jax.allocator: re-executing under a preloaded allocator keeps the command and loads the library once."""

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import run_python

PROBE = ("import json, os, sys; from resnet_jax.allocator import preload_tcmalloc; a = preload_tcmalloc(); "
         "print(json.dumps({'allocator': a, 'preload': os.environ.get('LD_PRELOAD', ''), 'argv': sys.argv[1:]}))")


def loaded_libc() -> str:
    """The path of the C library this process runs with: a real shared object that is harmless to preload."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1]
        if "/libc.so" in path or "/libc-" in path:
            return path
    raise AssertionError("no libc mapped into this process")


def run_probe(choice: str, *args: str) -> tuple[list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["RESNET_JAX_TCMALLOC"] = choice
    out = run_python(PROBE, args=args, env=env, timeout=60)
    return [json.loads(line) for line in out.stdout.splitlines()], out.stderr


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux-only")


def test_named_library_is_preloaded_by_one_re_exec_that_keeps_the_arguments():
    libc = loaded_libc()
    runs, _ = run_probe(libc, "--workdir=x", "--config.seed=3")
    assert len(runs) == 1  # the code after the re-exec ran once, and nothing before it printed
    assert runs[0]["preload"].split(":")[0] == libc
    assert runs[0]["argv"] == ["--workdir=x", "--config.seed=3"]
    assert runs[0]["allocator"] == "tcmalloc"


def test_zero_turns_it_off():
    runs, _ = run_probe("0")
    assert runs == [{"allocator": "glibc", "preload": "", "argv": []}]


def test_a_missing_library_is_reported_and_the_command_still_runs():
    runs, err = run_probe("/nonexistent/libtcmalloc_minimal.so.4")
    assert runs == [{"allocator": "glibc", "preload": "", "argv": []}]
    assert "/nonexistent/libtcmalloc_minimal.so.4" in err and "not a file" in err


def test_a_library_the_loader_cannot_load_is_reported_and_left_out(tmp_path):
    """A broken file in LD_PRELOAD is skipped by the loader with an error line, and was reported as tcmalloc (a
    benchmark recorded the wrong allocator), with the error repeated by every child process."""
    broken = tmp_path / "libtcmalloc_minimal.so.4"
    broken.write_bytes(b"")
    runs, err = run_probe(str(broken))
    assert runs == [{"allocator": "glibc", "preload": "", "argv": []}]
    assert f"warning: {broken} could not be preloaded" in err


def test_a_program_read_from_stdin_runs_without_the_re_exec():
    """``python - < script``: the re-executed process found stdin read already, ran nothing and exited 0."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["RESNET_JAX_TCMALLOC"] = loaded_libc()
    proc = subprocess.run([sys.executable, "-"], input=PROBE + "\nprint('ran to the end')\n", env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "ran to the end", proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[0])["allocator"] == "glibc"
