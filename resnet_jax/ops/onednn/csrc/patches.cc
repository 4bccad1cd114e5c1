// A strided or large convolution's kernel gradient as matrix products over input patches, a block of pixels at
// a time: dw (kh*kw*Cin x Cout) = the sum over blocks of patches(x)^T dy, each block's patches gathered (im2col)
// into a per-thread buffer, never the whole (N*Ho*Wo x kh*kw*Cin) matrix XLA would write to memory.
//
// Why: oneDNN's direct AVX2 kernel gradient ran ResNet-50's stride-2 3x3 layers at 85-100 GFLOP/s, and its GEMM
// runs these products at 120-175; XLA's patches fed to the same GEMM cost more in memory traffic than the GEMM
// saved (BENCHMARKS.md, 2026-12-04 night and 2026-12-05). Transposing each block (pixels innermost, as
// matmul.cc does for 1x1 layers) was measured too and lost on all but one of nine layers.

#include <algorithm>
#include <cstring>

#include "common.h"

namespace {

namespace ffi = xla::ffi;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, top, left;
  int64_t K() const { return kh * kw * c; }
  int64_t Pixels() const { return n * oh * ow; }
};

// rows [p0, p0 + count) of patches(x): each row is the kh*kw taps' Cin channels of one output pixel, in HWIO
// order, zeros where a tap falls on the padding.
void Gather(const float* x, const Geometry& g, int64_t p0, int64_t count, float* patches) {
  const int64_t k = g.K(), row_bytes = sizeof(float) * g.c;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < count; ++r) {
    const int64_t p = p0 + r, n = p / (g.oh * g.ow), oy = p / g.ow % g.oh, ox = p % g.ow;
    float* dst = patches + r * k;
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = oy * g.sh + i - g.top;
      for (int64_t j = 0; j < g.kw; ++j, dst += g.c) {
        const int64_t ix = ox * g.sw + j - g.left;
        if (iy < 0 || iy >= g.h || ix < 0 || ix >= g.w)
          std::memset(dst, 0, row_bytes);
        else
          std::memcpy(dst, x + ((n * g.h + iy) * g.w + ix) * g.c, row_bytes);
      }
    }
  }
}

void KernelGrad(const float* x, const float* dy, float* dw, const Geometry& g, int64_t block) {
  thread_local resnet_jax::ThreadBuffer patches_buffer;
  const int64_t k = g.K(), pixels = g.Pixels();
  if (pixels == 0) {
    std::memset(dw, 0, sizeof(float) * k * g.o);
    return;
  }
  block = std::min(block, pixels);
  float* patches = static_cast<float*>(patches_buffer.Get(sizeof(float) * block * k));
  for (int64_t p0 = 0; p0 < pixels; p0 += block) {
    const int64_t count = std::min(block, pixels - p0);
    Gather(x, g, p0, count, patches);
    auto* mm = resnet_jax::BatchedMatmul(1, k, count, g.o, /*transpose_lhs=*/true, false, /*accumulate=*/p0 > 0);
    resnet_jax::RunMatmul(*mm, patches, dy + p0 * g.o, dw);
    resnet_jax::Stream().wait();
  }
}

// x (N, H, W, Cin), dy (N, Ho, Wo, Cout) -> dw (kh, kw, Cin, Cout), float32; padding (top, bottom, left, right).
ffi::Error PatchKernelGrad(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                           ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding, int64_t pixel_block) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4 || strides.size() != 2 || padding.size() != 4)
    return ffi::Error::InvalidArgument("patch kernel gradient: expected NHWC x and dy, an HWIO kernel, 2 strides "
                                       "and 4 paddings");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2], strides[0], strides[1], padding[0],
             padding[2]};
  const bool consistent = yd[0] == g.n && wd[2] == g.c && yd[3] == g.o &&
                          resnet_jax::OutputFollows(g.h, padding[0], padding[1], g.kh, g.sh, g.oh) &&
                          resnet_jax::OutputFollows(g.w, padding[2], padding[3], g.kw, g.sw, g.ow);
  if (!consistent) return ffi::Error::InvalidArgument("patch kernel gradient: inconsistent shapes");
  if (pixel_block <= 0) return ffi::Error::InvalidArgument("patch kernel gradient: pixel_block must be positive");
  return resnet_jax::Run(
      [&] { KernelGrad(x.typed_data(), dy.typed_data(), dw->typed_data(), g, pixel_block); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxPatchKernelGrad, PatchKernelGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("pixel_block"));
