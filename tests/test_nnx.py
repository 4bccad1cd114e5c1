"""resnet_jax.nnx: the NNX face computes what linen does, follows NNX's BatchNorm modes, and works with NNX's
transforms, optimizer and split/merge."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import nnx
from flax.traverse_util import flatten_dict

import resnet_jax
from conftest import assert_close, random_batch_stats, run_python
from conftest import random_variables as conftest_random_variables
from resnet_jax import nnx as rnnx


def random_variables(module, seed=0, size=32):
    return conftest_random_variables(module, (1, size, size, module.in_channels), seed)


@nnx.jit
def call(model, x):
    """``model(x)``, compiled (train mode updates the model's statistics, as outside ``jit``). Every model here is
    compiled rather than run op by op: eagerly, each operation compiles on its own, seconds per model."""
    return model(x)


def linen_apply(module, variables, x, train=False):
    """``module.apply`` as the linen user runs it, compiled: eval mode gives the output, train mode the output and
    the updated statistics."""
    if train:
        return jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    return jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x)


def images(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_trees_equal(a, b, **tol):
    a, b = flatten_dict(a), flatten_dict(b)
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            np.testing.assert_allclose(a[k], b[k], err_msg=str(k), **tol)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


@pytest.fixture(scope="module")
def resnet18d():
    """A model with every kind of layer a ResNet-D has (deep stem, an identity block in stage 1, average-pool
    shortcuts after it) and its variables; one block per stage, since the NNX face maps layers by kind."""
    module = resnet_jax.create_model("resnet18d", num_classes=5, stage_sizes=(1, 1, 1, 1))
    return module, random_variables(module)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def test_outputs_stats_and_gradients_equal_linen(resnet18d):
    """Eval and train outputs, the train-mode running statistics, and the gradients with respect to every
    parameter are linen's for the same weights."""
    module, variables = resnet18d
    x, labels = images((4, 40, 56, 3)), jnp.array([0, 1, 2, 3])
    model = rnnx.from_linen(module, variables)

    model.eval()
    np.testing.assert_array_equal(call(model, x), linen_apply(module, variables, x))

    model.train()
    ref, updates = linen_apply(module, variables, x, train=True)
    np.testing.assert_array_equal(call(model, x), ref)
    assert_trees_equal(rnnx.to_linen(model)[1]["batch_stats"], updates["batch_stats"])

    model = rnnx.from_linen(module, variables)  # back to the original statistics
    grads = nnx.jit(nnx.grad(lambda m: cross_entropy(m(x), labels)))(model)

    def linen_loss(params):
        logits, _ = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels)
    ref_grads = jax.jit(jax.grad(linen_loss))(variables["params"])
    assert_trees_equal(nnx.to_pure_dict(grads), ref_grads, rtol=1e-6, atol=1e-7)


def test_create_model_is_linen_init():
    model = rnnx.create_model("resnet20", rngs=nnx.Rngs(3), in_channels=1, stage_sizes=(1, 1, 1))
    module, variables = rnnx.to_linen(model)
    assert module == resnet_jax.create_model("resnet20", in_channels=1, stage_sizes=(1, 1, 1))
    ref = module.init(nnx.Rngs(3).params(), jnp.zeros((1, 16, 16, 1)), train=False)
    assert_trees_equal(variables, ref)
    assert isinstance(model.layer1_0.conv1.kernel, nnx.Param) and isinstance(model.bn1.mean, nnx.BatchStat)
    assert not model.use_running_average  # NNX's convention: a new model is in train mode


def test_optimizer_step_in_train_mode_and_eval_mode(resnet18d):
    """One nnx.jit step with nnx.Optimizer (SGD with momentum): in train mode it moves the parameters and the
    BatchNorm statistics (to what linen computes); in eval mode it moves the parameters and leaves the
    statistics alone."""
    module, variables = resnet18d
    x, labels = images((4, 32, 48, 3)), jnp.array([4, 3, 2, 1])
    model = rnnx.from_linen(module, variables)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, labels):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), labels))(model)
        optimizer.update(model, grads)
        return loss

    _, updates = linen_apply(module, variables, x, train=True)
    step(model, optimizer, x, labels)
    after = rnnx.to_linen(model)[1]
    assert_trees_equal(after["batch_stats"], updates["batch_stats"], rtol=1e-4, atol=1e-6)  # two programs
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), after["params"], variables["params"])
    assert all(jax.tree.leaves(changed))  # every parameter took a step
    assert int(optimizer.step[...]) == 1

    model.eval()
    step(model, optimizer, x, labels)
    again = rnnx.to_linen(model)[1]
    assert_trees_equal(again["batch_stats"], after["batch_stats"])
    assert not np.array_equal(again["params"]["fc"]["kernel"], after["params"]["fc"]["kernel"])


