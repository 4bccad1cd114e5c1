"""resnet-jax: the ResNet family as functional Flax modules, with torchvision weights, training and data."""

from resnet_jax.blocks import BasicBlock, Bottleneck
from resnet_jax.pretrained import DownloadError, imagenet_classes, pretrained, weights_info
from resnet_jax.resnet import ResNet, create_model, list_models, model_config
from resnet_jax.torch_file import UnsafeFileError, WeightsFileError, read_torch_file, write_torch_file
from resnet_jax.torchvision import load_timm, load_torchvision, save_timm, save_torchvision, to_timm, to_torchvision

__version__ = "0.1.0"

__all__ = [
    "BasicBlock", "Bottleneck", "DownloadError", "ResNet", "UnsafeFileError", "WeightsFileError", "create_model",
    "imagenet_classes", "list_models", "load_timm", "load_torchvision", "model_config", "pretrained", "read_torch_file",
    "save_timm", "save_torchvision", "to_timm", "to_torchvision", "weights_info", "write_torch_file",
]
