// PyTorch operators `torch.ops.surge_hf.*` over the bit-packed W1A1 kernels (see xnor.h for the layouts), with the
// instruction-set variant chosen at run time and the work split over torch's intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#if defined(__SSE__) || defined(_M_X64)
#include <xmmintrin.h>
#endif
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "xnor.h"

namespace surge_xnor {
namespace {

bool cpu_supports(const Isa* isa) {
  if (isa == nullptr) return false;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const std::string name = isa->name;
  if (name == "avx512_vpopcntdq") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vpopcntdq");
  }
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif
  return true;
}

std::vector<const Isa*> supported() {
  std::vector<const Isa*> out;
  for (const Isa* isa : {avx512_isa(), avx2_isa(), portable_isa()}) {
    if (cpu_supports(isa)) out.push_back(isa);
  }
  return out;
}

const Isa*& active() {
  static const Isa* isa = supported().front();
  return isa;
}

// Work below this many 64-bit XOR-popcounts per thread runs on one thread. On the 2-core AVX-512 machine of
// benchmarks/results/popcount_peak_cpu.json one fork and join of torch's two OpenMP threads takes 0.69 us at best
// (0.81 us median, the machine idle), the time of about 12,800 XOR-popcounts at 18.5 G/s: a thread gets at least
// 5x that, so the fork and join costs at most about a sixth of what a second thread saves.
constexpr int64_t kMinWorkPerThread = 1 << 16;

int64_t words_per_row(int64_t k) { return (k + 63) / 64; }

// The index of word t of row j in weight panels of kw words a row (see xnor.h).
int64_t panel_word(int64_t kw, int64_t j, int64_t t) {
  return ((j / kPanelWidth) * kw + t) * kPanelWidth + j % kPanelWidth;
}

// The threads a product of `work` XOR-popcounts gets: one per kMinWorkPerThread, at most torch's intra-op threads.
int threads_for(int64_t work) {
  if (at::in_parallel_region()) return 1;
  return static_cast<int>(std::clamp<int64_t>(work / kMinWorkPerThread, 1, at::get_num_threads()));
}

// Runs body(c) for every c in [0, chunks) on up to `threads` of torch's OpenMP threads, which take chunks one at a
// time from a shared counter: a thread that starts late (its core busy) leaves its share to the others instead of
// holding everyone up, as a fixed split would. One fork and one join per call.
template <typename F>
void parallel_chunks(int threads, int64_t chunks, const F& body) {
#ifdef _OPENMP
  if (threads > 1 && chunks > 1) {
    std::atomic<int64_t> next{0};
#pragma omp parallel
    if (omp_get_thread_num() < threads) {
      for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) body(c);
    }
    return;
  }
#endif
  for (int64_t c = 0; c < chunks; ++c) body(c);
}

const float* threshold_data(const c10::optional<at::Tensor>& threshold, int64_t k) {
  if (!threshold.has_value()) return nullptr;
  TORCH_CHECK(threshold->scalar_type() == at::kFloat && threshold->is_contiguous() && threshold->numel() == k,
              "surge_hf: the threshold must be a contiguous float32 tensor of ", k, " values, got ",
              threshold->scalar_type(), " of shape ", threshold->sizes());
  return threshold->data_ptr<float>();
}

void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "surge_hf: activations must be a contiguous 2-D float32 CPU tensor, got ", x.scalar_type(), " of shape ",
              x.sizes());
}

CodeSpec code_spec(double step, int64_t q_min, int64_t q_max) {
  const int64_t levels = q_max - q_min + 1;
  CodeSpec spec;
  spec.step = static_cast<float>(step);
  spec.q_min = static_cast<int32_t>(q_min);
  spec.q_max = static_cast<int32_t>(q_max);
  spec.planes = levels == 2 ? 1 : levels == 4 ? 2 : levels == 16 ? 4 : levels == 256 ? 8 : 0;
  TORCH_CHECK(spec.planes > 0 && q_min <= 0, "surge_hf: codes [", q_min, ", ", q_max,
              "] must span 2, 4, 16 or 256 levels from q_min <= 0");
  return spec;
}

// Float rows of x packed into a product's bit rows: sign bits of x - tau, or the code planes of `codes` (with each
// plane's popcount); nan_rows[i] = 1 where row i of x - tau holds a NaN.
struct RowPacking {
  const float* x = nullptr;
  const float* threshold = nullptr;
  int64_t k = 0;
  const CodeSpec* codes = nullptr;
  uint64_t* bits = nullptr;
  int32_t* plane_counts = nullptr;
  uint8_t* nan_rows = nullptr;

  void rows(const Isa* isa, int64_t begin, int64_t end) const {
    if (begin >= end) return;
    if (codes) {
      isa->pack_codes(x, threshold, *codes, k, words_per_row(k), bits, plane_counts, nan_rows, begin, end);
    } else {
      isa->pack_signs(x, threshold, k, words_per_row(k), bits, nan_rows, begin, end);
    }
  }
};

// Rows flagged in nan_rows give NaN float outputs, as the reference path's float product does.
void fill_nan_rows(const GemmProblem& p, const uint8_t* nan_rows, int64_t begin, int64_t end) {
  if (!p.out_float || !nan_rows) return;
  for (int64_t i = begin; i < end; ++i) {
    if (nan_rows[i]) std::fill(p.out_float + i * p.n, p.out_float + (i + 1) * p.n,
                               std::numeric_limits<float>::quiet_NaN());
  }
}

// One product: pack the output rows [begin, end) with pack(isa, begin, end) (a no-op where the bit rows are given),
// XOR/AND-popcount them with every weight panel, write the outputs, fill NaN rows, all in one parallel region. With
// enough rows each chunk is a block of kRowBlock bit rows, packed and multiplied by every panel by the thread that
// takes it (its bits stay in that core's cache); with few rows, they are packed first and the chunks are groups of
// panels.
template <typename Pack>
void run_packed_product(const GemmProblem& p, const Pack& pack, const uint8_t* nan_rows) {
  if (p.rows == 0) return;
  const Isa* isa = active();
  const int64_t planes = std::max(p.planes, 1);
  const int64_t row_blocks = (p.rows + kRowBlock - 1) / kRowBlock;
  const int64_t num_panels = (p.n + kPanelWidth - 1) / kPanelWidth;
  const int threads = threads_for(p.rows * p.kw * num_panels * kPanelWidth);
  if (row_blocks >= 2 * threads) {
    parallel_chunks(threads, row_blocks, [&](int64_t block) {
      const int64_t begin = block * kRowBlock / planes, end = std::min(p.rows, (block + 1) * kRowBlock) / planes;
      pack(isa, begin, end);
      isa->gemm_tiles(p, block * num_panels, (block + 1) * num_panels);
      fill_nan_rows(p, nan_rows, begin, end);
    });
    return;
  }
  pack(isa, 0, p.rows / planes);
  const int64_t group = std::max<int64_t>(1, num_panels / (4 * threads));  // about 4 chunks per thread
  parallel_chunks(threads, (num_panels + group - 1) / group, [&](int64_t chunk) {
    const int64_t first = chunk * group, last = std::min(num_panels, first + group);
    for (int64_t block = 0; block < row_blocks; ++block) {
      isa->gemm_tiles(p, block * num_panels + first, block * num_panels + last);
    }
  });
  fill_nan_rows(p, nan_rows, 0, p.rows / planes);
}

