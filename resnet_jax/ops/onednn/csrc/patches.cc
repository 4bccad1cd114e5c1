// A strided or large convolution's kernel gradient as matrix products over input patches, a block of pixels at
// a time: dw (kh*kw*Cin x Cout) = the sum over blocks of patches(x)^T dy. Each thread gathers (im2col) the
// patches of its own share of the pixels, `pixel_block` at a time, into a buffer of its own, and sums the block's
// outer products by outer_products.h; the threads' sums are added at the end. Never the whole
// (N*Ho*Wo x kh*kw*Cin) matrix XLA would write to memory.
//
// Why: oneDNN's direct AVX2 kernel gradient ran the stride-2 3x3 layers of ResNet-18/50 and ResNet-18-CIFAR at
// 81-124 GFLOP/s; oneDNN's GEMM over 4096-pixel blocks of gathered patches at 102-171, and this kernel over
// blocks of 128 at 155-170 (BENCHMARKS.md, 2026-12-05). XLA's patches fed to a GEMM cost more in memory traffic
// than the GEMM saved (2026-12-04 night). AVX2 and FMA only, as outer_products.h.

#include <algorithm>
#include <cstring>

#include "common.h"
#include "outer_products.h"

namespace {

namespace ffi = xla::ffi;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, top, left;
  int64_t K() const { return kh * kw * c; }
  int64_t Pixels() const { return n * oh * ow; }
};

// Row p of patches(x): the kh*kw taps' Cin channels of output pixel p, in HWIO order, zeros where a tap falls
// on the padding.
inline void GatherRow(const float* x, const Geometry& g, int64_t p, float* dst) {
  const int64_t n = p / (g.oh * g.ow), oy = p / g.ow % g.oh, ox = p % g.ow, row_bytes = sizeof(float) * g.c;
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

#if defined(RESNET_JAX_OUTER_PRODUCTS)
void KernelGrad(const float* x, const float* dy, float* dw, const Geometry& g, int64_t block) {
  const int64_t k = g.K();
  resnet_jax::outer::OverTeam(g.Pixels(), k, g.o, dw, [&](int64_t p0, int64_t p1, float* dst) {
    thread_local resnet_jax::ThreadBuffer patches_buffer;
    float* patches = static_cast<float*>(patches_buffer.Get(sizeof(float) * std::min(block, p1 - p0) * k));
    if (p1 <= p0) std::fill(dst, dst + k * g.o, 0.f);
    for (int64_t q0 = p0; q0 < p1; q0 += block) {
      const int64_t count = std::min(block, p1 - q0);
      for (int64_t r = 0; r < count; ++r) GatherRow(x, g, q0 + r, patches + r * k);
      resnet_jax::outer::SumOverPixels(patches, k, dy + q0 * g.o, g.o, 0, count, k, g.o, dst, q0 > p0);
    }
  });
}
#endif

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
#if defined(RESNET_JAX_OUTER_PRODUCTS)
  return resnet_jax::Run(
      [&] { KernelGrad(x.typed_data(), dy.typed_data(), dw->typed_data(), g, pixel_block); });
#else
  return ffi::Error::InvalidArgument("patch kernel gradient: needs a CPU with AVX2 and FMA");
#endif
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
