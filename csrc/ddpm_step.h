// Guided DDPM ancestral step (the CBDM authors' sampler), host entry points.
//
// Per sample b (timestep tb = t[b]) and element i, all math in fp32:
//   eps    = eps_c + omega * (eps_c - eps_u)          (eps = eps_c when eps_u is absent)
//   x0     = table[0][tb] * x_t - table[1][tb] * eps   (sqrt(1/ab), sqrt(1/ab - 1))
//   x0     = clamp(x0, -1, 1)                         (only when clip)
//   mean   = table[2][tb] * x0 + table[3][tb] * x_t    (posterior mean coef1, coef2)
//   out    = tb > 0 ? mean + table[4][tb] * noise : mean   (sigma; noise is not read at tb == 0)
// The order of operations is the one of the torch reference (cbdm_fast.ops.ddpm_step_reference),
// and the build forbids mul+add contraction, so results are bit-identical to it in fp32.
#pragma once
#include <cstdint>

#include "step_common.h"  // DType

namespace cbdm {

struct DdpmStepArgs {
  void* out;            // (B, N) I/O dtype, written
  const void* x_t;      // (B, N) I/O dtype
  const void* eps_c;    // (B, N) I/O dtype, conditional (or only) eps prediction
  const void* eps_u;    // (B, N) I/O dtype, unconditional eps prediction; nullptr = no guidance
  const int64_t* t;     // (B,) int64 timesteps in [0, T)
  const void* noise;    // (B, N) I/O dtype
  const float* table;   // (5, T) float32 contiguous: sqrt_recip_ab, sqrt_recipm1_ab, coef1, coef2, sigma
  int64_t B, N, T;
  float omega;
  bool clip;
  int dtype;            // DType of out, x_t, eps_c, eps_u, noise
};

// Throws std::invalid_argument (ValueError in Python) on bad sizes / null pointers / dtype and when
// some t is outside [0, T) -- all checked before anything is written.
void ddpm_step_cpu(const DdpmStepArgs& a);

// Launches on `stream` (a cudaStream_t as an integer; 0 = legacy default stream) of `device`.
// Never synchronises or allocates; a t outside [0, T) turns that sample's output into NaN.
// Throws std::runtime_error on launch errors.
void ddpm_step_cuda(const DdpmStepArgs& a, int device, uintptr_t stream);

// Checks the arguments shared by both back ends (sizes, null pointers, dtype code).
void check_args(const DdpmStepArgs& a, bool cpu);

// CUDA status for Python's "can the extension run on this GPU" check: "" when usable, else why not.
const char* cuda_runtime_error();

}  // namespace cbdm
