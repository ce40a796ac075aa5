// Guided DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2), in place, host entry points.
//
// Row k = step[0] of the (M, 6) float32 coefficient table holds (w, inv_alpha_s, sigma_over_alpha_s,
// a, b, c) of the step s -> t (cbdm_fast.samplers.dpm_solver.dpm_solver_coefficients). Elementwise, fp32:
//   eps     = eps_c + w * (eps_c - eps_u)                   (eps = eps_c when eps_u is absent)
//   x0      = x * inv_alpha_s - sigma_over_alpha_s * eps   (the data prediction (x - sigma_s eps) / alpha_s)
//   x0      = clamp(x0, -1, 1)                             (only when clip)
//   x_new   = a * x + b * x0, plus c * x0_prev when c != 0 (x0_prev is not read at a first-order step)
//   x <- x_new, x0_prev <- x0                              (in place, each element read before it is written)
// The step index is read from device memory, so a captured CUDA graph replays every step of a run.
// The order of operations is the one of the torch reference (cbdm_fast.ops.dpm_step_reference), and
// the build forbids mul+add contraction, so the CPU results are bit-identical to it in fp32.
#pragma once
#include <cstdint>

#include "step_common.h"  // DType

namespace cbdm {

struct DpmStepArgs {
  void* x;                // (B, N) I/O dtype, read and written
  const void* eps_c;      // (B, N) I/O dtype, conditional (or only) eps prediction
  const void* eps_u;      // (B, N) I/O dtype, unconditional eps prediction; nullptr = no guidance
  void* x0_prev;          // (B, N) I/O dtype, the previous step's x0: read (when c != 0), then written
  const float* coefs;     // (M, 6) float32 contiguous: w, inv_alpha_s, sigma_over_alpha_s, a, b, c
  const int64_t* step;    // (1,) int64: the row of coefs, in [0, M)
  int64_t B, N, M;
  bool clip;
  int dtype;              // DType of x, eps_c, eps_u, x0_prev
};

constexpr int kDpmColumns = 6;

// Throws std::invalid_argument (ValueError in Python) on bad sizes / null pointers / dtype and when
// step is outside [0, M) -- all checked before anything is written.
void dpm_step_cpu(const DpmStepArgs& a);

// Launches on `stream` (a cudaStream_t as an integer; 0 = legacy default stream) of `device`.
// Never synchronises or allocates; a step outside [0, M) writes NaN to x and x0_prev (nothing is read
// out of bounds). Throws std::runtime_error on launch errors.
void dpm_step_cuda(const DpmStepArgs& a, int device, uintptr_t stream);

// Checks the arguments shared by both back ends (sizes, null pointers, dtype code).
void check_dpm_args(const DpmStepArgs& a, bool cpu);

}  // namespace cbdm
