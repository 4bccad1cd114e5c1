"""Moved to ``resnet_jax.allocator`` (shared by the CLI and the benchmarks); kept so old imports still work."""

from resnet_jax.allocator import ENV_VAR, find_tcmalloc, preload_tcmalloc  # noqa: F401
