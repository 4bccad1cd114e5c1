"""What this CPU allows: its float32 multiply-add peak and memory bandwidth, and each model's convolutions at it.

Why: ResNet-50's 1x1 layers are half its arithmetic, and in float32 both this project and torch run them as
oneDNN's kernels, at the same speed (BENCHMARKS.md). How far a speed-up over torch can go is then bounded by
the time those layers need at the machine's peak, whatever the rest costs. The peak is measured, not looked up:
a compiled loop of independent multiply-adds as wide as ``-march=native`` allows, on one core and on all; the
bandwidth is a read and a copy of a buffer far larger than the caches. The convolutions' time at peak counts
direct multiply-adds (a Winograd layer needs fewer; everything else needs at least this).

    python -m benchmarks.cpu_peak [--model resnet50] [--batch 32]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from benchmarks import common
from benchmarks.conv_layers import MODELS, layer_group, output_size

SOURCE = r"""
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
typedef float v16 __attribute__((vector_size(64)));  /* the compiler splits it where registers are narrower */
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
/* 12 independent chains: enough to cover the multiply-add latency on every port of current x86 and Arm cores */
static double fma_gflops(long iters, int threads) {
  float keep = 0.f;
  double t = now();
#pragma omp parallel num_threads(threads) reduction(+ : keep)
  {
    v16 b = (v16){} + 0.9999999f, c = (v16){} + 1e-8f;
    v16 s = (v16){} + (1.f + omp_get_thread_num() * 1e-9f), d = (v16){} + 1e-7f;  /* distinct, unknown starts */
    v16 a0 = s, a1 = s + d, a2 = a1 + d, a3 = a2 + d, a4 = a3 + d, a5 = a4 + d, a6 = a5 + d, a7 = a6 + d,
        a8 = a7 + d, a9 = a8 + d, a10 = a9 + d, a11 = a10 + d;
    for (long k = 0; k < iters; ++k) {  /* named chains, so they stay in registers */
      a0 = a0 * b + c; a1 = a1 * b + c; a2 = a2 * b + c; a3 = a3 * b + c; a4 = a4 * b + c; a5 = a5 * b + c;
      a6 = a6 * b + c; a7 = a7 * b + c; a8 = a8 * b + c; a9 = a9 * b + c; a10 = a10 * b + c; a11 = a11 * b + c;
    }
    v16 all = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
    keep += all[0];
  }
  t = now() - t;
  if (keep == 42.f) puts("");  /* keeps the loop */
  return 2.0 * 16 * 12 * iters * threads / t / 1e9;
}
int main(int argc, char** argv) {
  long iters = atol(argv[1]);
  size_t floats = (size_t)atol(argv[2]) << 18;  /* MiB */
  int all = omp_get_max_threads();
  double one = 0, both = 0;
  for (int r = 0; r < 3; ++r) {  /* the best of three: another process may hold a core for a while */
    double a = fma_gflops(iters, 1), b = fma_gflops(iters, all);
    one = a > one ? a : one;
    both = b > both ? b : both;
  }
  printf("fma_one %f\nfma_all %f\nthreads %d\n", one, both, all);
  float *x = aligned_alloc(64, floats * 4), *y = aligned_alloc(64, floats * 4);
#pragma omp parallel for
  for (size_t i = 0; i < floats; ++i) x[i] = y[i] = (float)(i & 7);
  double best_read = 0, best_copy = 0;
  for (int r = 0; r < 3; ++r) {
    float s = 0.f;
    double t = now();
#pragma omp parallel reduction(+ : s)
    {
      v16 acc = {};
      const v16* v = (const v16*)x;
#pragma omp for
      for (size_t i = 0; i < floats / 16; ++i) acc += v[i];
      for (int j = 0; j < 16; ++j) s += acc[j];
    }
    t = now() - t;
    if (s == 42.f) puts("");
    if (floats * 4 / t / 1e9 > best_read) best_read = floats * 4 / t / 1e9;
    t = now();
#pragma omp parallel for
    for (size_t i = 0; i < floats; ++i) y[i] = x[i];
    t = now() - t;
    if (2.0 * floats * 4 / t / 1e9 > best_copy) best_copy = 2.0 * floats * 4 / t / 1e9;
  }
  printf("read_gbs %f\ncopy_gbs %f\n", best_read, best_copy);
  return 0;
}
"""


def measure(iters: int, mebibytes: int) -> dict:
    """Compiles and runs SOURCE: {fma_one, fma_all (GFLOP/s), threads, read_gbs, copy_gbs (read + write)}."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("cpu_peak needs a C compiler with OpenMP (cc or $CC), as the oneDNN extension's build does")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "peak.c"), os.path.join(d, "peak")
        with open(src, "w") as f:
            f.write(SOURCE)
        build = subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", src, "-o", exe],
                               capture_output=True, text=True)
        if build.returncode != 0:
            raise SystemExit(f"cpu_peak: compiling the peak loop with {compiler} failed:\n{build.stderr}")
        out = subprocess.run([exe, str(iters), str(mebibytes)], capture_output=True, text=True, check=True).stdout
    values = dict(line.split() for line in out.splitlines() if line.strip())
    return {k: (int(v) if k == "threads" else float(v)) for k, v in values.items()}