// A product whose bit rows are packed from float rows by `packing`, or given (packing null).
void run_product(const GemmProblem& p, const RowPacking* packing, const uint8_t* nan_rows) {
  run_packed_product(p, [packing](const Isa* isa, int64_t begin, int64_t end) {
    if (packing) packing->rows(isa, begin, end);
  }, nan_rows);
}

// Packs all rows of x (the standalone packing operators), in chunks of kRowBlock rows.
void pack_all_rows(const RowPacking& packing, int64_t m) {
  const Isa* isa = active();
  const int64_t planes = packing.codes ? packing.codes->planes : 1;
  parallel_chunks(threads_for(m * packing.k * planes / 64), (m + kRowBlock - 1) / kRowBlock, [&](int64_t block) {
    packing.rows(isa, block * kRowBlock, std::min(m, (block + 1) * kRowBlock));
  });
}

void check_panels(const at::Tensor& bits, const at::Tensor& panels, int64_t n, int64_t k) {
  TORCH_CHECK(k > 0 && n > 0, "surge_hf: k and n must be positive, got k=", k, ", n=", n);
  const int64_t kw = words_per_row(k);
  TORCH_CHECK(bits.dim() == 2 && bits.scalar_type() == at::kLong && bits.is_contiguous() && bits.size(1) == kw,
              "surge_hf: activation bits must be contiguous int64 of shape (rows, ", kw, "), got ", bits.sizes());
  const int64_t num_panels = (n + kPanelWidth - 1) / kPanelWidth;
  TORCH_CHECK(panels.scalar_type() == at::kLong && panels.is_contiguous() &&
                  panels.sizes() == at::IntArrayRef({num_panels, kw, kPanelWidth}),
              "surge_hf: weight panels must be contiguous int64 of shape (", num_panels, ", ", kw, ", ", kPanelWidth,
              "), got ", panels.sizes());
}

GemmProblem make_problem(const at::Tensor& bits, const at::Tensor& panels, int64_t n, int64_t k) {
  GemmProblem problem;
  problem.a = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  problem.panels = reinterpret_cast<const uint64_t*>(panels.data_ptr<int64_t>());
  problem.rows = bits.size(0);
  problem.n = n;
  problem.k = k;
  problem.kw = words_per_row(k);
  return problem;
}

// The sign bits of x - tau (to be filled by a RowPacking), which rows hold a NaN, and the packing that fills both.
struct SignRows {
  at::Tensor bits, nan_rows;
  RowPacking packing;
};

SignRows sign_rows(const at::Tensor& x, const c10::optional<at::Tensor>& threshold) {
  check_activations(x);
  const int64_t m = x.size(0), k = x.size(1);
  SignRows rows{at::empty({m, words_per_row(k)}, x.options().dtype(at::kLong)),
                at::empty({m}, x.options().dtype(at::kByte)), RowPacking{}};
  rows.packing.x = x.data_ptr<float>();
  rows.packing.threshold = threshold_data(threshold, k);
  rows.packing.k = k;
  rows.packing.bits = reinterpret_cast<uint64_t*>(rows.bits.data_ptr<int64_t>());
  rows.packing.nan_rows = rows.nan_rows.data_ptr<uint8_t>();
  return rows;
}

// The code planes of x, each plane's popcount, which rows hold a NaN, and the packing that fills them.
struct CodeRows {
  at::Tensor planes, plane_counts, nan_rows;
  RowPacking packing;
};

CodeRows code_rows(const at::Tensor& x, const c10::optional<at::Tensor>& threshold, const CodeSpec& spec) {
  check_activations(x);
  const int64_t m = x.size(0), k = x.size(1);
  CodeRows rows{at::empty({m * spec.planes, words_per_row(k)}, x.options().dtype(at::kLong)),
                at::empty({m * spec.planes}, x.options().dtype(at::kInt)), at::empty({m}, x.options().dtype(at::kByte)),
                RowPacking{}};
  rows.packing.x = x.data_ptr<float>();
  rows.packing.threshold = threshold_data(threshold, k);
  rows.packing.k = k;
  rows.packing.codes = &spec;
  rows.packing.bits = reinterpret_cast<uint64_t*>(rows.planes.data_ptr<int64_t>());
  rows.packing.plane_counts = rows.plane_counts.data_ptr<int32_t>();
  rows.packing.nan_rows = rows.nan_rows.data_ptr<uint8_t>();
  return rows;
}

// The bit-serial part of a code product: plane popcounts and weight-row popcounts.
void set_code_planes(GemmProblem& problem, const CodeSpec& spec, const at::Tensor& plane_counts,
                     const at::Tensor& weight_counts) {
  TORCH_CHECK(problem.rows % spec.planes == 0, "surge_hf: ", problem.rows, " bit rows are not whole codes of ",
              spec.planes, " planes");
  TORCH_CHECK(plane_counts.scalar_type() == at::kInt && plane_counts.is_contiguous() &&
                  plane_counts.numel() == problem.rows,
              "surge_hf: plane counts must be contiguous int32 of ", problem.rows, " values");
  TORCH_CHECK(weight_counts.scalar_type() == at::kInt && weight_counts.is_contiguous() &&
                  weight_counts.numel() == problem.n,
              "surge_hf: weight row counts must be contiguous int32 of ", problem.n, " values, got ",
              weight_counts.sizes());
  problem.planes = spec.planes;
  problem.q_min = spec.q_min;
  problem.plane_counts = plane_counts.data_ptr<int32_t>();
  problem.weight_counts = weight_counts.data_ptr<int32_t>();
}

const float* optional_float(const c10::optional<at::Tensor>& tensor, int64_t size, const char* what) {
  if (!tensor.has_value()) return nullptr;
  TORCH_CHECK(tensor->scalar_type() == at::kFloat && tensor->is_contiguous() && tensor->numel() == size,
              "surge_hf: ", what, " must be a contiguous float32 tensor of ", size, " values, got ",
              tensor->scalar_type(), " of shape ", tensor->sizes());
  return tensor->data_ptr<float>();
}

