// A copy of its operand, which XLA then holds in memory: for a value its fusions would otherwise recompute
// inside every consumer. The max-pool's first-maximum indices are such a value: fused into the gradient's nine
// padded terms, their comparison chain ran once per term and pixel (ops/pool.py).

#include <cstring>

#include "common.h"

namespace {

namespace ffi = xla::ffi;

ffi::Error Keep(ffi::AnyBuffer a, ffi::Result<ffi::AnyBuffer> out) {
  if (a.size_bytes() != out->size_bytes() || a.element_type() != out->element_type())
    return ffi::Error::InvalidArgument("keep: the result must have the operand's size and dtype");
  std::memcpy(out->untyped_data(), a.untyped_data(), a.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxKeep, Keep, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
