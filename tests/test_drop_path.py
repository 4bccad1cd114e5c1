"""``drop_path_rate`` (stochastic depth): timm's per-block rates, timm's eval outputs, the per-sample drop in
train mode, the missing-rng error, and rate 0 (or eval) computing exactly what the model computed before."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

from conftest import assert_close, random_batch_stats, random_variables
from resnet_jax import create_model
from resnet_jax.torchvision import convert_state_dict

LAYERS = (2, 1, 1, 2)


def test_per_block_rates_are_timms():
    """timm's ResNet sets DropPath(drop_prob) per block, linear in the global block index (none at 0)."""
    tm = timm.create_model("resnet50", layers=list(LAYERS), drop_path_rate=0.3)
    theirs = [getattr(b.drop_path, "drop_prob", 0.0) for s in (tm.layer1, tm.layer2, tm.layer3, tm.layer4) for b in s]
    ours = create_model("resnet50", stage_sizes=LAYERS, drop_path_rate=0.3).drop_path_rates()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)
    assert ours[0] == 0 and ours[-1] == pytest.approx(0.3)


@pytest.fixture(scope="module")
def pair():
    """timm's resnet18 at 2/1/1/2 blocks with drop_path_rate 0.2 (eval mode) and ours holding its
    weights."""
    torch.manual_seed(0)
    tm = timm.create_model("resnet18", layers=list(LAYERS), num_classes=10, drop_path_rate=0.2).eval()
    tm.load_state_dict(random_batch_stats(tm.state_dict(), 0))
    model = create_model("resnet18", stage_sizes=LAYERS, num_classes=10, drop_path_rate=0.2)
    variables, _ = convert_state_dict(model, tm.state_dict(), naming="timm")
    return tm, model, variables


def test_eval_equals_timm_and_is_the_undropped_computation(pair):
    tm, model, variables = pair
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        want = tm(x).numpy()
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    assert_close(jax.jit(model.apply)(variables, xj), jnp.asarray(want), "eval logits")
    plain = model.clone(drop_path_rate=0.0)
    jaxpr = lambda m: str(jax.make_jaxpr(lambda v, x: m.apply(v, x))(variables, xj))  # noqa: E731
    assert jaxpr(model) == jaxpr(plain)  # eval: drop path is not there at all
    train = lambda m, **kw: str(jax.make_jaxpr(  # noqa: E731
        lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"], **kw))(variables, xj))
    assert train(plain) == train(create_model("resnet18", stage_sizes=LAYERS, num_classes=10))  # rate 0: as before


def test_train_mode_needs_the_dropout_rng(pair):
    _, model, variables = pair
    with pytest.raises(ValueError, match=r"rngs=\{'dropout': key\}"):
        model.apply(variables, jnp.zeros((2, 8, 8, 3)), train=True, mutable=["batch_stats"])


def test_train_mode_drops_whole_samples_and_scales_the_kept():
    """Last block at rate 0.5 over 64 samples: each sample's output is relu(shortcut + branch / 0.5) or
    relu(shortcut), as the captured branch (bn3) and shortcut say; about half are dropped; the draw follows the
    "dropout" key and nothing else."""
    model = create_model("resnet50", stage_sizes=(0, 0, 1, 1), stage_widths=(8, 8, 8, 16), num_classes=10,
                         drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (64, 8, 8, 3))
    variables = random_variables(model, (2, 8, 8, 3), seed=1)

    @jax.jit
    def run(key):
        return model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=True)[1]["intermediates"]["layer4_0"]

    got = run(jax.random.key(2))
    out, branch = got["__call__"][0], got["bn3"]["__call__"][0]
    shortcut = got["downsample"]["__call__"][0]
    kept = jnp.maximum(shortcut + branch / 0.5, 0)
    dropped = jnp.maximum(shortcut, 0)
    is_kept = np.asarray(jnp.all(jnp.isclose(out, kept, atol=1e-5), axis=(1, 2, 3)))
    is_dropped = np.asarray(jnp.all(jnp.isclose(out, dropped, atol=1e-5), axis=(1, 2, 3)))
    assert np.all(is_kept ^ is_dropped)
    assert 16 < is_dropped.sum() < 48
    again = run(jax.random.key(2))["__call__"][0]
    other = run(jax.random.key(3))["__call__"][0]
    np.testing.assert_array_equal(again, out)
    assert not np.array_equal(other, out)
