// CPU back end of the guided DDIM step: fp32 only, OpenMP-parallel over (sample, chunk) blocks for
// large inputs (>= 2M elements; honours OMP_NUM_THREADS), the inner loop branch-free so the compiler
// vectorises it.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#if defined(CBDM_FAST_WITH_OPENMP)
#include <omp.h>
#endif

#include "cbdm_build_config.h"
#include "ddim_step.h"

namespace cbdm {

void check_ddim_args(const DdimStepArgs& a, bool cpu) {
  if (a.B <= 0) throw std::invalid_argument("ddim_step: B (batch size) must be > 0, got " + std::to_string(a.B));
  if (a.N <= 0) throw std::invalid_argument("ddim_step: N (elements per sample) must be > 0, got " + std::to_string(a.N));
  if (a.T <= 0) throw std::invalid_argument("ddim_step: T (number of timesteps) must be > 0, got " + std::to_string(a.T));
  if (!a.out) throw std::invalid_argument("ddim_step: out is a null pointer");
  if (!a.x_t) throw std::invalid_argument("ddim_step: x_t is a null pointer");
  if (!a.eps_c) throw std::invalid_argument("ddim_step: eps_c is a null pointer");
  if (!a.t) throw std::invalid_argument("ddim_step: t is a null pointer");
  if (!a.t_prev) throw std::invalid_argument("ddim_step: t_prev is a null pointer");
  if (!a.alphas_bar) throw std::invalid_argument("ddim_step: alphas_bar is a null pointer");
  if (!(a.eta >= 0.0) || !std::isfinite(a.eta))
    throw std::invalid_argument("ddim_step: eta must be finite and >= 0, got " + std::to_string(a.eta));
  if (a.eta > 0.0 && !a.noise) throw std::invalid_argument("ddim_step: noise is a null pointer but eta > 0");
  if (cpu) {
    if (a.dtype != kFloat32)
      throw std::invalid_argument("ddim_step_cpu: only float32 (dtype code 0) is supported, got dtype code " +
                                  std::to_string(a.dtype));
  } else if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16) {
    throw std::invalid_argument("ddim_step_cuda: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(a.dtype));
  }
}

namespace {

// One sample's elements [lo, hi). HasU / Clip / Noise are hoisted out of the loop.
template <bool HasU, bool Clip, bool Noise>
inline void step_block(float* __restrict out, const float* __restrict x, const float* __restrict ec,
                       const float* __restrict eu, const float* __restrict nz, int64_t lo, int64_t hi,
                       float omega, const DdimCoefs c) {
  for (int64_t i = lo; i < hi; ++i) {
    float eps = ec[i];
    if (HasU) eps = ec[i] + omega * (ec[i] - eu[i]);
    float x0 = (x[i] - c.sqrt_1m_ab_t * eps) / c.sqrt_ab_t;
    if (Clip) {  // comparisons are false for NaN: NaN propagates like torch.clamp
      x0 = x0 < -1.0f ? -1.0f : x0;
      x0 = x0 > 1.0f ? 1.0f : x0;
    }
    const float mean = c.sqrt_ab_s * x0 + c.c_dir * eps;
    out[i] = Noise ? mean + c.sigma * nz[i] : mean;
  }
}

template <bool HasU, bool Clip>
void run(const DdimStepArgs& a) {
  const int64_t B = a.B, N = a.N;
  const int64_t kChunk = 16384;  // elements per task
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  const int64_t tasks = B * chunks;
  auto* out = static_cast<float*>(a.out);
  auto* x = static_cast<const float*>(a.x_t);
  auto* ec = static_cast<const float*>(a.eps_c);
  auto* eu = static_cast<const float*>(a.eps_u);
  auto* nz = static_cast<const float*>(a.noise);
  const float omega = a.omega;
#if defined(CBDM_FAST_WITH_OPENMP)
  // Memory-bound: a thread only pays off with ~1M elements of its own.
  const int64_t kMinPerThread = int64_t(1) << 20;
  const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), B * N / kMinPerThread));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / chunks;
    const int64_t lo = (task % chunks) * kChunk;
    const int64_t hi = std::min(N, lo + kChunk);
    const int64_t off = b * N;
    const DdimCoefs c = ddim_coefs(a.alphas_bar, a.t[b], a.t_prev[b], a.eta);
    const float* eub = HasU ? eu + off : nullptr;
    if (c.sigma > 0.0f)
      step_block<HasU, Clip, true>(out + off, x + off, ec + off, eub, nz + off, lo, hi, omega, c);
    else
      step_block<HasU, Clip, false>(out + off, x + off, ec + off, eub, nullptr, lo, hi, omega, c);
  }
}

}  // namespace

void ddim_step_cpu(const DdimStepArgs& a) {
  check_ddim_args(a, /*cpu=*/true);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t tb = a.t[b], sb = a.t_prev[b];
    if (tb < 0 || tb >= a.T)
      throw std::invalid_argument("ddim_step: t[" + std::to_string(b) + "] = " + std::to_string(tb) +
                                  " is outside [0, T) with T = " + std::to_string(a.T));
    if (sb < -1 || sb >= tb)
      throw std::invalid_argument("ddim_step: t_prev[" + std::to_string(b) + "] = " + std::to_string(sb) +
                                  " is outside [-1, t) with t = " + std::to_string(tb));
  }
  const bool has_u = a.eps_u != nullptr;
  if (has_u && a.clip) run<true, true>(a);
  else if (has_u) run<true, false>(a);
  else if (a.clip) run<false, true>(a);
  else run<false, false>(a);
}

#if !CBDM_FAST_WITH_CUDA
void ddim_step_cuda(const DdimStepArgs&, int, uintptr_t) {
  throw std::runtime_error("ddim_step_cuda: cbdm_fast._C was built without CUDA "
                           "(rebuild with nvcc on PATH or CBDM_FAST_CUDA=1)");
}
#endif

}  // namespace cbdm
