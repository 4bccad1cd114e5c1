"""Every convolution algorithm by name. Each algorithm module declares its own ``Algorithm`` records
(``ALGORITHMS``); this module only lists the modules."""

from __future__ import annotations

from resnet_jax.ops import atrous, gemm, matmul_grad, polyphase, widened, winograd, xla
from resnet_jax.ops.onednn import algorithms as onednn_algorithms
from resnet_jax.ops.spec import Algorithm

# pure JAX first (any backend), then the C++ extension (CPU only), then the extension's float32-only algorithms
# widened to bfloat16 ("NAME@float32") and dilated through sub-grids ("NAME@atrous")
_MODULES = (xla, matmul_grad, gemm, polyphase, winograd, onednn_algorithms, widened, atrous)

REGISTRY: dict[str, Algorithm] = {a.name: a for module in _MODULES for a in module.ALGORITHMS}
ALGORITHMS: tuple[str, ...] = tuple(REGISTRY)
