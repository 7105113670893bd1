// Portable variant: plain C++, any CPU.
#define SURGE_XNOR_NS portable
#define SURGE_XNOR_TARGET
#include "xnor_generic.h"

namespace surge_xnor {

const Isa* portable_isa() {
  static const Isa isa{"portable", portable::pack_signs, portable::pack_codes, portable::gemm_tiles,
                        portable::pack_planar_signs, portable::tap_sums};
  return &isa;
}

}  // namespace surge_xnor
