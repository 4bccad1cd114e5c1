// Pieces shared by the oneDNN handlers: one CPU engine, a stream and scratch buffers per calling thread, a
// cache of primitives keyed by shape, operand checks, and the translation of C++ failures (oneDNN errors, a
// failed allocation) into XLA FFI errors, raised in Python, instead of a crash.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <new>
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

// A growable 64-byte-aligned buffer owned by one thread. Throws std::bad_alloc when the memory is not there
// (Run turns that into an error; inside an OpenMP region, RegionErrors carries it out).
class ThreadBuffer {
 public:
  ~ThreadBuffer() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      data_ = nullptr;
      size_ = 0;
      const size_t rounded = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, rounded);
      if (data_ == nullptr) throw std::bad_alloc();
      size_ = rounded;
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
// operand optionally stored transposed ([batch][k][rows], [batch][cols][k]); `accumulate` adds to dst. An
// operand's batch stride may exceed its matrix (BatchStrides, in floats; 0: dense): Winograd skews its tile
// matrices that way (winograd.cc says why).
struct Matmul {
  dnnl::matmul prim;
  dnnl::memory::desc lhs, rhs, dst, scratchpad;
};

struct BatchStrides {
  int64_t lhs = 0, rhs = 0, dst = 0;
};

inline Matmul* BatchedMatmul(int64_t batch, int64_t rows, int64_t k, int64_t cols, bool transpose_lhs,
                             bool transpose_rhs, bool accumulate, BatchStrides strides = {}) {
  using dnnl::memory;
  std::string key = "matmul:" + std::to_string(batch) + ':' + std::to_string(rows) + ':' + std::to_string(k) +
                    ':' + std::to_string(cols) + ':' + std::to_string(transpose_lhs) +
                    std::to_string(transpose_rhs) + std::to_string(accumulate) + ':' +
                    std::to_string(strides.lhs) + ':' + std::to_string(strides.rhs) + ':' +
                    std::to_string(strides.dst);
  return Cached<Matmul>(key, [&] {
    const auto f32 = memory::data_type::f32;
    // dims {batch, r, c} of a matrix stored row-major, or transposed ([batch][c][r])
    auto desc = [&](int64_t r, int64_t c, bool transposed, int64_t batch_stride) {
      const int64_t step = batch_stride ? batch_stride : r * c;
      return memory::desc({batch, r, c}, f32, transposed ? memory::dims{step, 1, r} : memory::dims{step, c, 1});
    };
    memory::desc lhs = desc(rows, k, transpose_lhs, strides.lhs);
    memory::desc rhs = desc(k, cols, transpose_rhs, strides.rhs);
    memory::desc dst = desc(rows, cols, false, strides.dst);
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

// A C++ exception must not leave an OpenMP region (the process would terminate), and a thread that skips a
// worksharing loop or a barrier deadlocks the rest of its team. So inside a region every piece of work goes
// through Do: the first exception is kept, every later piece on every thread becomes a no-op, and each thread
// still reaches every loop and barrier; Rethrow after the region hands the exception to Run.
class RegionErrors {
 public:
  template <typename Work>
  void Do(Work&& work) {
    if (Failed()) return;
    try {
      work();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
      failed_.store(true, std::memory_order_release);
    }
  }
  bool Failed() const { return failed_.load(std::memory_order_acquire); }
  void Rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::mutex mutex_;
  std::exception_ptr first_;
};

// Whether `out` is the number of positions of a window spanning `span` pixels, moved by `stride` over `in` pixels
// padded by `lo` and `hi` (both non-negative): the check every handler makes before it reads a buffer by it.
inline bool OutputFollows(int64_t in, int64_t lo, int64_t hi, int64_t span, int64_t stride, int64_t out) {
  const int64_t padded = in + lo + hi;
  return stride >= 1 && lo >= 0 && hi >= 0 && span >= 1 && padded >= span && out == (padded - span) / stride + 1;
}

// Whether an XLA buffer has exactly these dimensions.
template <typename Dims>
bool HasDims(const Dims& dims, std::initializer_list<int64_t> want) {
  if (dims.size() != want.size()) return false;
  size_t i = 0;
  for (int64_t d : want)
    if (dims[i++] != d) return false;
  return true;
}

// Whether two XLA buffers have the same dimensions.
template <typename Dims>
bool SameDims(const Dims& a, const Dims& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Runs one handler's work, one handler at a time: each already spreads over every core with OpenMP, and XLA
// may start two independent convolutions at once on its own threads (it does, in a ResNet-18 step), where two
// OpenMP teams would oversubscribe the cores and spin against each other. A failure becomes an FFI error,
// which jax raises in Python with the message: the process lives on.
inline xla::ffi::Error Run(const std::function<void()>& body) {
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  try {
    body();
  } catch (const dnnl::error& e) {
    return xla::ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::bad_alloc&) {
    return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted,
                           "resnet_jax oneDNN extension: out of memory for its work buffers (a smaller batch, or "
                           "conv_impl='jax', needs less)");
  } catch (const std::exception& e) {
    return xla::ffi::Error::Internal(std::string("resnet_jax oneDNN extension: ") + e.what());
  }
  return xla::ffi::Error::Success();
}

}  // namespace resnet_jax