def test_split_merge_and_view(resnet18d):
    module, variables = resnet18d
    model = rnnx.from_linen(module, variables)
    model.eval()
    x = images((2, 32, 32, 3))
    graphdef, state = nnx.split(model)
    params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(variables["params"]))
    assert len(jax.tree.leaves(stats)) == len(jax.tree.leaves(variables["batch_stats"]))
    merged = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(call(merged, x), call(model, x))
    assert_trees_equal(rnnx.to_linen(merged)[1], variables)
    train_view = nnx.view(model, use_running_average=False)
    assert not train_view.use_running_average and model.use_running_average
    np.testing.assert_array_equal(call(train_view, x), linen_apply(module, variables, x, train=True)[0])
    # flax's view_info reads set_view's "Args:" section, as nnx.BatchNorm has it (it was a KeyError)
    assert "use_running_average" in str(nnx.view_info(model))


def test_a_folded_model_becomes_an_inference_only_nnx_model(resnet18d):
    """``from_linen(*fold_batchnorm(...))`` was refused for its empty batch_stats ("pass the whole dict")."""
    from resnet_jax.ops import fold_batchnorm

    module, variables = resnet18d
    folded_module, folded = fold_batchnorm(module, variables)
    model = rnnx.from_linen(folded_module, folded)
    x = images((2, 32, 32, 3))
    assert model.use_running_average  # it has no batch statistics to normalise a batch with
    np.testing.assert_array_equal(call(model, x), linen_apply(folded_module, folded, x))
    np.testing.assert_allclose(call(model, x), linen_apply(module, variables, x), rtol=1e-4, atol=1e-4)


def test_linen_round_trip_and_torchvision_weights(tmp_path):
    """torchvision's ResNet-18 (seeded random weights, and random BatchNorm statistics and affine parameters, so
    that a statistic dropped or put in another slot shows) loads into the NNX model, whose eval-mode logits are
    torchvision's own forward's; to_linen gives back the same variables, which save to a file torchvision
    loads."""
    torch.manual_seed(0)
    tm = torchvision.models.resnet18().eval()
    tm.load_state_dict(random_batch_stats(tm.state_dict(), 0))
    model = rnnx.load_torchvision("resnet18", tm.state_dict())
    model.eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = tm(x).numpy()
    assert_close(model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))), ref, "resnet18 logits")

    module, variables = rnnx.to_linen(model)
    again = rnnx.from_linen(module, variables)
    assert_trees_equal(rnnx.to_linen(again)[1], variables)
    resnet_jax.save_torchvision(variables, tmp_path / "r18.pth")
    torchvision.models.resnet18().load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=True)


@pytest.mark.parametrize("overrides", [{"features_only": True}, {"in_channels": 1}, {"remat": True},
                                       {"dtype": jnp.bfloat16}, {"num_classes": 0}])
