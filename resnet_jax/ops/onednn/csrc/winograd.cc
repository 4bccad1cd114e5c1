// Winograd F(m x m, 3 x 3) convolutions for 3x3 stride-1 layers on CPU (Lavin & Gray 2016), m = 2 or 4.
//
// Why: oneDNN's direct kernels already run the multiply-adds near the FMA peak, so beating them needs fewer
// multiply-adds. F(4x4, 3x3) computes a 4x4 output tile from a 6x6 input tile with 36 products per
// (input, output) channel pair instead of 144; the price is three cheap linear transforms per tile and memory
// for the transformed tiles. The 36 (or 16) products per tile position become one batched matrix product
// (oneDNN's matmul) over all tiles, so the heavy part still runs at GEMM speed.
//
// All three passes of training use it:
//   forward           Y = A^T [ (G w G^T) . (B^T X B) ] A     (+ bias, + residual, ReLU as an epilogue)
//   input gradient    the forward of dY with the flipped, transposed kernel (read so from the forward's)
//   kernel gradient   dW = G^T [ sum over tiles (B^T X B) . (A dY A^T) ] G
// The kernel-gradient form follows from the forward identity by the transposition principle: the same B and
// the roles of A and G exchanged. Tiles hang over the borders; reads there see zeros and writes are dropped.
//
// Two schedules: "blocked" (each thread transforms a small block of tiles, multiplies it and transforms it
// back while it is still in cache) for layers whose transformed kernel is small, and "whole" (transform every
// tile, one large batched product, transform back) for the deep layers, whose transformed kernel is large but
// whose tiles are few.

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <sstream>
#include <vector>

#include "bfloat16.h"
#include "common.h"

namespace {

namespace ffi = xla::ffi;
using dnnl::memory;
using resnet_jax::BatchedMatmul;
using resnet_jax::BatchStrides;
using resnet_jax::Engine;
using resnet_jax::Matmul;
using resnet_jax::RegionErrors;
using resnet_jax::Run;
using resnet_jax::RunMatmul;
using resnet_jax::Stream;
using resnet_jax::ThreadBuffer;
using resnet_jax::bf16::Load;
using resnet_jax::bf16::Store;
using resnet_jax::bf16::WithStorageType;

// Transform matrices; interpolation points 0, +-1 (F(2,3)) and 0, +-1, +-2 (F(4,3)), and infinity.
// B^T: input (A x A); G: kernel (A x 3); A^T: output (m x A); their transposes serve the kernel gradient.
template <int M>
struct Tables;

template <>
struct Tables<2> {
  static constexpr int kA = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
  static constexpr float A[4][2] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};
  static constexpr float GT[3][4] = {{1, 0.5f, 0.5f, 0}, {0, 0.5f, -0.5f, 0}, {0, 0.5f, 0.5f, 1}};
};

