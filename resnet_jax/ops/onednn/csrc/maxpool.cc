// The max-pool and its gradient. The forward writes each window's maximum and `first` (int8, one per window and
// channel): which of the window's taps, row-major, held it first. The gradient adds each window's cotangent onto
// the input pixel of that tap.
//
// Why: XLA derives the gradient as the transpose of the pool's tangent map, one padded, strided term per tap
// summed into the input's shape, and ran it at ResNet-50's stem pool (32x112x112x64) in 69 ms of a training step
// (BENCHMARKS.md, 2026-12-04 night), several passes over a 103 MB gradient; here it is one. The forward in XLA
// copied the input padded, took the maximum of its strided views, then compared every view with it for `first`:
// three passes (18 ms of a float32 ResNet-50 step, 2026-12-06, eighth session) where this is one.

#include <algorithm>
#include <limits>
#include <string>

#include "common.h"

namespace {

namespace ffi = xla::ffi;

// dst += g where tap == k, over c channels. The restrict qualifiers let the compiler vectorise: an int8 pointer
// may alias anything, so without them it must assume the stores change tap.
inline void AddRouted(float* __restrict__ dst, const float* __restrict__ g, const int8_t* __restrict__ tap,
                      int8_t k, int64_t c) {
  for (int64_t ch = 0; ch < c; ++ch) dst[ch] += tap[ch] == k ? g[ch] : 0.f;
}

// y = max(y, v) and first = k where v is larger, over c channels; a NaN is kept once seen (XLA's maximum
// propagates it), and the ties keep the earlier tap.
inline void TakeLarger(float* __restrict__ y, int8_t* __restrict__ first, const float* __restrict__ v, int8_t k,
                       int64_t c) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const bool larger = v[ch] > y[ch] || (v[ch] != v[ch] && y[ch] == y[ch]);
    y[ch] = larger ? v[ch] : y[ch];
    first[ch] = larger ? k : first[ch];
  }
}

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t CeilDiv(int64_t a, int64_t b) { return -FloorDiv(-a, b); }

// A pool's sizes: input (n, h, w, c), output (oh, ow), window, strides, and the top and left padding.
struct PoolGeometry {
  int64_t n, h, w, c, oh, ow, kh, kw, sh, sw, top, left;
};

// Reads both passes' geometry from the input image `xd` and the output `yd` (NHWC, `first` shaped as the output)
// and the attributes (padding: top, bottom, left, right): nullptr when they fit together, else what is wrong.
const char* ReadGeometry(ffi::Span<const int64_t> xd, ffi::Span<const int64_t> yd, ffi::Span<const int64_t> first,
                         ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides,
                         ffi::Span<const int64_t> padding, PoolGeometry* g) {
  if (xd.size() != 4 || yd.size() != 4 || window.size() != 2 || strides.size() != 2 || padding.size() != 4)
    return "expected NHWC buffers, a 2-d window, 2 strides and 4 paddings";
  *g = {xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], window[0], window[1], strides[0], strides[1], padding[0],
        padding[2]};
  const bool consistent = resnet_jax::SameDims(yd, first) && yd[0] == g->n && yd[3] == g->c &&
                          g->kh * g->kw <= 127 &&
                          resnet_jax::OutputFollows(g->h, padding[0], padding[1], g->kh, g->sh, g->oh) &&
                          resnet_jax::OutputFollows(g->w, padding[2], padding[3], g->kw, g->sw, g->ow);
  return consistent ? nullptr : "inconsistent shapes";
}

