"""oneDNN convolutions inside jitted JAX code on CPU: an optional accelerator, built on first use.

XLA:CPU's convolutions run well below oneDNN's on ResNet shapes (docs/cpu-convolution.md); calling oneDNN's
kernels through ``jax.ffi`` closes that gap while XLA keeps fusing everything around them. The flow:

    build.py       find the compiler and the oneDNN wheels, compile ``csrc/*.cc`` once per machine (locked, keyed)
    library.py     load the binary, register its FFI targets; ``available()`` and ``unavailable_reason()``
    calls.py       each C++ entry point as a JAX function, called by name, with its data-parallel sharding rule
    algorithms.py  the extension's ``Algorithm`` records, which ``ops/registry.py`` lists with the others

``python -m resnet_jax.ops.onednn --build`` builds it, checks it against XLA and says where it is.
"""

from resnet_jax.ops.onednn.build import OnednnBuildFailed, OnednnUnavailable
from resnet_jax.ops.onednn.library import TARGETS, available, unavailable_reason, version

__all__ = ["OnednnBuildFailed", "OnednnUnavailable", "TARGETS", "available", "unavailable_reason", "version"]
