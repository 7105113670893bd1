// The scalar-word implementation, included by each translation unit that compiles it for one instruction set:
// define SURGE_XNOR_NS (a namespace name) and SURGE_XNOR_TARGET (a function attribute, possibly empty) first.
#include <algorithm>
#include <cmath>
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

[[maybe_unused]] SURGE_XNOR_TARGET static void pack_signs(const float* x, const float* threshold, int64_t k,
                                                          int64_t kw, uint64_t* bits, uint8_t* nan_rows,
                                                          int64_t row_begin, int64_t row_end) {
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* row = x + i * k;
    bool nan = false;
    for (int64_t w = 0; w < kw; ++w) {
      const int64_t base = w * 64;
      const int64_t count = std::min<int64_t>(64, k - base);
      uint64_t word = 0;
      for (int64_t b = 0; b < count; ++b) {
        const float u = threshold ? row[base + b] - threshold[base + b] : row[base + b];
        word |= static_cast<uint64_t>(u >= 0.0f) << b;
        nan |= u != u;
      }
      bits[i * kw + w] = word;
    }
    nan_rows[i] = nan;
  }
}

// See Isa::pack_planar_signs: image by image, each channel's floats of the image rows read in one run.
[[maybe_unused]] SURGE_XNOR_TARGET static void pack_planar_signs(const float* x, const float* threshold,
                                                                 int64_t channels, int64_t height, int64_t width,
                                                                 uint64_t* bits, uint8_t* nan_positions,
                                                                 int64_t row_begin, int64_t row_end) {
  const int64_t cw = (channels + 63) / 64, plane = height * width;
  for (int64_t row = row_begin; row < row_end;) {
    const int64_t image = row / height, h0 = row % height, rows = std::min(row_end - row, height - h0);
    const int64_t count = rows * width;  // the positions of this image's rows
    uint64_t* out = bits + row * width * cw;
    uint8_t* nan = nan_positions + row * width;
    std::fill_n(out, count * cw, uint64_t{0});
    std::fill_n(nan, count, uint8_t{0});
    for (int64_t c = 0; c < channels; ++c) {
      const float* line = x + (image * channels + c) * plane + h0 * width;
      const uint64_t bit = uint64_t{1} << (c % 64);
      uint64_t* words = out + c / 64;
      for (int64_t q = 0; q < count; ++q) {
        const float u = threshold ? line[q] - threshold[c] : line[q];
        words[q * cw] |= u >= 0.0f ? bit : 0;
        nan[q] |= u != u;
      }
    }
    row += rows;
  }
}

// See Isa::tap_sums: panel by panel, in memory order.
[[maybe_unused]] SURGE_XNOR_TARGET static void tap_sums(const uint64_t* panels, int64_t n, int64_t taps,
                                                        int64_t channel_words, int64_t channels, int32_t* sums) {
  const int64_t row_words = taps * channel_words;
  std::fill_n(sums, n * taps, -static_cast<int32_t>(channels));
  for (int64_t j0 = 0; j0 < n; j0 += kPanelWidth) {
    const uint64_t* panel = panels + j0 * row_words;
    const int64_t lanes = std::min<int64_t>(kPanelWidth, n - j0);
    for (int64_t word = 0; word < row_words; ++word) {
      int32_t* tap = sums + j0 * taps + word / channel_words;
      for (int64_t l = 0; l < lanes; ++l) tap[l * taps] += 2 * popcount64(panel[word * kPanelWidth + l]);
    }
  }
}

