// out = lhs^T rhs where both operands are stored pixel-major (k x rows, k x cols) and the sum runs over the k
// pixels: the kernel gradient of a 1x1 convolution, x^T dy. oneDNN's GEMM reads such an lhs transposed at ~80-130
// GFLOP/s on AVX2 for most of ResNet-50's channel pairs (and at 180-250 on AVX-512 where one side is 64-256
// channels); this kernel takes it as a sum of outer products instead.
//
// Pixels go in blocks. Each block's columns of both operands are packed into panels, kMR columns of lhs and kNR
// of rhs per panel, so that a kMR x kNR tile of out keeps its accumulators in registers while it runs over the
// block: per pixel two vector loads of rhs, kMR broadcasts of lhs and 2 kMR FMAs, from panels that stay in the
// core's cache. The team splits the pixels and adds its partial sums at the end, so every pixel is read once.
// BENCHMARKS.md (2026-12-05 for AVX2, 2026-12-06 eighth session for AVX-512, issue 33) has the measurements
// behind the tile and block sizes and the rule that uses them.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define RESNET_JAX_OUTER_PRODUCTS 1
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace resnet_jax {
namespace outer {

#if defined(__AVX512F__)
// 512-bit vectors: an 8 x 32 tile, 16 accumulators, per pixel two loads, eight broadcasts and 16 FMAs. Blocks of
// at most 96 pixels keep a tile's panels in the core's L1 (12 KB of rhs); 12 x 32 tiles (24 accumulators) and
// blocks up to 1024 ran ResNet-50's products 1-8% slower (BENCHMARKS.md, 2026-12-06, eighth session)
constexpr int kMR = 8, kNR = 32;
constexpr int64_t kMaxBlock = 96;
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_load_ps(p); }
inline Vec LoadU(const float* p) { return _mm512_loadu_ps(p); }
inline void StoreU(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
#else
// 256-bit vectors: a 6 x 16 tile, 12 accumulators (of 16 registers), per pixel two loads, six broadcasts and
// twelve FMAs
constexpr int kMR = 6, kNR = 16;
constexpr int64_t kMaxBlock = 1024;
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_load_ps(p); }
inline Vec LoadU(const float* p) { return _mm256_loadu_ps(p); }
inline void StoreU(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
#endif
static_assert(kNR == 2 * kLanes, "a tile row is two vectors");
constexpr int64_t kPanelFloats = 98304;  // both panels of a block: 384 KB, within a core's L2 next to out's tiles
constexpr int64_t kRowChunk = 96;  // rows of lhs packed at a time (a patch-matrix row is 9 x Cin long)

// out[kMR x kNR, row stride ldo] (+)= sum over n pixels of a[p][0:kMR]^T b[p][0:kNR], a and b packed (rows of kMR
// and kNR floats, b aligned to a vector). Edge tiles run it on a buffer (SumOverPixels), so it has one shape.
inline void Tile(const float* a, const float* b, int64_t n, float* out, int64_t ldo, bool accumulate) {
  Vec acc[kMR][2];
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = Zero();
  for (int64_t p = 0; p < n; ++p, a += kMR, b += kNR) {
    const Vec b0 = Load(b), b1 = Load(b + kLanes);
#pragma GCC unroll 12
    for (int i = 0; i < kMR; ++i) {
      const Vec x = Broadcast(a + i);
      acc[i][0] = Fma(x, b0, acc[i][0]);
      acc[i][1] = Fma(x, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < kMR; ++i) {
    float* o = out + i * ldo;
    if (accumulate) {
      acc[i][0] = Add(acc[i][0], LoadU(o));
      acc[i][1] = Add(acc[i][1], LoadU(o + kLanes));
    }
    StoreU(o, acc[i][0]);
    StoreU(o + kLanes, acc[i][1]);
  }
}

// The n rows of src (row stride ld) into panels of kPanel columns, panel q holding row p at
// dst[(q * n + p) * kPanel]; the columns past `width` are zero.
template <int kPanel>
void Pack(const float* src, int64_t ld, int64_t n, int64_t width, float* dst) {
  for (int64_t q = 0; q * kPanel < width; ++q) {
    const int64_t w = std::min<int64_t>(kPanel, width - q * kPanel);
    float* d = dst + q * n * kPanel;
    const float* s = src + q * kPanel;
    if (w == kPanel) {
      for (int64_t p = 0; p < n; ++p, d += kPanel, s += ld)
#pragma GCC unroll 32
        for (int c = 0; c < kPanel; ++c) d[c] = s[c];
    } else {
      for (int64_t p = 0; p < n; ++p, d += kPanel, s += ld)
        for (int c = 0; c < kPanel; ++c) d[c] = c < w ? s[c] : 0.f;  // never read past the operand
    }
  }
}

inline int64_t RoundUp(int64_t n, int64_t unit) { return (n + unit - 1) / unit * unit; }

// out (rows x cols, row stride cols) = the sum over pixels [p0, p1) of lhs^T rhs (row strides ld_l, ld_r), on
// the calling thread (zeros for no pixels); with `add`, out += that sum. The rows go kRowChunk at a time, so a
// block's panels stay in cache however many rows there are (9 x Cin of a 3x3 layer's patches). Throws
// std::bad_alloc when the panels cannot be allocated.
inline void SumOverPixels(const float* lhs, int64_t ld_l, const float* rhs, int64_t ld_r, int64_t p0, int64_t p1,
                          int64_t rows, int64_t cols, float* out, bool add = false) {
  thread_local ThreadBuffer a_buffer, b_buffer;
  const int64_t chunk = std::min(rows, kRowChunk);
  const int64_t block = std::clamp<int64_t>(kPanelFloats / (chunk + cols), 16, kMaxBlock);
  float* a = static_cast<float*>(a_buffer.Get(sizeof(float) * RoundUp(chunk, kMR) * block));
  float* b = static_cast<float*>(b_buffer.Get(sizeof(float) * RoundUp(cols, kNR) * block));
  if (p1 <= p0 && !add) std::fill(out, out + rows * cols, 0.f);
  const int64_t tiles = RoundUp(rows, kMR) / kMR * (RoundUp(cols, kNR) / kNR);
  for (int64_t q0 = p0; q0 < p1; q0 += block) {
    const int64_t n = std::min(block, p1 - q0);
    const bool accumulate = add || q0 > p0;
    Pack<kNR>(rhs + q0 * ld_r, ld_r, n, cols, b);
    // the next block's rows are fetched while this one computes, a share per tile, so that packing it does not
    // wait for memory (5% of ResNet-50's 1x1 kernel gradients in one run, 2% in another)
    const int64_t next = std::min(block, p1 - q0 - n);
    const char* next_l = reinterpret_cast<const char*>(lhs + (q0 + n) * ld_l);
    const char* next_r = reinterpret_cast<const char*>(rhs + (q0 + n) * ld_r);
    const int64_t lines_l = next > 0 ? next * ld_l * 4 / 64 : 0, lines_r = next > 0 ? next * ld_r * 4 / 64 : 0;
    const int64_t share_l = (lines_l + tiles - 1) / tiles, share_r = (lines_r + tiles - 1) / tiles;
    int64_t tile = 0;
    for (int64_t i0 = 0; i0 < rows; i0 += chunk) {
      const int64_t chunk_rows = std::min(chunk, rows - i0);
      Pack<kMR>(lhs + q0 * ld_l + i0, ld_l, n, chunk_rows, a);
      for (int64_t i = i0; i < i0 + chunk_rows; i += kMR) {
        const int64_t height = std::min<int64_t>(kMR, i0 + chunk_rows - i);
        for (int64_t j = 0; j < cols; j += kNR, ++tile) {
          for (int64_t l = tile * share_l; l < std::min(lines_l, (tile + 1) * share_l); ++l)
            _mm_prefetch(next_l + l * 64, _MM_HINT_T0);
          for (int64_t l = tile * share_r; l < std::min(lines_r, (tile + 1) * share_r); ++l)
            _mm_prefetch(next_r + l * 64, _MM_HINT_T0);
          const int64_t width = std::min<int64_t>(kNR, cols - j);
          const float* pa = a + (i - i0) * n;
          const float* pb = b + j * n;
          if (height == kMR && width == kNR) {
            Tile(pa, pb, n, out + i * cols + j, cols, accumulate);
            continue;
          }
          alignas(64) float edge[kMR * kNR];  // a tile past out's edge: summed here, its part inside out kept
          for (int64_t r = 0; r < height; ++r)
            for (int64_t c = 0; c < width; ++c) edge[r * kNR + c] = accumulate ? out[(i + r) * cols + j + c] : 0.f;
          Tile(pa, pb, n, edge, kNR, true);
          for (int64_t r = 0; r < height; ++r)
            for (int64_t c = 0; c < width; ++c) out[(i + r) * cols + j + c] = edge[r * kNR + c];
        }
      }
    }
  }
}

// out (rows x cols) = the sum over k pixels, split over the OpenMP team: each thread calls sum(p0, p1, dst) for
// its share [p0, p1) of the pixels, dst out itself on the first thread and a partial buffer on the others (sum
// must write dst whole, zeros for no pixels), and the partials are then added into out.
template <typename Sum>
void OverTeam(int64_t k, int64_t rows, int64_t cols, float* out, Sum sum) {
  std::vector<float*> partial(omp_get_max_threads(), nullptr);
  RegionErrors errors;  // see common.h
#pragma omp parallel
  {
    const int team = omp_get_num_threads(), me = omp_get_thread_num();
    thread_local ThreadBuffer partial_buffer;
    float* dst = out;
    errors.Do([&] {
      if (me > 0) dst = static_cast<float*>(partial_buffer.Get(sizeof(float) * rows * cols));
      sum(k * me / team, k * (me + 1) / team, dst);
    });
    partial[me] = dst;
#pragma omp barrier
    const bool ok = !errors.Failed();  // the same on every thread: nothing can fail after the barrier
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows * cols; ++i) {
      if (!ok) continue;
      float s = out[i];
      for (int t = 1; t < team; ++t) s += partial[t][i];
      out[i] = s;
    }
  }
  errors.Rethrow();
}

// out (rows x cols) = lhs^T rhs for lhs (k x rows) and rhs (k x cols), over the OpenMP team.
inline void LhsTransposedTimesRhs(const float* lhs, const float* rhs, float* out, int64_t k, int64_t rows,
                                  int64_t cols) {
  OverTeam(k, rows, cols, out, [&](int64_t p0, int64_t p1, float* dst) {
    SumOverPixels(lhs, rows, rhs, cols, p0, p1, rows, cols, dst);
  });
}

}  // namespace outer
}  // namespace resnet_jax
#endif
