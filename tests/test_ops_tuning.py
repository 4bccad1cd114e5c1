"""Measured choices: tune() times a model's convolutions, stores the fastest per pass, and "auto" then runs
them, deterministically; a damaged or disabled file leaves the shipped rules in charge."""

import json
import re
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import run_python
from resnet_jax import create_model
from resnet_jax.ops import ConvSpec, choose, rules, tuning, tuning_cache
from resnet_jax.ops.registry import REGISTRY

SHAPE = (2, 8, 8, 1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(path))
    tuning_cache.entries.cache_clear()
    yield path
    tuning_cache.entries.cache_clear()


def tiny():
    return create_model("resnet20", num_classes=3, in_channels=1, stage_sizes=(1, 1, 1))


def test_tuned_choices_are_stored_and_then_run_by_auto(cache):
    messages = []
    chosen = tuning.tune(tiny(), SHAPE, repeats=1, candidates=["matmul_grad", "im2col"], log=messages.append)
    geometries = tuning.model_specs(tiny(), SHAPE)
    assert len(geometries) == len(chosen) == 6  # stem, and a 3x3 stride-1 and stride-2 shape per stage
    stored = json.loads(cache.read_text())[rules.machine_key()]
    for g in geometries:
        entry = stored[g.key()]
        assert set(entry["seconds"]["kernel_grad"]) <= {"xla", "matmul_grad", "im2col"}
        for pass_name, name in zip(rules.PASSES, entry["auto"]):  # the fastest measured, per pass
            assert entry["seconds"][pass_name][name] == min(entry["seconds"][pass_name].values())
        assert choose(g, "cpu") == tuple(entry["auto"]) and choose(g, "cpu", extension=False) == tuple(entry["jax"])
        assert choose(g, "gpu") == ("xla",) * 3  # measurements are this machine's CPU's only
    assert messages[-1].startswith("tuned 6 convolution shapes in ") and str(cache) in messages[-1]
    model, x = tiny(), jax.random.normal(jax.random.key(0), SHAPE)
    variables = model.init(jax.random.key(1), x)
    reference = tiny().clone(conv_impl="xla").apply(variables, x)
    np.testing.assert_allclose(model.apply(variables, x), reference, rtol=1e-5, atol=1e-5)


def test_damaged_or_disabled_tuning_leaves_the_rules(cache, monkeypatch, caplog):
    g = ConvSpec(2, 8, 8, 16, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")
    by_rules = choose(g, "cpu", measured=False)
    cache.write_text("{not json")
    with caplog.at_level("WARNING", logger="resnet_jax"):
        assert choose(g, "cpu") == by_rules
        assert choose(g, "cpu") == by_rules
    assert [r.message for r in caplog.records if "tuning file" in r.message][0].startswith(
        f"resnet_jax: ignoring the convolution tuning file {cache}")
    assert len([r for r in caplog.records if "tuning file" in r.message]) == 1  # said once
    # an entry naming an algorithm that cannot compute the shape (an edited file) is not used
    cache.write_text(json.dumps({rules.machine_key(): {g.key(): {
        "auto": ["gemm", "gemm", "gemm"], "jax": ["gemm", "gemm", "gemm"], "seconds": {}}}}))
    tuning_cache.entries.cache_clear()
    assert REGISTRY["gemm"].refusal(g, "cpu") and choose(g, "cpu") == by_rules
    monkeypatch.setenv(tuning_cache.ENV_VAR, "0")
    tuning_cache.entries.cache_clear()
    assert choose(g, "cpu") == by_rules
    with pytest.raises(ValueError, match="RESNET_JAX_CONV_TUNING=0 turns tuning off"):
        tuning.tune(tiny(), SHAPE, repeats=1)


@pytest.mark.parametrize("mine", [
    {"KEY": []},                                                     # an entry that is no mapping
    {"KEY": {"auto": ["gemm", "gemm", "gemm"]}},                    # without "jax"
    {"KEY": {"auto": ["onednn", "onednn"], "jax": ["xla", "xla"]}},  # two names, not three
    [],                                                              # the machine's entries no mapping
], ids=["list-entry", "no-jax", "two-names", "list-machine"])
def test_a_tuning_file_of_another_shape_leaves_the_rules(cache, mine, caplog):
    """Valid JSON of another shape (an edited or foreign file) made every convolution fail (AttributeError,
    KeyError), or passed a two-name list as the three passes' choice."""
    g = ConvSpec(2, 8, 8, 16, 16, (3, 3), (1, 1), ((1, 1), (1, 1)), 1, "float32")
    by_rules = choose(g, "cpu", measured=False)
    entry = json.loads(json.dumps(mine).replace("KEY", g.key().replace('"', '\\"')))
    cache.write_text(json.dumps({rules.machine_key(): entry}))
    with caplog.at_level("WARNING", logger="resnet_jax"):
        assert choose(g, "cpu") == by_rules and choose(g, "cpu", extension=False) == choose(
            g, "cpu", extension=False, measured=False)
    assert any("tuning file" in r.message for r in caplog.records)
    cache.write_text("[1, 2]")  # not even a mapping at the top: replaced by the next tuning, not a crash
    tuning_cache.store(rules.machine_key(), {g.key(): {"auto": list(by_rules), "jax": list(by_rules)}})
    assert tuning_cache.entries(rules.machine_key()) == {g.key(): {"auto": list(by_rules), "jax": list(by_rules)}}


def test_two_tunings_at_once_keep_both_sets_of_entries(cache):
    """store read the file, merged and replaced it without a lock: of two processes storing 300 entries each,
    about a third of the entries were lost."""

    writer = f"""
        import os, sys
        os.environ[{tuning_cache.ENV_VAR!r}] = {str(cache)!r}
        from resnet_jax.ops import tuning_cache
        for i in range(150):
            tuning_cache.store("machine", {{f"{{sys.argv[1]}}-{{i}}": {{"auto": ["xla"] * 3, "jax": ["xla"] * 3}}}})
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer), name]) for name in "ab"]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(json.loads(cache.read_text())["machine"]) == 300


def test_tuning_into_an_unwritable_place_says_so_before_measuring(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(blocker / "tuning.json"))
    messages = []
    with pytest.raises(ValueError, match=r"cannot write the tuning file .*a_file/tuning\.json"):
        tuning.tune(tiny(), SHAPE, repeats=1, log=messages.append)
    assert messages == []  # nothing was measured (and lost)


def test_a_directory_or_no_repeats_is_refused_before_measuring(tmp_path, monkeypatch):
    """Used to be: every layer measured, then IsADirectoryError (a directory) or, after the first layer's
    compile, statistics' "no median for empty data" (repeats=0)."""
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(tmp_path))
    messages = []
    with pytest.raises(ValueError, match=f"names the directory {tmp_path}; name the file to write in it"):
        tuning.tune(tiny(), SHAPE, repeats=1, log=messages.append)
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(tmp_path / "tuning.json"))
    with pytest.raises(ValueError, match="repeats must be 1 or more"):
        tuning.tune(tiny(), SHAPE, repeats=0, log=messages.append)
    with pytest.raises(ValueError, match=r"input_shape must be .*got \(0, 8, 8, 1\)"):  # was ZeroDivisionError
        tuning.tune(tiny(), (0, 8, 8, 1), repeats=1, log=messages.append)
    assert messages == []


