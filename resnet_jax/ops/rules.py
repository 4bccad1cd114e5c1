"""Which algorithm computes each pass: a name the caller forces, or the per-shape choice behind "auto".

A choice is a triple, one algorithm per pass (forward, input gradient, kernel gradient), because the fastest
algorithm depends on the pass as much as on the shape. ``choose`` is deterministic: this machine's own
measurements where ``python -m resnet_jax.ops.tuning`` stored some, else the rules below, read off the per-layer
tables of BENCHMARKS.md ("Per-layer algorithms"); on GPU/TPU XLA's own convolutions, whose libraries pick
their algorithms themselves.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import os

import jax

from resnet_jax.ops import cpu, tuning_cache
from resnet_jax.ops.onednn import library as onednn_library
from resnet_jax.ops.onednn.library import available as extension_available
from resnet_jax.ops.onednn.library import built_library as extension_build
from resnet_jax.ops.registry import ALGORITHMS, REGISTRY
from resnet_jax.ops.spec import ConvSpec

CHOICES = ("auto", "jax")  # chosen per shape and pass: among all algorithms, or among the pure-JAX ones
Passes = tuple[str, str, str]  # the algorithm of the forward, of the input gradient, of the kernel gradient
PASSES = ("forward", "input_grad", "kernel_grad")  # their names, in that order (tuning files, BFLOAT16_WINOGRAD_*)

# Below this many 4x4 output tiles per call (``winograd_tiles``), transforming the kernel on every call costs the
# extension's Winograd more than it saves: per layer, all three passes, ResNet-50's 7x7x512 lost at 4 and 8 tiles
# (batch 1 and 2: 0.49-0.89x oneDNN's direct kernels) and won at 16 (batch 4: 0.97-1.47x); every layer of 16 tiles
# or more won or tied over its three passes together (one pass lost by up to 12%), down to 0.04 GFLOP
# (BENCHMARKS.md, 2026-12-05, fourth session)
WINOGRAD_MIN_TILES = 16
# A bfloat16 3x3 stride-1 layer's passes by the extension's Winograd F(4,3), which reads and writes bfloat16
# activations and computes in float32, against oneDNN's bfloat16 kernels (BENCHMARKS.md, issue 33), per pass:
# - With AMX (oneDNN's AMX kernels run 3-4x float32 Winograd on images of 14x14 and larger), measured through the
#   float32 detour ("@float32": the same arithmetic plus three conversion passes): the kernel gradient won on
#   images of at most 8x8 pixels (1.1-3.3x: 4x4x512 and 8x8x256 at batch 128, 7x7x512 at batch 32) and lost at
#   14x14 and 16x16; the forward won on 4x4x512 only; both lost below a few GFLOP (7x7x512 at batch 8).
# - With AVX-512 BF16 and no AMX (2026-12-06, twelfth session, the native reads): the kernel gradient won on every
#   layer of ResNet-18-CIFAR and ResNet-50 at batches 8-128 (1.06-2.7x, 7x7x512 at batch 8 included); the forward
#   and input gradient won on outputs of whole 4x4 tiles up to 32x32 (1.03-1.6x; 28x28 mixed) and lost on 14x14
#   and 7x7 (a quarter of each tile's outputs discarded: 0.78-0.92x) and on 56x56 (0.93-1.0x).
BFLOAT16_WINOGRAD_AMX = {"forward": 16, "kernel_grad": 64}  # at most this many pixels, and WINOGRAD_MIN_FLOPS
BFLOAT16_WINOGRAD_MIN_FLOPS = 4e9
BFLOAT16_WINOGRAD_AVX512 = {"forward": 1024, "input_grad": 1024, "kernel_grad": None}  # the pass's output pixels


def names(algorithm: str) -> Passes | None:
    """The per-pass names that ``algorithm`` forces (None for a choice, "auto" or "jax"); ``ValueError`` with
    the known names when it is neither. What a model checks its ``conv_impl`` with."""
    if algorithm in CHOICES:
        return None
    parts = algorithm.split("/") if "/" in algorithm else [algorithm] * 3
    unknown = [n for n in parts if n not in REGISTRY]
    if unknown or len(parts) != 3:
        close = difflib.get_close_matches(unknown[0] if unknown else algorithm, [*ALGORITHMS, *CHOICES], n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown convolution algorithm {algorithm!r}; {hint}choose one of "
                         f"{[*ALGORITHMS, *CHOICES]}, or three of those joined by '/' (forward/input gradient/"
                         "kernel gradient)")
    return tuple(parts)


def resolve(algorithm: str, spec: ConvSpec, backend: str, fallback: bool = False) -> Passes:
    """The (forward, input gradient, kernel gradient) algorithms that ``conv2d(algorithm=...)`` runs. A forced
    name that cannot compute ``spec`` raises ``ValueError`` saying why, or with ``fallback`` gives "auto"'s."""
    forced = names(algorithm)
    if forced is None:
        return choose(spec, backend, extension=algorithm == "auto")
    refusal = next((r for r in (REGISTRY[n].refusal(spec, backend) for n in dict.fromkeys(forced)) if r), None)
    if refusal and fallback:
        return choose(spec, backend)
    if refusal:
        raise ValueError(f"{refusal}; use algorithm='auto' to pick one that can")
    return forced


