// AVX-512 variant (x86-64 with AVX-512 F/BW/DQ/VL and VPOPCNTDQ): 8 bit rows x 16 output channels per micro-tile,
// 64-bit popcounts of XORed (signs) or ANDed (code planes) words in 512-bit vectors, signs compared 16 floats at a
// time (rows of x, or 16 positions of an NCHW channel plane), the outputs of sign products written 16 channels a
// vector; code planes are packed, and the outputs of code products written, by the scalar routines compiled for
// AVX-512.
#include "xnor.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <vector>

#define SURGE_XNOR_NS avx512
#define SURGE_XNOR_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq")))
#include "xnor_generic.h"

namespace surge_xnor {
namespace avx512 {

SURGE_XNOR_TARGET static void pack_signs_avx512(const float* x, const float* threshold, int64_t k, int64_t kw,
                                               uint64_t* bits, uint8_t* nan_rows, int64_t row_begin,
                                               int64_t row_end) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = row_begin; i < row_end; ++i) {
    const float* row = x + i * k;
    __mmask16 nan = 0;
    for (int64_t w = 0; w < kw; ++w) {
      uint64_t word = 0;
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t base = w * 64 + q * 16;
        if (base >= k) break;
        const int64_t count = std::min<int64_t>(16, k - base);
        const __mmask16 valid = count == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
        __m512 u = _mm512_maskz_loadu_ps(valid, row + base);
        if (threshold) u = _mm512_sub_ps(u, _mm512_maskz_loadu_ps(valid, threshold + base));
        const __mmask16 positive = _mm512_mask_cmp_ps_mask(valid, u, zero, _CMP_GE_OQ);
        nan |= _mm512_mask_cmp_ps_mask(valid, u, u, _CMP_UNORD_Q);
        word |= static_cast<uint64_t>(positive) << (q * 16);
      }
      bits[i * kw + w] = word;
    }
    nan_rows[i] = nan != 0;
  }
}

// See Isa::pack_planar_signs: image by image, each channel's floats of the image rows read in one run, 16 at a
// time, their signs ORed into the 64-bit words of 16 positions (one lane each).
SURGE_XNOR_TARGET static void pack_planar_signs_avx512(const float* x, const float* threshold, int64_t channels,
                                                      int64_t height, int64_t width, uint64_t* bits,
                                                      uint8_t* nan_positions, int64_t row_begin, int64_t row_end) {
  const int64_t cw = (channels + 63) / 64, plane = height * width;
  const __m512 zero = _mm512_setzero_ps();
  std::vector<uint64_t> words;
  std::vector<__mmask16> nan;
  for (int64_t row = row_begin; row < row_end;) {
    const int64_t image = row / height, h0 = row % height, rows = std::min(row_end - row, height - h0);
    const int64_t count = rows * width, blocks = (count + 15) / 16;  // the positions of this image's rows
    words.assign(blocks * 16, 0);
    nan.assign(blocks, 0);
    uint64_t* out = bits + row * width * cw;
    for (int64_t g = 0; g < cw; ++g) {
      if (g > 0) std::fill(words.begin(), words.end(), uint64_t{0});
      for (int64_t c = g * 64; c < std::min<int64_t>(channels, (g + 1) * 64); ++c) {
        const float* line = x + (image * channels + c) * plane + h0 * width;
        const __m512 tau = _mm512_set1_ps(threshold ? threshold[c] : 0.0f);
        const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t{1} << (c % 64)));
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t left = count - b * 16;
          const __mmask16 valid = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : (1u << left) - 1);
          __m512 u = _mm512_maskz_loadu_ps(valid, line + b * 16);
          if (threshold) u = _mm512_sub_ps(u, tau);
          const __mmask16 positive = _mm512_mask_cmp_ps_mask(valid, u, zero, _CMP_GE_OQ);
          nan[b] |= _mm512_mask_cmp_ps_mask(valid, u, u, _CMP_UNORD_Q);
          uint64_t* acc = words.data() + b * 16;
          const __m512i low = _mm512_maskz_mov_epi64(static_cast<__mmask8>(positive), bit);
          const __m512i high = _mm512_maskz_mov_epi64(static_cast<__mmask8>(positive >> 8), bit);
          _mm512_storeu_si512(acc, _mm512_or_si512(_mm512_loadu_si512(acc), low));
          _mm512_storeu_si512(acc + 8, _mm512_or_si512(_mm512_loadu_si512(acc + 8), high));
        }
      }
      for (int64_t q = 0; q < count; ++q) out[q * cw + g] = words[q];
    }
    for (int64_t q = 0; q < count; ++q) nan_positions[row * width + q] = (nan[q / 16] >> (q % 16)) & 1;
    row += rows;
  }
}

