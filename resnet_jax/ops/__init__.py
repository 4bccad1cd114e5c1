"""How the layers compute: convolution algorithms, the per-shape choice between them, BatchNorm and its folding,
and the max-pool. Read top to bottom (docs/ops.md draws the same map):

    conv.py        conv2d and the Conv layer: the epilogue (bias, residual, ReLU) and its derivative
    linear.py      the three convolution passes as linear primitives, so every JAX transformation works
    rules.py       which algorithm runs each pass: a forced name, or the per-shape choice ("auto", "jax")
    tuning_cache.py, tuning.py    this machine's measured choices: the file, and the tuner that writes it
    registry.py    every algorithm by name, as each algorithm module declares it
    spec.py        ConvSpec (what a convolution is) and Algorithm (one way to compute it)
    xla.py gemm.py matmul_grad.py polyphase.py winograd.py    the pure-JAX algorithms, one module each
    onednn/        the optional C++ extension: build, load, calls, its algorithms
    widened.py     "NAME@float32": an extension algorithm's pass in float32 inside a bfloat16 model
    batchnorm.py batchnorm_grad.py     BatchNorm (+ residual + ReLU) and its derivative (C++ passes on CPU)
    pool.py pool_grad.py               max-pool and its derivative (the backward in C++ on CPU)
    fold.py cpu.py                     folding BatchNorm away, CPU flags
    trace.py       a model's layers as it calls them (what folding and tuning read a model's structure from)
    jax_compat.py  every private or experimental JAX interface ops/ uses, resolved in one place

The models pass their ``conv_impl`` through as ``algorithm`` and know nothing else about algorithms; ops/
imports nothing outside itself and knows no model (folding asks the model through a small protocol, fold.py).
"""

from resnet_jax.ops.batchnorm import BatchNorm, batch_norm_act
from resnet_jax.ops.conv import Conv, conv2d
from resnet_jax.ops.fold import fold_batchnorm
from resnet_jax.ops.pool import max_pool
from resnet_jax.ops.registry import ALGORITHMS
from resnet_jax.ops.rules import CHOICES, choose, describe
from resnet_jax.ops.spec import ConvSpec

__all__ = ["ALGORITHMS", "BatchNorm", "CHOICES", "Conv", "ConvSpec", "batch_norm_act", "choose", "conv2d", "describe",
           "fold_batchnorm", "max_pool"]