def describe(algorithm: str, backend: str | None = None) -> str:
    """What computes the convolutions of a model built with ``conv_impl=algorithm`` on ``backend`` (default:
    jax's), in one line for a run's log: above all whether the oneDNN extension runs and, where it does not, why
    (a user who gets the slow path without knowing it cannot fix it)."""
    backend = backend or jax.default_backend()
    forced = names(algorithm)
    if forced is not None:
        return f"{algorithm!r} on every layer it can compute, 'auto' elsewhere"
    if backend != "cpu":
        return f"XLA's own on {backend} (conv_impl={algorithm!r})"
    if algorithm == "jax":
        return "pure JAX, chosen per layer (conv_impl='jax')"
    reason = onednn_library.unavailable_reason()
    if reason is None:
        return f"the oneDNN {onednn_library.version()} extension, chosen per layer (conv_impl='auto')"
    return f"pure JAX, chosen per layer: the oneDNN extension is off ({reason})"


def max_pool_method(algorithm: str, backend: str) -> str:
    """How ``ops.max_pool`` computes in a model built with ``conv_impl=algorithm``: "reduce_window" (XLA's own
    window op) off CPU, and where every algorithm forced is ``xla_ops_only`` (so the plain-XLA reference and the
    exported artifacts hold XLA's own operations only); "sliced" (the strided views of ``pool.py``, several times
    faster on XLA:CPU) otherwise."""
    forced = names(algorithm)
    if backend != "cpu" or (forced is not None and all(REGISTRY[n].xla_ops_only for n in forced)):
        return "reduce_window"
    return "sliced"


def may_use_extension(algorithm: str, backend: str) -> bool:
    """Whether a model built with ``conv_impl=algorithm`` may call the extension outside its convolutions (the
    max-pool's gradient, BatchNorm's passes in training): on CPU where it is usable, for "auto" or a forced
    algorithm of the extension's; never for "jax" or XLA's own, whose models hold no extension call."""
    forced = names(algorithm)
    allowed = algorithm == "auto" or (forced is not None and any(REGISTRY[n].cpu_only for n in forced))
    return backend == "cpu" and allowed and extension_available()


def compute_dtype(dtype: str, algorithm: str, backend: str, native_bfloat16: bool | None = None) -> str:
    """The dtype a convolution chosen by ``algorithm`` computes in, for inputs of ``dtype``.

    bfloat16 on a CPU without bfloat16 instructions (AVX2, or AVX-512 without BF16) computes in float32: there
    oneDNN refuses bfloat16 convolutions, and XLA emulates them slower than its float32 ones, so a bfloat16
    model would train slower than the same model in float32. Upcast, the float32 algorithms (Winograd, oneDNN)
    run. A ResNet asks the same question for all its layers (``ResNet.layer_dtype``) and computes in float32
    throughout: converting the activations around every convolution cost more than bfloat16 saved (a
    ResNet-18-CIFAR step 1.93 s against float32's 1.59 s on an AVX2 EPYC, BENCHMARKS.md 2026-12-04). A forced
    algorithm computes as named.
    """
    if dtype != "bfloat16" or backend != "cpu" or algorithm not in CHOICES:
        return dtype
    native = cpu.native_bfloat16() if native_bfloat16 is None else native_bfloat16
    return dtype if native else "float32"


