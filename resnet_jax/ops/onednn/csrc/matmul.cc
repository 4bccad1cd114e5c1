// One matrix product on XLA's buffers by oneDNN's matmul: the 1x1 convolutions' three passes are plain
// products ((N*H*W, Cin) x (Cin, Cout), its transposes), and oneDNN's GEMM kernels run them without XLA's
// layout copies; the kernel gradient's reduction over every pixel is the product XLA:CPU runs slowest.
//
// That product, x^T dy, reads its left operand transposed (pixels outermost), and oneDNN's AVX2 GEMM runs that
// form at ~80 GFLOP/s where one side is <= 256 and the other >= 1024, against ~165 for the same product with
// both operands pixel-contiguous. With `pixel_block` > 0 the pixels are taken in blocks of that many: each
// block of both operands is transposed into a per-thread buffer and multiplied in the fast form, the blocks'
// products summed into the output (algorithms.py chooses where; BENCHMARKS.md has the measurements).

#include <algorithm>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "common.h"

namespace {

namespace ffi = xla::ffi;

#if defined(__AVX__)
// dst (8 x 8, row stride ldd) = the transpose of src (8 x 8, row stride ld).
inline void Transpose8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // then r[i] (i < 4) holds columns i and i + 4 of rows 0-3 in its two halves, r[i + 4] those of rows 4-7
  r[0] = _mm256_shuffle_ps(t[0], t[2], 0x44);
  r[1] = _mm256_shuffle_ps(t[0], t[2], 0xEE);
  r[2] = _mm256_shuffle_ps(t[1], t[3], 0x44);
  r[3] = _mm256_shuffle_ps(t[1], t[3], 0xEE);
  r[4] = _mm256_shuffle_ps(t[4], t[6], 0x44);
  r[5] = _mm256_shuffle_ps(t[4], t[6], 0xEE);
  r[6] = _mm256_shuffle_ps(t[5], t[7], 0x44);
  r[7] = _mm256_shuffle_ps(t[5], t[7], 0xEE);
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst (m x n, row stride ldd) = the transpose of src (n x m, row stride ld), in 64 x 64 tiles over the team.
void Transpose(const float* src, int64_t n, int64_t m, int64_t ld, float* dst, int64_t ldd) {
  constexpr int64_t kTile = 64;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t i0 = 0; i0 < n; i0 += kTile)
    for (int64_t j0 = 0; j0 < m; j0 += kTile) {
      const int64_t i1 = std::min(n, i0 + kTile), j1 = std::min(m, j0 + kTile);
      int64_t i = i0;
#if defined(__AVX__)
      for (; i + 8 <= i1; i += 8) {
        int64_t j = j0;
        for (; j + 8 <= j1; j += 8) Transpose8x8(src + i * ld + j, ld, dst + j * ldd + i, ldd);
        for (; j < j1; ++j)
          for (int64_t r = i; r < i + 8; ++r) dst[j * ldd + r] = src[r * ld + j];
      }
#endif
      for (; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * ldd + i] = src[i * ld + j];
    }
}

// out (rows x cols) = lhs^T rhs for lhs (k x rows), rhs (k x cols), `block` pixels at a time (see the top).
void ProductByPixelBlocks(const float* lhs, const float* rhs, float* out, int64_t k, int64_t rows, int64_t cols,
                          int64_t block) {
  thread_local resnet_jax::ThreadBuffer lhs_buffer, rhs_buffer;
  block = std::min(block, k);
  float* lhs_t = static_cast<float*>(lhs_buffer.Get(sizeof(float) * rows * block));
  float* rhs_t = static_cast<float*>(rhs_buffer.Get(sizeof(float) * cols * block));
  for (int64_t k0 = 0; k0 < k; k0 += block) {
    const int64_t kb = std::min(block, k - k0);
    Transpose(lhs + k0 * rows, kb, rows, rows, lhs_t, kb);
    Transpose(rhs + k0 * cols, kb, cols, cols, rhs_t, kb);
    auto* mm = resnet_jax::BatchedMatmul(1, rows, kb, cols, false, true, /*accumulate=*/k0 > 0);
    resnet_jax::RunMatmul(*mm, lhs_t, rhs_t, out);
    resnet_jax::Stream().wait();
  }
}

// out = lhs x rhs with lhs (rows x k) or, transposed, stored (k x rows); rhs (k x cols) or stored (cols x k).
ffi::Error Product(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, ffi::Result<ffi::Buffer<ffi::F32>> out,
                   int64_t transpose_lhs, int64_t transpose_rhs, int64_t pixel_block) {
  auto a = lhs.dimensions(), b = rhs.dimensions(), c = out->dimensions();
  if (a.size() != 2 || b.size() != 2 || c.size() != 2)
    return ffi::Error::InvalidArgument("oneDNN matmul: expected matrices");
  const int64_t rows = transpose_lhs ? a[1] : a[0], k = transpose_lhs ? a[0] : a[1];
  const int64_t k2 = transpose_rhs ? b[1] : b[0], cols = transpose_rhs ? b[0] : b[1];
  if (k != k2 || c[0] != rows || c[1] != cols)
    return ffi::Error::InvalidArgument("oneDNN matmul: inconsistent shapes");
  if (pixel_block < 0 || (pixel_block > 0 && (!transpose_lhs || transpose_rhs)))
    return ffi::Error::InvalidArgument("oneDNN matmul: pixel blocks are for lhs^T x rhs only, and positive");
  return resnet_jax::Run([&] {
    if (pixel_block > 0 && k > 0) {
      ProductByPixelBlocks(lhs.typed_data(), rhs.typed_data(), out->typed_data(), k, rows, cols, pixel_block);
      return;
    }
    auto* mm = resnet_jax::BatchedMatmul(1, rows, k, cols, transpose_lhs, transpose_rhs, false);
    resnet_jax::RunMatmul(*mm, lhs.typed_data(), rhs.typed_data(), out->typed_data());
    resnet_jax::Stream().wait();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMatmul, Product,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transpose_lhs")
                                  .Attr<int64_t>("transpose_rhs")
                                  .Attr<int64_t>("pixel_block"));
