"""timm <-> Flax weights: output parity with real timm, strict round trips, refusals of other architectures.

What a model computes from its weights is decided by its *kind* (every ``model_config`` field but
``stage_sizes``: block, stem, shortcut, groups, widths, pre-activation) and by its depth. Outputs are compared
with timm on one name of each kind, built by both libraries with the same few blocks per stage (timm's
``layers=``, our ``stage_sizes=``), which runs every layer, shortcut and weight-mapping rule that kind has; the
full depth of every shared name is checked where depth shows, on the names and shapes of all its weights, in
test_resnet.py (timm's meta device, ``jax.eval_shape``: no memory, no compute); and ``save_timm`` writes back
timm's own state_dict at full depth for a basic, a ResNet-D and a pre-activation model.
"""

import copy
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torchvision

from conftest import assert_close, random_batch_stats, run_python
from resnet_jax import create_model, list_models
from resnet_jax.resnet import model_config
from resnet_jax.torchvision import (TIMM_MODELS, convert_state_dict, load_timm, load_torchvision, save_timm, to_timm,
                                    to_torchvision)

# One block in each stage, and a second (identity-shortcut) block after layer2's stride-2 one: every kind of
# block and shortcut a model of the kind has, at a small fraction of its depth.
SMALL = (1, 2, 1, 1)
# 72x104: non-square, and odd feature maps (9x13 into stage 3) exercise the ceil-mode average-pool shortcut
IMAGE = (1, 3, 72, 104)


def kind(name):
    """What, besides depth, decides what ``name`` computes from its weights."""
    return tuple(sorted((k, repr(v)) for k, v in model_config(name).items() if k != "stage_sizes"))


def representative(name):
    """The shallowest shared name of ``name``'s kind (resnet34d -> resnet18d)."""
    return min((n for n in TIMM_MODELS if kind(n) == kind(name)), key=lambda n: sum(model_config(n)["stage_sizes"]))


PARITY = sorted({representative(n) for n in TIMM_MODELS})  # 12 kinds, from resnet18 to resnetv2_50d
# the float64 input gradient: a basic block with the plain stem; a bottleneck with ResNet-D's deep stem and
# average-pool shortcut; a pre-activation (ResNetV2) model
GRADIENT = ["resnet18", "resnet50d", "resnetv2_18"]


