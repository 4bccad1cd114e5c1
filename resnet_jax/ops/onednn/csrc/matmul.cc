// One matrix product on XLA's buffers by oneDNN's matmul: the 1x1 convolutions' three passes are plain
// products ((N*H*W, Cin) x (Cin, Cout), its transposes), and oneDNN's GEMM kernels run them without XLA's
// layout copies; the kernel gradient's reduction over every pixel is the product XLA:CPU runs slowest.
//
// That product, x^T dy, reads its left operand transposed (pixels outermost), a form oneDNN's AVX2 GEMM runs at
// ~80-130 GFLOP/s on most of ResNet-50's channel pairs. With `own_kernel` it is summed as outer products by
// outer_products.h instead (algorithms.py chooses where; BENCHMARKS.md has the measurements).
//
// ResnetJaxMatmulAccumulate computes out = acc + lhs x rhs with `acc`'s buffer as the output (a oneDNN `sum`
// post-op): a block's input gradient where the same input also went to the residual, the two cotangents summed
// by the product as it writes its tiles instead of by a separate pass over them (ops/fanout.py).

#include <cstring>
#include <utility>

#include "common.h"
#include "outer_products.h"

namespace {

namespace ffi = xla::ffi;

// A buffer read as a matrix: every dimension but the last is a row (an NHWC image: one row per pixel), so XLA
// passes images as they are, with no reshape between the calls (a reshaped operand that a call updates in place
// made XLA copy it first).
std::pair<int64_t, int64_t> AsMatrix(ffi::Span<const int64_t> dims) {
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return {rows, dims.size() == 0 ? 1 : dims[dims.size() - 1]};
}

// out = lhs x rhs with lhs (rows x k) or, transposed, stored (k x rows); rhs (k x cols) or stored (cols x k).
ffi::Error Multiply(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, const float* acc,
                    ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t transpose_lhs, int64_t transpose_rhs,
                    int64_t own_kernel) {
  auto a = AsMatrix(lhs.dimensions()), b = AsMatrix(rhs.dimensions()), c = AsMatrix(out->dimensions());
  if (lhs.dimensions().size() < 2 || rhs.dimensions().size() != 2 || out->dimensions().size() < 2 ||
      (transpose_lhs && lhs.dimensions().size() != 2))
    return ffi::Error::InvalidArgument("oneDNN matmul: expected matrices (or images, one row per pixel)");
  const int64_t rows = transpose_lhs ? a.second : a.first, k = transpose_lhs ? a.first : a.second;
  const int64_t k2 = transpose_rhs ? b.second : b.first, cols = transpose_rhs ? b.first : b.second;
  if (k != k2 || c.first != rows || c.second != cols)
    return ffi::Error::InvalidArgument("oneDNN matmul: inconsistent shapes");
  if (own_kernel && (!transpose_lhs || transpose_rhs || acc))
    return ffi::Error::InvalidArgument("oneDNN matmul: the own kernel computes lhs^T x rhs only");
#if !defined(RESNET_JAX_OUTER_PRODUCTS)
  if (own_kernel) return ffi::Error::InvalidArgument("oneDNN matmul: the own kernel needs AVX2 and FMA");
#endif
  return resnet_jax::Run([&] {
#if defined(RESNET_JAX_OUTER_PRODUCTS)
    if (own_kernel) {
      using resnet_jax::outer::LhsTransposedTimesRhs;
      LhsTransposedTimesRhs(lhs.typed_data(), rhs.typed_data(), out->typed_data(), k, rows, cols);
      return;
    }
#endif
    // XLA hands the accumulator's buffer over as the output when it can; otherwise (never seen) copy it there
    if (acc && acc != out->typed_data()) std::memcpy(out->typed_data(), acc, out->size_bytes());
    auto* mm = resnet_jax::BatchedMatmul(1, rows, k, cols, transpose_lhs, transpose_rhs, acc != nullptr);
    resnet_jax::RunMatmul(*mm, lhs.typed_data(), rhs.typed_data(), out->typed_data());
    resnet_jax::Stream().wait();
  });
}

ffi::Error Product(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, ffi::Result<ffi::Buffer<ffi::F32>> out,
                   int64_t transpose_lhs, int64_t transpose_rhs, int64_t own_kernel) {
  return Multiply(lhs, rhs, nullptr, out, transpose_lhs, transpose_rhs, own_kernel);
}

// acc + lhs x rhs, lhs never transposed: the rows it adds to are pixels, as the accumulator's.
ffi::Error ProductAccumulated(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, ffi::Buffer<ffi::F32> acc,
                              ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t transpose_rhs) {
  if (!resnet_jax::SameDims(acc.dimensions(), out->dimensions()))
    return ffi::Error::InvalidArgument("oneDNN matmul: the accumulator must have the product's shape");
  return Multiply(lhs, rhs, acc.typed_data(), out, 0, transpose_rhs, 0);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMatmulAccumulate, ProductAccumulated,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transpose_rhs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxMatmul, Product,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transpose_lhs")
                                  .Attr<int64_t>("transpose_rhs")
                                  .Attr<int64_t>("own_kernel"));
