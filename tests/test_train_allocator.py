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