// The outputs of a sign (XOR) tile, 16 channels a vector, from the popcounts of channels 0-7 (`low`) and 8-15
// (`high`) of each row: the scalar store_tile's operations, in its order and rounding (mul, then add, no FMA).
template <int MR>
SURGE_XNOR_TARGET static void store_sign_tile(const GemmProblem& p, int64_t row0, int64_t panel,
                                              const __m512i (&low)[MR], const __m512i (&high)[MR]) {
  const int64_t col0 = panel * kPanelWidth;
  const int64_t cols = std::min<int64_t>(kPanelWidth, p.n - col0);
  const __mmask16 valid = static_cast<__mmask16>(cols == kPanelWidth ? 0xFFFFu : (1u << cols) - 1);
  const Epilogue& e = p.epilogue;
  const SignEpilogue& s = p.sign_epilogue;
  __m512 scale = _mm512_setzero_ps(), bias = _mm512_setzero_ps();
  __m512i bound = _mm512_setzero_si512(), width = _mm512_setzero_si512();
  __mmask16 flip = 0;
  if (p.out_float) {
    scale = e.alpha_per_channel ? _mm512_maskz_loadu_ps(valid, e.alpha + col0) : _mm512_set1_ps(e.alpha[0]);
    if (e.input_scale) scale = _mm512_mul_ps(scale, _mm512_set1_ps(*e.input_scale));
    if (e.bias) bias = _mm512_maskz_loadu_ps(valid, e.bias + col0);
  } else if (p.out_signs) {
    bound = _mm512_maskz_loadu_epi32(valid, s.low + col0);
    width = _mm512_maskz_loadu_epi32(valid, s.width + col0);
    const __m128i flips = _mm_maskz_loadu_epi8(valid, s.flip + col0);
    flip = _mm_test_epi8_mask(flips, flips);
  }
  const __m512i k = _mm512_set1_epi32(static_cast<int32_t>(p.k));
  for (int r = 0; r < MR; ++r) {
    const __m512i counts = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(low[r])),
                                              _mm512_cvtepi64_epi32(high[r]), 1);
    __m512i dots = _mm512_sub_epi32(k, _mm512_add_epi32(counts, counts));
    const int64_t row = row0 + r;
    if (p.row_pattern) {
      const int32_t* correction = p.pattern_dots + static_cast<int64_t>(p.row_pattern[row]) * p.n + col0;
      dots = _mm512_add_epi32(dots, _mm512_maskz_loadu_epi32(valid, correction));
    }
    if (p.out_int) {
      _mm512_mask_storeu_epi32(p.out_int + row * p.n + col0, valid, dots);
    } else if (p.out_float) {
      __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(dots), scale);
      if (e.bias) y = _mm512_add_ps(y, bias);
      _mm512_mask_storeu_ps(p.out_float + row * p.n + col0, valid, y);
    } else {
      const __mmask16 inside = _mm512_cmple_epu32_mask(_mm512_sub_epi32(dots, bound), width);
      p.out_signs[row * sign_chunks_per_row(p.n) + panel] = static_cast<uint16_t>((inside ^ flip) & valid);
    }
  }
}

template <int MR, bool kAnd>
struct VectorTile {
  SURGE_XNOR_TARGET static void run(const GemmProblem& p, int64_t row0, int64_t panel) {
    const uint64_t* weights = p.panels + panel * p.kw * kPanelWidth;
    const uint64_t* a = p.a + row0 * p.kw;
    __m512i low[MR], high[MR];
    for (int r = 0; r < MR; ++r) low[r] = high[r] = _mm512_setzero_si512();
    for (int64_t t = 0; t < p.kw; ++t) {
      const __m512i w0 = _mm512_loadu_si512(weights + t * kPanelWidth);
      const __m512i w1 = _mm512_loadu_si512(weights + t * kPanelWidth + 8);
      for (int r = 0; r < MR; ++r) {
        const __m512i word = _mm512_set1_epi64(static_cast<long long>(a[r * p.kw + t]));
        const __m512i b0 = kAnd ? _mm512_and_si512(word, w0) : _mm512_xor_si512(word, w0);
        const __m512i b1 = kAnd ? _mm512_and_si512(word, w1) : _mm512_xor_si512(word, w1);
        low[r] = _mm512_add_epi64(low[r], _mm512_popcnt_epi64(b0));
        high[r] = _mm512_add_epi64(high[r], _mm512_popcnt_epi64(b1));
      }
    }
    if (!kAnd) {
      store_sign_tile<MR>(p, row0, panel, low, high);
      return;
    }
    int32_t counts[MR][kPanelWidth];
    for (int r = 0; r < MR; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&counts[r][0]), _mm512_cvtepi64_epi32(low[r]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&counts[r][8]), _mm512_cvtepi64_epi32(high[r]));
    }
    store_tile<MR>(p, row0, panel, counts);
  }
};

SURGE_XNOR_TARGET static void gemm_tiles_avx512(const GemmProblem& p, int64_t tile_begin, int64_t tile_end) {
  for_each_tile<VectorTile>(p, tile_begin, tile_end);
}

}  // namespace avx512

const Isa* avx512_isa() {
  static const Isa isa{"avx512_vpopcntdq", avx512::pack_signs_avx512, avx512::pack_codes,
                        avx512::gemm_tiles_avx512, avx512::pack_planar_signs_avx512,
                        avx512::tap_sums};
  return &isa;
}

}  // namespace surge_xnor
#else
namespace surge_xnor {
const Isa* avx512_isa() { return nullptr; }
}  // namespace surge_xnor
#endif
