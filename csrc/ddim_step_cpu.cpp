// CPU back end of the guided DDIM step: fp32 only, OpenMP-parallel over (sample, chunk) blocks for
// large inputs (>= 2M elements; honours OMP_NUM_THREADS), the inner loop branch-free so the compiler
// vectorises it.
#include <cmath>
#include <stdexcept>
#include <string>

#include "ddim_step.h"

namespace cbdm {

void check_ddim_args(const DdimStepArgs& a, bool cpu) {
  check_sizes_and_dtype("ddim_step", a.B, a.N, a.T, a.dtype, cpu);
  require_ptrs("ddim_step", {{a.out, "out"}, {a.x_t, "x_t"}, {a.eps_c, "eps_c"}, {a.t, "t"}, {a.t_prev, "t_prev"},
                             {a.alphas_bar, "alphas_bar"}});
  if (!(a.eta >= 0.0) || !std::isfinite(a.eta))
    throw std::invalid_argument("ddim_step: eta must be finite and >= 0, got " + std::to_string(a.eta));
  if (a.eta > 1.0)  // sigma can pass sqrt(1 - ab_s), and the clamp on c_dir would make it another step
    throw std::invalid_argument("ddim_step: eta must be <= 1 (0: deterministic DDIM, 1: DDPM-like), got " +
                                std::to_string(a.eta));
  if (a.eta > 0.0 && !a.noise) throw std::invalid_argument("ddim_step: noise is a null pointer but eta > 0");
}

namespace {

// One sample's elements [lo, hi). HasU / Clip / Noise are hoisted out of the loop.
template <bool HasU, bool Clip, bool Noise>
inline void step_block(float* __restrict out, const float* __restrict x, const float* __restrict ec,
                       const float* __restrict eu, const float* __restrict nz, int64_t lo, int64_t hi,
                       float omega, const DdimCoefs c) {
  for (int64_t i = lo; i < hi; ++i) {
    const float eps = guided_eps<HasU>(ec[i], HasU ? eu[i] : 0.0f, omega);
    const float x0 = clip_x0<Clip>((x[i] - c.sqrt_1m_ab_t * eps) / c.sqrt_ab_t);
    const float mean = c.sqrt_ab_s * x0 + c.c_dir * eps;
    out[i] = Noise ? mean + c.sigma * nz[i] : mean;
  }
}

template <bool HasU, bool Clip>
void run(const DdimStepArgs& a) {
  const int64_t N = a.N;
  auto* out = static_cast<float*>(a.out);
  auto* x = static_cast<const float*>(a.x_t);
  auto* ec = static_cast<const float*>(a.eps_c);
  auto* eu = static_cast<const float*>(a.eps_u);
  auto* nz = static_cast<const float*>(a.noise);
  const float omega = a.omega;
  for_each_block(a.B, N, [&](int64_t b, int64_t lo, int64_t hi) {
    const int64_t off = b * N;
    const DdimCoefs c = ddim_coefs(a.alphas_bar, a.t[b], a.t_prev[b], a.eta);
    const float* eub = HasU ? eu + off : nullptr;
    if (c.sigma > 0.0f)
      step_block<HasU, Clip, true>(out + off, x + off, ec + off, eub, nz + off, lo, hi, omega, c);
    else
      step_block<HasU, Clip, false>(out + off, x + off, ec + off, eub, nullptr, lo, hi, omega, c);
  });
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
  with_guidance_and_clip(a.eps_u != nullptr, a.clip, [&](auto has_u, auto clip) {
    run<decltype(has_u)::value, decltype(clip)::value>(a);
  });
}

}  // namespace cbdm