void set_epilogue(GemmProblem& problem, const at::Tensor& alpha, const float* input_scale,
                  const c10::optional<at::Tensor>& bias) {
  const int64_t n = problem.n;
  TORCH_CHECK(alpha.numel() == n || alpha.numel() == 1, "surge_hf: alpha must hold 1 or ", n, " values, got ",
              alpha.numel());
  problem.epilogue.alpha = optional_float(alpha, alpha.numel(), "alpha");
  problem.epilogue.alpha_per_channel = alpha.numel() == n && n > 1;
  problem.epilogue.input_scale = input_scale;
  problem.epilogue.bias = optional_float(bias, n, "the bias");
}

// -- binary convolutions (see xnor.h: im2col over bits, the padding correction) ------------------------------------

// The geometry of a convolution of an NCHW input: kernel, stride, zero padding (top, bottom, left, right), dilation,
// the output size, and the words of one tap (ceil(channels / 64)).
struct ConvShape {
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t kh = 0, kw = 0, sh = 0, sw = 0, pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0, dh = 0, dw = 0;
  int64_t out_h = 0, out_w = 0, channel_words = 0;

  int64_t taps() const { return kh * kw; }
  int64_t row_words() const { return taps() * channel_words; }
  int64_t positions() const { return out_h * out_w; }
  int64_t rows() const { return batch * positions(); }
  bool padded() const { return pad_top > 0 || pad_bottom > 0 || pad_left > 0 || pad_right > 0; }
  // The input row (column) that kernel row i (column j) reads at output row oh (column ow): padding outside
  // [0, height) ([0, width)).
  int64_t input_row(int64_t oh, int64_t i) const { return oh * sh - pad_top + i * dh; }
  int64_t input_col(int64_t ow, int64_t j) const { return ow * sw - pad_left + j * dw; }
};

ConvShape conv_shape(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "surge_hf: the input of a binary convolution must be a 4-D (batch, channels, height, width) float32 "
              "CPU tensor, got ", x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && dilation.size() == 2 && padding.size() == 4,
              "surge_hf: a binary convolution takes kernel_size, stride and dilation as 2 values (height, width) "
              "and padding as 4 (top, bottom, left, right), got ", kernel_size, ", ", stride, ", ", dilation, " and ",
              padding);
  ConvShape s;
  s.batch = x.size(0), s.channels = x.size(1), s.height = x.size(2), s.width = x.size(3);
  s.kh = kernel_size[0], s.kw = kernel_size[1], s.sh = stride[0], s.sw = stride[1], s.dh = dilation[0],
  s.dw = dilation[1];
  s.pad_top = padding[0], s.pad_bottom = padding[1], s.pad_left = padding[2], s.pad_right = padding[3];
  TORCH_CHECK(s.kh > 0 && s.kw > 0 && s.sh > 0 && s.sw > 0 && s.dh > 0 && s.dw > 0 && s.pad_top >= 0 &&
                  s.pad_bottom >= 0 && s.pad_left >= 0 && s.pad_right >= 0,
              "surge_hf: kernel_size, stride and dilation must be positive and padding non-negative, got ",
              "kernel_size=", kernel_size, ", stride=", stride, ", padding=", padding, ", dilation=", dilation);
  TORCH_CHECK(s.channels > 0, "surge_hf: the input of a binary convolution has no channels (shape ", x.sizes(), ")");
  const int64_t span_h = s.dh * (s.kh - 1) + 1, span_w = s.dw * (s.kw - 1) + 1;
  const int64_t padded_h = s.height + s.pad_top + s.pad_bottom, padded_w = s.width + s.pad_left + s.pad_right;
  TORCH_CHECK(padded_h >= span_h && padded_w >= span_w, "surge_hf: the padded input (", padded_h, " x ", padded_w,
              ") is smaller than the dilated kernel (", span_h, " x ", span_w, ")");
  s.out_h = (padded_h - span_h) / s.sh + 1;
  s.out_w = (padded_w - span_w) / s.sw + 1;
  s.channel_words = words_per_row(s.channels);
  return s;
}

// Output rows alike in which of their taps fall on the padding share a pattern: a class of output rows oh (by the
// kernel rows inside the input) times a class of output columns ow (by the kernel columns inside it).
struct PaddingPatterns {
  std::vector<int32_t> row_class, col_class;                   // (out_h), (out_w)
  std::vector<std::vector<uint8_t>> rows_inside, cols_inside;  // per class, 1 for each kernel row (column) inside
  std::vector<int32_t> dots;  // (patterns, n): -q_min * sum over the pattern's padded taps of sum_c w[j][c][tap]

  int32_t pattern(int64_t oh, int64_t ow) const {
    return row_class[oh] * static_cast<int32_t>(cols_inside.size()) + col_class[ow];
  }
};

// The class of each of `outputs` output rows (or columns): which of its `taps` kernel rows land inside [0, size).
template <typename InputIndex>
void classify(int64_t outputs, int64_t taps, int64_t size, const InputIndex& input_index,
              std::vector<int32_t>& classes, std::vector<std::vector<uint8_t>>& inside) {
  std::map<std::vector<uint8_t>, int32_t> ids;
  classes.resize(outputs);
  for (int64_t o = 0; o < outputs; ++o) {
    std::vector<uint8_t> mask(taps);
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t index = input_index(o, t);
      mask[t] = index >= 0 && index < size;
    }
    const auto found = ids.emplace(mask, static_cast<int32_t>(inside.size()));
    if (found.second) inside.push_back(mask);
    classes[o] = found.first->second;
  }
}

// The padding patterns of a convolution and their corrections, from the weight panels: a padded tap holds the code
// q_min (bits 0) where the reference multiplies 0, so each of its weights w adds q_min * w too many.
PaddingPatterns padding_patterns(const ConvShape& s, const uint64_t* panels, int64_t n, int32_t q_min) {
  PaddingPatterns patterns;
  classify(s.out_h, s.kh, s.height, [&s](int64_t oh, int64_t i) { return s.input_row(oh, i); },
           patterns.row_class, patterns.rows_inside);
  classify(s.out_w, s.kw, s.width, [&s](int64_t ow, int64_t j) { return s.input_col(ow, j); },
           patterns.col_class, patterns.cols_inside);
  const int64_t taps = s.taps(), cw = s.channel_words;
  std::vector<int32_t> tap_sums(n * taps);  // sum_c w[j][c][tap]
  active()->tap_sums(panels, n, taps, cw, s.channels, tap_sums.data());
  const int64_t row_classes = patterns.rows_inside.size(), col_classes = patterns.cols_inside.size();
  patterns.dots.assign(row_classes * col_classes * n, 0);
  std::vector<int64_t> padded;  // the taps of a pattern that fall on the padding
  for (int64_t rc = 0; rc < row_classes; ++rc) {
    for (int64_t cc = 0; cc < col_classes; ++cc) {
      padded.clear();
      for (int64_t tap = 0; tap < taps; ++tap) {
        if (!patterns.rows_inside[rc][tap / s.kw] || !patterns.cols_inside[cc][tap % s.kw]) padded.push_back(tap);
      }
      int32_t* dots = patterns.dots.data() + (rc * col_classes + cc) * n;
      for (int64_t j = 0; !padded.empty() && j < n; ++j) {
        int32_t sum = 0;
        for (const int64_t tap : padded) sum += tap_sums[j * taps + tap];
        dots[j] = -q_min * sum;
      }
    }
  }
  return patterns;
}

