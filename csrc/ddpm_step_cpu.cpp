// CPU back end of the guided DDPM step: fp32 only, OpenMP-parallel over (sample, chunk) blocks for
// large inputs (>= 2M elements; honours OMP_NUM_THREADS),
// the inner loop branch-free so the compiler vectorises it.
#include <stdexcept>
#include <string>

#include "cbdm_build_config.h"
#include "ddpm_step.h"

namespace cbdm {

void check_args(const DdpmStepArgs& a, bool cpu) {
  check_sizes_and_dtype("ddpm_step", a.B, a.N, a.T, a.dtype, cpu);
  require_ptr(a.out, "ddpm_step", "out");
  require_ptr(a.x_t, "ddpm_step", "x_t");
  require_ptr(a.eps_c, "ddpm_step", "eps_c");
  require_ptr(a.t, "ddpm_step", "t");
  require_ptr(a.noise, "ddpm_step", "noise");
  require_ptr(a.table, "ddpm_step", "table");
}

namespace {

// One sample's elements [lo, hi). HasU / Clip / Noise are hoisted out of the loop.
template <bool HasU, bool Clip, bool Noise>
inline void step_block(float* __restrict out, const float* __restrict x, const float* __restrict ec,
                       const float* __restrict eu, const float* __restrict nz, int64_t lo, int64_t hi,
                       float omega, float c0, float c1, float c2, float c3, float sigma) {
  for (int64_t i = lo; i < hi; ++i) {
    float eps = ec[i];
    if (HasU) eps = ec[i] + omega * (ec[i] - eu[i]);
    float x0 = c0 * x[i] - c1 * eps;
    if (Clip) {  // comparisons are false for NaN: NaN propagates like torch.clamp
      x0 = x0 < -1.0f ? -1.0f : x0;
      x0 = x0 > 1.0f ? 1.0f : x0;
    }
    float mean = c2 * x0 + c3 * x[i];
    out[i] = Noise ? mean + sigma * nz[i] : mean;
  }
}

template <bool HasU, bool Clip>
void run(const DdpmStepArgs& a) {
  const int64_t N = a.N, T = a.T;
  auto* out = static_cast<float*>(a.out);
  auto* x = static_cast<const float*>(a.x_t);
  auto* ec = static_cast<const float*>(a.eps_c);
  auto* eu = static_cast<const float*>(a.eps_u);
  auto* nz = static_cast<const float*>(a.noise);
  const float* tab = a.table;
  const float omega = a.omega;
  for_each_block(a.B, N, [&](int64_t b, int64_t lo, int64_t hi) {
    const int64_t tb = a.t[b];
    const int64_t off = b * N;
    const float c0 = tab[tb], c1 = tab[T + tb], c2 = tab[2 * T + tb], c3 = tab[3 * T + tb], s = tab[4 * T + tb];
    const float* eub = HasU ? eu + off : nullptr;
    if (tb > 0)
      step_block<HasU, Clip, true>(out + off, x + off, ec + off, eub, nz + off, lo, hi, omega, c0, c1, c2, c3, s);
    else
      step_block<HasU, Clip, false>(out + off, x + off, ec + off, eub, nz + off, lo, hi, omega, c0, c1, c2, c3, s);
  });
}

}  // namespace

void ddpm_step_cpu(const DdpmStepArgs& a) {
  check_args(a, /*cpu=*/true);
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t tb = a.t[b];
    if (tb < 0 || tb >= a.T)
      throw std::invalid_argument("ddpm_step: t[" + std::to_string(b) + "] = " + std::to_string(tb) +
                              " is outside [0, T) with T = " + std::to_string(a.T));
  }
  with_guidance_and_clip(a.eps_u != nullptr, a.clip, [&](auto has_u, auto clip) {
    run<decltype(has_u)::value, decltype(clip)::value>(a);
  });
}

#if !CBDM_FAST_WITH_CUDA
void ddpm_step_cuda(const DdpmStepArgs&, int, uintptr_t) {
  throw std::runtime_error("ddpm_step_cuda: cbdm_fast._C was built without CUDA "
                           "(rebuild with nvcc on PATH or CBDM_FAST_CUDA=1)");
}
const char* cuda_runtime_error() { return "cbdm_fast._C was built without CUDA"; }
#endif

}  // namespace cbdm
