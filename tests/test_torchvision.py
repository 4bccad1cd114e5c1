"""torchvision <-> Flax weights: output parity with real torchvision, exact round trips, strict clear errors.

As in test_timm.py: outputs and the round trip are compared with torchvision on one name of each kind (every
``model_config`` field but ``stage_sizes``), both sides built with the same few blocks per stage (torchvision's
``ResNet(block, layers, groups=, width_per_group=)``, our ``stage_sizes=``); every name's full depth is checked
on the names and shapes of its weights in test_resnet.py (torchvision's meta device, ``jax.eval_shape``).
"""

import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import timm
import torchvision
from flax.traverse_util import flatten_dict

from conftest import assert_close, random_batch_stats, run_python
from resnet_jax import create_model, list_models
from resnet_jax.resnet import model_config
from resnet_jax.torchvision import (TORCHVISION_MODELS, load_torchvision, save_torchvision, to_timm, to_torchvision,
                                    torch_library)

NAMES = sorted(n for n in list_models() if hasattr(torchvision.models, n))
SMALL = (1, 2, 1, 1)  # every kind of block and shortcut (layer2.1: identity after stride 2), few of them


def kind(name):
    """What, besides depth, decides what ``name`` computes from its weights."""
    return tuple(sorted((k, repr(v)) for k, v in model_config(name).items() if k != "stage_sizes"))


def representative(name):
    """The shallowest torchvision name of ``name``'s kind (resnet152 -> resnet50)."""
    return min((n for n in NAMES if kind(n) == kind(name)), key=lambda n: sum(model_config(n)["stage_sizes"]))


PARITY = sorted({representative(n) for n in NAMES})  # basic, bottleneck, three ResNeXt and a wide one


def torchvision_model(name, seed=0, **kwargs):
    """A torchvision model in eval mode with random weights and random, non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(**kwargs).eval()
    model.load_state_dict(random_batch_stats(model.state_dict(), seed))
    return model


def meta_model(name):
    """torchvision's ``name`` on the meta device: its structure, with no memory and no initialisation."""
    with torch.device("meta"):
        return getattr(torchvision.models, name)()


def small_torchvision(name, layers=SMALL, seed=0):
    """torchvision's ResNet class with ``name``'s block, groups and width (read from torchvision's own
    ``name``), ``layers`` blocks per stage, random weights and statistics, in eval mode."""
    full = meta_model(name)
    torch.manual_seed(seed)
    model = torchvision.models.resnet.ResNet(type(full.layer1[0]), list(layers), groups=full.groups,
                                             width_per_group=full.base_width).eval()
    model.load_state_dict(random_batch_stats(model.state_dict(), seed))
    return model


def torch_forward(model, x):
    """torchvision's forward, keeping the four stage outputs."""
    with torch.no_grad():
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        features = []
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            y = stage(y)
            features.append(y.numpy())
        logits = model.fc(torch.flatten(model.avgpool(y), 1)).numpy()
    return logits, features


def assert_state_dicts_equal(ours, ref, ordered=True):
    assert list(ours) == list(ref) if ordered else sorted(ours) == sorted(ref)  # same names (in the same order)
    for k, v in ref.items():
        v = v.numpy()
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


