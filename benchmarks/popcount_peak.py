"""The binary GEMM's throughput against this CPU's popcount peak, and what a second thread buys.

Peak (a microbenchmark compiled here with `torch.utils.cpp_extension.load_inline`, AVX-512 VPOPCNTDQ): 64-bit
popcounts per second of register-resident data, with no loads or stores, on 1 and 2 threads at once:

- `popcount`: `v = popcount(v)` over 12 independent vectors of 8 words: the popcount unit alone, the roofline;
- `xor_popcount_add`: `acc += popcount(a xor w)`, the inner loop of the XNOR GEMM with its XOR and accumulate.

Fork and join: the cost of one parallel region of torch's 2 OpenMP threads that does nothing, and the number of
popcounts the XNOR loop does in that time: the kernel gives a thread at least a few times that much work
(`kMinWorkPerThread` in `surge_hf/csrc/xnor_ops.cpp`), and runs smaller products on one thread.

GEMM: the kernel's products at BERT-base shapes (768x768, 768x3072, 3072x768) and MiniLM shapes (384x384, 384x1536,
1536x384; `in x out`), M rows: `xor_gemm` (on packed bits: the popcount part) and `binary_linear` (the whole layer:
packing, products, scales and bias), as `M * N * ceil(K / 64)` word popcounts per second and as a share of the
peak with the same number of threads; and the speed-up of 2 threads over 1 thread.

Timing: each measurement repeats a short call many times, round-robin with the others of its group, and keeps the
minimum (the run least disturbed by other processes: the figure for a peak) and the median. On a shared machine
read the ratios within one run, and the minimum-based ones first.

    python benchmarks/popcount_peak.py       # writes benchmarks/results/popcount_peak_cpu.json
    python benchmarks/popcount_peak.py --threads 1 --output results/<name>.json   # one thread only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

from surge_hf import kernels
from surge_hf.packing import pack_signs

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"bert-base": [(768, 768), (768, 3072), (3072, 768)], "minilm": [(384, 384), (384, 1536), (1536, 384)]}
ROWS = (1, 8, 32, 128, 512)
VECTORS, WORDS_PER_VECTOR = 12, 8

PEAK_SOURCE = r"""
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <chrono>
#include <cstdint>

#define TARGET __attribute__((target("avx512f,avx512vpopcntdq")))

// v = popcount(v) on 12 independent vectors (latency 3, at most one popcount a cycle: 12 chains keep it busy).
TARGET static void popcount_loop(int64_t iterations, uint64_t* sink) {
  __m512i v[12];
  for (int j = 0; j < 12; ++j) v[j] = _mm512_set1_epi64(0x0123456789ABCDEFLL + j);
  for (int64_t i = 0; i < iterations; ++i) {
    for (int j = 0; j < 12; ++j) {
      v[j] = _mm512_popcnt_epi64(v[j]);
      asm volatile("" : "+v"(v[j]));  // keeps each popcount: the value reaches a fixed point after two rounds
    }
  }
  for (int j = 0; j < 12; ++j) *sink += _mm512_reduce_add_epi64(v[j]);
}

// acc += popcount(a xor w) on 12 accumulators: the XNOR GEMM's inner loop without its loads.
TARGET static void xor_popcount_add_loop(int64_t iterations, uint64_t* sink) {
  __m512i acc[12], a[12];
  __m512i w = _mm512_set1_epi64(0x5555AAAA5555AAAALL);
  for (int j = 0; j < 12; ++j) {
    acc[j] = _mm512_setzero_si512();
    a[j] = _mm512_set1_epi64(0x0123456789ABCDEFLL * (j + 1));
  }
  for (int64_t i = 0; i < iterations; ++i) {
    asm volatile("" : "+v"(w));  // w "changes" every iteration: the XORs cannot be hoisted
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_add_epi64(acc[j], _mm512_popcnt_epi64(_mm512_xor_si512(a[j], w)));
  }
  for (int j = 0; j < 12; ++j) *sink += _mm512_reduce_add_epi64(acc[j]);
}

