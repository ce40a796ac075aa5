// CPU back end of the guided DPM-Solver++(2M) step: fp32 only, OpenMP-parallel over (sample, chunk)
// blocks for large inputs (see for_each_block), the inner loop branch-free so the compiler vectorises it.
#include <stdexcept>
#include <string>

#include "dpm_step.h"

namespace cbdm {

void check_dpm_args(const DpmStepArgs& a, bool cpu) {
  if (a.M <= 0) throw std::invalid_argument("dpm_step: M (rows of coefs) must be > 0, got " + std::to_string(a.M));
  check_sizes_and_dtype("dpm_step", a.B, a.N, a.M, a.dtype, cpu);
  require_ptrs("dpm_step", {{a.x, "x"}, {a.eps_c, "eps_c"}, {a.x0_prev, "x0_prev"}, {a.coefs, "coefs"},
                            {a.step, "step"}});
  if (a.x == a.x0_prev) throw std::invalid_argument("dpm_step: x and x0_prev are the same buffer");
}

namespace {

// Elements [lo, hi) of one sample. HasU / Clip / History are hoisted out of the loop.
template <bool HasU, bool Clip, bool History>
inline void step_block(float* __restrict x, const float* __restrict ec, const float* __restrict eu,
                       float* __restrict x0p, int64_t lo, int64_t hi, const float* __restrict row) {
  const float w = row[0], inv_alpha = row[1], sigma_over_alpha = row[2], ca = row[3], cb = row[4], cc = row[5];
  for (int64_t i = lo; i < hi; ++i) {
    const float eps = guided_eps<HasU>(ec[i], HasU ? eu[i] : 0.0f, w);
    const float x0 = clip_x0<Clip>(x[i] * inv_alpha - sigma_over_alpha * eps);
    float out = ca * x[i] + cb * x0;
    if (History) out = out + cc * x0p[i];
    x[i] = out;
    x0p[i] = x0;
  }
}

template <bool HasU, bool Clip>
void run(const DpmStepArgs& a, const float* row) {
  const int64_t N = a.N;
  auto* x = static_cast<float*>(a.x);
  auto* ec = static_cast<const float*>(a.eps_c);
  auto* eu = static_cast<const float*>(a.eps_u);
  auto* x0p = static_cast<float*>(a.x0_prev);
  const bool history = row[5] != 0.0f;
  for_each_block(a.B, N, [&](int64_t b, int64_t lo, int64_t hi) {
    const int64_t off = b * N;
    const float* eub = HasU ? eu + off : nullptr;
    if (history)
      step_block<HasU, Clip, true>(x + off, ec + off, eub, x0p + off, lo, hi, row);
    else
      step_block<HasU, Clip, false>(x + off, ec + off, eub, x0p + off, lo, hi, row);
  });
}

}  // namespace

void dpm_step_cpu(const DpmStepArgs& a) {
  check_dpm_args(a, /*cpu=*/true);
  const int64_t k = a.step[0];
  if (k < 0 || k >= a.M)
    throw std::invalid_argument("dpm_step: step = " + std::to_string(k) + " is outside [0, M) with M = " +
                                std::to_string(a.M));
  const float* row = a.coefs + k * kDpmColumns;
  with_guidance_and_clip(a.eps_u != nullptr, a.clip, [&](auto has_u, auto clip) {
    run<decltype(has_u)::value, decltype(clip)::value>(a, row);
  });
}

}  // namespace cbdm