template <>
struct Tables<4> {
  static constexpr int kA = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[6][3] = {{0.25f, 0, 0},
                                    {-1.f / 6, -1.f / 6, -1.f / 6},
                                    {-1.f / 6, 1.f / 6, -1.f / 6},
                                    {1.f / 24, 1.f / 12, 1.f / 6},
                                    {1.f / 24, -1.f / 12, 1.f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
  static constexpr float A[6][4] = {{1, 0, 0, 0}, {1, 1, 1, 1}, {1, -1, 1, -1}, {1, 2, 4, 8}, {1, -2, 4, -8}, {0, 0, 0, 1}};
  static constexpr float GT[3][6] = {{0.25f, -1.f / 6, -1.f / 6, 1.f / 24, 1.f / 24, 0},
                                     {0, -1.f / 6, 1.f / 6, 1.f / 12, -1.f / 12, 0},
                                     {0, -1.f / 6, -1.f / 6, 1.f / 6, 1.f / 6, 1}};
};

enum Epilogue { kBias = 1, kResidual = 2, kRelu = 4 };

// out[i][j] = sum_{k,l} T[i][k] in[k][l] T[j][l] for every channel: `in` holds S*S pointers, `out` R*R, each to
// `channels` contiguous elements (NHWC rows or rows of a transformed-tile matrix). Vectorised over channels; the
// constant T folds into adds and a few multiplies. `Flags` adds the forward epilogue on the way out. `In` and
// `Out` are float or bfloat16 (uint16_t): an activation in bfloat16 is widened as it is read and rounded once as
// it is written, so a bfloat16 layer needs no float32 copy of its input or output (bfloat16.h).
template <int R, int S, const float (&T)[R][S], int Flags = 0, typename In = float, typename Out = float>
inline void Sandwich(const In* const* in, Out* const* out, int64_t channels, const float* bias = nullptr,
                     const Out* const* residual = nullptr) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    float d[S][S];
#pragma GCC unroll 8
    for (int k = 0; k < S; ++k)
#pragma GCC unroll 8
      for (int l = 0; l < S; ++l) d[k][l] = Load(in[k * S + l], c);
    float t[R][S];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int l = 0; l < S; ++l) {
        float acc = 0.f;
#pragma GCC unroll 8
        for (int k = 0; k < S; ++k)
          if (T[i][k] != 0.f) acc += T[i][k] * d[k][l];
        t[i][l] = acc;
      }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) {
        float acc = 0.f;
#pragma GCC unroll 8
        for (int l = 0; l < S; ++l)
          if (T[j][l] != 0.f) acc += t[i][l] * T[j][l];
        if constexpr ((Flags & kBias) != 0) acc += bias[c];
        if constexpr ((Flags & kResidual) != 0) acc += Load(residual[i * R + j], c);
        if constexpr ((Flags & kRelu) != 0) acc = acc > 0.f ? acc : 0.f;
        Store(out[i * R + j], c, acc);
      }
  }
}

// Where the tiles are: output tiles of m x m over an (N, OH, OW) map; tile p is (n, ty, tx), row-major.
struct Tiling {
  int64_t n, h, w, oh, ow, pad_top, pad_left, m, tiles_h, tiles_w;
  int64_t Count() const { return n * tiles_h * tiles_w; }
  void Locate(int64_t p, int64_t* image, int64_t* row, int64_t* col) const {
    *col = (p % tiles_w) * m;
    *row = (p / tiles_w % tiles_h) * m;
    *image = p / (tiles_w * tiles_h);
  }
};

// Pointers to the S x S window at (row0, col0) of an (rows x cols x channels) image; outside: `outside`.
template <int S, typename Ptr>
inline void Window(Ptr base, int64_t rows, int64_t cols, int64_t channels, int64_t row0, int64_t col0, Ptr outside,
                   Ptr* out) {
  for (int i = 0; i < S; ++i)
    for (int j = 0; j < S; ++j) {
      int64_t r = row0 + i, c = col0 + j;
      out[i * S + j] = (r >= 0 && r < rows && c >= 0 && c < cols) ? base + (r * cols + c) * channels : outside;
    }
}

// A transformed-tile matrix is laid out [A*A][rows][channels], its A*A slices kSkew floats further apart than
// their size. A transform touches one row of every slice per tile; slices a multiple of 4 KB apart (64 tiles x
// 64 channels is 16 KB) put all 36 rows in one set of the L1 cache, which holds 8 lines, so each write evicted
// the last. The skew spreads them over 36 sets: the input transform ran 1.6-1.7x faster on three of the four
// 64- and 128-channel layers of ResNet-50 and ResNet-18-CIFAR, whole passes 1.15-1.7x (BENCHMARKS.md, 2026-12-05,
// issue 33).
constexpr int64_t kSkew = 16;
inline int64_t SliceStride(int64_t rows, int64_t channels) { return rows * channels + kSkew; }

// Row t of every slice of a transformed-tile matrix of `rows` rows.
template <int S>
inline void Rows(float* matrix, int64_t rows, int64_t channels, int64_t t, float** out) {
  for (int k = 0; k < S * S; ++k) out[k] = matrix + k * SliceStride(rows, channels) + t * channels;
}

