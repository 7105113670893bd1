// Bit-packed W1A1 matrix product: the pieces shared by the instruction-set variants and the operator glue.
//
// Layouts (bit b of 64-bit word w of a row is column 64 * w + b; bits past the last column are 0):
//   activation bits  (M, kw) words, kw = ceil(K / 64): bit = 1 where x - tau >= 0 (sign +1), 0 where sign -1;
//   weight panels    (ceil(N / 16), kw, 16) words: 16 weight rows interleaved word by word, so one vector load
//                    gives the same word of 16 output channels (rows past N are 0 and never stored).
// For +-1 vectors a and w of length K with bit patterns A and W: a . w = K - 2 * popcount(A xor W).
#pragma once

#include <cstdint>

namespace surge_xnor {

constexpr int64_t kPanelWidth = 16;  // output channels per weight panel
constexpr int64_t kRowBlock = 8;     // activation rows per micro-tile

// y = float(dot) * (alpha[j] * input_scale) + bias[j] (alpha[0] when not per channel; input_scale and bias
// optional), each operation rounded to float32 on its own (no fused multiply-add): the reference path's order.
struct Epilogue {
  const float* alpha = nullptr;
  bool alpha_per_channel = false;
  const float* input_scale = nullptr;
  const float* bias = nullptr;
};

struct GemmProblem {
  const uint64_t* a = nullptr;       // (m, kw) activation bits
  const uint64_t* panels = nullptr;  // (ceil(n / 16), kw, 16) weight panels
  int64_t m = 0, n = 0, k = 0, kw = 0;
  int32_t* out_int = nullptr;  // (m, n) exact dot products, or
  float* out_float = nullptr;  // (m, n) scaled outputs (see Epilogue)
  Epilogue epilogue;
};

// One instruction-set variant: pack rows [row_begin, row_end) of x (m, k) float32, row-major, with an optional
// threshold (k); compute the micro-tiles [tile_begin, tile_end) of a product (tile t: panel t / row_blocks, row block
// t % row_blocks).
struct Isa {
  const char* name;
  void (*pack_rows)(const float* x, const float* threshold, int64_t k, int64_t kw, uint64_t* bits, int64_t row_begin,
                    int64_t row_end);
  void (*gemm_tiles)(const GemmProblem& problem, int64_t tile_begin, int64_t tile_end);
};

// nullptr where the variant was not compiled for this target (the CPU is checked separately, at run time).
const Isa* avx512_isa();
const Isa* avx2_isa();
const Isa* portable_isa();

}  // namespace surge_xnor