@pytest.mark.parametrize("name", PARITY)
def test_parity_and_round_trip(name):
    """Logits and stage outputs match torchvision on a non-square image, for one name of each kind; export
    gives back the same state_dict, which torchvision loads strictly."""
    tm = small_torchvision(name)
    state = tm.state_dict()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 72, 104), dtype=np.float32))
    ref_logits, ref_features = torch_forward(tm, x)

    model, variables = load_torchvision(name, state, stage_sizes=SMALL)
    backbone = create_model(name, stage_sizes=SMALL, features_only=True)
    logits, features = jax.jit(lambda v, x: (model.apply(v, x), backbone.apply(v, x)))(
        variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert_close(logits, ref_logits, f"{name} logits")
    for i, (ours, ref) in enumerate(zip(features, ref_features, strict=True)):
        assert_close(np.asarray(ours).transpose(0, 3, 1, 2), ref, f"{name} layer{i + 1}")

    exported = to_torchvision(variables)
    assert_state_dicts_equal(exported, state)
    small_torchvision(name).load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_torchvision_builds_each_name_as_its_kind():
    """torchvision builds every name from the block, groups and width of the name of its kind whose outputs are
    compared above: depth is all that sets them apart, and each name's full depth is checked against
    torchvision's in test_resnet.py."""
    for name in NAMES:
        full, rep = meta_model(name), meta_model(representative(name))
        assert (type(full.layer1[0]), full.groups, full.base_width) == (
            type(rep.layer1[0]), rep.groups, rep.base_width), name


def test_every_torchvision_resnet_is_a_name_here():
    builders = {n for n in torchvision.models.resnet.__all__ if n[0].islower()}  # resnet18 ... wide_resnet101_2
    assert len(builders) == 10 and set(NAMES) == builders == set(TORCHVISION_MODELS)


@pytest.mark.parametrize("name, expected", [("resnet50", ("torchvision", "resnet50")),
                                            ("resnet50d", ("timm", "resnet50d")),
                                            ("seresnet18", ("timm", "seresnet18")),
                                            ("preact_resnet18", ("timm", "resnetv2_18")),  # the same network
                                            ("resnet20", None), ("resnet18_cifar", None)])
def test_torch_library_names_the_pytorch_model_that_loads_the_weights(name, expected, tmp_path):
    """What an export of ``name`` is for: the library's model of that name loads ``save_torchvision`` /
    ``save_timm`` output strictly (torchvision first, where it has it); with other input channels or depths it
    is timm's (``in_chans``) or none."""
    model = create_model(name, num_classes=7)
    assert torch_library(model) == expected
    if expected is not None:
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
        library, arch = expected
        if library == "torchvision":
            getattr(torchvision.models, arch)(num_classes=7).load_state_dict(
                {k: torch.from_numpy(v) for k, v in to_torchvision(variables).items()}, strict=True)
        else:
            timm = pytest.importorskip("timm")
            timm.create_model(arch, num_classes=7).load_state_dict(
                {k: torch.from_numpy(v) for k, v in to_timm(model, variables).items()}, strict=True)
    assert torch_library(create_model("resnet50", in_channels=1)) == ("timm", "resnet50")
    assert torch_library(create_model("resnet50", stage_sizes=(1, 1, 1, 1))) is None
    # torchvision's BasicBlock raises for dilation: a dilated ResNet-18 is timm's (output_stride), ResNet-50 stays
    assert torch_library(create_model("resnet18", output_stride=16)) == ("timm", "resnet18")
    assert torch_library(create_model("resnet50", output_stride=8)) == ("torchvision", "resnet50")


@pytest.fixture(scope="module")
def resnet18():
    tm = torchvision_model("resnet18")
    return tm, tm.state_dict()


def test_pth_export_loads_in_torch_weights_only(tmp_path, resnet18):
    tm, state = resnet18
    model, variables = load_torchvision("resnet18", state)
    save_torchvision(variables, tmp_path / "r18.pth")
    loaded = torch.load(tmp_path / "r18.pth", weights_only=True)
    assert_state_dicts_equal({k: v.numpy() for k, v in loaded.items()}, state)
    fresh = torchvision.models.resnet18().eval()
    fresh.load_state_dict(loaded, strict=True)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        assert torch.equal(fresh(x), tm(x))
    _, again = load_torchvision("resnet18", tmp_path / "r18.pth")  # and our reader takes our file back
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_safetensors_both_ways(tmp_path, resnet18):
    tm, state = resnet18
    safetensors.torch.save_file(state, tmp_path / "theirs.safetensors")
    _, variables = load_torchvision("resnet18", tmp_path / "theirs.safetensors")
    save_torchvision(variables, tmp_path / "ours.safetensors")
    loaded = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    torchvision.models.resnet18().load_state_dict(loaded, strict=True)
    assert_state_dicts_equal({k: v.numpy() for k, v in loaded.items()}, state, ordered=False)  # it sorts names


@pytest.mark.parametrize("name,kwargs", [("resnet18_cifar", {}), ("resnet20", {}), ("preact_resnet18", {}),
                                         ("preact_resnet50", {}), ("resnet18d", {}), ("resnet50d", {}),
                                         ("resnet18", {"num_classes": 7, "in_channels": 1})])
def test_every_variant_round_trips(tmp_path, name, kwargs):
    """Models torchvision does not have still go to a state_dict and back unchanged, through a .pth file."""
    model = create_model(name, **kwargs)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, model.in_channels)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    save_torchvision(variables, tmp_path / "v.pth")
    state = torch.load(tmp_path / "v.pth", weights_only=True)
    assert all(k.endswith(("weight", "bias", "running_mean", "running_var", "num_batches_tracked")) for k in state)
    _, back = load_torchvision(name, tmp_path / "v.pth", **kwargs)
    assert flatten_dict(back).keys() == flatten_dict(variables).keys()
    jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18"])
