// Poisoning of __shared__ memory at each block start. shared.ld gathers the
// function-local statics of namespace memdec_fast (GCC ignores section
// attributes on statics of templates, bug 70435) between two symbols.
#pragma once

extern "C" {
extern char __cudacpu_shared_begin[] __attribute__((weak));
extern char __cudacpu_shared_end[] __attribute__((weak));
}

namespace cudacpu {

// Bytes of __shared__ memory found; 0 when linked without shared.ld.
inline long SharedBytes() {
  if (__cudacpu_shared_begin == nullptr || __cudacpu_shared_end == nullptr) return 0;
  return __cudacpu_shared_end - __cudacpu_shared_begin;
}

// A different byte per block: 0xff reads as NaN, -1 and UINT_MAX, 0x7f as a
// huge finite float and a large positive int.
inline void PoisonShared(unsigned block) {
  static const unsigned char kBytes[] = {0xff, 0x7f, 0xa5};
  const char byte = static_cast<char>(kBytes[block % 3]);
  for (long i = 0; i < SharedBytes(); ++i) {
    char* p = __cudacpu_shared_begin + i;
#if defined(__SANITIZE_ADDRESS__)
    if (__asan_address_is_poisoned(p)) continue;  // ASan's redzones between the variables
#endif
    *p = byte;
  }
}

}  // namespace cudacpu