// `count` zero elements of T: what a tile reads beyond the image's border.
template <typename T>
const T* Zeros(int64_t count) {
  thread_local std::vector<T> zeros;
  if (static_cast<int64_t>(zeros.size()) < count) zeros.assign(count, T{});
  return zeros.data();
}

// Room for `count` elements of T: where a tile's outputs beyond the image's border are written and dropped.
template <typename T>
T* Sink(int64_t count) {
  thread_local ThreadBuffer sink;
  return static_cast<T*>(sink.Get(count * sizeof(T)));
}

// Input tiles [p0, p0 + count) of x into rows [0, count) of v ([A*A][rows][C]).
template <int M, typename T>
void TransformInput(const T* x, const Tiling& g, int64_t c, int64_t p0, int64_t count, float* v, int64_t rows) {
  constexpr int kA = Tables<M>::kA;
  const T* zeros = Zeros<T>(c);
  for (int64_t t = 0; t < count; ++t) {
    int64_t image, row, col;
    g.Locate(p0 + t, &image, &row, &col);
    const T* in[kA * kA];
    float* out[kA * kA];
    Window<kA>(x + image * g.h * g.w * c, g.h, g.w, c, row - g.pad_top, col - g.pad_left, zeros, in);
    Rows<kA>(v, rows, c, t, out);
    Sandwich<kA, kA, Tables<M>::BT, 0, T, float>(in, out, c);
  }
}

// Output tiles [p0, p0 + count) from rows [0, count) of mhat ([A*A][rows][O]) into y, with the epilogue.
template <int M, int Flags, typename T>
void TransformOutput(float* mhat, int64_t rows, const Tiling& g, int64_t o, int64_t p0, int64_t count, T* y,
                     const float* bias, const T* residual) {
  constexpr int kA = Tables<M>::kA;
  T* sink = Sink<T>(o);
  const T* zeros = Zeros<T>(o);
  for (int64_t t = 0; t < count; ++t) {
    int64_t image, row, col;
    g.Locate(p0 + t, &image, &row, &col);
    float* in[kA * kA];
    T* out[M * M];
    const T* res[M * M];
    Rows<kA>(mhat, rows, o, t, in);
    Window<M>(y + image * g.oh * g.ow * o, g.oh, g.ow, o, row, col, sink, out);
    if constexpr ((Flags & kResidual) != 0)
      Window<M>(residual + image * g.oh * g.ow * o, g.oh, g.ow, o, row, col, zeros, res);
    Sandwich<M, kA, Tables<M>::AT, Flags, float, T>(in, out, o, bias, res);
  }
}

template <int M, typename T>
void TransformOutputDispatch(int flags, float* mhat, int64_t rows, const Tiling& g, int64_t o, int64_t p0,
                             int64_t count, T* y, const float* bias, const T* residual) {
  switch (flags) {
#define CASE(F) \
  case F: return TransformOutput<M, F, T>(mhat, rows, g, o, p0, count, y, bias, residual);
    CASE(0) CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7)
#undef CASE
  }
}

// U = G w G^T for every channel pair: w is (3, 3, rows, cols), u is [A*A][rows][cols]. `flipped` reads w's taps
// in reverse (w[2 - i][2 - j]): an input gradient's kernel is the forward's flipped in space with its channels
// exchanged, and the exchange can be left to the product, reading u transposed (Forward says where).
template <int M>
void TransformKernel(const float* w, int64_t rows, int64_t cols, float* u, bool flipped) {
  constexpr int kA = Tables<M>::kA;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* in[9];
    float* out[kA * kA];
    for (int k = 0; k < 9; ++k) in[k] = w + ((flipped ? 8 - k : k) * rows + r) * cols;
    for (int k = 0; k < kA * kA; ++k) out[k] = u + (k * rows + r) * cols;
    Sandwich<kA, 3, Tables<M>::G>(in, out, cols);
  }
}

