// PyTorch operators `torch.ops.surge_hf.*` over the bit-packed W1A1 kernels (see xnor.h for the layouts), with the
// instruction-set variant chosen at run time and the work split over torch's intra-op threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

// Work items below this many 64-bit XOR-popcounts (or packed floats) run on one thread.
constexpr int64_t kMinWorkPerThread = 1 << 15;

int64_t words_per_row(int64_t k) { return (k + 63) / 64; }

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

int64_t pack_grain(int64_t k) { return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(k, 1)); }

// The sign bits of x - tau, and which rows hold a NaN.
std::tuple<at::Tensor, at::Tensor> pack_sign_rows(const at::Tensor& x, const c10::optional<at::Tensor>& threshold) {
  check_activations(x);
  const int64_t m = x.size(0), k = x.size(1), kw = words_per_row(k);
  const float* tau = threshold_data(threshold, k);
  at::Tensor bits = at::empty({m, kw}, x.options().dtype(at::kLong));
  at::Tensor nan_rows = at::empty({m}, x.options().dtype(at::kByte));
  const float* data = x.data_ptr<float>();
  auto* out = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
  uint8_t* nan = nan_rows.data_ptr<uint8_t>();
  const Isa* isa = active();
  at::parallel_for(0, m, pack_grain(k),
                   [&](int64_t begin, int64_t end) { isa->pack_signs(data, tau, k, kw, out, nan, begin, end); });
  return {bits, nan_rows};
}

