// The scalar-word implementation, included by each translation unit that compiles it for one instruction set:
// define SURGE_XNOR_NS (a namespace name) and SURGE_XNOR_TARGET (a function attribute, possibly empty) first.
#include <algorithm>
#include <cstdint>

#include "xnor.h"

namespace surge_xnor {
namespace SURGE_XNOR_NS {

SURGE_XNOR_TARGET static inline int popcount64(uint64_t word) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcountll(word);
#else
  word = word - ((word >> 1) & 0x5555555555555555ULL);
  word = (word & 0x3333333333333333ULL) + ((word >> 2) & 0x3333333333333333ULL);
  word = (word + (word >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return static_cast<int>((word * 0x0101010101010101ULL) >> 56);
#endif
}

[[maybe_unused]] SURGE_XNOR_TARGET static void pack_rows(const float* x, const float* threshold, int64_t k, int64_t kw, uint64_t* bits,
                                        int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* row = x + i * k;
    for (int64_t w = 0; w < kw; ++w) {
      const int64_t base = w * 64;
      const int64_t count = std::min<int64_t>(64, k - base);
      uint64_t word = 0;
      for (int64_t b = 0; b < count; ++b) {
        const float u = threshold ? row[base + b] - threshold[base + b] : row[base + b];
        word |= static_cast<uint64_t>(u >= 0.0f) << b;
      }
      bits[i * kw + w] = word;
    }
  }
}

// Writes rows [row0, row0 + MR) x columns of `panel` from the popcounts of the tile.
template <int MR>
SURGE_XNOR_TARGET static void store_tile(const GemmProblem& p, int64_t row0, int64_t panel,
                                         const int32_t (&counts)[MR][kPanelWidth]) {
  const int64_t col0 = panel * kPanelWidth;
  const int64_t cols = std::min<int64_t>(kPanelWidth, p.n - col0);
  const int32_t k = static_cast<int32_t>(p.k);
  const Epilogue& e = p.epilogue;
  for (int r = 0; r < MR; ++r) {
    int32_t dots[kPanelWidth];
    for (int64_t l = 0; l < kPanelWidth; ++l) dots[l] = k - 2 * counts[r][l];
    if (p.out_int) {
      int32_t* out = p.out_int + (row0 + r) * p.n + col0;
      for (int64_t l = 0; l < cols; ++l) out[l] = dots[l];
      continue;
    }
    float* out = p.out_float + (row0 + r) * p.n + col0;
    for (int64_t l = 0; l < cols; ++l) {
      float scale = e.alpha[e.alpha_per_channel ? col0 + l : 0];
      if (e.input_scale) scale = scale * *e.input_scale;
      out[l] = static_cast<float>(dots[l]) * scale;
    }
    if (e.bias) {
      for (int64_t l = 0; l < cols; ++l) out[l] = out[l] + e.bias[col0 + l];
    }
  }
}

template <int MR>
SURGE_XNOR_TARGET static void micro_tile(const GemmProblem& p, int64_t row0, int64_t panel) {
  const uint64_t* weights = p.panels + panel * p.kw * kPanelWidth;
  int32_t counts[MR][kPanelWidth] = {};
  for (int64_t t = 0; t < p.kw; ++t) {
    const uint64_t* w = weights + t * kPanelWidth;
    for (int r = 0; r < MR; ++r) {
      const uint64_t a = p.a[(row0 + r) * p.kw + t];
      for (int64_t l = 0; l < kPanelWidth; ++l) counts[r][l] += popcount64(a ^ w[l]);
    }
  }
  store_tile<MR>(p, row0, panel, counts);
}

// Runs `Tile<MR>::run(p, row0, panel)` over tiles [tile_begin, tile_end) with MR = the rows left in the block.
template <template <int> class Tile>
SURGE_XNOR_TARGET static void for_each_tile(const GemmProblem& p, int64_t tile_begin, int64_t tile_end) {
  const int64_t row_blocks = (p.m + kRowBlock - 1) / kRowBlock;
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t panel = t / row_blocks;
    const int64_t row0 = (t % row_blocks) * kRowBlock;
    switch (std::min<int64_t>(kRowBlock, p.m - row0)) {
      case 1: Tile<1>::run(p, row0, panel); break;
      case 2: Tile<2>::run(p, row0, panel); break;
      case 3: Tile<3>::run(p, row0, panel); break;
      case 4: Tile<4>::run(p, row0, panel); break;
      case 5: Tile<5>::run(p, row0, panel); break;
      case 6: Tile<6>::run(p, row0, panel); break;
      case 7: Tile<7>::run(p, row0, panel); break;
      default: Tile<8>::run(p, row0, panel); break;
    }
  }
}

template <int MR>
struct ScalarTile {
  SURGE_XNOR_TARGET static void run(const GemmProblem& p, int64_t row0, int64_t panel) { micro_tile<MR>(p, row0, panel); }
};

[[maybe_unused]] SURGE_XNOR_TARGET static void gemm_tiles(const GemmProblem& p, int64_t tile_begin, int64_t tile_end) {
  for_each_tile<ScalarTile>(p, tile_begin, tile_end);
}

}  // namespace SURGE_XNOR_NS
}  // namespace surge_xnor
