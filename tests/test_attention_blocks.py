"""The SE and ECA modules' sizes follow timm's rules at every width, not only at the powers of two the named
models have (whole-model equality with timm is in test_timm.py)."""

import timm.layers
import torch

from resnet_jax.attention import eca_kernel_size, se_channels


def test_se_width_and_eca_kernel_are_timms_for_any_channel_count():
    for channels in range(8, 4100, 12):
        assert se_channels(channels) == timm.layers.make_divisible(channels / 16, 8, round_limit=0.0), channels
        eca = timm.layers.EcaModule(channels)
        assert eca_kernel_size(channels) == eca.conv.kernel_size[0], channels
    assert isinstance(eca.conv, torch.nn.Conv1d)
