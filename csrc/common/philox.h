// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011), identical on
// the CPU and the GPU. A draw is a pure function of (seed, offset, row), so a
// row's number does not depend on how rows are scheduled.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace memdec_fast {

struct Philox4 {
  uint32_t x[4];
};

MDF_HD void MulHiLo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on counter (c0..c3) with a 64-bit key.
MDF_HD Philox4 Philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t key) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    MulHiLo(0xD2511F53u, c0, &hi0, &lo0);
    MulHiLo(0xCD9E8D57u, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A uniform number in [0, 1) with 24 random bits, for `row` of the call whose
// generator state is (seed, offset).
MDF_HD float RowUniform(uint64_t seed, uint64_t offset, uint64_t row) {
  const Philox4 r = Philox4x32(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                               static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32), seed);
  return static_cast<float>(r.x[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace memdec_fast
