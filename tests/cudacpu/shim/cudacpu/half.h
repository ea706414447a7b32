// __half and __nv_bfloat16 as 16-bit storage types with exact conversions to
// float: the kernels only read them.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;  // IEEE binary16 in GCC >= 12 on x86-64: the conversion is exact
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