// Copies (or zeroes) `count` words; the short runs of a few taps without a call to memcpy (memset).
inline void copy_words(const uint64_t* src, int64_t count, uint64_t* dst) {
  if (count > 4) {
    std::memcpy(dst, src, count * sizeof(uint64_t));
    return;
  }
  for (int64_t w = 0; w < 4; ++w) {
    if (w < count) dst[w] = src[w];
  }
}

inline void zero_words(uint64_t* dst, int64_t count) {
  if (count > 4) {
    std::memset(dst, 0, count * sizeof(uint64_t));
    return;
  }
  for (int64_t w = 0; w < 4; ++w) {
    if (w < count) dst[w] = 0;
  }
}

// The rows of a convolution's product gathered from the packed input positions (im2col over bits): row r (image
// r / positions, output position r % positions) holds, tap by tap, the words of the input position the tap reads,
// or 0 words where it reads the padding; also each row's plane popcounts (codes), NaN flag and padding pattern.
struct ConvRows {
  const ConvShape* shape = nullptr;
  int planes = 1;                         // bit planes per code (1: signs)
  const uint64_t* pixels = nullptr;       // (batch * height * width * planes, channel_words) packed input positions
  const int32_t* pixel_counts = nullptr;  // (batch * height * width * planes) popcount of each plane (codes), or null
  const uint8_t* pixel_nan = nullptr;     // (batch * height * width) 1 where the position holds a NaN
  const PaddingPatterns* patterns = nullptr;  // null: no correction
  uint64_t* bits = nullptr;               // (rows * planes, row_words)
  int32_t* plane_counts = nullptr;        // (rows * planes), codes only
  uint8_t* nan_rows = nullptr;            // (rows)
  int32_t* row_pattern = nullptr;         // (rows), with patterns only

  void rows(int64_t begin, int64_t end) const {
    const ConvShape& s = *shape;
    const int64_t cw = s.channel_words, row_words = s.row_words();
    for (int64_t r = begin; r < end; ++r) {
      const int64_t image = r / s.positions(), oh = r % s.positions() / s.out_w, ow = r % s.out_w;
      // the kernel columns [j0, j1) that read inside the input
      const int64_t iw0 = s.input_col(ow, 0);
      const int64_t j0 = iw0 >= 0 ? 0 : (-iw0 + s.dw - 1) / s.dw;
      const int64_t j1 = iw0 >= s.width ? 0 : std::min(s.kw, (s.width - 1 - iw0) / s.dw + 1);
      uint64_t* out = bits + r * planes * row_words;
      int32_t counts[8] = {};
      bool nan = false;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t ih = s.input_row(oh, i);
        const bool inside = ih >= 0 && ih < s.height && j0 < j1;
        for (int b = 0; b < planes; ++b) {
          uint64_t* taps = out + b * row_words + i * s.kw * cw;
          if (!inside) {
            zero_words(taps, s.kw * cw);
            continue;
          }
          zero_words(taps, j0 * cw);
          zero_words(taps + j1 * cw, (s.kw - j1) * cw);
        }
        if (!inside) continue;
        const int64_t first = (image * s.height + ih) * s.width + iw0 + j0 * s.dw;  // the position tap j0 reads
        uint64_t* taps = out + (i * s.kw + j0) * cw;
        if (planes == 1 && s.dw == 1) {  // the taps' positions are adjacent: one run of words
          copy_words(pixels + first * cw, (j1 - j0) * cw, taps);
        } else {
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t pixel = first + (j - j0) * s.dw;
            for (int b = 0; b < planes; ++b) {
              copy_words(pixels + (pixel * planes + b) * cw, cw, taps + b * row_words + (j - j0) * cw);
            }
          }
        }
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t pixel = first + (j - j0) * s.dw;
          nan |= pixel_nan[pixel] != 0;
          if (pixel_counts) {
            for (int b = 0; b < planes; ++b) counts[b] += pixel_counts[pixel * planes + b];
          }
        }
      }
      if (plane_counts) std::copy_n(counts, planes, plane_counts + r * planes);
      nan_rows[r] = nan;
      if (row_pattern) row_pattern[r] = patterns->pattern(oh, ow);
    }
  }
};

// The sign bits or code planes of every input position (image, h, w) of a convolution's input, at bit row
// (image * height + h) * width + w (code planes: planes rows per position), with their popcounts (codes) and NaN
// flags: signs of a contiguous NCHW input packed from its planes, anything else from its NHWC rows.
struct PackedPositions {
  at::Tensor bits, counts, nan;
};

PackedPositions pack_positions(const at::Tensor& x, const ConvShape& s, const c10::optional<at::Tensor>& threshold,
                               const CodeSpec* codes) {
  PackedPositions packed;
  if (!codes && x.is_contiguous()) {
    const float* tau = threshold_data(threshold, s.channels);
    const int64_t image_rows = s.batch * s.height;
    packed.bits = at::empty({image_rows * s.width, s.channel_words}, x.options().dtype(at::kLong));
    packed.nan = at::empty({image_rows * s.width}, x.options().dtype(at::kByte));
    const Isa* isa = active();
    const float* data = x.data_ptr<float>();
    auto* bits = reinterpret_cast<uint64_t*>(packed.bits.data_ptr<int64_t>());
    uint8_t* nan = packed.nan.data_ptr<uint8_t>();
    // about the work of one XOR-popcount a float (measured: 6.7 G floats/s packed, 11.6 G XOR-popcounts/s)
    parallel_chunks(threads_for(x.numel()), (image_rows + kRowBlock - 1) / kRowBlock, [&](int64_t block) {
      isa->pack_planar_signs(data, tau, s.channels, s.height, s.width, bits, nan, block * kRowBlock,
                             std::min(image_rows, (block + 1) * kRowBlock));
    });
    return packed;
  }
  const at::Tensor rows = x.permute({0, 2, 3, 1}).contiguous().reshape({-1, s.channels});
  if (codes) {
    CodeRows code = code_rows(rows, threshold, *codes);
    pack_all_rows(code.packing, rows.size(0));
    packed.bits = code.planes, packed.counts = code.plane_counts, packed.nan = code.nan_rows;
  } else {
    SignRows sign = sign_rows(rows, threshold);
    pack_all_rows(sign.packing, rows.size(0));
    packed.bits = sign.bits, packed.nan = sign.nan_rows;
  }
  return packed;
}

// Output rows per chunk of a channel-major (NCHW) convolution product.
constexpr int64_t kConvChunkRows = 64;