def test_a_backbone_loads_from_a_whole_models_file(tmp_path, name):
    """``features_only`` builds neither the head nor the pre-activation stack's closing BatchNorm: the file's
    entries for them are ignored and everything else loads unchanged."""
    model = create_model(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    save_torchvision(variables, tmp_path / "v.pth")
    _, back = load_torchvision(name, tmp_path / "v.pth", features_only=True)
    kept = {k: v for k, v in flatten_dict(variables).items() if k[1] not in ("fc", "bn_final")}
    assert flatten_dict(back).keys() == kept.keys()
    for k, v in kept.items():
        np.testing.assert_array_equal(flatten_dict(back)[k], v)


def test_strict_error_lists_every_problem_at_once(resnet18):
    _, state = resnet18
    state = dict(state)
    del state["layer1.0.conv1.weight"], state["bn1.running_var"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    state["extra.thing"] = torch.zeros(1)
    state["layer2.0.conv2.weight"] = torch.zeros(128, 128, 5, 5)
    with pytest.raises(ValueError) as info:
        load_torchvision("resnet18", state)
    msg = str(info.value)
    for needle in ["2 missing", "layer1.0.conv1.weight", "bn1.running_var", "2 unexpected", "layer9.0.conv1.weight",
                   "extra.thing", "1 mis-shaped", "layer2.0.conv2.weight: file has (128, 128, 5, 5), model needs "
                   "(128, 128, 3, 3)"]:
        assert needle in msg, (needle, msg)


def test_wrong_model_name_is_a_clear_error(resnet18):
    with pytest.raises(ValueError, match=r"missing.*layer1\.2\.conv1\.weight"):
        load_torchvision("resnet34", resnet18[1])


def test_a_file_of_another_depth_is_named_briefly_without_the_head_advice(resnet18):
    """ResNet-50's weights for a ResNet-18: every stage differs, and the message listed hundreds of names (6 KB)
    ending in "pass num_classes=N and new_head=True", although both heads have 1000 classes."""
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    with pytest.raises(ValueError) as info:
        load_torchvision("resnet18", state)
    msg = str(info.value)
    assert len(msg) < 3000 and "new_head" not in msg
    assert re.search(r"\d+ mis-shaped:(\n    \S+: file has .*){12}\n    \.\.\. and \d+ more", msg), msg


def test_overrides_torchvision_cannot_build_are_refused(resnet18):
    """Used to be: ``load_torchvision("resnet18", file, shortcut="avg_pool")`` (and ``pretrained`` or
    ``Classifier.from_pretrained`` with it) loaded, the shapes agreeing, and computed other logits than
    torchvision's (0.59 apart); ``load_timm`` refused the same. What torchvision's ResNet class itself takes
    (here ``bn_epsilon``, for a ``norm_layer`` of another eps) still loads."""
    _, state = resnet18
    for option in ({"shortcut": "avg_pool"}, {"stem": "deep"}, {"attn_layer": "se"}):
        with pytest.raises(ValueError, match=rf"load_torchvision\('resnet18'\) builds torchvision's resnet18 "
                                             rf"architecture; the option\(s\) \['{next(iter(option))}'\] would change"):
            load_torchvision("resnet18", state, **option)
    model, _ = load_torchvision("resnet18", state, bn_epsilon=1e-3)
    assert model.bn_epsilon == 1e-3


def test_a_list_for_a_tuple_setting_is_the_same_architecture(resnet18):
    """Used to be: ``stage_sizes=[2, 2, 2, 2]`` (which create_model takes) was "an option that would change what
    the weights compute" to the loaders, and a model built with it had no PyTorch library for ``to_timm``."""
    _, state = resnet18
    model, variables = load_torchvision("resnet18", state, stage_sizes=[2, 2, 2, 2])
    listed = create_model("resnet18", stage_sizes=[2, 2, 2, 2], stage_widths=[64, 128, 256, 512])
    assert torch_library(listed) == ("torchvision", "resnet18")
    fresh = timm.create_model("resnet18")
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in to_timm(listed, variables).items()}, strict=True)


