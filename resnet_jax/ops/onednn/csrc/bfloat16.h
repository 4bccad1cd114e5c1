// bfloat16 storage for the extension's own loops: a tensor element is `float` or `uint16_t` (bfloat16's bits),
// widened to float32 on load and rounded once on store, as XLA converts. Shared by every kernel that reads or
// writes bfloat16 tensors itself (BatchNorm's passes, Winograd's transforms) so that all round alike.
#pragma once

#include <cstdint>
#include <cstring>

namespace resnet_jax::bf16 {

inline uint32_t Bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return bits;
}
inline float FromBits(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return FromBits(uint32_t(p[i]) << 16); }
// bfloat16's upper 16 bits of a float32, rounded to nearest even; a NaN stays a (quiet) NaN. Branch-free, so the
// element loops around it vectorise (a branch here made the bfloat16 passes 4x slower).
inline uint32_t RoundedHigh(uint32_t bits) {
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7fffffffu) > 0x7f800000u ? ((bits >> 16) | 0x40u) : rounded;
}
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = uint16_t(RoundedHigh(Bits(v))); }
// v rounded to the storage type and back.
inline float RoundTo(float, float v) { return v; }
inline float RoundTo(uint16_t, float v) { return FromBits(RoundedHigh(Bits(v)) << 16); }

// Calls body(T{}) with T the storage type: uint16_t for a bfloat16 tensor, float for a float32 one.
template <typename Body>
void WithStorageType(bool bfloat16, Body body) {
  if (bfloat16)
    body(uint16_t{});
  else
    body(float{});
}

}  // namespace resnet_jax::bf16
