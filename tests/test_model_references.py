"""The model rows that neither torchvision nor timm ship, each against an outside reference, and README's Models
table naming a reference for every row.

- He et al. 2015 (section 4.2, table 6) CIFAR ResNets: a PyTorch network written from the paper and its
  reference code's "option A" shortcut (a stride-2 subsample, then zero channels split evenly before and after),
  fed our weights through ``to_torchvision`` (the paper's parameter counts are checked in test_resnet.py, where
  every model's full-depth variables are traced once).
- The CIFAR-stem ResNets: torchvision's own ResNet with its stem swapped for a 3x3 stride-1 convolution and no
  max-pool, as the usual CIFAR recipes do.
- Pre-activation: the same configurations as timm's ResNetV2 (whose parity is in test_timm.py).
"""

import re

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from conftest import REPO, assert_close, random_variables
from resnet_jax import create_model, list_models
from resnet_jax.resnet import MODEL_CONFIGS
from resnet_jax.torchvision import to_torchvision

class OptionA(nn.Module):
    """The reference code's parameter-free shortcut: every other pixel, zero channels on both sides."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class PaperBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = OptionA((cout - cin) // 2) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class PaperCifarResNet(nn.Module):
    """6n+2 layers: a 3x3 conv to 16 channels, three stages of n blocks at 16/32/64, global pool, fc."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16)
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(PaperBlock(cin, width, 2 if stage > 0 and j == 0 else 1))
                cin = width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def torch_logits(net: nn.Module, variables, x_nhwc: np.ndarray) -> np.ndarray:
    state = {k: torch.from_numpy(v) for k, v in to_torchvision(variables).items()}
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        return net.eval()(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))).numpy()


def ours(name: str, size: tuple[int, int], seed: int = 0, **overrides):
    """The model, random variables, a batch and its logits (compiled: a whole model runs slowly op by op)."""
    model = create_model(name, num_classes=10, **overrides)
    variables = random_variables(model, (1, *size, 3), seed)
    x = np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)
    return model, variables, x, np.asarray(jax.jit(model.apply)(variables, x))


@pytest.mark.parametrize("name", ["resnet20", "resnet32"])
def test_cifar_resnets_compute_the_papers_network(name):
    """Our weights in the paper's network (option-A shortcuts as the reference code writes them): equal logits
    on a non-square image with odd sizes, so the subsample and the channel split are checked, not only shapes."""
    _, variables, x, logits = ours(name, (30, 22))
    assert_close(logits, torch_logits(PaperCifarResNet(int(name[6:])), variables, x), name)


@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet50_cifar"])
def test_cifar_stem_resnets_are_torchvisions_with_a_small_stem(name):
    """Two blocks in the first stage (a projection and an identity shortcut in the bottleneck net), one in the
    others: the stem is the point, and every block kind is there."""
    _, variables, x, logits = ours(name, (24, 20), stage_sizes=(2, 1, 1, 1))
    block = {"resnet18_cifar": BasicBlock, "resnet50_cifar": Bottleneck}[name]
    net = torchvision.models.resnet.ResNet(block, [2, 1, 1, 1], num_classes=10)
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    assert_close(logits, torch_logits(net, variables, x), name)


def test_pre_activation_models_are_timms_resnetv2():
    """preact_resnetN is timm's resnetv2_N, whose logits and input gradients test_timm.py compares."""
    for depth in (18, 34, 50, 101, 152):
        assert MODEL_CONFIGS[f"preact_resnet{depth}"] == MODEL_CONFIGS[f"resnetv2_{depth}"]


def models_table() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Models", 1)[1].split("\n### ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return rows[2:]  # past the header and its rule


def test_every_models_table_row_names_a_reference_and_its_test():
    """Each row says what outside reference it equals and which test checks it; every model name is in a row."""
    rows = models_table()
    assert rows
    covered = set()
    for family, names, _notes, reference in rows:
        tests = re.findall(r"tests/test_\w+\.py", reference)
        assert tests and "round trip only" not in reference.lower(), f"{family}: no outside reference named"
        assert all((REPO / t).is_file() for t in tests), reference
        for token in re.findall(r"`([a-z0-9_/]+)`", names):  # resnet18/34/50: one prefix, several endings
            first, *rest = token.split("/")
            prefix = re.match(r"[a-z_]*?(?:v2_)?(?=\d)", first).group(0)
            covered |= {first, *(prefix + r for r in rest)}
    assert set(list_models()) <= covered, sorted(set(list_models()) - covered)
    assert covered <= set(list_models()), sorted(covered - set(list_models()))
