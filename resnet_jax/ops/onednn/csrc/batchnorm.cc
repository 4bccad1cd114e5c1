// Training-mode BatchNorm + residual + ReLU as four passes over (rows, channels) tensors, channels last:
//   forward:  Stats (sums of x - shift and of its square)  then Apply (y = relu((x - mean) * mul + bias + residual))
//   backward: GradSums (sum g, sum g * (x - mean), with g = ct masked by y > 0)  then GradApply
//             (dx = g * a + (x - mean) * b + c); x centred by the forward's mean as it is read, not
//             sum g * x - mean * sum g after, which cancels where a channel's mean is large against its spread;
//             GradSumsMasked also writes g (a residual's gradient), and GradApply reads it unmasked; without a
//             residual both passes may take the mask from x and the forward's coefficients instead of reading y
// The per-channel arithmetic between the passes (statistics, coefficients) stays in JAX (batchnorm.py,
// batchnorm_grad.py): these are only the passes over every element, which is where BatchNorm's time goes on
// CPU. XLA:CPU ran the same passes 1.3-1.7x slower than these loops (BENCHMARKS.md, 2026-12-04).
//
// Tensors are float32 or bfloat16 (every tensor of one call the same); sums and per-channel vectors are
// float32. Each sum is accumulated in float32 over blocks of 64 rows, and the blocks in double, so a sum over
// millions of rows keeps float32 precision. bfloat16 results round once, to nearest even, as XLA does.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bfloat16.h"
#include "common.h"

namespace {

namespace ffi = xla::ffi;

using namespace resnet_jax::bf16;  // Load, Store, RoundTo: bfloat16.h

// The BatchNorm of x[i] in T, (x - mean) * mul + bias as one explicit fused multiply-add: Apply writes it and the
// gradient passes recompute its sign from x, so both must round alike whatever the compiler contracts.
template <typename T>
inline float Normalized(const T* x, int64_t i, float mean, float mul, float bias) {
  return RoundTo(T{}, std::fma(Load(x, i) - mean, mul, bias));
}

constexpr int64_t kBlock = 64;

// out[0:C] = sum over rows of first(r, c), out[C:2C] = sum of second(r, c); `row` adds one row into (a, b).
template <typename Row>
void ChannelSums(int64_t rows, int64_t channels, float* out, Row row) {
  const int threads = omp_get_max_threads();
  std::vector<double> totals(size_t(threads) * 2 * channels, 0.0);
  std::vector<float> scratch(size_t(threads) * 2 * channels);
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    float* a = scratch.data() + size_t(t) * 2 * channels;
    float* b = a + channels;
    double* total = totals.data() + size_t(t) * 2 * channels;
    for (int64_t block = blocks * t / n; block < blocks * (t + 1) / n; ++block) {
      std::fill(a, a + 2 * channels, 0.f);
      for (int64_t r = block * kBlock, end = std::min(rows, r + kBlock); r < end; ++r) row(r, a, b);
      for (int64_t c = 0; c < 2 * channels; ++c) total[c] += a[c];
    }
  }
  for (int64_t c = 0; c < 2 * channels; ++c) {
    double sum = 0.0;
    for (int t = 0; t < threads; ++t) sum += totals[size_t(t) * 2 * channels + c];
    out[c] = float(sum);
  }
}

int64_t Channels(const ffi::AnyBuffer& x) {
  auto dims = x.dimensions();
  return dims.size() == 0 ? 1 : dims[dims.size() - 1];
}

// Calls body(std::true_type{}) or body(std::false_type{}): a flag tested inside an element loop as a compile-time
// constant, so each variant of the loop vectorises (a run-time test there made GradSums 10x slower: no vectorised loop).
template <typename Body>
void WithFlag(bool flag, Body body) {
  if (flag)
    body(std::true_type{});
  else
    body(std::false_type{});
}

// The ReLU's mask in the gradient passes: y > 0 read from the output, or (`from_x`, no residual) the sign of the
// forward's BatchNorm recomputed from x and the coefficients Apply used, which saves reading y: x is read anyway.
// The forward's mean also centres x in both gradient passes, with or without from_x.
template <typename T>
struct Mask {
  const T* y;
  const float *mean, *mul, *bias;  // the forward's coefficients
};

// The masked cotangent g of both gradient passes: ct where the ReLU passed, ct without it.
template <typename WithRelu, typename FromX, typename T>
inline float Masked(WithRelu, FromX, const T* ct, const Mask<T>& mask, const T* x, int64_t i, int64_t c) {
  const float g = Load(ct, i);
  if constexpr (WithRelu::value && FromX::value)
    return Normalized(x, i, mask.mean[c], mask.mul[c], mask.bias[c]) > 0.f ? g : 0.f;
  if constexpr (WithRelu::value) return Load(mask.y, i) > 0.f ? g : 0.f;
  return g;
}

