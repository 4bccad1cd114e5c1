"""timm <-> Flax weights: output parity with real timm, strict round trips, refusals of other architectures."""

import copy
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from flax.traverse_util import flatten_dict

from conftest import assert_close, random_batch_stats, run_python
from resnet_jax import create_model, list_models
from resnet_jax.torchvision import (TIMM_MODELS, flax_to_torch_name, load_timm, load_torchvision, save_timm,
                                    to_timm, to_torchvision, torch_to_flax_name)

PARITY = ["resnet18", "resnet50", "resnet50d", "resnext50_32x4d",
          "resnetv2_18", "resnetv2_18d", "resnetv2_34", "resnetv2_34d", "resnetv2_50", "resnetv2_50d"]
PARITY_LARGE = ["resnet101d", "wide_resnet50_2"]
# 72x104: non-square, and odd feature maps (9x13 into stage 3) exercise the ceil-mode average-pool shortcut
IMAGE = (1, 3, 72, 104)


def timm_model(name, seed=0):
    """A timm model in eval mode with random weights and random, non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    model.load_state_dict(random_batch_stats(model.state_dict(), seed))
    return model


def assert_same_state_dict(ours, ref):
    assert list(ours) == list(ref)  # the same names in timm's order
    for k, v in ref.items():
        v = v.numpy()
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


def check_input_gradient(name, tm, x):
    """The gradient of weighted logits with respect to the image equals timm's, both in float64.

    Why float64: the max-pool routes each window's gradient to its largest input, and float32 rounding (ours
    or torch's, whose float32 and float64 kernels differ) flips near-ties, which moves whole gradient entries:
    torch float32 against torch float64 differed by 1e-2 of the scale on resnet50d. In float64 no tie flips, so
    what is compared is the architecture and the weight mapping alone."""
    x64 = torch.from_numpy(x.astype(np.float64)).requires_grad_()
    probe = np.random.default_rng(1).standard_normal((x.shape[0], 1000))  # a cotangent that weighs every logit
    tm64 = copy.deepcopy(tm).double()
    (tm64(x64) * torch.from_numpy(probe)).sum().backward()
    with jax.enable_x64(True):
        model, variables = load_timm(name, tm64.state_dict(), dtype=jnp.float64, param_dtype=jnp.float64,
                                     conv_impl="xla")
        grad = jax.grad(lambda image: jnp.sum(model.apply(variables, image) * probe))(
            jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float64))
        assert grad.dtype == jnp.float64
        assert_close(np.asarray(grad), x64.grad.numpy().transpose(0, 2, 3, 1), f"{name} input gradient")


def check_parity_and_round_trip(name, tmp_path):
    """Logits, the input gradient and the four stage outputs match timm's on a non-square image; save_timm
    writes back the same state_dict, which timm loads strictly."""
    tm = timm_model(name)
    state = tm.state_dict()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(IMAGE, dtype=np.float32))
    with torch.no_grad():
        ref_logits = tm(x).numpy()
        ref_features = tm.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)

    model, variables = load_timm(name, state)
    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    assert_close(model.apply(variables, x_nhwc), ref_logits, f"{name} logits")
    check_input_gradient(name, tm, x.numpy())
    features = create_model(name, features_only=True).apply(variables, x_nhwc)
    for i, (ours, ref) in enumerate(zip(features, ref_features, strict=True)):
        assert_close(np.asarray(ours).transpose(0, 3, 1, 2), ref.numpy(), f"{name} layer{i + 1}")

    save_timm(model, variables, tmp_path / f"{name}.pth")
    written = torch.load(tmp_path / f"{name}.pth", weights_only=True)
    assert_same_state_dict({k: v.numpy() for k, v in written.items()}, state)
    timm.create_model(name).load_state_dict(written, strict=True)


@pytest.mark.parametrize("name", PARITY)
def test_parity_and_round_trip(name, tmp_path):
    check_parity_and_round_trip(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY_LARGE)
def test_parity_and_round_trip_large(name, tmp_path):
    check_parity_and_round_trip(name, tmp_path)


def meta_state_dict(name):
    """timm's names and shapes for ``name`` without allocating or initialising its weights."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in timm.create_model(name).state_dict().items()}


@pytest.mark.parametrize("name", sorted(set(TIMM_MODELS) - set(PARITY) - set(PARITY_LARGE)))
def test_every_shared_name_has_timm_names_and_shapes(name):
    """The shared names not run above: every timm entry has a place of the same shape here, and every variable
    here a timm name that maps back to it (depth is the only difference from a model whose outputs are checked).
    Shapes only, so the 100M-parameter models cost no memory."""
    timm_shapes = meta_state_dict(name)
    model = create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    ours = {k: v.shape for k, v in flatten_dict(shapes).items()}
    for key, shape in timm_shapes.items():
        path, layout = torch_to_flax_name(key, "timm", model)
        if path is not None:  # num_batches_tracked is dropped
            assert layout(np.empty(shape, np.uint8)).shape == ours[path], key
    assert sorted(flax_to_torch_name(p, "timm", model)[0] for p in ours) == sorted(
        k for k in timm_shapes if not k.endswith("num_batches_tracked"))


def test_timm_models_are_exactly_the_shared_names():
    """Every name both libraries have is either checked against timm here or deliberately absent."""
    assert set(TIMM_MODELS) == {n for n in list_models() if n in timm.list_models()}


@pytest.fixture(scope="module")
def resnet18d():
    tm = timm_model("resnet18d")
    return tm, tm.state_dict()