// Rows [begin, end) of a convolution's row-major outputs (scratch, (end - begin, n)) stored into the NCHW output
// `out` (`positions` output positions per image): each channel's outputs of an image a contiguous run.
void store_channel_major(const float* scratch, int64_t begin, int64_t end, int64_t n, int64_t positions, float* out) {
  for (int64_t r = begin; r < end;) {
    const int64_t image = r / positions, position = r % positions;
    const int64_t run = std::min(positions - position, end - r);
    const float* rows = scratch + (r - begin) * n;
    float* channels = out + image * n * positions + position;
    int64_t j = 0;
#if defined(__SSE__) || defined(_M_X64)
    for (; j + 4 <= n; j += 4) {  // 4 x 4 blocks, transposed in registers
      float* o = channels + j * positions;
      int64_t q = 0;
      for (; q + 4 <= run; q += 4) {
        __m128 r0 = _mm_loadu_ps(rows + q * n + j), r1 = _mm_loadu_ps(rows + (q + 1) * n + j);
        __m128 r2 = _mm_loadu_ps(rows + (q + 2) * n + j), r3 = _mm_loadu_ps(rows + (q + 3) * n + j);
        _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
        _mm_storeu_ps(o + q, r0);
        _mm_storeu_ps(o + positions + q, r1);
        _mm_storeu_ps(o + 2 * positions + q, r2);
        _mm_storeu_ps(o + 3 * positions + q, r3);
      }
      for (; q < run; ++q) {
        for (int64_t l = 0; l < 4; ++l) o[l * positions + q] = rows[q * n + j + l];
      }
    }
#endif
    for (; j < n; ++j) {
      for (int64_t q = 0; q < run; ++q) channels[j * positions + q] = rows[q * n + j];
    }
    r += run;
  }
}

// A convolution's product written NCHW: each chunk of kConvChunkRows output rows is packed, multiplied into a
// per-thread row-major scratch, its NaN rows filled, and stored channel by channel (stores straight from each
// 8-row tile would scatter over every channel's plane, several times slower); with fewer than two chunks per thread,
// the whole product goes into one scratch, its panels split over the threads.
template <typename Pack>
void run_channel_major_product(const GemmProblem& p, const Pack& pack, const uint8_t* nan_rows, float* out,
                               int64_t positions) {
  const int64_t planes = std::max(p.planes, 1), m = p.rows / planes;
  if (m == 0) return;
  const int64_t num_panels = (p.n + kPanelWidth - 1) / kPanelWidth;
  const int threads = threads_for(p.rows * p.kw * num_panels * kPanelWidth);
  const int64_t chunks = (m + kConvChunkRows - 1) / kConvChunkRows;
  if (chunks < 2 * threads) {
    std::vector<float> scratch(m * p.n);
    GemmProblem whole = p;
    whole.out_float = scratch.data();
    run_packed_product(whole, pack, nan_rows);
    store_channel_major(scratch.data(), 0, m, p.n, positions, out);
    return;
  }
  const Isa* isa = active();
  parallel_chunks(threads, chunks, [&](int64_t chunk) {
    const int64_t begin = chunk * kConvChunkRows, end = std::min(m, begin + kConvChunkRows);
    pack(isa, begin, end);
    thread_local std::vector<float> scratch;
    scratch.resize((end - begin) * p.n);
    GemmProblem part = p;
    part.a = p.a + begin * planes * p.kw;
    part.rows = (end - begin) * planes;
    if (p.plane_counts) part.plane_counts = p.plane_counts + begin * planes;
    if (p.row_pattern) part.row_pattern = p.row_pattern + begin;
    part.out_float = scratch.data();
    isa->gemm_tiles(part, 0, (part.rows + kRowBlock - 1) / kRowBlock * num_panels);
    fill_nan_rows(part, nan_rows + begin, 0, end - begin);
    store_channel_major(scratch.data(), begin, end, p.n, positions, out);
  });
}

// A binary convolution: the input positions packed once (sign bits of x - tau, or the code planes of `codes`), then
// gathered into the product's rows by the thread that multiplies them, the padding corrected, the outputs scaled
// (alpha * input_scale, then the bias) and written NCHW, or NHWC (channels_last) for a channels_last input.
at::Tensor conv_product(const at::Tensor& x, const ConvShape& s, const c10::optional<at::Tensor>& threshold,
                        const CodeSpec* codes, const at::Tensor& panels, const at::Tensor* weight_counts, int64_t n,
                        const at::Tensor& alpha, const float* input_scale, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(n > 0, "surge_hf: a binary convolution needs n > 0 output channels, got ", n);
  const int64_t num_panels = (n + kPanelWidth - 1) / kPanelWidth;
  TORCH_CHECK(panels.scalar_type() == at::kLong && panels.is_contiguous() &&
                  panels.sizes() == at::IntArrayRef({num_panels, s.row_words(), kPanelWidth}),
              "surge_hf: the weight panels of a convolution with ", n, " output channels, ", s.channels,
              " input channels and a ", s.kh, "x", s.kw, " kernel must be contiguous int64 of shape (", num_panels,
              ", ", s.row_words(), ", ", kPanelWidth, "), got ", panels.scalar_type(), " of shape ", panels.sizes(),
              ": build them with surge_hf.kernels.pack_conv_weight_panels");
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const PackedPositions positions = pack_positions(x, s, threshold, codes);
  const int planes = codes ? codes->planes : 1;
  ConvRows gather;
  gather.shape = &s;
  gather.planes = planes;
  gather.pixels = reinterpret_cast<const uint64_t*>(positions.bits.data_ptr<int64_t>());
  if (codes) gather.pixel_counts = positions.counts.data_ptr<int32_t>();
  gather.pixel_nan = positions.nan.data_ptr<uint8_t>();

  const int64_t m = s.rows();
  const at::Tensor bits = at::empty({m * planes, s.row_words()}, x.options().dtype(at::kLong));
  const at::Tensor nan_rows = at::empty({m}, x.options().dtype(at::kByte));
  at::Tensor out = at::empty({s.batch, n, s.out_h, s.out_w},
                             x.options().dtype(at::kFloat).memory_format(
                                 channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  GemmProblem problem;
  problem.a = reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>());
  problem.panels = reinterpret_cast<const uint64_t*>(panels.data_ptr<int64_t>());
  problem.rows = m * planes;
  problem.n = n;
  problem.k = s.channels * s.taps();
  problem.kw = s.row_words();
  at::Tensor plane_counts;
  if (codes) {
    plane_counts = at::empty({m * planes}, x.options().dtype(at::kInt));
    set_code_planes(problem, *codes, plane_counts, *weight_counts);
    gather.plane_counts = plane_counts.data_ptr<int32_t>();
  }
  const int32_t q_min = codes ? codes->q_min : -1;  // the code of a padded tap: bits 0 (sign -1)
  PaddingPatterns patterns;
  std::vector<int32_t> row_pattern;
  if (s.padded() && q_min != 0) {
    patterns = padding_patterns(s, problem.panels, n, q_min);
    row_pattern.resize(m);
    gather.patterns = &patterns;
    gather.row_pattern = row_pattern.data();
    problem.row_pattern = row_pattern.data();
    problem.pattern_dots = patterns.dots.data();
  }
  gather.bits = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  gather.nan_rows = nan_rows.data_ptr<uint8_t>();
  set_epilogue(problem, alpha, input_scale, bias);
  const auto pack = [&gather](const Isa*, int64_t begin, int64_t end) { gather.rows(begin, end); };
  if (channels_last) {
    problem.out_float = out.data_ptr<float>();
    run_packed_product(problem, pack, gather.nan_rows);
  } else {
    run_channel_major_product(problem, pack, gather.nan_rows, out.data_ptr<float>(), s.positions());
  }
  return out;
}

// -- binary attention scores (see xnor.h): per head, float(sign(Q) sign(K)^T) * scale ---------------------------

// The sign bits of `rows` rows of k floats that start `stride` floats apart (the rows of one head of a transposed
// (batch, tokens, heads, head_dim) view are heads * head_dim apart), into (rows, ceil(k / 64)) words and NaN flags:
// one packing call where the rows are adjacent, one per row otherwise.
void pack_strided_rows(const Isa* isa, const float* x, int64_t stride, int64_t rows, int64_t k, uint64_t* bits,
                       uint8_t* nan_rows) {
  const int64_t kw = words_per_row(k);
  if (stride == k) {
    isa->pack_signs(x, nullptr, k, kw, bits, nan_rows, 0, rows);
    return;
  }
  for (int64_t i = 0; i < rows; ++i) {
    isa->pack_signs(x + i * stride, nullptr, k, kw, bits + i * kw, nan_rows + i, 0, 1);
  }
}

// Bit rows (n, kw) laid out as weight panels (ceil(n / 16), kw, 16), the lanes past row n zero.
void rows_to_panels(const uint64_t* rows, int64_t n, int64_t kw, uint64_t* panels) {
  std::fill_n(panels, (n + kPanelWidth - 1) / kPanelWidth * kw * kPanelWidth, uint64_t{0});
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t t = 0; t < kw; ++t) panels[panel_word(kw, j, t)] = rows[j * kw + t];
  }
}