def timm_model(name, seed=0, **kwargs):
    """A timm model in eval mode with random weights and random, non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(random_batch_stats(model.state_dict(), seed))
    return model


def small_pair(name):
    """timm's ``name`` and ours with ``SMALL`` blocks per stage, ours holding timm's random weights (mapped by
    the timm rules ``load_timm`` uses, which refuses a depth timm's ``name`` does not have)."""
    tm = timm_model(name, layers=list(SMALL))
    model = create_model(name, stage_sizes=SMALL)
    variables, _ = convert_state_dict(model, tm.state_dict(), naming="timm", model_name=name)
    return tm, model, variables


def assert_same_state_dict(ours, ref):
    assert list(ours) == list(ref)  # the same names in timm's order
    for k, v in ref.items():
        v = v.numpy()
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


@pytest.mark.parametrize("name", PARITY)
def test_outputs_match_timm(name):
    """Logits and the four stage outputs on a non-square image equal timm's, for one name of each kind; the
    ``features_only`` backbone loaded from the whole state_dict (its head and closing norm ignored)."""
    tm, model, variables = small_pair(name)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(IMAGE, dtype=np.float32))
    with torch.no_grad():
        ref_logits = tm(x).numpy()
        ref_features = tm.forward_intermediates(x, indices=[1, 2, 3, 4], intermediates_only=True)
    backbone = create_model(name, stage_sizes=SMALL, features_only=True)
    backbone_variables, _ = convert_state_dict(backbone, tm.state_dict(), naming="timm", model_name=name)
    logits, features = jax.jit(lambda v, b, x: (model.apply(v, x), backbone.apply(b, x)))(
        variables, backbone_variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert_close(logits, ref_logits, f"{name} logits")
    for i, (ours, ref) in enumerate(zip(features, ref_features, strict=True)):
        assert_close(np.asarray(ours).transpose(0, 3, 1, 2), ref.numpy(), f"{name} layer{i + 1}")


@pytest.mark.parametrize("name, in_channels", [("resnet18", 1), ("resnet50d", 4), ("resnetv2_18", 2)])
def test_rgb_weights_load_into_other_input_channels_as_timm_adapts_them(name, in_channels):
    """timm's pretrained loading with ``in_chans`` != 3 adapts the first convolution (summed for one channel,
    repeated and scaled otherwise: ``adapt_input_conv``); loading the RGB file into ``in_channels`` must give the
    logits of timm's model holding timm's adaptation, on the plain, the deep (ResNet-D) and the ResNetV2 stem."""
    from timm.models._manipulate import adapt_input_conv as timm_adapt

    rgb = timm_model(name, layers=list(SMALL))
    state = dict(rgb.state_dict())
    first = next(k for k, v in state.items() if v.ndim == 4 and v.shape[1] == 3)
    state[first] = timm_adapt(in_channels, state[first].clone())
    reference = timm.create_model(name, layers=list(SMALL), in_chans=in_channels).eval()
    reference.load_state_dict(state)
    model = create_model(name, stage_sizes=SMALL, in_channels=in_channels)
    variables, _ = convert_state_dict(model, rgb.state_dict(), naming="timm", model_name=name)
    x = np.random.default_rng(1).standard_normal((2, 48, 40, in_channels), dtype=np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert_close(model.apply(variables, x), expected, f"{name} with {in_channels} input channels")


@pytest.mark.parametrize("name", GRADIENT)
def test_input_gradient_matches_timm_in_float64(name):
    """The gradient of weighted logits with respect to the image equals timm's, both in float64.

    Why float64: the max-pool routes each window's gradient to its largest input, and float32 rounding (ours
    or torch's, whose float32 and float64 kernels differ) flips near-ties, which moves whole gradient entries:
    torch float32 against torch float64 differed by 1e-2 of the scale on resnet50d. In float64 no tie flips, so
    what is compared is the architecture (the backward of every layer) and the weight mapping alone."""
    tm = timm_model(name, layers=list(SMALL))
    x = np.random.default_rng(0).standard_normal(IMAGE)
    x64 = torch.from_numpy(x).requires_grad_()
    probe = np.random.default_rng(1).standard_normal((x.shape[0], 1000))  # a cotangent that weighs every logit
    tm64 = copy.deepcopy(tm).double()
    (tm64(x64) * torch.from_numpy(probe)).sum().backward()
    with jax.enable_x64(True):
        model = create_model(name, stage_sizes=SMALL, dtype=jnp.float64, param_dtype=jnp.float64, conv_impl="xla")
        variables, _ = convert_state_dict(model, tm64.state_dict(), naming="timm", model_name=name)
        grad = jax.jit(jax.grad(lambda v, image: jnp.sum(model.apply(v, image) * probe), argnums=1))(
            variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
        assert grad.dtype == jnp.float64
        assert_close(np.asarray(grad), x64.grad.numpy().transpose(0, 2, 3, 1), f"{name} input gradient")


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "resnetv2_50d"])
def test_save_timm_writes_timms_state_dict(name, tmp_path):
    """At full depth, load_timm then save_timm gives back timm's state_dict (names in timm's order, dtypes,
    values), which timm loads strictly: a plain basic model, ResNet-D's bottleneck, and ResNetV2 (whose head is
    a 1x1 convolution)."""
    tm = timm_model(name)
    state = tm.state_dict()
    model, variables = load_timm(name, state)
    save_timm(model, variables, tmp_path / f"{name}.pth")
    written = torch.load(tmp_path / f"{name}.pth", weights_only=True)
    assert_same_state_dict({k: v.numpy() for k, v in written.items()}, state)
    tm.load_state_dict(written, strict=True)


def load_into_timm(name, state):
    """timm's own strict ``load_state_dict`` (every name, every shape) into its model on the meta device, which
    costs no memory and no initialisation."""
    with torch.device("meta"):
        model = timm.create_model(name)
    model.load_state_dict(state, strict=True, assign=True)


def meta_state_dict(name, **kwargs):
    """timm's names and shapes for ``name`` without allocating or initialising its weights."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in timm.create_model(name, **kwargs).state_dict().items()}


def test_timm_builds_each_name_as_its_kind():
    """At the small depth, timm builds every shared name exactly as the name of its kind whose outputs are
    compared above (the same entries, the same shapes): depth is all that sets them apart, and each name's full
    depth is checked against timm's in test_resnet.py."""
    for name in TIMM_MODELS:
        small = list(SMALL)
        assert meta_state_dict(name, layers=small) == meta_state_dict(representative(name), layers=small), name


def test_timm_models_are_exactly_the_shared_names():
    """Every name both libraries have is either checked against timm here or deliberately absent."""
    assert set(TIMM_MODELS) == {n for n in list_models() if n in timm.list_models()}
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"for the {len(TIMM_MODELS)} names timm shares with us" in readme  # the README counts them too


@pytest.fixture(scope="module")
def resnet18d():
    tm = timm_model("resnet18d")
    return tm, tm.state_dict()


def test_tagged_name_and_safetensors(tmp_path, resnet18d):
    """timm's hub format (.safetensors) under timm's tagged name loads, and goes back out as .safetensors holding
    exactly timm's tensors, which timm loads strictly (what the mapping computes is compared above)."""
    _, state = resnet18d
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    model, variables = load_timm("resnet18d.ra2_in1k", tmp_path / "model.safetensors")
    save_timm("resnet18d", variables, tmp_path / "ours.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    load_into_timm("resnet18d", loaded)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_new_head_and_backbone(resnet18d):
    _, state = resnet18d
    _, variables = load_timm("resnet18d", state, num_classes=7, new_head=True, rng=1)
    assert variables["params"]["fc"]["kernel"].shape == (512, 7)
    backbone, variables = load_timm("resnet18d", state, features_only=True)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)  # shapes are the point: traced, not run
    assert "fc" not in variables["params"] and len(jax.eval_shape(backbone.apply, variables, x)) == 4


@pytest.mark.parametrize("name", ["preact_resnet50", "resnet20", "resnet18_cifar", "resnet26d", "seresnetaa50d"])
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
    # a file of another architecture fits neither naming: no loader is suggested (a torchvision ResNet-18 was
    # sent to load_torchvision, which fails too: the stems differ)
    torchvision_resnet18 = {k: v.numpy() for k, v in torchvision.models.resnet18().state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_timm("resnet18d", torchvision_resnet18)
    assert "load it with" not in str(info.value) and "Check the model name" in str(info.value)


def test_loading_needs_no_torch(tmp_path):
    """With torch blocked from importing: timm .pth and .safetensors files load (linen and NNX) into the same
    variables, and save, for ResNet-D's names, ResNetV2's and the SE and ECA blocks' (one process for all:
    starting one costs seconds); what the saved files hold is compared with timm's here."""
    names = ["resnet18d", "resnetv2_18d", "seresnet18", "ecaresnet26t"]  # + SE and ECA (se.fc1, se.conv)
    states = {name: timm_model(name).state_dict() for name in names}
    for name, state in states.items():
        torch.save(state, tmp_path / f"{name}.pth")
        safetensors.torch.save_file(state, tmp_path / f"{name}.safetensors")
    script = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision", "timm"):
                    raise ImportError(f"torch is blocked in this test: {{name}}")
        sys.meta_path.insert(0, BlockTorch())
        import jax
        import numpy as np
        from resnet_jax import load_timm, save_timm
        from resnet_jax import nnx
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
        for name in {names!r}:
            base = {str(tmp_path)!r} + "/" + name
            loaded = []
            for suffix in ("pth", "safetensors"):
                model, variables = load_timm(name, base + "." + suffix)
                loaded.append(variables)
                save_timm(model, variables, base + ".out." + suffix)
            nnx_model = nnx.load_timm(name, base + ".safetensors")
            loaded.append(nnx.to_linen(nnx_model)[1])
            for other in loaded[1:]:
                assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded[0], other))), name + ": not the same"
            print(name, jax.eval_shape(model.apply, variables, x).shape)
        assert not any(m.split(".")[0] in ("torch", "torchvision", "timm") for m in sys.modules), "torch imported"
        print("no torch")
    """)
    assert "".join(f"{n} (1, 1000)\n" for n in names) + "no torch" in run_python(script).stdout
    for name, state in states.items():
        for suffix in ("pth", "safetensors"):
            out = tmp_path / f"{name}.out.{suffix}"
            written = torch.load(out, weights_only=True) if suffix == "pth" else safetensors.torch.load_file(out)
            load_into_timm(name, written)
            for k, v in state.items():
                assert torch.equal(written[k], v), (name, suffix, k)


def test_to_timm_refuses_variables_of_another_model(resnet18d):
    """timm's names are spelt by the model's settings, not the variables: resnet18d's variables given as another
    name were written under names no timm model has (a deeper one, a plain stem), for timm to refuse at load."""
    _, variables = load_timm("resnet18d", resnet18d[1])
    with pytest.raises(ValueError, match=r"do not fit timm's 'resnet34d': missing .*layer1_2.*Pass the model"):
        to_timm("resnet34d", variables)
    with pytest.raises(ValueError, match=r"do not fit timm's 'resnet18': missing .*unexpected params/conv1_0"):
        to_timm("resnet18", variables)
    _, headless = load_timm("resnet18d", resnet18d[1], num_classes=0)
    exported = {k: torch.from_numpy(v) for k, v in to_timm("resnet18d", variables).items()}
    load_into_timm("resnet18d", exported)  # the right name still exports, and the head's width is the variables'

    assert "fc.weight" not in to_timm("resnet18d", headless)


@pytest.mark.parametrize("name", ["resnetv2_18", "resnet18d"])
def test_a_timm_features_only_state_dict_loads_as_a_backbone(name):
    """timm's ``features_only`` wrapper renames ResNetV2's weights (``stem_conv1``, ``stages_0``: its top-level
    sequences flattened into one); ResNet's keep their names. Both load as our backbone and compute timm's
    features."""
    torch.manual_seed(0)
    tm = timm.create_model(name, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    tm.load_state_dict(random_batch_stats(tm.state_dict(), 0))
    model, variables = load_timm(name, tm.state_dict(), features_only=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = [f.numpy().transpose(0, 2, 3, 1) for f in tm(x)]
    features = model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), train=False)
    assert len(features) == len(expected) == 4
    for ours, ref in zip(features, expected):
        assert_close(ours, ref)