def test_params_alone_or_folded_batchnorm_are_refused_not_written_for_torch_to_reject(resnet18):
    """Used to be: the params alone (an optimizer's, no ``batch_stats``) or ``ops.fold_batchnorm``'s variables
    were written without a word, as state_dicts torch's strict ``load_state_dict`` rejects (missing
    running_mean/running_var; unexpected conv biases); to_timm blamed a folded model's architecture."""
    from resnet_jax import ops

    tm, state = resnet18
    model, variables = load_torchvision("resnet18", state)
    with pytest.raises(ValueError, match=r"no BatchNorm statistics \(batch_stats\) for 20 of their 20 BatchNorm "
                                         r"layers \(bn1, layer1_0/bn1, layer1_0/bn2\.\.\.\).*not the params alone"):
        to_torchvision({"params": variables["params"]})
    with pytest.raises(ValueError, match="no BatchNorm statistics"):
        to_timm(model, {"params": variables["params"]})
    folded_model, folded = ops.fold_batchnorm(model, variables, (1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"BatchNorm folded into the convolutions \(ops.fold_batchnorm\).*before "
                                         r"folding"):
        to_torchvision(folded)
    with pytest.raises(ValueError, match="BatchNorm folded into its convolutions"):
        to_timm(folded_model, variables)
    torchvision.models.resnet18().load_state_dict(  # what is refused above is what torch refuses
        {k: torch.from_numpy(v) for k, v in to_torchvision(variables).items()}, strict=True)


def test_other_class_count_needs_new_head(resnet18):
    _, state = resnet18
    with pytest.raises(ValueError, match=r"fc\.weight: file has \(1000, 512\), model needs \(10, 512\)"
                                         r"(.|\n)*new_head=True"):
        load_torchvision("resnet18", state, num_classes=10)
    model, variables = load_torchvision("resnet18", state, num_classes=10, new_head=True, rng=3)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    assert float(jnp.abs(variables["params"]["fc"]["kernel"]).sum()) > 0
    _, same = load_torchvision("resnet18", state, num_classes=10, new_head=True, rng=3)
    jax.tree.map(np.testing.assert_array_equal, same, variables)  # the rng decides the head
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                  state["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    assert jax.eval_shape(model.apply, variables, jnp.ones((1, 32, 32, 3))).shape == (1, 10)  # traced, not run


def test_backbone_takes_a_classifier_file(resnet18):
    model, variables = load_torchvision("resnet18", resnet18[1], features_only=True)
    assert "fc" not in variables["params"]
    assert len(jax.eval_shape(model.apply, variables, jnp.ones((1, 64, 64, 3)))) == 4  # traced, not run


def test_data_parallel_prefix_is_stripped(resnet18):
    wrapped = {f"module.{k}": v for k, v in resnet18[1].items()}
    _, variables = load_torchvision("resnet18", wrapped)
    assert_state_dicts_equal(to_torchvision(variables), resnet18[1])


def test_a_compiled_models_state_dict_loads():
    """torch.compile's wrapper saves every name under ``_orig_mod.`` (and inside DDP under ``module._orig_mod.``)."""
    model = torchvision.models.resnet18()
    compiled = torch.compile(model).state_dict()  # compiles nothing until called
    assert all(k.startswith("_orig_mod.") for k in compiled)
    for state in (compiled, {f"module.{k}": v for k, v in compiled.items()}):
        _, variables = load_torchvision("resnet18", state)
        assert_state_dicts_equal(to_torchvision(variables), model.state_dict())


def test_loaded_weights_do_not_share_memory_with_the_torch_model():
    """BatchNorm's vectors and biases (no transpose on the way) were numpy views of the torch tensors that
    jnp.asarray kept on CPU: a train-mode forward of the torch model (its running statistics) or any in-place edit
    changed the JAX weights after loading."""
    tm = torchvision_model("resnet18")
    _, variables = load_torchvision("resnet18", tm.state_dict())
    before = jax.tree.map(np.array, variables)
    with torch.no_grad():
        for tensor in tm.state_dict().values():
            tensor.add_(1)
    jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_a_training_checkpoint_around_the_state_dict_says_to_take_it_out(resnet18):
    """{"model": state_dict, "epoch": 3} was reported as 2 unexpected and 102 missing entries."""
    with pytest.raises(ValueError, match=r"holds dictionaries under 'model', not tensors: .* checkpoint\['model'\]"):
        load_torchvision("resnet18", {"model": resnet18[1], "epoch": 3})


def test_bad_source_type_is_a_clear_error():
    with pytest.raises(TypeError, match="file path or a mapping"):
        load_torchvision("resnet18", 42)


def test_loading_needs_no_torch(tmp_path, resnet18):
    """In a process where importing torch fails, a .pth still loads, converts and saves; torch stays unloaded."""
    torch.save(resnet18[1], tmp_path / "r18.pth")
    script = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchvision"):
                    raise ImportError(f"torch is blocked in this test: {{name}}")
        sys.meta_path.insert(0, BlockTorch())
        import jax
        import numpy as np
        from resnet_jax.torchvision import load_torchvision, save_torchvision
        model, variables = load_torchvision("resnet18", {str(tmp_path / "r18.pth")!r})
        save_torchvision(variables, {str(tmp_path / "out.pth")!r})
        save_torchvision(variables, {str(tmp_path / "out.safetensors")!r})
        print(jax.eval_shape(model.apply, variables, np.ones((1, 32, 32, 3), np.float32)).shape)
        assert not any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules), "torch was imported"
        print("no torch")
    """)
    assert "(1, 1000)\nno torch" in run_python(script).stdout
    loaded = torch.load(tmp_path / "out.pth", weights_only=True)
    assert_state_dicts_equal({k: v.numpy() for k, v in loaded.items()}, resnet18[1])
