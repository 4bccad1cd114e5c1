"""BasicBlock and Bottleneck used on their own, as the package exports them, equal torchvision's blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchvision.models.resnet import BasicBlock as TorchBasicBlock, Bottleneck as TorchBottleneck, conv1x1

from resnet_jax import BasicBlock, Bottleneck
from resnet_jax.torchvision import to_torchvision


def projection(inplanes, planes, stride):
    return torch.nn.Sequential(conv1x1(inplanes, planes, stride), torch.nn.BatchNorm2d(planes))


@pytest.mark.parametrize("ours,theirs", [
    (BasicBlock(64, strides=2), TorchBasicBlock(64, 64, 2, downsample=projection(64, 64, 2))),
    (BasicBlock(64), TorchBasicBlock(64, 64)),
    (Bottleneck(32), TorchBottleneck(64, 32, downsample=projection(64, 128, 1))),
    (Bottleneck(32, strides=2, groups=4, width_per_group=16),
     TorchBottleneck(64, 32, 2, downsample=projection(64, 128, 2), groups=4, base_width=16)),
], ids=["basic-strided", "basic", "bottleneck", "resnext-bottleneck-strided"])
def test_a_block_on_its_own_equals_torchvisions_in_both_modes(ours, theirs):
    """Used to be: exported, but ``BasicBlock(64, 1)`` raised a TypeError (the stack's conv_norm and norm
    factories were required, and only a private function made them). Now a block builds torchvision's
    convolution and BatchNorm itself: with the same (random) weights and running statistics it equals
    torchvision's block in eval mode and, ``deterministic=False``, in train mode (batch statistics)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 12, 10, 64)).astype(np.float32)
    variables = ours.init(jax.random.key(0), jnp.asarray(x))
    variables = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32), variables)
    state = to_torchvision({kind: {"layer1_0": tree} for kind, tree in variables.items()})  # a block's names
    theirs.load_state_dict({k.removeprefix("layer1.0."): torch.from_numpy(v) for k, v in state.items()}, strict=True)
    for train in (False, True):
        theirs.train(train)
        with torch.no_grad():
            expected = theirs(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
        out, updated = ours.clone(deterministic=not train).apply(variables, x, mutable=["batch_stats"])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), updated["batch_stats"],
                                             variables["batch_stats"]))
        assert all(moved) if train else not any(moved)  # running averages move in train mode only


def test_a_block_takes_both_factories_or_neither():
    with pytest.raises(ValueError, match="give a block both conv_norm and norm"):
        BasicBlock(64, norm=lambda **kw: None).init(jax.random.key(0), jnp.zeros((1, 8, 8, 64)))


@pytest.mark.parametrize("shape", [(4, 1, 1, 1024), (1, 1, 1, 4096), (2, 5, 7, 8), (3, 1, 6, 700), (2, 4, 6, 3)])
def test_the_resnet_d_shortcuts_pool_equals_torchs_ceil_mode_pool(shape):
    """ResNet-D's shortcut pool (torch's AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)). It was
    reduce_window with its own padding, which XLA:CPU (jaxlib 0.10.2) summed as 4x on a 1x1 input once the
    batch held 4096 values: a resnet50d at 16 px gave other logits at batch 4 than one image at a time."""
    from resnet_jax.blocks import _avg_pool_ceil

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    expected = pool(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(_avg_pool_ceil)(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-6)