def test_overrides_work_as_in_linen(overrides):
    """features_only, in_channels, remat, dtype: the NNX model returns what the linen model with the same
    settings returns, and trains (gradients) through it."""
    module = resnet_jax.create_model("resnet20", **overrides)
    variables = random_variables(module)
    model = rnnx.from_linen(module, variables)
    model.eval()
    x = images((2, 16, 24, module.in_channels))
    out, ref = call(model, x), linen_apply(module, variables, x)
    jax.tree.map(np.testing.assert_array_equal, out, ref)
    if overrides.get("features_only"):
        assert [f.shape for f in out] == [(2, 16, 24, 16), (2, 8, 12, 32), (2, 4, 6, 64)]
    else:
        assert out.dtype == jnp.float32  # logits in float32 whatever the compute dtype
    grads = nnx.jit(nnx.grad(lambda m: sum(jnp.sum(o.astype(jnp.float32) ** 2) for o in jax.tree.leaves(m(x)))))(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_pretrained_from_the_cache(tmp_path, monkeypatch):
    """rnnx.pretrained is resnet_jax.pretrained as an NNX model: here a test entry whose verified file is already
    in the cache, so no network is needed."""
    from resnet_jax.pretrained import WEIGHTS, Weights, file_sha256

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-test.pth")
    entry = Weights("resnet18", "TEST", "resnet18-test.pth", file_sha256(tmp_path / "resnet18-test.pth"), 0.0)
    monkeypatch.setitem(WEIGHTS["resnet18"], "TEST", entry)
    model = rnnx.pretrained("resnet18", "TEST", cache_dir=tmp_path, mirror="http://127.0.0.1:9", progress=False)
    _, ref = resnet_jax.pretrained("resnet18", "TEST", cache_dir=tmp_path, mirror="http://127.0.0.1:9")
    assert isinstance(model, rnnx.ResNet)
    assert_trees_equal(rnnx.to_linen(model)[1], ref)


def test_timm_weights_load():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    tm = timm.create_model("resnet18d").eval()
    tm.load_state_dict(random_batch_stats(tm.state_dict(), 0))
    model = rnnx.load_timm("resnet18d", tm.state_dict())
    model.eval()
    x = torch.randn(1, 3, 36, 52)
    with torch.no_grad():
        ref = tm(x).numpy()
    assert_close(model(jnp.asarray(x.numpy().transpose(0, 2, 3, 1))), ref, "resnet18d logits")


def test_bad_input_is_a_clear_error(resnet18d):
    module, variables = resnet18d
    with pytest.raises(TypeError, match="from_linen takes a resnet_jax.ResNet"):
        rnnx.from_linen(object(), variables)
    with pytest.raises(TypeError, match="to_linen takes a resnet_jax.nnx.ResNet"):
        rnnx.to_linen(module)
    with pytest.raises(ValueError, match=r"extra collection\(s\) \['intermediates'\]"):
        rnnx.from_linen(module, {**variables, "intermediates": {}})
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        rnnx.create_model("resnet5", rngs=nnx.Rngs(0))
    # variables["params"] alone (an easy slip) failed at the first call, as AttributeError or flax's scope error
    with pytest.raises(ValueError, match=r"the variables have no 'batch_stats' collection .* not one collection"):
        rnnx.from_linen(module, {"params": variables["params"]})
    # another model's variables (here another class count) failed only at the first call, in flax's words
    with pytest.raises(ValueError, match=r"these variables do not fit the linen module: params/fc/bias is \(5,\), the "
                                         r"model's \(10,\); params/fc/kernel is \(512, 5\)"):
        rnnx.from_linen(module.clone(num_classes=10), variables)


def test_stochastic_depth_draws_from_the_dropout_stream():
    """drop_path_rate > 0 trains with masks drawn from the model's ``dropout`` stream (each call a new key, as
    ``nnx.Dropout`` draws them): the output is linen's with that key; eval mode needs no key; without ``rngs`` train
    mode is a clear error."""
    module = resnet_jax.create_model("resnet20", stage_sizes=(1, 1, 1), drop_path_rate=0.5)
    variables = random_variables(module, size=16)
    x = images((16, 16, 16, 3))
    model = rnnx.from_linen(module, variables, rngs=nnx.Rngs(dropout=7))
    first, second = call(model, x), call(model, x)
    stream = nnx.Rngs(dropout=7)
    keys = [stream.dropout(), stream.dropout()]
    for got, key in zip((first, second), keys):
        want = jax.jit(lambda v, x, k: module.apply(v, x, train=True, mutable=["batch_stats"],
                                                    rngs={"dropout": k})[0])(variables, x, key)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(first, second)  # a new mask each call
    model.eval()
    np.testing.assert_array_equal(call(model, x), linen_apply(module, rnnx.to_linen(model)[1], x))
    untrained = rnnx.from_linen(module, variables)
    with pytest.raises(ValueError, match=r"drop_path_rate=0.5 .* rngs=nnx.Rngs\(dropout=seed\)"):
        untrained(x)
    # rngs of other streams only (a params stream, no default): Flax's AttributeError before
    params_only = rnnx.from_linen(module, variables, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r"its rngs have no dropout stream, nor a default one"):
        params_only(x)


def test_loaded_weights_fine_tune_with_stochastic_depth():
    """Fine-tuning published weights with drop_path_rate (as timm's RSB recipes do) needs the ``dropout`` stream:
    the loaders take ``rngs`` as ``from_linen`` does, and train as linen does with the same key."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    state = timm.create_model("resnet18d").state_dict()
    model = rnnx.load_timm("resnet18d", state, drop_path_rate=0.2, rngs=nnx.Rngs(dropout=3))
    module, variables = resnet_jax.load_timm("resnet18d", state, drop_path_rate=0.2)
    x = images((2, 32, 32, 3))
    want = module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": nnx.Rngs(dropout=3)
                                                                                   .dropout()})[0]
    np.testing.assert_allclose(call(model, x), want, rtol=1e-5, atol=1e-5)
    tv = rnnx.load_torchvision("resnet18", torchvision.models.resnet18().state_dict(), drop_path_rate=0.1,
                               rngs=nnx.Rngs(dropout=0))
    assert call(tv, x).shape == (2, 1000)


def test_an_older_flax_is_named_on_import():
    """flax 0.10 (which the package allows for its linen models) lacks the NNX API used here: the face failed at
    the first create_model with "module 'flax.nnx' has no attribute 'to_pure_dict'"."""
    proc = run_python("""
        import flax
        flax.__version__ = "0.10.0"
        import resnet_jax.nnx
    """, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert "ImportError: resnet_jax.nnx needs flax >= 0.12.3 (nnx.view: 0.12.4), found 0.10.0" in last, last