// dW = G^T dwhat G: dwhat is [A*A][C][O], dw is HWIO.
template <int M>
void TransformKernelGradient(const float* dwhat, int64_t c, int64_t o, float* dw) {
  constexpr int kA = Tables<M>::kA;
#pragma omp parallel for schedule(static)
  for (int64_t ci = 0; ci < c; ++ci) {
    const float* in[kA * kA];
    float* out[9];
    for (int k = 0; k < kA * kA; ++k) in[k] = dwhat + (k * c + ci) * o;
    for (int k = 0; k < 9; ++k) out[k] = dw + (k * c + ci) * o;
    Sandwich<3, kA, Tables<M>::GT>(in, out, o);
  }
}

// Output-gradient tiles [p0, p0 + count) of dy (N, OH, OW, O) as A dY A^T into rows [0, count) of z.
template <int M, typename T>
void TransformOutputGradient(const T* dy, const Tiling& g, int64_t o, int64_t p0, int64_t count, float* z,
                             int64_t rows) {
  constexpr int kA = Tables<M>::kA;
  const T* zeros = Zeros<T>(o);
  for (int64_t t = 0; t < count; ++t) {
    int64_t image, row, col;
    g.Locate(p0 + t, &image, &row, &col);
    const T* in[M * M];
    float* out[kA * kA];
    Window<M>(dy + image * g.oh * g.ow * o, g.oh, g.ow, o, row, col, zeros, in);
    Rows<kA>(z, rows, o, t, out);
    Sandwich<kA, M, Tables<M>::A, 0, T, float>(in, out, o);
  }
}

// Tiles per block of the blocked schedule: enough rows for an efficient product, few enough that a block's
// transformed tiles stay in the core's cache.
int64_t BlockTiles(int64_t channels) { return std::clamp<int64_t>((96 * 1024) / (channels * 4 * 4), 16, 64); }

// The blocked schedule pays off while the transformed kernel fits in cache next to a block.
bool Blocked(int kA, int64_t c, int64_t o) { return kA * kA * c * o * 4 <= 4 * 1024 * 1024; }

thread_local ThreadBuffer u_buffer, v_buffer, m_buffer, w_buffer;

template <int M, typename T>
void Forward(const T* x, const float* w, const float* bias, const T* residual, T* y, const Tiling& g, int64_t c,
             int64_t o, int flags, bool transposed_kernel) {
  constexpr int kA = Tables<M>::kA;
  float* u = static_cast<float*>(u_buffer.Get(kA * kA * c * o * sizeof(float)));
  // A transposed kernel w is (3, 3, O, C). On the whole schedule, u is made [A*A][O][C] and each slice read
  // transposed: oneDNN ran ResNet's 512-channel products that way in 18 ms against 27 for XLA's copy and the
  // plain layout (BENCHMARKS.md, 2026-12-05). The blocked schedule's small products ran 5-8% slower so, and its
  // kernel is small: its channels are exchanged here first (TransformKernel still flips it).
  const bool read_transposed = transposed_kernel && !Blocked(kA, c, o);
  const float* kernel = w;
  if (transposed_kernel && !read_transposed) {
    float* exchanged = static_cast<float*>(w_buffer.Get(9 * c * o * sizeof(float)));
    for (int k = 0; k < 9; ++k)
      for (int64_t j = 0; j < o; ++j)
        for (int64_t i = 0; i < c; ++i) exchanged[(k * c + i) * o + j] = w[(k * o + j) * c + i];
    kernel = exchanged;
  }
  TransformKernel<M>(kernel, read_transposed ? o : c, read_transposed ? c : o, u, transposed_kernel);
  const int64_t tiles = g.Count();
  RegionErrors errors;  // every OpenMP region below: see common.h
  if (Blocked(kA, c, o)) {
    const int64_t block = BlockTiles(std::max(c, o));
    Matmul* mm = BatchedMatmul(kA * kA, block, c, o, false, false, false,
                               {SliceStride(block, c), 0, SliceStride(block, o)});
    const int64_t blocks = (tiles + block - 1) / block;
#pragma omp parallel
    {
      thread_local ThreadBuffer vb, mb;
      float *v = nullptr, *mh = nullptr;
      errors.Do([&] {
        v = static_cast<float*>(vb.Get(kA * kA * SliceStride(block, c) * sizeof(float)));
        mh = static_cast<float*>(mb.Get(kA * kA * SliceStride(block, o) * sizeof(float)));
      });
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b)
        errors.Do([&] {
          const int64_t p0 = b * block, count = std::min(block, tiles - p0);
          TransformInput<M>(x, g, c, p0, count, v, block);
          RunMatmul(*mm, v, u, mh);
          Stream().wait();
          TransformOutputDispatch<M>(flags, mh, block, g, o, p0, count, y, bias, residual);
        });
    }
    errors.Rethrow();
    return;
  }
  float* v = static_cast<float*>(v_buffer.Get(kA * kA * SliceStride(tiles, c) * sizeof(float)));
  float* mh = static_cast<float*>(m_buffer.Get(kA * kA * SliceStride(tiles, o) * sizeof(float)));
  const int64_t chunk = 8;