@functools.cache
def machine_key() -> str:
    """What a measured ranking depends on: the CPU, jax's version, the backend, the extension's build (its
    library's path holds its sources' and oneDNN's hash) and the threads this process may run (its CPU affinity,
    OMP_NUM_THREADS, XLA_FLAGS: os.cpu_count() saw neither taskset nor a container's cpuset). Tuning files are
    keyed by it, so a different machine, build or thread budget never reuses another's measurements."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu.flags(), jax.__version__, jax.default_backend(), extension_build(), str(threads),
             os.environ.get("OMP_NUM_THREADS", ""), os.environ.get("XLA_FLAGS", "")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def measured_choice(spec: ConvSpec, extension: bool) -> Passes | None:
    entry = tuning_cache.entries(machine_key()).get(spec.key())
    if not entry:
        return None
    passes = tuple(entry["auto" if extension else "jax"])
    usable = all(n in REGISTRY and REGISTRY[n].refusal(spec, "cpu") is None for n in passes)
    return passes if usable else None


def _usable(*algorithms: str, spec: ConvSpec, backend: str) -> bool:
    return all(REGISTRY[n].refusal(spec, backend) is None for n in algorithms)


def choose(spec: ConvSpec, backend: str, extension: bool = True, measured: bool = True) -> Passes:
    """The algorithms "auto" runs for ``spec`` on ``backend``, per pass ("jax": ``extension=False``).

    With ``measured``, this machine's own measurements win where they cover the shape. The rules, float32 on CPU
    (docs/cpu-convolution.md says what each was measured against):
    - 3x3 stride 1: the extension's Winograd F(4,3) for all three passes, except on layers of few output tiles
      (``WINOGRAD_MIN_TILES``) and the stems' few channels, where oneDNN's direct kernels win. Without the
      extension: XLA's forward and input gradient, and the kernel gradient by jnp Winograd F(4,3) in float32, by
      the patch matmul otherwise.
    - 1x1: oneDNN's direct kernel forward (it also applies the epilogue) and oneDNN's GEMM for both gradients.
      Without the extension: XLA's dot for all three, which beats XLA's own 1x1 convolution.
    - Stems and other strided or large kernels: oneDNN's direct kernels, the kernel gradient of
      strided ones with at least 8 input channels by outer products over blocks of patches ("onednn_matmul_grad",
      ``patch_kernel_grad``); without the extension XLA's forward and input gradient with the patch matmul's
      kernel gradient.
    - Dilated kernels (``output_stride`` < 32): stride 1 the extension's Winograd F(4,3) on the input's
      sub-grids ("onednn_winograd_f4@atrous", ``atrous.py``) where Winograd pays as above, else oneDNN's direct
      kernels, which take the dilation; without the extension XLA's own, the one pure-JAX algorithm that
      computes them (Winograd's tiles and the patch matmul cannot).
    bfloat16 takes oneDNN's direct kernels where the CPU has bfloat16 instructions (the GEMM and the patch
    kernel gradient compute float32 only), 1x1 layers included: XLA's bfloat16 dot ran ResNet-50's 1x1 input gradients
    at 9-198 GFLOP/s against oneDNN's 34-388 (BENCHMARKS.md, Machine A2, 2026-12-03). One exception: a 3x3
    stride-1 layer takes the extension's Winograd (bfloat16 in and out, float32 inside) for the passes where it
    beats oneDNN's bfloat16 kernels on this CPU (``bfloat16_passes``). On GPU/TPU, for sizes that are symbols
    (``jax.export`` with a symbolic batch) and for negative padding (a crop): XLA's own.
    """
    if backend != "cpu" or not spec.concrete or spec.cropped:
        return ("xla", "xla", "xla")
    if measured:
        tuned = measured_choice(spec, extension)
        if tuned:
            return tuned
    ok = lambda *algorithms: _usable(*algorithms, spec=spec, backend=backend)  # noqa: E731
    pure_kernel_grad = "matmul_grad" if spec.groups == 1 else "xla"
    if spec.kernel == (1, 1) and spec.groups == 1:  # never dilated (ConvSpec records a 1x1's dilation as 1)
        if extension and ok("onednn", "onednn_gemm"):
            return ("onednn", "onednn_gemm", "onednn_gemm")
        if extension and ok("onednn"):  # bfloat16 (the GEMM is float32 only): XLA's bf16 dot is far slower
            return ("onednn", "onednn", "onednn")
        return ("gemm", "gemm", "gemm")
    if spec.dilated:  # Winograd on the sub-grids; XLA's is the one pure-JAX algorithm that dilates
        winograd, pure = "onednn_winograd_f4@atrous", ("xla", "xla", "xla")
    else:
        winograd_grad = spec.dtype == "float32" and spec.in_channels >= 8 and ok("winograd_f4")
        winograd, pure = "onednn_winograd_f4", ("xla", "xla", "winograd_f4" if winograd_grad else pure_kernel_grad)
    if not extension:
        return pure
    # Winograd's fixed costs outweigh the multiplies it saves on few tiles and on the stems' few channels
    small = winograd_tiles(spec) < WINOGRAD_MIN_TILES or spec.in_channels < 8
    # bfloat16 starts from oneDNN's bfloat16 kernels and takes Winograd pass by pass where it pays
    for name in ("onednn",) if small or spec.dtype == "bfloat16" else (winograd, "onednn"):
        if ok(name):
            return patch_kernel_grad(spec, (name,) * 3 if small else bfloat16_passes(spec, name, ok), ok)
    return pure


def winograd_tiles(spec: ConvSpec) -> int:
    """How many 4x4 output tiles Winograd F(4,3) computes for ``spec`` (a dilated layer: on each of its sub-grids),
    what its per-call cost of transforming the kernel is spread over."""
    _, ho, wo, _ = spec.y_shape
    dh, dw = spec.dilation
    return spec.batch * dh * dw * _ceil_div(_ceil_div(ho, dh), 4) * _ceil_div(_ceil_div(wo, dw), 4)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def patch_kernel_grad(spec: ConvSpec, passes: Passes, ok) -> Passes:
    """``passes`` with the kernel gradient of oneDNN's direct kernels replaced by "onednn_matmul_grad" on a
    strided layer with at least 8 input channels.

    Measured on AVX2 (BENCHMARKS.md, 2026-12-05): oneDNN's direct kernel gradient ran the stride-2 3x3 layers of
    ResNet-18/50 and ResNet-18-CIFAR at 81-124 GFLOP/s, oneDNN's GEMM over blocks of their patches at 104-176
    (each of nine layers ahead), and the outer-product kernel that now sums them at 155-170; ResNet-50's 7x7
    stem (3 channels) went the other way, 122 against 75. On AVX-512 (2026-12-06, eighth session) the kernel's
    512-bit tile ran ResNet-50's and ResNet-18-CIFAR's six stride-2 3x3 layers at 278-322 GFLOP/s against oneDNN's
    direct 225-290 (each ahead, by 3-26%), the stem again 124 against 238."""
    strided = spec.strides != (1, 1) and spec.in_channels >= 8
    if passes != ("onednn",) * 3 or not strided or not ok("onednn_matmul_grad"):
        return passes
    return ("onednn", "onednn", "onednn_matmul_grad")


def bfloat16_passes(spec: ConvSpec, name: str, ok) -> Passes:
    """``name`` for all three passes, except that a bfloat16 3x3 stride-1 layer's passes take the extension's
    Winograd F(4,3) (bfloat16 activations read and written as such) where it beats oneDNN's bfloat16 kernels on
    this CPU: with AMX on small images only (``BFLOAT16_WINOGRAD_AMX``); without AMX the kernel gradient of every
    layer that reaches this (16 or more tiles, 8 or more input channels) and the forward and input gradient where
    their own output (y, or dx) is whole 4x4 tiles of at most 32x32 pixels (``BFLOAT16_WINOGRAD_AVX512``; None:
    any size)."""
    winograd = "onednn_winograd_f4"
    if name != "onednn" or spec.dtype != "bfloat16" or spec.dilated or not ok(winograd):
        return (name,) * 3
    if cpu.has("amx_bf16"):
        if spec.direct_flops() < BFLOAT16_WINOGRAD_MIN_FLOPS:
            return (name,) * 3
        pixels = spec.height * spec.width
        return tuple(winograd if pixels <= BFLOAT16_WINOGRAD_AMX.get(p, 0) else name for p in PASSES)
    outputs = {"forward": spec.y_shape[1:3], "input_grad": spec.x_shape[1:3], "kernel_grad": None}

    def takes(p):
        limit, out = BFLOAT16_WINOGRAD_AVX512[p], outputs[p]
        return limit is None or (out[0] % 4 == 0 and out[1] % 4 == 0 and out[0] * out[1] <= limit)
    return tuple(winograd if takes(p) else name for p in PASSES)