// Seconds of one fork and join of `threads` of torch's OpenMP threads doing nothing.
double fork_join_seconds(int64_t threads) {
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [](int64_t, int64_t) {});
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Seconds for `threads` threads to run `iterations` of the loop each, at once.
double peak_seconds(int64_t iterations, int64_t threads, bool with_xor) {
  uint64_t sinks[64] = {};
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      with_xor ? xor_popcount_add_loop(iterations, &sinks[t % 64]) : popcount_loop(iterations, &sinks[t % 64]);
    }
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  uint64_t total = 0;
  for (uint64_t s : sinks) total += s;
  return total == 1 ? -1.0 : seconds;  // reads the sinks, so that no loop is removed
}
"""


def build_peak():
    return load_inline("surge_hf_popcount_peak", cpp_sources=PEAK_SOURCE,
                       functions=["peak_seconds", "fork_join_seconds"], extra_cflags=["-O3", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], verbose=False)


def timed(candidates: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict[str, float]]:
    """Seconds per call of each candidate (a callable returning its own seconds, or None to be timed here),
    round-robin over `repeats` rounds: minimum and median."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for call in candidates.values():
        call()  # warm-up
    for _ in range(repeats):
        for name, call in candidates.items():
            start = time.perf_counter()
            own = call()
            samples[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return {name: {"min": min(values), "median": statistics.median(values)} for name, values in samples.items()}


def with_threads(threads: int, call: Callable[[], object]) -> Callable[[], object]:
    def run():
        torch.set_num_threads(threads)
        return call()
    return run


def measure_peak(module, iterations: int, repeats: int, thread_counts: tuple[int, ...]) -> dict:
    """Word popcounts per second (minimum and median time) of each loop on each number of threads."""
    words = iterations * VECTORS * WORDS_PER_VECTOR
    candidates = {f"{kind}_{threads}t": with_threads(threads, lambda kind=kind, threads=threads: module.peak_seconds(
                      iterations, threads, kind == "xor_popcount_add"))
                  for kind in ("popcount", "xor_popcount_add") for threads in thread_counts}
    seconds = timed(candidates, repeats)
    return {name: {"words_per_s_best": words * int(name[-2]) / s["min"],
                   "words_per_s_median": words * int(name[-2]) / s["median"]} for name, s in seconds.items()}


def measure_fork_join(module, repeats: int) -> dict:
    """Microseconds of one fork and join of 2 threads (minimum and median of `repeats` x 50 calls)."""
    torch.set_num_threads(2)
    samples = [module.fork_join_seconds(2) for _ in range(50 * repeats)]
    return {"us_best": 1e6 * min(samples), "us_median": 1e6 * statistics.median(samples)}


def measure_gemm(peak: dict, repeats: int, min_seconds: float, thread_counts: tuple[int, ...]) -> list[dict]:
    rows = []
    for family, shapes in SHAPES.items():
        for in_features, out_features in shapes:
            generator = torch.Generator().manual_seed(0)
            weight = torch.randn(out_features, in_features, generator=generator)
            panels = kernels.pack_weight_panels(pack_signs(weight), in_features)
            alpha, bias = weight.abs().mean(1), torch.randn(out_features, generator=generator)
            for m in ROWS:
                x = torch.randn(m, in_features, generator=generator)
                bits = kernels.pack_activation_bits(x)
                ops = {"xor_gemm": lambda: kernels.xnor_gemm(bits, panels, out_features, in_features),
                       "binary_linear": lambda: kernels.binary_linear(x, None, panels, out_features, alpha, None,
                                                                      bias)}
                start = time.perf_counter()
                ops["binary_linear"]()
                calls = max(1, round(min_seconds / max(time.perf_counter() - start, 1e-7)))
                candidates = {f"{op}_{threads}t": with_threads(threads, lambda call=call: [call() for _ in
                                                                                          range(calls)])
                              for op, call in ops.items() for threads in thread_counts}
                seconds = {name: {key: value / calls for key, value in s.items()}
                           for name, s in timed(candidates, repeats).items()}
                words = m * out_features * ((in_features + 63) // 64)
                row = {"family": family, "in_features": in_features, "out_features": out_features, "rows": m,
                       "ms_best": {name: 1e3 * s["min"] for name, s in seconds.items()},
                       "ms_median": {name: 1e3 * s["median"] for name, s in seconds.items()}}
                for stat, key in (("best", "min"), ("median", "median")):
                    row[f"share_of_popcount_peak_{stat}"] = {
                        name: words / s[key] / peak[f"popcount_{name[-2]}t"][f"words_per_s_{stat}"]
                        for name, s in seconds.items()}
                    if {1, 2} <= set(thread_counts):
                        row[f"two_thread_speedup_{stat}"] = {
                            op: seconds[f"{op}_1t"][key] / seconds[f"{op}_2t"][key] for op in ops}
                rows.append(row)
                print(f"{family} {in_features}x{out_features} M={m}: "
                      + ", ".join(f"{name} {ms:.3f} ms" for name, ms in row["ms_best"].items())
                      + " | peak share (best) " + ", ".join(f"{name} {share:.0%}" for name, share in
                                                              row["share_of_popcount_peak_best"].items())
                      + "".join(" | 2t/1t (best) " + ", ".join(f"{op} {r:.2f}x" for op, r in speedups.items())
                                for speedups in [row.get("two_thread_speedup_best")] if speedups), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=41, help="round-robin rounds per group")
    parser.add_argument("--min_ms", type=float, default=3.0, help="repeat each GEMM call to fill this many ms")
    parser.add_argument("--iterations", type=int, default=20000, help="loop iterations of one peak measurement")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to measure")
    parser.add_argument("--output", type=Path, default=RESULTS / "popcount_peak_cpu.json")
    args = parser.parse_args()
    thread_counts = tuple(int(count) for count in args.threads.split(","))
    if not kernels.available() or "avx512_vpopcntdq" not in kernels.supported_isas():
        raise SystemExit("This benchmark needs the surge_hf kernel and an AVX-512 VPOPCNTDQ CPU.")
    threads = torch.get_num_threads()
    module = build_peak()
    peak = measure_peak(module, args.iterations, args.repeats, thread_counts)
    fork_join = measure_fork_join(module, args.repeats) if 2 in thread_counts else None
    print(json.dumps({"peak": peak, "fork_join": fork_join}, indent=2), flush=True)
    report = {
        "command": " ".join(["python benchmarks/popcount_peak.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {platform.system()}, {threads} threads available",
        "torch": torch.__version__,
        "kernel_isa": kernels.isa(),
        "repeats": args.repeats,
        "peak": peak,
        "fork_join_2_threads": fork_join,
        "gemm": measure_gemm(peak, args.repeats, args.min_ms / 1e3, thread_counts),
    }
    if fork_join and 1 in thread_counts:
        rate = peak["xor_popcount_add_1t"]["words_per_s_best"]
        report["popcounts_per_fork_join_best"] = rate * fork_join["us_best"] / 1e6
    torch.set_num_threads(threads)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