def test_tagged_name_and_safetensors(tmp_path, resnet18d):
    """timm's hub format (.safetensors) under timm's tagged name loads, and goes back out as .safetensors."""
    tm, state = resnet18d
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    model, variables = load_timm("resnet18d.ra2_in1k", tmp_path / "model.safetensors")
    save_timm("resnet18d", variables, tmp_path / "ours.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    timm.create_model("resnet18d").load_state_dict(loaded, strict=True)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ref = tm(x).numpy()
    assert_close(model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))), ref, "resnet18d")


def test_new_head_and_backbone(resnet18d):
    _, state = resnet18d
    model, variables = load_timm("resnet18d", state, num_classes=7, new_head=True, rng=1)
    assert model.apply(variables, jnp.ones((1, 32, 32, 3))).shape == (1, 7)
    backbone, variables = load_timm("resnet18d", state, features_only=True)
    assert "fc" not in variables["params"] and len(backbone.apply(variables, jnp.ones((1, 32, 32, 3)))) == 4


@pytest.mark.parametrize("name", ["preact_resnet50", "resnet20", "resnet18_cifar", "resnet26d", "seresnet50"])
def test_names_timm_does_not_share_are_refused(name, resnet18d):
    with pytest.raises(ValueError, match=rf"'{name}' is not one of the timm models.*choose one of"):
        load_timm(name, resnet18d[1])


@pytest.mark.parametrize("name", ["resnetv2_50x1_bit", "resnetv2_50d_gn", "resnetv2_50d_evos"])
def test_resnetv2_without_batchnorm_is_refused_naming_the_normalisation(name):
    assert name in timm.list_models()
    state = {k: np.zeros(s, np.float32) for k, s in meta_state_dict(name).items()}
    with pytest.raises(ValueError, match=rf"'{name}' is not one of .*GroupNorm, EvoNorm.*uses BatchNorm"):
        load_timm(name, state)


def test_architecture_overrides_are_refused(resnet18d):
    with pytest.raises(ValueError, match=r"\['bn_epsilon', 'shortcut'\] would change what the weights compute"):
        load_timm("resnet18d", resnet18d[1], shortcut="projection", bn_epsilon=1e-3)
    load_timm("resnet18d", resnet18d[1], shortcut="avg_pool", dtype=jnp.bfloat16)  # the same value is fine


def test_to_timm_refuses_architectures_timm_lacks():
    for model in (create_model("preact_resnet18", stem="cifar"), create_model("resnet50", stem="deep")):
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
        with pytest.raises(ValueError, match="timm has no model with this architecture"):
            to_timm(model, variables)


def test_a_different_timm_architecture_is_refused():
    """timm's resnet50c has the deep stem without the average-pool shortcut: same stem names, same shapes in
    the stem, but it is not resnet50d and must not load as one."""
    state = {k: np.zeros(s, np.float32) for k, s in meta_state_dict("resnet50c").items()}
    with pytest.raises(ValueError, match=r"missing.*layer1\.0\.downsample\.2\.weight"):
        load_timm("resnet50d", state)


def test_naming_mismatch_is_named_in_the_error(resnet18d):
    """A timm ResNet-D file through load_torchvision, or our torchvision-style export through load_timm: refused,
    and the error says which loader fits."""
    _, state = resnet18d
    with pytest.raises(ValueError, match=r"unexpected.*conv1\.0\.weight(.|\n)*load it with load_timm"):
        load_torchvision("resnet18d", state)
    _, variables = load_timm("resnet18d", state)
    with pytest.raises(ValueError, match=r"unexpected.*conv1_0\.weight(.|\n)*load it with load_torchvision"):
        load_timm("resnet18d", to_torchvision(variables))


@pytest.mark.parametrize("name", ["resnet18d", "resnetv2_18d"])
def test_loading_needs_no_torch(tmp_path, name):
    """With torch blocked from importing: timm .pth and .safetensors files load (linen and NNX), and save."""
    state = timm_model(name).state_dict()
    torch.save(state, tmp_path / "r18d.pth")
    safetensors.torch.save_file(state, tmp_path / "r18d.safetensors")
    script = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "timm"):
                    raise ImportError(f"torch is blocked in this test: {{name}}")
        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from resnet_jax import load_timm, save_timm
        from resnet_jax import nnx
        x = np.ones((1, 32, 32, 3), np.float32)
        outs = []
        for suffix in ("pth", "safetensors"):
            model, variables = load_timm({name!r}, {str(tmp_path)!r} + "/r18d." + suffix)
            outs.append(np.asarray(model.apply(variables, x)))
            save_timm(model, variables, {str(tmp_path)!r} + "/out." + suffix)
        nnx_model = nnx.load_timm({name!r}, {str(tmp_path)!r} + "/r18d.safetensors")
        nnx_model.eval()
        outs.append(np.asarray(nnx_model(x)))
        assert all(np.array_equal(o, outs[0]) for o in outs), "the files gave different models"
        assert not any(m.split(".")[0] in ("torch", "torchvision", "timm") for m in sys.modules), "torch imported"
        print(outs[0].shape, "no torch")
    """)
    assert "(1, 1000) no torch" in run_python(script).stdout
    for suffix in ("pth", "safetensors"):
        written = (torch.load(tmp_path / f"out.{suffix}", weights_only=True) if suffix == "pth"
                   else safetensors.torch.load_file(tmp_path / f"out.{suffix}"))
        timm.create_model(name).load_state_dict(written, strict=True)
        for k, v in state.items():
            assert torch.equal(written[k], v), k