// Columns flagged in nan_columns (keys holding a NaN) of a (rows, n) float output become NaN, as in the reference
// product.
void fill_nan_columns(float* out, int64_t rows, int64_t n, const uint8_t* nan_columns) {
  for (int64_t j = 0; j < n; ++j) {
    if (!nan_columns[j]) continue;
    for (int64_t i = 0; i < rows; ++i) out[i * n + j] = std::numeric_limits<float>::quiet_NaN();
  }
}

// The float32 rows of a (batch, heads, tokens, head_dim) tensor, each row's head_dim floats adjacent (a copy where
// they are not).
at::Tensor head_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "surge_hf: the ", what,
              " must be a 4-D (batch, heads, tokens, head_dim) float32 CPU tensor, got ", x.scalar_type(),
              " of shape ", x.sizes());
  return x.stride(3) == 1 ? x : x.contiguous();
}

}  // namespace

at::Tensor pack_weight_panels(const at::Tensor& packed, int64_t k) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.device().is_cpu(),
              "surge_hf: packed signs must be a 2-D uint8 CPU tensor, got ", packed.scalar_type(), " of shape ",
              packed.sizes());
  const int64_t row_bytes = (k + 7) / 8;
  TORCH_CHECK(k > 0 && packed.size(1) == row_bytes, "surge_hf: packed signs of shape ", packed.sizes(),
              " do not hold ", k, " columns (", row_bytes, " bytes per row)");
  const at::Tensor rows = packed.contiguous();
  const int64_t n = rows.size(0), kw = words_per_row(k), num_panels = (n + kPanelWidth - 1) / kPanelWidth;
  at::Tensor panels = at::zeros({num_panels, kw, kPanelWidth}, packed.options().dtype(at::kLong));
  const uint8_t* src = rows.data_ptr<uint8_t>();
  auto* dst = reinterpret_cast<uint64_t*>(panels.data_ptr<int64_t>());
  const uint64_t last_word_mask = k % 64 == 0 ? ~0ULL : (1ULL << (k % 64)) - 1;
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t t = 0; t < kw; ++t) {
      uint64_t word = 0;
      for (int64_t b = 0; b < 8 && t * 8 + b < row_bytes; ++b) {
        word |= static_cast<uint64_t>(src[j * row_bytes + t * 8 + b]) << (8 * b);
      }
      if (t == kw - 1) word &= last_word_mask;  // bits past column k never count
      dst[panel_word(kw, j, t)] = word;
    }
  }
  return panels;
}

at::Tensor weight_row_counts(const at::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.device().is_cpu(),
              "surge_hf: packed signs must be a 2-D uint8 CPU tensor, got ", packed.scalar_type(), " of shape ",
              packed.sizes());
  const at::Tensor rows = packed.contiguous();
  at::Tensor counts = at::zeros({rows.size(0)}, packed.options().dtype(at::kInt));
  const uint8_t* src = rows.data_ptr<uint8_t>();
  int32_t* dst = counts.data_ptr<int32_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) dst[i / rows.size(1)] += __builtin_popcount(src[i]);
  return counts;
}

at::Tensor pack_activation_bits(const at::Tensor& x, const c10::optional<at::Tensor>& threshold) {
  SignRows rows = sign_rows(x, threshold);
  pack_all_rows(rows.packing, x.size(0));
  return rows.bits;
}

std::tuple<at::Tensor, at::Tensor> pack_activation_codes(const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& threshold, double step,
                                                         int64_t q_min, int64_t q_max) {
  const CodeSpec spec = code_spec(step, q_min, q_max);
  CodeRows rows = code_rows(x, threshold, spec);
  pack_all_rows(rows.packing, x.size(0));
  return {rows.planes, rows.plane_counts};
}

at::Tensor xnor_gemm(const at::Tensor& bits, const at::Tensor& panels, int64_t n, int64_t k) {
  check_panels(bits, panels, n, k);
  at::Tensor out = at::empty({bits.size(0), n}, bits.options().dtype(at::kInt));
  GemmProblem problem = make_problem(bits, panels, n, k);
  problem.out_int = out.data_ptr<int32_t>();
  run_product(problem, nullptr, nullptr);
  return out;
}