// The code planes of rows [row_begin, row_end): c = q - q_min, q = clamp(nearbyint((x - tau) / step), q_min, q_max)
// (round half to even, the default rounding mode, as torch.round), plane b of row i at bit row i * planes + b.
SURGE_XNOR_TARGET static void pack_codes(const float* x, const float* threshold, const CodeSpec& spec, int64_t k,
                                         int64_t kw, uint64_t* planes, int32_t* plane_counts, uint8_t* nan_rows,
                                         int64_t row_begin, int64_t row_end) {
  const float low = static_cast<float>(spec.q_min), high = static_cast<float>(spec.q_max);
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* row = x + i * k;
    bool nan = false;
    uint64_t* out = planes + i * spec.planes * kw;
    int32_t* counts = plane_counts + i * spec.planes;
    for (int b = 0; b < spec.planes; ++b) counts[b] = 0;
    for (int64_t w = 0; w < kw; ++w) {
      const int64_t base = w * 64;
      const int64_t count = std::min<int64_t>(64, k - base);
      uint64_t words[8] = {};
      for (int64_t j = 0; j < count; ++j) {
        const float u = threshold ? row[base + j] - threshold[base + j] : row[base + j];
        const float v = std::nearbyint(u / spec.step);
        nan |= v != v;
        const float q = v != v ? low : std::min(std::max(v, low), high);
        const auto code = static_cast<uint32_t>(static_cast<int32_t>(q) - spec.q_min);
        for (int b = 0; b < spec.planes; ++b) words[b] |= static_cast<uint64_t>((code >> b) & 1u) << j;
      }
      for (int b = 0; b < spec.planes; ++b) {
        out[b * kw + w] = words[b];
        counts[b] += popcount64(words[b]);
      }
    }
    nan_rows[i] = nan;
  }
}

// The sign outputs of channels [col0, col0 + cols) of one row (bit l for channel col0 + l; see SignEpilogue).
SURGE_XNOR_TARGET static inline uint16_t sign_chunk(const SignEpilogue& e, int64_t col0, int64_t cols,
                                                    const int32_t (&dots)[kPanelWidth]) {
  uint32_t chunk = 0;
  for (int64_t l = 0; l < cols; ++l) {
    const uint32_t offset = static_cast<uint32_t>(dots[l]) - static_cast<uint32_t>(e.low[col0 + l]);
    const uint32_t inside = offset <= static_cast<uint32_t>(e.width[col0 + l]);
    chunk |= (inside ^ e.flip[col0 + l]) << l;
  }
  return static_cast<uint16_t>(chunk);
}

// Adds the padding correction of output row `row` (a convolution's row_pattern, see xnor.h) to its dot products
// of channels [col0, col0 + cols).
SURGE_XNOR_TARGET static inline void add_pattern_dots(const GemmProblem& p, int64_t row, int64_t col0, int64_t cols,
                                                      int32_t (&dots)[kPanelWidth]) {
  if (!p.row_pattern) return;
  const int32_t* correction = p.pattern_dots + static_cast<int64_t>(p.row_pattern[row]) * p.n + col0;
  for (int64_t l = 0; l < cols; ++l) dots[l] += correction[l];
}

// Writes the outputs of bit rows [row0, row0 + MR) x the columns of `panel` from the popcounts of the tile.
template <int MR>
SURGE_XNOR_TARGET static void store_tile(const GemmProblem& p, int64_t row0, int64_t panel,
                                         const int32_t (&counts)[MR][kPanelWidth]) {
  const int64_t col0 = panel * kPanelWidth;
  const int64_t cols = std::min<int64_t>(kPanelWidth, p.n - col0);
  const int32_t k = static_cast<int32_t>(p.k);
  const int planes = p.planes > 0 ? p.planes : 1;
  const Epilogue& e = p.epilogue;
  float scale[kPanelWidth] = {}, bias[kPanelWidth] = {};
  if (p.out_float) {
    for (int64_t l = 0; l < cols; ++l) {
      scale[l] = e.alpha[e.alpha_per_channel ? col0 + l : 0];
      if (e.input_scale) scale[l] = scale[l] * *e.input_scale;
      if (e.bias) bias[l] = e.bias[col0 + l];
    }
  }
  for (int r = 0; r < MR; r += planes) {
    int32_t dots[kPanelWidth] = {};
    if (p.planes == 0) {
      for (int64_t l = 0; l < kPanelWidth; ++l) dots[l] = k - 2 * counts[r][l];
    } else {
      const int32_t* plane_counts = p.plane_counts + row0 + r;
      for (int64_t l = 0; l < cols; ++l) {
        int32_t dot = p.q_min * (2 * p.weight_counts[col0 + l] - k);
        for (int b = 0; b < planes; ++b) dot += (2 * counts[r + b][l] - plane_counts[b]) * (1 << b);
        dots[l] = dot;
      }
    }
    const int64_t out_row = (row0 + r) / planes;
    add_pattern_dots(p, out_row, col0, cols, dots);
    if (p.out_int) {
      std::copy(dots, dots + cols, p.out_int + out_row * p.n + col0);
      continue;
    }
    if (p.out_signs) {
      p.out_signs[out_row * sign_chunks_per_row(p.n) + panel] = sign_chunk(p.sign_epilogue, col0, cols, dots);
      continue;
    }
    float y[kPanelWidth];
    for (int64_t l = 0; l < kPanelWidth; ++l) y[l] = static_cast<float>(dots[l]) * scale[l];
    if (e.bias) {
      for (int64_t l = 0; l < kPanelWidth; ++l) y[l] = y[l] + bias[l];
    }
    std::copy(y, y + cols, p.out_float + out_row * p.n + col0);
  }
}

