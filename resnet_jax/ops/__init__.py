"""Hand-tuned building blocks that XLA lowers poorly on some backends (see ``conv.py``)."""

from resnet_jax.ops.conv import MatmulGradConv, conv2d

__all__ = ["MatmulGradConv", "conv2d"]
