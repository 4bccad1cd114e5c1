// Pieces shared by the oneDNN handlers: one CPU engine, a stream and scratch buffers per calling thread, a
// cache of primitives keyed by shape, and the translation of oneDNN errors into XLA FFI errors.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace resnet_jax {

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

inline dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// A growable 64-byte-aligned buffer owned by one thread.
class ThreadBuffer {
 public:
  ~ThreadBuffer() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Built once per key (under a lock), then shared read-only by every thread.
template <typename T, typename Build>
T* Cached(const std::string& key, Build build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::unique_ptr<T>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<T>(build());
  return slot.get();
}

// A batched matrix product [batch][rows][k] x [batch][k][cols] -> [batch][rows][cols] (row-major), either
// operand optionally stored transposed ([batch][k][rows], [batch][cols][k]); `accumulate` adds to dst.
struct Matmul {
  dnnl::matmul prim;
  dnnl::memory::desc lhs, rhs, dst, scratchpad;
};

inline Matmul* BatchedMatmul(int64_t batch, int64_t rows, int64_t k, int64_t cols, bool transpose_lhs,
                             bool transpose_rhs, bool accumulate) {
  using dnnl::memory;
  using tag = memory::format_tag;
  std::string key = "matmul:" + std::to_string(batch) + ':' + std::to_string(rows) + ':' + std::to_string(k) +
                    ':' + std::to_string(cols) + ':' + std::to_string(transpose_lhs) +
                    std::to_string(transpose_rhs) + std::to_string(accumulate);
  return Cached<Matmul>(key, [&] {
    const auto f32 = memory::data_type::f32;
    memory::desc lhs({batch, rows, k}, f32, transpose_lhs ? tag::acb : tag::abc);
    memory::desc rhs({batch, k, cols}, f32, transpose_rhs ? tag::acb : tag::abc);
    memory::desc dst({batch, rows, cols}, f32, tag::abc);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.f);
      attr.set_post_ops(ops);
    }
    dnnl::matmul::primitive_desc pd(Engine(), lhs, rhs, dst, attr);
    return Matmul{dnnl::matmul(pd), lhs, rhs, dst, pd.scratchpad_desc()};
  });
}

inline void RunMatmul(const Matmul& mm, const float* lhs, const float* rhs, float* dst) {
  using dnnl::memory;
  thread_local ThreadBuffer scratch;
  mm.prim.execute(Stream(), {{DNNL_ARG_SRC, memory(mm.lhs, Engine(), const_cast<float*>(lhs))},
                             {DNNL_ARG_WEIGHTS, memory(mm.rhs, Engine(), const_cast<float*>(rhs))},
                             {DNNL_ARG_DST, memory(mm.dst, Engine(), dst)},
                             {DNNL_ARG_SCRATCHPAD,
                              memory(mm.scratchpad, Engine(), scratch.Get(mm.scratchpad.get_size()))}});
}

// Runs one handler's work, one handler at a time: each already spreads over every core with OpenMP, and XLA
// may start two independent convolutions at once on its own threads (it does, in a ResNet-18 step), where two
// OpenMP teams would oversubscribe the cores and spin against each other.
inline xla::ffi::Error Run(const std::function<void()>& body) {
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  try {
    body();
  } catch (const dnnl::error& e) {
    return xla::ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
  return xla::ffi::Error::Success();
}

}  // namespace resnet_jax
