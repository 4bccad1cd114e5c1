// One matrix product on XLA's buffers by oneDNN's matmul: the 1x1 convolutions' three passes are plain
// products ((N*H*W, Cin) x (Cin, Cout), its transposes), and oneDNN's GEMM kernels run them without XLA's
// layout copies; the kernel gradient's reduction over every pixel is the product XLA:CPU runs slowest.

#include "common.h"

namespace {

namespace ffi = xla::ffi;

// out = lhs x rhs with lhs (rows x k) or, transposed, stored (k x rows); rhs (k x cols) or stored (cols x k).
ffi::Error Product(ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs, ffi::Result<ffi::Buffer<ffi::F32>> out,
                   int64_t transpose_lhs, int64_t transpose_rhs) {
  auto a = lhs.dimensions(), b = rhs.dimensions(), c = out->dimensions();
  if (a.size() != 2 || b.size() != 2 || c.size() != 2)
    return ffi::Error::InvalidArgument("oneDNN matmul: expected matrices");
  const int64_t rows = transpose_lhs ? a[1] : a[0], k = transpose_lhs ? a[0] : a[1];
  const int64_t k2 = transpose_rhs ? b[1] : b[0], cols = transpose_rhs ? b[0] : b[1];
  if (k != k2 || c[0] != rows || c[1] != cols)
    return ffi::Error::InvalidArgument("oneDNN matmul: inconsistent shapes");
  return resnet_jax::Run([&] {
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
                                  .Attr<int64_t>("transpose_rhs"));