// AND (bit-serial codes) or XOR (signs) of an activation word with a weight word.
template <bool kAnd>
SURGE_XNOR_TARGET static inline uint64_t combine(uint64_t a, uint64_t w) {
  return kAnd ? (a & w) : (a ^ w);
}

template <int MR, bool kAnd>
struct ScalarTile {
  SURGE_XNOR_TARGET static void run(const GemmProblem& p, int64_t row0, int64_t panel) {
    const uint64_t* weights = p.panels + panel * p.kw * kPanelWidth;
    int32_t counts[MR][kPanelWidth] = {};
    for (int64_t t = 0; t < p.kw; ++t) {
      const uint64_t* w = weights + t * kPanelWidth;
      for (int r = 0; r < MR; ++r) {
        const uint64_t a = p.a[(row0 + r) * p.kw + t];
        for (int64_t l = 0; l < kPanelWidth; ++l) counts[r][l] += popcount64(combine<kAnd>(a, w[l]));
      }
    }
    store_tile<MR>(p, row0, panel, counts);
  }
};

// Runs `Tile<MR, kAnd>::run(p, row0, panel)` over tiles [tile_begin, tile_end), MR = the bit rows left in the block
// (a multiple of the plane count, which divides kRowBlock), kAnd for code planes.
template <template <int, bool> class Tile>
SURGE_XNOR_TARGET static void for_each_tile(const GemmProblem& p, int64_t tile_begin, int64_t tile_end) {
  const int64_t num_panels = (p.n + kPanelWidth - 1) / kPanelWidth;
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int64_t panel = t % num_panels;
    const int64_t row0 = (t / num_panels) * kRowBlock;
    const int64_t rows = std::min<int64_t>(kRowBlock, p.rows - row0);
#define SURGE_XNOR_TILE(R)                                                        \
  case R:                                                                         \
    p.planes ? Tile<R, true>::run(p, row0, panel) : Tile<R, false>::run(p, row0, panel); \
    break;
    switch (rows) {
      SURGE_XNOR_TILE(1)
      SURGE_XNOR_TILE(2)
      SURGE_XNOR_TILE(3)
      SURGE_XNOR_TILE(4)
      SURGE_XNOR_TILE(5)
      SURGE_XNOR_TILE(6)
      SURGE_XNOR_TILE(7)
      default:
        p.planes ? Tile<8, true>::run(p, row0, panel) : Tile<8, false>::run(p, row0, panel);
    }
#undef SURGE_XNOR_TILE
  }
}

[[maybe_unused]] SURGE_XNOR_TARGET static void gemm_tiles(const GemmProblem& p, int64_t tile_begin,
                                                          int64_t tile_end) {
  for_each_tile<ScalarTile>(p, tile_begin, tile_end);
}

}  // namespace SURGE_XNOR_NS
}  // namespace surge_xnor