#pragma omp parallel for schedule(static)
  for (int64_t p0 = 0; p0 < tiles; p0 += chunk)
    errors.Do([&] { TransformInput<M>(x, g, c, p0, std::min(chunk, tiles - p0), v + p0 * c, tiles); });
  errors.Rethrow();
  RunMatmul(*BatchedMatmul(kA * kA, tiles, c, o, false, read_transposed, false,
                           {SliceStride(tiles, c), 0, SliceStride(tiles, o)}),
            v, u, mh);
  Stream().wait();
#pragma omp parallel for schedule(static)
  for (int64_t p0 = 0; p0 < tiles; p0 += chunk)
    errors.Do([&] {
      TransformOutputDispatch<M>(flags, mh + p0 * o, tiles, g, o, p0, std::min(chunk, tiles - p0), y, bias,
                                 residual);
    });
  errors.Rethrow();
}

template <int M, typename T>
void KernelGradient(const T* x, const T* dy, float* dw, const Tiling& g, int64_t c, int64_t o) {
  constexpr int kA = Tables<M>::kA;
  const int64_t tiles = g.Count();
  float* dwhat = static_cast<float*>(u_buffer.Get(kA * kA * c * o * sizeof(float)));
  if (Blocked(kA, c, o)) {
    const int64_t block = BlockTiles(std::max(c, o));
    const BatchStrides skewed{SliceStride(block, c), SliceStride(block, o), 0};
    Matmul* first = BatchedMatmul(kA * kA, c, block, o, true, false, false, skewed);
    Matmul* more = BatchedMatmul(kA * kA, c, block, o, true, false, true, skewed);
    const int64_t blocks = (tiles + block - 1) / block;
    std::vector<float*> partial(omp_get_max_threads(), nullptr);
    RegionErrors errors;  // see common.h
#pragma omp parallel
    {
      thread_local ThreadBuffer vb, zb, db;
      const int me = omp_get_thread_num(), team = omp_get_num_threads();
      float *v = nullptr, *z = nullptr, *acc = nullptr;
      errors.Do([&] {
        v = static_cast<float*>(vb.Get(kA * kA * SliceStride(block, c) * sizeof(float)));
        z = static_cast<float*>(zb.Get(kA * kA * SliceStride(block, o) * sizeof(float)));
        acc = static_cast<float*>(db.Get(kA * kA * c * o * sizeof(float)));
      });
      bool started = false;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < blocks; ++b)
        errors.Do([&] {
          const int64_t p0 = b * block, count = std::min(block, tiles - p0);
          TransformInput<M>(x, g, c, p0, count, v, block);
          TransformOutputGradient<M>(dy, g, o, p0, count, z, block);
          if (count < block) {  // rows past the last tile must add nothing
            for (int k = 0; k < kA * kA; ++k) {
              std::memset(v + k * SliceStride(block, c) + count * c, 0, (block - count) * c * sizeof(float));
              std::memset(z + k * SliceStride(block, o) + count * o, 0, (block - count) * o * sizeof(float));
            }
          }
          RunMatmul(started ? *more : *first, v, z, acc);
          Stream().wait();
          started = true;
        });
      errors.Do([&] {
        if (!started) std::memset(acc, 0, kA * kA * c * o * sizeof(float));
      });
      partial[me] = acc;
#pragma omp barrier
      const bool sum = !errors.Failed();  // the same on every thread: nothing can fail after the barrier
#pragma omp for schedule(static)
      for (int64_t i = 0; i < kA * kA * c * o; ++i) {
        if (!sum) continue;
        float s = 0.f;
        for (int t = 0; t < team; ++t) s += partial[t][i];
        dwhat[i] = s;
      }
    }
    errors.Rethrow();
  } else {
    float* v = static_cast<float*>(v_buffer.Get(kA * kA * SliceStride(tiles, c) * sizeof(float)));
    float* z = static_cast<float*>(m_buffer.Get(kA * kA * SliceStride(tiles, o) * sizeof(float)));
    const int64_t chunk = 8;
    RegionErrors errors;  // see common.h
#pragma omp parallel for schedule(static)
    for (int64_t p0 = 0; p0 < tiles; p0 += chunk)
      errors.Do([&] {
        TransformInput<M>(x, g, c, p0, std::min(chunk, tiles - p0), v + p0 * c, tiles);
        TransformOutputGradient<M>(dy, g, o, p0, std::min(chunk, tiles - p0), z + p0 * o, tiles);
      });
    errors.Rethrow();
    RunMatmul(*BatchedMatmul(kA * kA, c, tiles, o, true, false, false,
                             {SliceStride(tiles, c), SliceStride(tiles, o), 0}),
              v, z, dwhat);
    Stream().wait();
  }
  TransformKernelGradient<M>(dwhat, c, o, dw);
}

