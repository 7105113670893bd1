// Bit-packed W1A1 / W1A{k} matrix products: the pieces shared by the instruction-set variants and the operator glue.
//
// Layouts (bit b of 64-bit word w of a row is column 64 * w + b; bits past the last column are 0):
//   sign activations (M, kw) words, kw = ceil(K / 64): bit = 1 where x - tau >= 0 (sign +1), 0 where sign -1;
//   k-bit codes      (M * k, kw) words: row m * k + b holds bit b of c = q - q_min, q the integer code of column;
//   weight panels    (ceil(N / 16), kw, 16) words: 16 weight rows interleaved word by word, so one vector load
//                    gives the same word of 16 output channels (rows past N are 0 and never stored).
// Sign activations a, sign weights w (bits A, W): a . w = K - 2 * popcount(A xor W).
// Codes q = q_min + sum_b 2^b c_b with bit planes c_b (bits C_b):
//   q . w = sum_b 2^b (2 * popcount(C_b and W) - popcount(C_b)) + q_min * (2 * popcount(W) - K).
// Convolutions (im2col over bits): row r of a product is one output position, its K = C * kh * kw columns tap by
// tap (tap t = i * kw + j of the kernel), each tap's C channels in its own ceil(C / 64) words (bits past C are 0,
// in the activations and in the weight panels). A tap that falls on the zero padding holds 0 bits, i.e. the code
// q_min (-1 for signs), where the reference convolution multiplies 0: the product adds, to each such row, the
// correction -q_min * sum over its padded taps of sum_c w[j][c][tap], one integer per output channel and padding
// pattern (row_pattern, pattern_dots), which makes the dot product the exact sum over the taps inside the input.
// Sign outputs (the output of a layer that the next layer only binarizes): (M, ceil(N / 64)) words in the sign
// activations' layout, bit j of row i = (low[j] <= dot[i][j] <= low[j] + width[j]) xor flip[j]; each 16-column
// panel writes its own 16-bit quarter of a word, so threads never share a store.
// Binary attention scores: per (batch, head), the sign bits of the query rows are the activation rows and those of
// the key rows the weight panels (keys as output channels), so score (i, j) = float(d - 2 * popcount(Q_i xor K_j)) *
// scale, the bits past head_dim 0 on both sides.
#pragma once

#include <cstdint>

namespace surge_xnor {

constexpr int64_t kPanelWidth = 16;  // output channels per weight panel
constexpr int64_t kRowBlock = 8;     // bit rows per micro-tile (a multiple of every plane count: 1, 2, 4, 8)

// y = float(dot) * (alpha[j] * input_scale) + bias[j] (alpha[0] when not per channel; input_scale and bias
// optional), each operation rounded to float32 on its own (no fused multiply-add): the reference path's order.
struct Epilogue {
  const float* alpha = nullptr;
  bool alpha_per_channel = false;
  const float* input_scale = nullptr;
  const float* bias = nullptr;
};

// 16-bit stores per row of sign outputs of n channels (whole 64-bit words).
constexpr int64_t sign_chunks_per_row(int64_t n) { return (n + 63) / 64 * 4; }

// bit = (low <= dot <= low + width) xor flip, per output channel (width read as unsigned: an empty interval has
// low > K, where dot - low wraps to a huge unsigned number).
struct SignEpilogue {
  const int32_t* low = nullptr;
  const int32_t* width = nullptr;
  const uint8_t* flip = nullptr;
};

struct GemmProblem {
  const uint64_t* a = nullptr;       // (rows, kw) activation bit rows: M sign rows, or M * planes code planes
  const uint64_t* panels = nullptr;  // (ceil(n / 16), kw, 16) weight panels
  int64_t rows = 0, n = 0, k = 0, kw = 0;
  int planes = 0;                        // 0: sign activations (XOR); else bits per code (AND, bit-serial)
  int32_t q_min = 0;                     // smallest code (planes > 0)
  const int32_t* plane_counts = nullptr;   // (rows) popcount of each code plane (planes > 0)
  const int32_t* weight_counts = nullptr;  // (n) popcount of each weight row (planes > 0)
  const int32_t* row_pattern = nullptr;   // (rows / max(planes, 1)) padding pattern of each output row, or null
  const int32_t* pattern_dots = nullptr;  // (patterns, n) added to the dot products of the rows of each pattern
  int32_t* out_int = nullptr;     // (rows / max(planes, 1), n) exact dot products, or
  float* out_float = nullptr;     // the same shape, scaled (see Epilogue), or
  uint16_t* out_signs = nullptr;  // (rows, ceil(n / 64) * 4) sign outputs (see SignEpilogue), 16 channels a store
  Epilogue epilogue;
  SignEpilogue sign_epilogue;
};

// What a uniform quantizer needs: q = clamp(round_half_even((x - tau) / step), q_min, q_max).
struct CodeSpec {
  float step = 1.0f;
  int32_t q_min = 0, q_max = 0;
  int planes = 1;
};

// One instruction-set variant: pack rows [row_begin, row_end) of x (m, k) float32, row-major, with an optional
// threshold (k), as sign bits or as code planes (also writing each plane's popcount); compute the micro-tiles
// [tile_begin, tile_end) of a product (tile t: row block t / num_panels, panel t % num_panels: a row block's outputs
// are written row by row while the weight panels, at most a few hundred KB, stay in cache).
// Both packers set nan_rows[i] = 1 where row i has a NaN in x - tau (the reference path's output row is then NaN).
struct Isa {
  const char* name;
  void (*pack_signs)(const float* x, const float* threshold, int64_t k, int64_t kw, uint64_t* bits,
                     uint8_t* nan_rows, int64_t row_begin, int64_t row_end);
  void (*pack_codes)(const float* x, const float* threshold, const CodeSpec& spec, int64_t k, int64_t kw,
                     uint64_t* planes, int32_t* plane_counts, uint8_t* nan_rows, int64_t row_begin,
                     int64_t row_end);
  void (*gemm_tiles)(const GemmProblem& problem, int64_t tile_begin, int64_t tile_end);
  // The sign bits of the input positions of contiguous NCHW images x (batch, channels, height, width) with an optional
  // threshold (channels), for image rows [row_begin, row_end) of the batch * height: position (image, h, w) is bit row
  // (image * height + h) * width + w of bits (its ceil(channels / 64) words), and nan_positions[that row] = 1 where a
  // channel of x - tau is NaN (the same bits as pack_signs of the transposed NHWC rows, without transposing x).
  void (*pack_planar_signs)(const float* x, const float* threshold, int64_t channels, int64_t height, int64_t width,
                            uint64_t* bits, uint8_t* nan_positions, int64_t row_begin, int64_t row_end);
  // sums[j * taps + t] = sum over the channels c of sign(w[j][c][tap t]) = 2 * popcount(the tap's channel_words
  // words) - channels, for the n weight rows of convolution panels (taps * channel_words words a row).
  void (*tap_sums)(const uint64_t* panels, int64_t n, int64_t taps, int64_t channel_words, int64_t channels,
                   int32_t* sums);
};

// nullptr where the variant was not compiled for this target (the CPU is checked separately, at run time).
const Isa* avx512_isa();
const Isa* avx2_isa();
const Isa* portable_isa();

}  // namespace surge_xnor
