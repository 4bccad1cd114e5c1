"""Measured choices: tune() times a model's convolutions, stores the fastest per pass, and "auto" then runs
them, deterministically; a damaged or disabled file leaves the shipped rules in charge."""

import json

import jax
import numpy as np
import pytest

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
