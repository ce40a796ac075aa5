// Guided DDIM step (Song et al. 2021), host entry points.
//
// Per sample b (timestep tb = t[b], previous timestep sb = t_prev[b], sb = -1: the final step to x_0)
// and element i. Per-sample coefficients (ddim_coefs below; float64, then rounded to float32):
//   ab_t = alphas_bar[tb]; ab_s = sb >= 0 ? alphas_bar[sb] : 1
//   sigma = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(max(1 - ab_t / ab_s, 0))
//   c_dir = sqrt(max((1 - ab_s) - sigma * sigma, 0))
// Elementwise, in fp32:
//   eps  = eps_c + omega * (eps_c - eps_u)             (eps = eps_c when eps_u is absent)
//   x0   = (x_t - sqrt(1 - ab_t) * eps) / sqrt(ab_t)
//   x0   = clamp(x0, -1, 1)                            (only when clip)
//   mean = sqrt(ab_s) * x0 + c_dir * eps
//   out  = sigma > 0 ? mean + sigma * noise : mean     (noise is not read when sigma == 0)
// The max(., 0) only absorbs rounding (exactly >= 0 in exact arithmetic for 0 <= eta <= 1).
// The order of operations is the one of the torch reference (cbdm_fast.ops.ddim_step_reference),
// and the build forbids mul+add contraction, so the CPU results are bit-identical to it in fp32.
#pragma once
#include <cmath>
#include <cstdint>

#include "ddpm_step.h"  // cuda_runtime_error
#include "step_common.h"  // DType, CBDM_HD

namespace cbdm {

struct DdimStepArgs {
  void* out;              // (B, N) I/O dtype, written
  const void* x_t;        // (B, N) I/O dtype
  const void* eps_c;      // (B, N) I/O dtype, conditional (or only) eps prediction
  const void* eps_u;      // (B, N) I/O dtype, unconditional eps prediction; nullptr = no guidance
  const int64_t* t;       // (B,) int64 timesteps in [0, T)
  const int64_t* t_prev;  // (B,) int64 previous timesteps in [-1, t[b])
  const void* noise;      // (B, N) I/O dtype; may be nullptr when eta == 0
  const float* alphas_bar;  // (T,) float32 contiguous
  int64_t B, N, T;
  double eta;           // in [0, 1] (double: the torch reference multiplies by the Python float)
  float omega;
  bool clip;
  int dtype;              // DType of out, x_t, eps_c, eps_u, noise
};

struct DdimCoefs {
  float sqrt_ab_t, sqrt_1m_ab_t, sqrt_ab_s, c_dir, sigma;
};

// Per-sample coefficients, computed in float64 from the float32 table and rounded to float32 at the
// end (only IEEE +, -, *, /, sqrt: torch's float32 sqrt on CPU is not always correctly rounded, its
// float64 ops are, so the torch reference reproduces these bits). tb in [0, T) and sb in [-1, tb)
// must hold (callers check or guard).
CBDM_HD DdimCoefs ddim_coefs(const float* alphas_bar, int64_t tb, int64_t sb, double eta) {
  const double ab_t = (double)alphas_bar[tb];
  const double ab_s = sb >= 0 ? (double)alphas_bar[sb] : 1.0;
  const double one_m_ab_t = 1.0 - ab_t;
  const double one_m_ab_s = 1.0 - ab_s;
  double ratio = 1.0 - ab_t / ab_s;
  ratio = ratio < 0.0 ? 0.0 : ratio;
  const double sigma = eta * sqrt(one_m_ab_s / one_m_ab_t) * sqrt(ratio);
  double dir2 = one_m_ab_s - sigma * sigma;
  dir2 = dir2 < 0.0 ? 0.0 : dir2;
  DdimCoefs c;
  c.sqrt_ab_t = (float)sqrt(ab_t);
  c.sqrt_1m_ab_t = (float)sqrt(one_m_ab_t);
  c.sqrt_ab_s = (float)sqrt(ab_s);
  c.c_dir = (float)sqrt(dir2);
  c.sigma = (float)sigma;
  return c;
}

// Throws std::invalid_argument (ValueError in Python) on bad sizes / null pointers / dtype / eta and
// when some t is outside [0, T) or some t_prev outside [-1, t) -- all checked before anything is written.
void ddim_step_cpu(const DdimStepArgs& a);

// Launches on `stream` (a cudaStream_t as an integer; 0 = legacy default stream) of `device`.
// Never synchronises or allocates; a sample whose t is outside [0, T) or whose t_prev is outside
// [-1, t) gets NaN outputs (nothing is read out of bounds). Throws std::runtime_error on launch errors.
void ddim_step_cuda(const DdimStepArgs& a, int device, uintptr_t stream);

// Checks the arguments shared by both back ends (sizes, null pointers, dtype code, eta).
void check_ddim_args(const DdimStepArgs& a, bool cpu);

}  // namespace cbdm