at::Tensor code_gemm(const at::Tensor& planes, const at::Tensor& plane_counts, const at::Tensor& panels,
                     const at::Tensor& weight_counts, int64_t n, int64_t k, int64_t q_min, int64_t q_max) {
  const CodeSpec spec = code_spec(1.0, q_min, q_max);
  check_panels(planes, panels, n, k);
  GemmProblem problem = make_problem(planes, panels, n, k);
  set_code_planes(problem, spec, plane_counts, weight_counts);
  at::Tensor out = at::empty({planes.size(0) / spec.planes, n}, planes.options().dtype(at::kInt));
  problem.out_int = out.data_ptr<int32_t>();
  run_product(problem, nullptr, nullptr);
  return out;
}

// float(dot) * (alpha * s) + b of sign bit rows: packed here from x (packing), or given with their NaN rows.
at::Tensor scaled_sign_product(const at::Tensor& bits, const uint8_t* nan_rows, const RowPacking* packing,
                               const at::Tensor& panels, int64_t n, int64_t k, const at::Tensor& alpha,
                               const c10::optional<at::Tensor>& input_scale, const c10::optional<at::Tensor>& bias) {
  check_panels(bits, panels, n, k);
  at::Tensor out = at::empty({bits.size(0), n}, bits.options().dtype(at::kFloat));
  GemmProblem problem = make_problem(bits, panels, n, k);
  problem.out_float = out.data_ptr<float>();
  set_epilogue(problem, alpha, optional_float(input_scale, 1, "the input scale"), bias);
  run_product(problem, packing, nan_rows);
  return out;
}

at::Tensor binary_linear_from_signs(const at::Tensor& bits, const at::Tensor& nan_rows, const at::Tensor& panels,
                                    int64_t n, int64_t k, const at::Tensor& alpha,
                                    const c10::optional<at::Tensor>& input_scale,
                                    const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(nan_rows.scalar_type() == at::kByte && nan_rows.is_contiguous() && nan_rows.dim() == 1 &&
                  nan_rows.numel() == bits.size(0),
              "surge_hf: nan_rows must be contiguous uint8 of ", bits.size(0), " values, got ", nan_rows.sizes());
  return scaled_sign_product(bits, nan_rows.data_ptr<uint8_t>(), nullptr, panels, n, k, alpha, input_scale, bias);
}

at::Tensor binary_linear(const at::Tensor& x, const c10::optional<at::Tensor>& threshold, const at::Tensor& panels,
                         int64_t n, const at::Tensor& alpha, const c10::optional<at::Tensor>& input_scale,
                         const c10::optional<at::Tensor>& bias) {
  SignRows rows = sign_rows(x, threshold);
  return scaled_sign_product(rows.bits, rows.packing.nan_rows, &rows.packing, panels, n, x.size(1), alpha,
                             input_scale, bias);
}

std::tuple<at::Tensor, at::Tensor> binary_linear_signs(const at::Tensor& x, const c10::optional<at::Tensor>& threshold,
                                                       const at::Tensor& panels, int64_t n, const at::Tensor& low,
                                                       const at::Tensor& width, const at::Tensor& flip) {
  SignRows rows = sign_rows(x, threshold);
  const int64_t k = x.size(1);
  check_panels(rows.bits, panels, n, k);
  for (const at::Tensor* bound : {&low, &width}) {
    TORCH_CHECK(bound->scalar_type() == at::kInt && bound->is_contiguous() && bound->numel() == n,
                "surge_hf: sign-output bounds must be contiguous int32 tensors of ", n, " values, got ",
                bound->scalar_type(), " of shape ", bound->sizes());
  }
  TORCH_CHECK(flip.scalar_type() == at::kByte && flip.is_contiguous() && flip.numel() == n,
              "surge_hf: sign-output flips must be a contiguous uint8 tensor of ", n, " values, got ",
              flip.scalar_type(), " of shape ", flip.sizes());
  // Zeros: the 16-bit chunks past the last panel are never written, and bits past column n must stay 0.
  at::Tensor out = at::zeros({x.size(0), words_per_row(n)}, x.options().dtype(at::kLong));
  GemmProblem problem = make_problem(rows.bits, panels, n, k);
  problem.out_signs = reinterpret_cast<uint16_t*>(out.data_ptr<int64_t>());
  problem.sign_epilogue.low = low.data_ptr<int32_t>();
  problem.sign_epilogue.width = width.data_ptr<int32_t>();
  problem.sign_epilogue.flip = flip.data_ptr<uint8_t>();
  run_product(problem, &rows.packing, nullptr);
  return {out, rows.nan_rows};
}

at::Tensor quantized_linear(const at::Tensor& x, const c10::optional<at::Tensor>& threshold, const at::Tensor& step,
                            int64_t q_min, int64_t q_max, const at::Tensor& panels, const at::Tensor& weight_counts,
                            int64_t n, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias) {
  const float* step_data = optional_float(step, 1, "the step size");
  const CodeSpec spec = code_spec(*step_data, q_min, q_max);
  CodeRows rows = code_rows(x, threshold, spec);
  const int64_t k = x.size(1);
  check_panels(rows.planes, panels, n, k);
  GemmProblem problem = make_problem(rows.planes, panels, n, k);
  set_code_planes(problem, spec, rows.plane_counts, weight_counts);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  problem.out_float = out.data_ptr<float>();
  set_epilogue(problem, alpha, step_data, bias);
  run_product(problem, &rows.packing, rows.packing.nan_rows);
  return out;
}

// float(conv2d(sign(x - tau), sign(W))[:, j]) * (alpha[j] * input_scale) + bias[j], the padding counted as zeros.
at::Tensor binary_conv2d(const at::Tensor& x, const c10::optional<at::Tensor>& threshold, const at::Tensor& panels,
                         int64_t n, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                         at::IntArrayRef dilation, const at::Tensor& alpha,
                         const c10::optional<at::Tensor>& input_scale, const c10::optional<at::Tensor>& bias) {
  const ConvShape shape = conv_shape(x, kernel_size, stride, padding, dilation);
  return conv_product(x, shape, threshold, nullptr, panels, nullptr, n, alpha,
                      optional_float(input_scale, 1, "the input scale"), bias);
}

// float(conv2d(q, sign(W))[:, j]) * (alpha[j] * step) + bias[j], q = clamp(round((x - tau) / step), q_min, q_max).
at::Tensor quantized_conv2d(const at::Tensor& x, const c10::optional<at::Tensor>& threshold, const at::Tensor& step,
                            int64_t q_min, int64_t q_max, const at::Tensor& panels, const at::Tensor& weight_counts,
                            int64_t n, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias) {
  const ConvShape shape = conv_shape(x, kernel_size, stride, padding, dilation);
  const float* step_data = optional_float(step, 1, "the step size");
  const CodeSpec spec = code_spec(*step_data, q_min, q_max);
  return conv_product(x, shape, threshold, &spec, panels, &weight_counts, n, alpha, step_data, bias);
}

