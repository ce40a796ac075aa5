// CPU back end of the guided DDPM step: fp32 only, OpenMP-parallel over (sample, chunk) blocks for
// large inputs (>= 2M elements; honours OMP_NUM_THREADS),
// the inner loop branch-free so the compiler vectorises it.
#include <stdexcept>
#include <string>

#include "ddpm_step.h"

namespace cbdm {

void check_args(const DdpmStepArgs& a, bool cpu) {
  check_sizes_and_dtype("ddpm_step", a.B, a.N, a.T, a.dtype, cpu);
  require_ptrs("ddpm_step", {{a.out, "out"}, {a.x_t, "x_t"}, {a.eps_c, "eps_c"}, {a.t, "t"}, {a.noise, "noise"},
                             {a.table, "table"}});
}

namespace {

// One sample's elements [lo, hi). HasU / Clip / Noise are hoisted out of the loop.
template <bool HasU, bool Clip, bool Noise>
inline void step_block(float* __restrict out, const float* __restrict x, const float* __restrict ec,
                       const float* __restrict eu, const float* __restrict nz, int64_t lo, int64_t hi,
                       float omega, float c0, float c1, float c2, float c3, float sigma) {
  for (int64_t i = lo; i < hi; ++i) {
    const float eps = guided_eps<HasU>(ec[i], HasU ? eu[i] : 0.0f, omega);
    const float x0 = clip_x0<Clip>(c0 * x[i] - c1 * eps);
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

}  // namespace cbdm
