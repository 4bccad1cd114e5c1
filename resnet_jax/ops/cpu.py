"""What this CPU can do, read once from ``/proc/cpuinfo`` (empty elsewhere): the extension's build flags, its
bfloat16 support and the tuning cache's machine key all depend on it."""

from __future__ import annotations

import functools


@functools.cache
def flags() -> str:
    """The CPU's feature-flags line ("" where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def has(*names: str) -> bool:
    """Whether the CPU has any of these feature flags (as /proc/cpuinfo spells them, e.g. "avx512f")."""
    present = flags().split()
    return any(name in present for name in names)


def native_bfloat16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX-512 BF16 or AMX). oneDNN 3.2 refuses to create bfloat16
    convolutions on an AVX2-only CPU ("could not create a primitive descriptor"), so elsewhere bfloat16 layers
    stay with XLA."""
    return has("avx512_bf16", "amx_bf16")