// Whether the operands fit: the forward's (3, channels) coefficients, and y with x's element count unless the
// mask comes from x (y then a placeholder).
bool MaskFits(const ffi::AnyBuffer& y, const ffi::Buffer<ffi::F32>& forward, bool from_x, int64_t count,
              int64_t channels) {
  return resnet_jax::HasDims(forward.dimensions(), {3, channels}) && (from_x || y.element_count() == count);
}

template <typename T>
Mask<T> MakeMask(const ffi::AnyBuffer& y, const ffi::Buffer<ffi::F32>& forward, int64_t channels) {
  const float* mean = forward.typed_data();
  return {static_cast<const T*>(y.untyped_data()), mean, mean + channels, mean + 2 * channels};
}

bool Supported(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

// Calls body(T{}) with T the storage type of `x` (float, or uint16_t for bfloat16), once every tensor in `same`
// has that dtype too.
template <typename Body>
ffi::Error Dispatch(const char* name, ffi::DataType type, std::initializer_list<const ffi::AnyBuffer*> same,
                    Body body) {
  if (!Supported(type))
    return ffi::Error::InvalidArgument(std::string(name) + ": only float32 and bfloat16 tensors are supported");
  for (auto* b : same)
    if (b->element_type() != type)
      return ffi::Error::InvalidArgument(std::string(name) + ": every tensor must have the input's dtype");
  return resnet_jax::Run([&] { WithStorageType(type == ffi::DataType::BF16, body); });
}

// out = (sum d, sum d^2) with d = x - shift, per channel: sums shifted by a value of the data (batchnorm.py
// passes the batch's first pixel, the same to every shard), so the variance E[d^2] - E[d]^2 keeps float32
// precision when a channel's mean is large against its spread (unshifted, E[x^2] - mean^2 lost every digit at a
// mean 1e4 times the spread; torch's two-pass variance does not). batchnorm.py adds the shift back to the mean.
ffi::Error Stats(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> shift, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  if (!resnet_jax::HasDims(out->dimensions(), {2, channels}) ||
      !resnet_jax::HasDims(shift.dimensions(), {channels}))
    return ffi::Error::InvalidArgument("BatchNorm sums: the shift must be (channels,), the result (2, channels)");
  return Dispatch("BatchNorm sums", x.element_type(), {}, [&](auto tag) {
    using T = decltype(tag);
    const T* px = static_cast<const T*>(x.untyped_data());
    const float* k = shift.typed_data();
    ChannelSums(rows, channels, out->typed_data(), [&](int64_t r, float* a, float* b) {
      const T* row = px + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const float v = Load(row, c) - k[c];
        a[c] += v;
        b[c] += v * v;
      }
    });
  });
}

// y = relu(round((x - mean) * mul + bias) + residual), coef = (mean, mul, bias) per channel: the BatchNorm is
// rounded to the tensor dtype before the residual is added, as the model computes it (BatchNorm, then the add).
ffi::Error Apply(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> coef, ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> y,
                 int64_t relu, int64_t has_residual) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  if (!resnet_jax::HasDims(coef.dimensions(), {3, channels}) || y->element_count() != x.element_count() ||
      (has_residual && residual.element_count() != x.element_count()))
    return ffi::Error::InvalidArgument("BatchNorm apply: inconsistent shapes");
  // without a residual, calls.batch_norm_apply passes a one-element placeholder of x's dtype
  return Dispatch("BatchNorm apply", x.element_type(), {&residual, &*y}, [&](auto tag) {
    using T = decltype(tag);
    const T* px = static_cast<const T*>(x.untyped_data());
    const T* pr = static_cast<const T*>(residual.untyped_data());
    T* py = static_cast<T*>(y->untyped_data());
    const float *mean = coef.typed_data(), *mul = mean + channels, *bias = mul + channels;
    WithFlag(relu, [&](auto with_relu) {
      WithFlag(has_residual, [&](auto with_residual) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t o = r * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            float v = Normalized(px, o + c, mean[c], mul[c], bias[c]);
            if constexpr (with_residual) v += Load(pr, o + c);
            if constexpr (with_relu) v = std::max(v, 0.f);
            Store(py, o + c, v);
          }
        }
      });
    });
  });
}