def numpy_gemm_gflops(n: int, rounds: int = 5) -> float:
    """numpy's (OpenBLAS's) float32 product of two n x n matrices: an outside check, since no GEMM can run
    above the true peak, a peak measured below it would show as numpy beating it."""
    import time

    import numpy as np

    a, b = (np.random.default_rng(i).standard_normal((n, n), np.float32) for i in range(2))
    a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def convolution_work(model: str, batch: int | None) -> dict:
    """GFLOP per batch of each layer group and pass (direct multiply-adds x 2), and MACs per image. The first
    layer needs no input gradient (the image is not differentiated)."""
    default_batch, layers = MODELS[model]
    batch = batch or default_batch
    groups: dict[str, dict[str, float]] = {}
    macs = 0
    for i, ((h, cin, cout, k, s), uses) in enumerate(layers):
        out = output_size(h, k, s)
        layer_macs = out * out * cout * k * k * cin * uses
        macs += layer_macs
        group = layer_group(k, s)
        by_pass = groups.setdefault(group, {"forward": 0.0, "input_grad": 0.0, "kernel_grad": 0.0})
        gflop = 2 * batch * layer_macs / 1e9
        for pass_name in by_pass:
            if not (pass_name == "input_grad" and i == 0):
                by_pass[pass_name] += gflop
    return {"batch": batch, "macs_per_image": macs, "gflop": groups}


def main(argv=None) -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), action="append", help="default: resnet50")
    p.add_argument("--batch", type=int, help="default: the model's benchmark batch")
    args = p.parse_args(argv)
    peak = measure(iters=20_000_000 if args.quick else 50_000_000, mebibytes=16 if args.quick else 512)
    peak["numpy_gemm"] = numpy_gemm_gflops(1024 if args.quick else 2048)
    print(f"float32 multiply-add peak: {peak['fma_one']:.0f} GFLOP/s on one core, {peak['fma_all']:.0f} on "
          f"{peak['threads']} threads; memory: read {peak['read_gbs']:.1f} GB/s, copy {peak['copy_gbs']:.1f} GB/s "
          f"(read + write); numpy's float32 GEMM {peak['numpy_gemm']:.0f} GFLOP/s")
    if peak["numpy_gemm"] > peak["fma_all"] or peak["fma_all"] < 0.8 * peak["fma_one"]:
        # no GEMM runs above the true peak, and two cores do not multiply-add slower than one: the cores were busy
        print("warning: the peak looks measured low (numpy's GEMM beat it, or all cores lost to one); rerun on a "
              "quiet machine before comparing against it")
    models = {}
    for model in args.model or ["resnet50"]:
        work = models[model] = convolution_work(model, args.batch)
        rows = [[group, pass_name, gflop, 1e3 * gflop / peak["fma_all"]]
                for group, by_pass in work["gflop"].items() for pass_name, gflop in by_pass.items()]
        inference = sum(by["forward"] for by in work["gflop"].values())
        training = sum(sum(by.values()) for by in work["gflop"].values())
        rows += [["all", "inference (forward)", inference, 1e3 * inference / peak["fma_all"]],
                 ["all", "training (three passes)", training, 1e3 * training / peak["fma_all"]]]
        common.print_table(f"{model}, batch {work['batch']}: convolutions at the float32 peak "
                           f"({work['macs_per_image'] / 1e9:.3f} GMACs per image)",
                           ["group", "pass", "GFLOP", "ms at peak"], rows)
    common.write_json(args.json, "cpu_peak.json", {"environment": common.environment("system"),
                                                     "results": {**peak, "models": models}})


if __name__ == "__main__":
    main()
