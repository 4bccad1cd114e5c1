"""Convolution algorithms (each pass a linear primitive, so every JAX transformation works), the per-shape
choice, BatchNorm folding, and BatchNorm + residual + ReLU with a hand-written derivative for training.

``conv2d(..., algorithm=NAME)`` forces one of ``ALGORITHMS``; "auto" picks per shape, dtype and backend.
The models name an algorithm through their ``conv_impl`` field and know nothing else about them.
"""

from resnet_jax.ops.algorithms import ALGORITHMS, Geometry, choose
from resnet_jax.ops.batchnorm import BatchNorm, batch_norm_act
from resnet_jax.ops.conv import Conv, conv2d
from resnet_jax.ops.fold import fold_batchnorm

__all__ = ["ALGORITHMS", "BatchNorm", "Conv", "Geometry", "batch_norm_act", "choose", "conv2d", "fold_batchnorm"]
