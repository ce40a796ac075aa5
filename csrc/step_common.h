// Pieces shared by the sampling-step back ends: the guidance and clipping arithmetic (host and device),
// argument checks, and the CPU loop that splits a (B, N) problem into blocks, OpenMP-parallel only when
// the work pays for the threads.
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(CBDM_FAST_WITH_OPENMP)
#include <omp.h>
#endif

#if defined(__CUDACC__)
#define CBDM_HD __host__ __device__ __forceinline__
#else
#define CBDM_HD inline
#endif

namespace cbdm {

// Classifier-free guidance of the authors' sampler: eps = eps_c + omega * (eps_c - eps_u), in this order
// (the torch references' order, so results are bit-identical); eps_c alone without an unconditional pass.
// Without guidance the eps_u pointer is null: callers pass `HasU ? eu[i] : 0.0f`, never eu[i] itself.
template <bool HasU>
CBDM_HD float guided_eps(float e_c, float e_u, float omega) {
  return HasU ? e_c + omega * (e_c - e_u) : e_c;
}

// clamp(x0, -1, 1) when Clip. Comparisons are false for NaN, so NaN propagates like torch.clamp.
template <bool Clip>
CBDM_HD float clip_x0(float x0) {
  if (Clip) {
    x0 = x0 < -1.0f ? -1.0f : x0;
    x0 = x0 > 1.0f ? 1.0f : x0;
  }
  return x0;
}

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Every step kernel is specialised on two switches, a guided pair (eps_u given) and x0 clipping: calls
// f(has_u, clip) with both as compile-time constants (std::true_type / std::false_type), so each of the
// four variants compiles without a branch in its inner loop.
template <typename F>
void with_guidance_and_clip(bool has_u, bool clip, F&& f) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (has_u && clip) f(Yes{}, Yes{});
  else if (has_u) f(Yes{}, No{});
  else if (clip) f(No{}, Yes{});
  else f(No{}, No{});
}

// Throws std::invalid_argument (ValueError in Python) naming `op` and the first null pointer of
// (pointer, name) pairs.
inline void require_ptrs(const char* op, std::initializer_list<std::pair<const void*, const char*>> ptrs) {
  for (const auto& p : ptrs)
    if (!p.first) throw std::invalid_argument(std::string(op) + ": " + p.second + " is a null pointer");
}

// Sizes and the I/O dtype code: CPU back ends take float32 only, CUDA ones float32/16 and bfloat16.
inline void check_sizes_and_dtype(const char* op, int64_t B, int64_t N, int64_t T, int dtype, bool cpu) {
  const std::string o(op);
  if (B <= 0) throw std::invalid_argument(o + ": B (batch size) must be > 0, got " + std::to_string(B));
  if (N <= 0) throw std::invalid_argument(o + ": N (elements per sample) must be > 0, got " + std::to_string(N));
  if (T <= 0) throw std::invalid_argument(o + ": T (number of timesteps) must be > 0, got " + std::to_string(T));
  if (cpu) {
    if (dtype != kFloat32)
      throw std::invalid_argument(o + "_cpu: only float32 (dtype code 0) is supported, got dtype code " +
                                  std::to_string(dtype));
  } else if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument(o + "_cuda: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(dtype));
  }
}

// Calls block(b, lo, hi) over sample b's elements [lo, hi) for every sample, in chunks of 16384
// elements. Memory-bound work: a thread only pays off with ~1M elements of its own (fork/join and, on
// a busy machine, waiting for a descheduled worker cost more below that).
template <typename Block>
void for_each_block(int64_t B, int64_t N, Block block) {
  const int64_t kChunk = 16384;
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const int64_t tasks = B * chunks;
#if defined(CBDM_FAST_WITH_OPENMP)
  const int64_t kMinPerThread = int64_t(1) << 20;
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), B * N / kMinPerThread));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t lo = (task % chunks) * kChunk;
    block(task / chunks, lo, std::min(N, lo + kChunk));
  }
}

}  // namespace cbdm