// float(sign(Q) sign(K)^T) * scale per (batch, head), NaN in the rows of queries and the columns of keys that hold a
// NaN. Each head's query rows are packed once, its key rows packed into weight panels, and the product runs as a
// binary linear layer's with the keys as output channels and `scale` as a per-tensor alpha, so each score is
// float(d - 2 * popcount(q xor k)) * float(scale) (see Epilogue); the heads are split over the threads.
at::Tensor sign_scores(const at::Tensor& query, const at::Tensor& key, double scale) {
  const at::Tensor q = head_rows(query, "query"), k = head_rows(key, "key");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) && q.size(3) > 0,
              "surge_hf: query and key must share batch, heads and a positive head_dim, got shapes ", q.sizes(),
              " and ", k.sizes());
  const int64_t heads = q.size(1), queries = q.size(2), keys = k.size(2), d = q.size(3);
  at::Tensor out = at::empty({q.size(0), heads, queries, keys}, q.options());
  if (out.numel() == 0) return out;
  const int64_t kw = words_per_row(d), num_panels = (keys + kPanelWidth - 1) / kPanelWidth;
  const int64_t tiles = (queries + kRowBlock - 1) / kRowBlock * num_panels;
  const float alpha = static_cast<float>(scale);
  const float *q_data = q.data_ptr<float>(), *k_data = k.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const Isa* isa = active();
  const int64_t pairs = q.size(0) * heads;
  parallel_chunks(threads_for(pairs * queries * kw * num_panels * kPanelWidth), pairs, [&](int64_t pair) {
    const int64_t b = pair / heads, h = pair % heads;
    thread_local std::vector<uint64_t> query_bits, key_bits, panels;
    thread_local std::vector<uint8_t> query_nan, key_nan;
    query_bits.resize(queries * kw), key_bits.resize(keys * kw), panels.resize(num_panels * kw * kPanelWidth);
    query_nan.resize(queries), key_nan.resize(keys);
    pack_strided_rows(isa, q_data + b * q.stride(0) + h * q.stride(1), q.stride(2), queries, d, query_bits.data(),
                      query_nan.data());
    pack_strided_rows(isa, k_data + b * k.stride(0) + h * k.stride(1), k.stride(2), keys, d, key_bits.data(),
                      key_nan.data());
    rows_to_panels(key_bits.data(), keys, kw, panels.data());
    GemmProblem problem;
    problem.a = query_bits.data();
    problem.panels = panels.data();
    problem.rows = queries, problem.n = keys, problem.k = d, problem.kw = kw;
    problem.out_float = out_data + pair * queries * keys;
    problem.epilogue.alpha = &alpha;
    isa->gemm_tiles(problem, 0, tiles);
    fill_nan_rows(problem, query_nan.data(), 0, queries);
    fill_nan_columns(problem.out_float, queries, keys, key_nan.data());
  });
  return out;
}

std::string isa() { return active()->name; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa* candidate : supported()) names.emplace_back(candidate->name);
  return names;
}

std::string set_isa(const std::string& name) {
  const std::string previous = active()->name;
  for (const Isa* candidate : supported()) {
    if (name == candidate->name) {
      active() = candidate;
      return previous;
    }
  }
  TORCH_CHECK(false, "surge_hf: instruction set '", name, "' is not available on this CPU; available: ",
              c10::Join(", ", supported_isas()));
}

}  // namespace surge_xnor

TORCH_LIBRARY(surge_hf, m) {
  m.set_python_module("surge_hf.kernels");  // the fake (shape-only) kernels that tracing uses are registered there
  m.def("pack_weight_panels(Tensor packed, int k) -> Tensor");
  m.def("pack_activation_bits(Tensor x, Tensor? threshold) -> Tensor");
  m.def("weight_row_counts(Tensor packed) -> Tensor");
  m.def("pack_activation_codes(Tensor x, Tensor? threshold, float step, int q_min, int q_max) -> (Tensor, Tensor)");
  m.def("xnor_gemm(Tensor bits, Tensor panels, int n, int k) -> Tensor");
  m.def("code_gemm(Tensor planes, Tensor plane_counts, Tensor panels, Tensor weight_counts, int n, int k, int q_min, "
        "int q_max) -> Tensor");
  m.def("binary_linear(Tensor x, Tensor? threshold, Tensor panels, int n, Tensor alpha, Tensor? input_scale, "
        "Tensor? bias) -> Tensor");
  m.def("binary_linear_from_signs(Tensor bits, Tensor nan_rows, Tensor panels, int n, int k, Tensor alpha, "
        "Tensor? input_scale, Tensor? bias) -> Tensor");
  m.def("binary_linear_signs(Tensor x, Tensor? threshold, Tensor panels, int n, Tensor low, Tensor width, "
        "Tensor flip) -> (Tensor, Tensor)");
  m.def("quantized_linear(Tensor x, Tensor? threshold, Tensor step, int q_min, int q_max, Tensor panels, "
        "Tensor weight_counts, int n, Tensor alpha, Tensor? bias) -> Tensor");
  m.def("binary_conv2d(Tensor x, Tensor? threshold, Tensor panels, int n, int[2] kernel_size, int[2] stride, "
        "int[4] padding, int[2] dilation, Tensor alpha, Tensor? input_scale, Tensor? bias) -> Tensor");
  m.def("quantized_conv2d(Tensor x, Tensor? threshold, Tensor step, int q_min, int q_max, Tensor panels, "
        "Tensor weight_counts, int n, int[2] kernel_size, int[2] stride, int[4] padding, int[2] dilation, "
        "Tensor alpha, Tensor? bias) -> Tensor");
  m.def("sign_scores(Tensor query, Tensor key, float scale) -> Tensor");
  m.def("xnor_isa() -> str", &surge_xnor::isa);
  m.def("xnor_supported_isas() -> str[]", &surge_xnor::supported_isas);
  m.def("xnor_set_isa(str name) -> str", &surge_xnor::set_isa);
}

TORCH_LIBRARY_IMPL(surge_hf, CPU, m) {
  m.impl("pack_weight_panels", &surge_xnor::pack_weight_panels);
  m.impl("pack_activation_bits", &surge_xnor::pack_activation_bits);
  m.impl("weight_row_counts", &surge_xnor::weight_row_counts);
  m.impl("pack_activation_codes", &surge_xnor::pack_activation_codes);
  m.impl("xnor_gemm", &surge_xnor::xnor_gemm);
  m.impl("code_gemm", &surge_xnor::code_gemm);
  m.impl("binary_linear", &surge_xnor::binary_linear);
  m.impl("binary_linear_from_signs", &surge_xnor::binary_linear_from_signs);
  m.impl("binary_linear_signs", &surge_xnor::binary_linear_signs);
  m.impl("quantized_linear", &surge_xnor::quantized_linear);
  m.impl("binary_conv2d", &surge_xnor::binary_conv2d);
  m.impl("quantized_conv2d", &surge_xnor::quantized_conv2d);
  m.impl("sign_scores", &surge_xnor::sign_scores);
}