ffi::ErrorOr<Tiling> MakeTiling(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions y,
                                ffi::Span<const int64_t> padding, int64_t m) {
  if (x.size() != 4 || y.size() != 4 || padding.size() != 4 || (m != 2 && m != 4))
    return ffi::Unexpected(ffi::Error::InvalidArgument("Winograd: expected NHWC buffers, 4 pads and m of 2 or 4"));
  if (*std::min_element(padding.begin(), padding.end()) < 0)
    return ffi::Unexpected(ffi::Error::InvalidArgument("Winograd: negative padding"));
  if (y[1] != x[1] + padding[0] + padding[1] - 2 || y[2] != x[2] + padding[2] + padding[3] - 2 || y[0] != x[0])
    return ffi::Unexpected(ffi::Error::InvalidArgument("Winograd: output shape does not match a 3x3 stride-1 conv"));
  return Tiling{x[0], x[1], x[2], y[1], y[2], padding[0], padding[2], m, (y[1] + m - 1) / m, (y[2] + m - 1) / m};
}

// x (N, H, W, C), the kernel or its gradient (3, 3, C, O) (transposed: (3, 3, O, C)) and y or dy (N, OH, OW, O).
// The kernel (or its gradient) is float32; x and y are both float32 or both bfloat16, the activations a bfloat16
// model passes between layers, read and written as such (the arithmetic is float32 either way).
ffi::Error CheckKernel(const ffi::AnyBuffer& x, const ffi::AnyBuffer& kernel, const ffi::AnyBuffer& y, int64_t c,
                       int64_t o, bool transposed = false) {
  if (kernel.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("Winograd: the kernel (or its gradient) must be float32");
  if ((x.element_type() != ffi::DataType::F32 && x.element_type() != ffi::DataType::BF16) ||
      y.element_type() != x.element_type())
    return ffi::Error::InvalidArgument("Winograd: x and y (or the output gradient dy) must be both float32 or both "
                                       "bfloat16");
  if (transposed && !resnet_jax::HasDims(kernel.dimensions(), {3, 3, o, c}))
    return ffi::Error::InvalidArgument("Winograd: a transposed kernel must be (3, 3, O, C), C the input's channels "
                                       "and O the output's");
  if (!transposed && !resnet_jax::HasDims(kernel.dimensions(), {3, 3, c, o}))
    return ffi::Error::InvalidArgument("Winograd: the kernel must be HWIO (3, 3, C, O), C the input's channels and "
                                       "O the output's");
  return ffi::Error::Success();
}

ffi::Error WinogradForward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Span<const int64_t> padding, int64_t m, int64_t has_bias, int64_t has_residual,
                           int64_t relu, int64_t transposed_kernel) {
  auto tiling = MakeTiling(x.dimensions(), y->dimensions(), padding, m);
  if (tiling.has_error()) return tiling.error();
  const int64_t c = x.dimensions()[3], o = y->dimensions()[3];
  if (auto error = CheckKernel(x, w, *y, c, o, transposed_kernel); error.failure()) return error;
  if (static_cast<int64_t>(rest.size()) != has_bias + has_residual)
    return ffi::Error::InvalidArgument("Winograd: optional operands do not match has_bias/has_residual");
  const float* bias = nullptr;
  const void* residual = nullptr;
  if (has_bias) {
    ffi::AnyBuffer b = *rest.get<ffi::AnyBuffer>(0);
    if (b.element_type() != ffi::DataType::F32 || !resnet_jax::HasDims(b.dimensions(), {o}))
      return ffi::Error::InvalidArgument("Winograd: the bias must be float32 of shape (O,), O the output channels");
    bias = b.typed_data<float>();
  }
  if (has_residual) {
    ffi::AnyBuffer r = *rest.get<ffi::AnyBuffer>(has_bias);
    if (r.element_type() != x.element_type() || !resnet_jax::SameDims(r.dimensions(), y->dimensions()))
      return ffi::Error::InvalidArgument("Winograd: the residual must have the output's shape and dtype");
    residual = r.untyped_data();
  }
  const int flags = (has_bias ? kBias : 0) | (has_residual ? kResidual : 0) | (relu ? kRelu : 0);
  return Run([&] {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const T* in = static_cast<const T*>(x.untyped_data());
      const T* res = static_cast<const T*>(residual);
      T* out = static_cast<T*>(y->untyped_data());
      if (m == 4)
        Forward<4>(in, w.typed_data<float>(), bias, res, out, *tiling, c, o, flags, transposed_kernel);
      else
        Forward<2>(in, w.typed_data<float>(), bias, res, out, *tiling, c, o, flags, transposed_kernel);
    };
    WithStorageType(x.element_type() == ffi::DataType::BF16, run);
  });
}

ffi::Error WinogradBackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                                   ffi::Span<const int64_t> padding, int64_t m) {
  auto tiling = MakeTiling(x.dimensions(), dy.dimensions(), padding, m);
  if (tiling.has_error()) return tiling.error();
  const int64_t c = x.dimensions()[3], o = dy.dimensions()[3];
  if (auto error = CheckKernel(x, *dw, dy, c, o); error.failure()) return error;
  return Run([&] {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const T* in = static_cast<const T*>(x.untyped_data());
      const T* grad = static_cast<const T*>(dy.untyped_data());
      if (m == 4)
        KernelGradient<4>(in, grad, dw->typed_data<float>(), *tiling, c, o);
      else
        KernelGradient<2>(in, grad, dw->typed_data<float>(), *tiling, c, o);
    };
    WithStorageType(x.element_type() == ffi::DataType::BF16, run);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxWinogradForward, WinogradForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("has_bias")
                                  .Attr<int64_t>("has_residual")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("transposed_kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxWinogradBackwardWeights, WinogradBackwardWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("padding")
                                  .Attr<int64_t>("m"));