// Rows of x with a NaN give NaN outputs, as the reference path's float product does.
void propagate_nan_rows(at::Tensor& out, const at::Tensor& nan_rows) {
  const uint8_t* nan = nan_rows.data_ptr<uint8_t>();
  for (int64_t i = 0; i < out.size(0); ++i) {
    if (nan[i]) out[i].fill_(std::numeric_limits<float>::quiet_NaN());
  }
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

// The code planes of x, each plane's popcount, and which rows hold a NaN.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_code_rows(const at::Tensor& x,
                                                              const c10::optional<at::Tensor>& threshold,
                                                              const CodeSpec& spec) {
  check_activations(x);
  const int64_t m = x.size(0), k = x.size(1), kw = words_per_row(k);
  const float* tau = threshold_data(threshold, k);
  at::Tensor planes = at::empty({m * spec.planes, kw}, x.options().dtype(at::kLong));
  at::Tensor counts = at::empty({m * spec.planes}, x.options().dtype(at::kInt));
  const float* data = x.data_ptr<float>();
  auto* out = reinterpret_cast<uint64_t*>(planes.data_ptr<int64_t>());
  int32_t* out_counts = counts.data_ptr<int32_t>();
  at::Tensor nan_rows = at::empty({m}, x.options().dtype(at::kByte));
  uint8_t* nan = nan_rows.data_ptr<uint8_t>();
  const Isa* isa = active();
  at::parallel_for(0, m, pack_grain(k * spec.planes), [&](int64_t begin, int64_t end) {
    isa->pack_codes(data, tau, spec, k, kw, out, out_counts, nan, begin, end);
  });
  return {planes, counts, nan_rows};
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

void run_gemm(const GemmProblem& problem) {
  if (problem.rows == 0) return;
  const int64_t row_blocks = (problem.rows + kRowBlock - 1) / kRowBlock;
  const int64_t tiles = row_blocks * ((problem.n + kPanelWidth - 1) / kPanelWidth);
  const int64_t work_per_tile = std::min(problem.rows, kRowBlock) * problem.kw * kPanelWidth;
  const Isa* isa = active();
  at::parallel_for(0, tiles, std::max<int64_t>(1, kMinWorkPerThread / work_per_tile),
                   [&](int64_t begin, int64_t end) { isa->gemm_tiles(problem, begin, end); });
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
  return std::get<0>(pack_sign_rows(x, threshold));
}

std::tuple<at::Tensor, at::Tensor> pack_activation_codes(const at::Tensor& x,
                                                         const c10::optional<at::Tensor>& threshold, double step,
                                                         int64_t q_min, int64_t q_max) {
  auto [planes, counts, nan_rows] = pack_code_rows(x, threshold, code_spec(step, q_min, q_max));
  return {planes, counts};
}

at::Tensor xnor_gemm(const at::Tensor& bits, const at::Tensor& panels, int64_t n, int64_t k) {
  check_panels(bits, panels, n, k);
  at::Tensor out = at::empty({bits.size(0), n}, bits.options().dtype(at::kInt));
  GemmProblem problem = make_problem(bits, panels, n, k);
  problem.out_int = out.data_ptr<int32_t>();
  run_gemm(problem);
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
  run_gemm(problem);
  return out;
}

at::Tensor binary_linear_from_signs(const at::Tensor& bits, const at::Tensor& nan_rows, const at::Tensor& panels,
                                    int64_t n, int64_t k, const at::Tensor& alpha,
                                    const c10::optional<at::Tensor>& input_scale,
                                    const c10::optional<at::Tensor>& bias) {
  check_panels(bits, panels, n, k);
  TORCH_CHECK(nan_rows.scalar_type() == at::kByte && nan_rows.is_contiguous() && nan_rows.numel() == bits.size(0),
              "surge_hf: nan_rows must be contiguous uint8 of ", bits.size(0), " values, got ", nan_rows.sizes());
  at::Tensor out = at::empty({bits.size(0), n}, bits.options().dtype(at::kFloat));
  GemmProblem problem = make_problem(bits, panels, n, k);
  problem.out_float = out.data_ptr<float>();
  set_epilogue(problem, alpha, optional_float(input_scale, 1, "the input scale"), bias);
  run_gemm(problem);
  propagate_nan_rows(out, nan_rows);
  return out;
}

at::Tensor binary_linear(const at::Tensor& x, const c10::optional<at::Tensor>& threshold, const at::Tensor& panels,
                         int64_t n, const at::Tensor& alpha, const c10::optional<at::Tensor>& input_scale,
                         const c10::optional<at::Tensor>& bias) {
  auto [bits, nan_rows] = pack_sign_rows(x, threshold);
  return binary_linear_from_signs(bits, nan_rows, panels, n, x.size(1), alpha, input_scale, bias);
}

std::tuple<at::Tensor, at::Tensor> binary_linear_signs(const at::Tensor& x, const c10::optional<at::Tensor>& threshold,
                                                       const at::Tensor& panels, int64_t n, const at::Tensor& low,
                                                       const at::Tensor& width, const at::Tensor& flip) {
  auto [bits, nan_rows] = pack_sign_rows(x, threshold);
  const int64_t k = x.size(1);
  check_panels(bits, panels, n, k);
  for (const at::Tensor* bound : {&low, &width}) {
    TORCH_CHECK(bound->scalar_type() == at::kInt && bound->is_contiguous() && bound->numel() == n,
                "surge_hf: sign-output bounds must be contiguous int32 tensors of ", n, " values, got ",
                bound->scalar_type(), " of shape ", bound->sizes());
  }
  TORCH_CHECK(flip.scalar_type() == at::kByte && flip.is_contiguous() && flip.numel() == n,
              "surge_hf: sign-output flips must be a contiguous uint8 tensor of ", n, " values, got ",
              flip.scalar_type(), " of shape ", flip.sizes());
  const int64_t out_words = words_per_row(n);
  // Zeros: the 16-bit chunks past the last panel are never written, and bits past column n must stay 0.
  at::Tensor out = at::zeros({x.size(0), out_words}, x.options().dtype(at::kLong));
  GemmProblem problem = make_problem(bits, panels, n, k);
  problem.out_signs = reinterpret_cast<uint16_t*>(out.data_ptr<int64_t>());
  problem.sign_epilogue.low = low.data_ptr<int32_t>();
  problem.sign_epilogue.width = width.data_ptr<int32_t>();
  problem.sign_epilogue.flip = flip.data_ptr<uint8_t>();
  run_gemm(problem);
  return {out, nan_rows};
}

at::Tensor quantized_linear(const at::Tensor& x, const c10::optional<at::Tensor>& threshold, const at::Tensor& step,
                            int64_t q_min, int64_t q_max, const at::Tensor& panels, const at::Tensor& weight_counts,
                            int64_t n, const at::Tensor& alpha, const c10::optional<at::Tensor>& bias) {
  const float* step_data = optional_float(step, 1, "the step size");
  const CodeSpec spec = code_spec(*step_data, q_min, q_max);
  auto [planes, plane_counts, nan_rows] = pack_code_rows(x, threshold, spec);
  const int64_t k = x.size(1);
  check_panels(planes, panels, n, k);
  GemmProblem problem = make_problem(planes, panels, n, k);
  set_code_planes(problem, spec, plane_counts, weight_counts);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  problem.out_float = out.data_ptr<float>();
  set_epilogue(problem, alpha, step_data, bias);
  run_gemm(problem);
  propagate_nan_rows(out, nan_rows);
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