// ct (N, Ho, Wo, C) float32, first (N, Ho, Wo, C) int8 -> dx (N, H, W, C) float32; window (kh, kw), strides,
// padding (top, bottom, left, right). Each input pixel sums the windows that hold it, in row-major order as
// XLA's select_and_scatter adds them (the same float32 sums, bit for bit), and is written by one thread only.
ffi::Error MaxPoolGrad(ffi::Buffer<ffi::F32> ct, ffi::Buffer<ffi::S8> first, ffi::Result<ffi::Buffer<ffi::F32>> dx,
                       ffi::Span<const int64_t> window, ffi::Span<const int64_t> strides,
                       ffi::Span<const int64_t> padding) {
  PoolGeometry geometry;
  if (const char* wrong = ReadGeometry(dx->dimensions(), ct.dimensions(), first.dimensions(), window, strides,
                                       padding, &geometry))
    return ffi::Error::InvalidArgument(std::string("max-pool gradient: ") + wrong);
  // named locals, not a structured binding: the OpenMP loops' lambdas capture them (C++17)
  const int64_t n = geometry.n, h = geometry.h, w = geometry.w, c = geometry.c, oh = geometry.oh, ow = geometry.ow;
  const int64_t kh = geometry.kh, kw = geometry.kw, sh = geometry.sh, sw = geometry.sw, top = geometry.top,
                left = geometry.left;
  const float* g = ct.typed_data();
  const int8_t* tap = first.typed_data();
  float* out = dx->typed_data();
  return resnet_jax::Run([&] {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < n; ++b)
      for (int64_t iy = 0; iy < h; ++iy) {
        // the windows that hold row iy: oy * sh <= iy + top <= oy * sh + kh - 1
        const int64_t oy0 = std::max<int64_t>(0, CeilDiv(iy + top - kh + 1, sh));
        const int64_t oy1 = std::min(oh - 1, FloorDiv(iy + top, sh));
        for (int64_t ix = 0; ix < w; ++ix) {
          const int64_t ox0 = std::max<int64_t>(0, CeilDiv(ix + left - kw + 1, sw));
          const int64_t ox1 = std::min(ow - 1, FloorDiv(ix + left, sw));
          float* dst = out + ((b * h + iy) * w + ix) * c;
          std::fill(dst, dst + c, 0.f);
          for (int64_t oy = oy0; oy <= oy1; ++oy)
            for (int64_t ox = ox0; ox <= ox1; ++ox) {
              const int8_t k = static_cast<int8_t>((iy + top - oy * sh) * kw + ix + left - ox * sw);
              const int64_t at = ((b * oh + oy) * ow + ox) * c;
              AddRouted(dst, g + at, tap + at, k, c);
            }
        }
      }
  });
}

// x (N, H, W, C) float32 -> y (N, Ho, Wo, C) float32, first (N, Ho, Wo, C) int8; window, strides, padding as
// MaxPoolGrad's. As pool.py's jnp pool: the padding is -inf, first is the first tap (row-major) equal to the
// maximum, and where the maximum is NaN (a NaN in the window) first is the last tap, as no tap equals it there.
ffi::Error MaxPool(ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::F32>> y,
                   ffi::Result<ffi::Buffer<ffi::S8>> first, ffi::Span<const int64_t> window,
                   ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding) {
  PoolGeometry geometry;
  if (const char* wrong = ReadGeometry(x.dimensions(), y->dimensions(), first->dimensions(), window, strides,
                                       padding, &geometry))
    return ffi::Error::InvalidArgument(std::string("max-pool: ") + wrong);
  // named locals, not a structured binding: the OpenMP loops' lambdas capture them (C++17)
  const int64_t n = geometry.n, h = geometry.h, w = geometry.w, c = geometry.c, oh = geometry.oh, ow = geometry.ow;
  const int64_t kh = geometry.kh, kw = geometry.kw, sh = geometry.sh, sw = geometry.sw, top = geometry.top,
                left = geometry.left;
  const float* in = x.typed_data();
  float* out = y->typed_data();
  int8_t* tap = first->typed_data();
  const int8_t last = static_cast<int8_t>(kh * kw - 1);
  return resnet_jax::Run([&] {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < n; ++b)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          const int64_t at = ((b * oh + oy) * ow + ox) * c;
          float* best = out + at;
          int8_t* k = tap + at;
          // a window of padding only (or of -inf) has the maximum -inf, equal to its first tap
          std::fill(best, best + c, -std::numeric_limits<float>::infinity());
          std::fill(k, k + c, int8_t{0});
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t iy = oy * sh - top + i;
            if (iy < 0 || iy >= h) continue;
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t ix = ox * sw - left + j;
              if (ix < 0 || ix >= w) continue;
              TakeLarger(best, k, in + ((b * h + iy) * w + ix) * c, static_cast<int8_t>(i * kw + j), c);
            }
          }
          for (int64_t ch = 0; ch < c; ++ch) k[ch] = best[ch] != best[ch] ? last : k[ch];
        }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMaxPool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>()
                                  .Attr<ffi::Span<const int64_t>>("window")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMaxPoolGrad, MaxPoolGrad,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("window")
                                  .Attr<ffi::Span<const int64_t>>("strides")
                                  .Attr<ffi::Span<const int64_t>>("padding"));