@pytest.mark.parametrize("args,message", [
    (["--repeats", "0"], "repeats must be 1 or more"),
    (["--batch", "0"], r"each 1 or more \(--batch, --image-size and the input channels on the command line\), "
                       r"got \(0, 8, 8, 1\)"),
])
def test_the_command_line_says_what_tune_refuses_in_one_line(cache, capsys, args, message):
    """Used to be: a traceback ending in tune's ValueError, or a ZeroDivisionError for a batch of 0."""
    with pytest.raises(SystemExit):
        tuning.main(["resnet_jax:create_model", "resnet20", "--image-size", "8", "--in-channels", "1", *args])
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_the_machine_key_follows_the_threads_this_process_may_run():
    """os.cpu_count() ignored taskset, a container's cpuset and OMP_NUM_THREADS: a 1-core run reused choices
    measured on every core."""
    key = "from resnet_jax.ops import rules; print(rules.machine_key())"
    one_core = "import os; os.sched_setaffinity(0, {0}); " + key
    every = run_python(key).stdout.strip()
    assert run_python(one_core).stdout.strip() != every
    assert run_python(key, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.strip() != every


@pytest.mark.parametrize("native", [False, True])
def test_a_bfloat16_model_is_tuned_under_the_dtype_auto_computes_it_in(native, monkeypatch):
    """On a CPU without bfloat16 instructions "auto" computes bfloat16 layers in float32 and looks up float32
    keys; tune stored them as bfloat16, so its measurements never applied. (The CPU's answer is set here, as
    this machine's CPU cannot change.)"""
    from resnet_jax.ops import cpu

    import flax.linen as nn

    from resnet_jax.ops import Conv

    class TwoLayers(nn.Module):  # ops.Conv in a model of one's own (a ResNet asks the question for its layers)
        @nn.compact
        def __call__(self, x):
            x = Conv(16, (3, 3), dtype=jax.numpy.bfloat16)(x)
            return Conv(16, (1, 1), dtype=jax.numpy.bfloat16)(x)

    monkeypatch.setattr(cpu, "native_bfloat16", lambda: native)
    assert {g.dtype for g in tuning.model_specs(TwoLayers(), (2, 8, 8, 16))} == {"bfloat16" if native else "float32"}


def test_unknown_candidate_is_a_clear_error(cache):
    with pytest.raises(ValueError, match=r"unknown convolution algorithm\(s\) \['cudnn'\]"):
        tuning.tune(tiny(), SHAPE, candidates=["cudnn"])


def test_the_command_line_builds_the_model_by_the_factory_it_is_given(capsys):
    """ops/ knows no model: the tuner's command line imports the factory the caller names."""
    import resnet_jax

    assert tuning.factory("resnet_jax:create_model") is resnet_jax.create_model
    with pytest.raises(SystemExit):
        tuning.main(["resnet_jax:no_such_factory", "resnet50"])
    assert "cannot import the model factory 'resnet_jax:no_such_factory'; name it as module:function" in \
        capsys.readouterr().err
