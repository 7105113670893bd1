// AVX2 variant: the scalar-word kernel compiled for AVX2 with the POPCNT instruction (x86-64 only).
#include "xnor.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SURGE_XNOR_NS avx2
#define SURGE_XNOR_TARGET __attribute__((target("avx2,popcnt")))
#include "xnor_generic.h"

namespace surge_xnor {
const Isa* avx2_isa() {
  static const Isa isa{"avx2", avx2::pack_signs, avx2::pack_codes, avx2::gemm_tiles,
                        avx2::pack_planar_signs, avx2::tap_sums};
  return &isa;
}
}  // namespace surge_xnor
#else
namespace surge_xnor {
const Isa* avx2_isa() { return nullptr; }
}  // namespace surge_xnor
#endif
