"""resnet-jax: the ResNet family as functional Flax modules, with torchvision weights, training and data."""

from resnet_jax.blocks import BasicBlock, Bottleneck
from resnet_jax.resnet import ResNet, create_model, list_models, model_config

__version__ = "0.1.0"

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "create_model", "list_models", "model_config"]