// The masked cotangent g = ct where the ReLU passed (every element without it): out = (sum g, sum g * (x - mean)),
// mean the forward's; with `masked`, g itself is written there too (GradSumsMasked).
ffi::Error Sums(ffi::AnyBuffer ct, ffi::AnyBuffer y, ffi::AnyBuffer x, const ffi::Buffer<ffi::F32>& forward,
                ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::AnyBuffer* masked, int64_t relu, int64_t from_x) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  if (ct.element_count() != x.element_count() || (masked && masked->element_count() != x.element_count()) ||
      !MaskFits(y, forward, from_x, x.element_count(), channels) ||
      !resnet_jax::HasDims(out->dimensions(), {2, channels}))
    return ffi::Error::InvalidArgument("BatchNorm gradient sums: inconsistent shapes");
  ffi::AnyBuffer* same = masked ? masked : &ct;
  return Dispatch("BatchNorm gradient sums", x.element_type(), {&ct, &y, same}, [&](auto tag) {
    using T = decltype(tag);
    const Mask<T> mask = MakeMask<T>(y, forward, channels);
    const T *pg = static_cast<const T*>(ct.untyped_data()), *px = static_cast<const T*>(x.untyped_data());
    T* pm = masked ? static_cast<T*>(masked->untyped_data()) : nullptr;
    WithFlag(relu, [&](auto with_relu) {
      WithFlag(from_x, [&](auto mask_from_x) {
        WithFlag(masked != nullptr, [&](auto with_store) {
          ChannelSums(rows, channels, out->typed_data(), [&](int64_t r, float* a, float* b) {
            const int64_t o = r * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
              const float g = Masked(with_relu, mask_from_x, pg, mask, px, o + c, c);
              if constexpr (with_store) Store(pm, o + c, g);  // each element read before it is overwritten
              a[c] += g;
              b[c] += g * (Load(px, o + c) - mask.mean[c]);
            }
          });
        });
      });
    });
  });
}

ffi::Error GradSums(ffi::AnyBuffer ct, ffi::AnyBuffer y, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> forward,
                    ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t relu, int64_t mask_from_x) {
  return Sums(ct, y, x, forward, out, nullptr, relu, mask_from_x);
}

// GradSums that also writes g, in ct's buffer where XLA hands it over: a block's last BatchNorm, whose g is also
// the shortcut's gradient. It saves the separate masking pass (read ct and y, write g), and GradApply then reads
// g without y.
ffi::Error GradSumsMasked(ffi::AnyBuffer ct, ffi::AnyBuffer y, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> forward,
                          ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::Result<ffi::AnyBuffer> g) {
  return Sums(ct, y, x, forward, out, &*g, 1, 0);
}

// dx = g * coef[0] + (x - mean) * coef[1] + coef[2], per channel, g and mean as in GradSums.
ffi::Error GradApply(ffi::AnyBuffer ct, ffi::AnyBuffer y, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> coef,
                     ffi::Buffer<ffi::F32> forward, ffi::Result<ffi::AnyBuffer> dx, int64_t relu,
                     int64_t mask_from_x) {
  const int64_t channels = Channels(x), rows = x.element_count() / std::max<int64_t>(channels, 1);
  if (ct.element_count() != x.element_count() || dx->element_count() != x.element_count() ||
      !MaskFits(y, forward, mask_from_x, x.element_count(), channels) ||
      !resnet_jax::HasDims(coef.dimensions(), {3, channels}))
    return ffi::Error::InvalidArgument("BatchNorm input gradient: inconsistent shapes");
  return Dispatch("BatchNorm input gradient", x.element_type(), {&ct, &y, &*dx}, [&](auto tag) {
    using T = decltype(tag);
    const Mask<T> mask = MakeMask<T>(y, forward, channels);
    const T *pg = static_cast<const T*>(ct.untyped_data()), *px = static_cast<const T*>(x.untyped_data());
    T* out = static_cast<T*>(dx->untyped_data());
    const float *a = coef.typed_data(), *b = a + channels, *k = b + channels;
    WithFlag(relu, [&](auto with_relu) {
      WithFlag(mask_from_x, [&](auto from_x) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t o = r * channels;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            const float g = Masked(with_relu, from_x, pg, mask, px, o + c, c);
            Store(out, o + c, g * a[c] + (Load(px, o + c) - mask.mean[c]) * b[c] + k[c]);
          }
        }
      });
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxBatchNormSums, Stats,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxBatchNormApply, Apply,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("has_residual"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxBatchNormGradSums, GradSums,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("mask_from_x"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxBatchNormGradSumsMasked, GradSumsMasked,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxBatchNormGradApply, GradApply,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("mask_from_x"));
