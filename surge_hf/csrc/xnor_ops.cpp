// PyTorch operators `torch.ops.surge_hf.*` over the bit-packed W1A1 kernels (see xnor.h for the layouts), with the
// instruction-set variant chosen at run time and the work split over torch's intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
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

// One product: pack the rows of x (unless `packing` is null: the bit rows are given), XOR/AND-popcount them with
// every weight panel, write the outputs, fill NaN rows, all in one parallel region. With enough rows each chunk is a
// block of kRowBlock bit rows, packed and multiplied by every panel by the thread that takes it (its bits stay in
// that core's cache); with few rows, they are packed first and the chunks are groups of panels.
void run_product(const GemmProblem& p, const RowPacking* packing, const uint8_t* nan_rows) {
  if (p.rows == 0) return;
  const Isa* isa = active();
  const int64_t planes = std::max(p.planes, 1);
  const int64_t row_blocks = (p.rows + kRowBlock - 1) / kRowBlock;
  const int64_t num_panels = (p.n + kPanelWidth - 1) / kPanelWidth;
  const int threads = threads_for(p.rows * p.kw * num_panels * kPanelWidth);
  if (row_blocks >= 2 * threads) {
    parallel_chunks(threads, row_blocks, [&](int64_t block) {
      const int64_t begin = block * kRowBlock / planes, end = std::min(p.rows, (block + 1) * kRowBlock) / planes;
      if (packing) packing->rows(isa, begin, end);
      isa->gemm_tiles(p, block * num_panels, (block + 1) * num_panels);
      fill_nan_rows(p, nan_rows, begin, end);
    });
    return;
  }
  if (packing) packing->rows(isa, 0, p.rows / planes);
  const int64_t group = std::max<int64_t>(1, num_panels / (4 * threads));  // about 4 chunks per thread
  parallel_chunks(threads, (num_panels + group - 1) / group, [&](int64_t chunk) {
    const int64_t first = chunk * group, last = std::min(num_panels, first + group);
    for (int64_t block = 0; block < row_blocks; ++block) {
      isa->gemm_tiles(p, block * num_panels + first, block * num_panels + last);
    }
  });
  fill_nan_rows(p, nan_rows, 0, p.rows / planes);
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
      dst[((j / kPanelWidth) * kw + t) * kPanelWidth + j % kPanelWidth] = word;
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
}
