// CUDA back end of the guided DPM-Solver++(2M) step: fp32 / fp16 / bf16 I/O, fp32 math, one thread per
// element (grid-stride over elements in x, over samples in y). The step index and the coefficients are
// read from device memory and the launch goes to the caller's stream (no synchronisation, no
// allocation), so one captured CUDA graph replays every step of a run.
#include <stdexcept>
#include <string>

#include "dpm_step.h"
#include "step_common.cuh"

namespace cbdm {
namespace {

// x, x0p: (B, N) scalar_t, read and written; ec, eu: (B, N) scalar_t; coefs: (M, 6) float32; step: (1,) int64.
template <typename scalar_t, bool HasU, bool Clip>
__global__ void dpm_step_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ ec,
                                const scalar_t* __restrict__ eu, scalar_t* __restrict__ x0p,
                                const float* __restrict__ coefs, const int64_t* __restrict__ step, int64_t B,
                                int64_t N, int64_t M) {
  const int64_t k = *step;
  const bool bad = k < 0 || k >= M;  // guard: never read out of bounds
  const float* row = coefs + (bad ? 0 : k) * kDpmColumns;
  const float w = row[0], inv_alpha = row[1], sigma_over_alpha = row[2], ca = row[3], cb = row[4], cc = row[5];
  const bool history = cc != 0.0f;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t off = b * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x) {
      const int64_t e = off + i;
      if (bad) {  // NaN marks a bad step index
        store(x, e, nan_marker());
        store(x0p, e, nan_marker());
        continue;
      }
      const float xv = load(x, e);
      const float eps = guided_eps<HasU>(load(ec, e), HasU ? load(eu, e) : 0.0f, w);
      const float x0 = clip_x0<Clip>(xv * inv_alpha - sigma_over_alpha * eps);
      float out = ca * xv + cb * x0;
      if (history) out = out + cc * load(x0p, e);
      store(x, e, out);
      store(x0p, e, x0);
    }
  }
}

template <typename scalar_t, bool HasU, bool Clip>
struct Launch {
  static void run(const DpmStepArgs& a, cudaStream_t stream) {
    dpm_step_kernel<scalar_t, HasU, Clip><<<step_grid(a.B, a.N), kStepThreads, 0, stream>>>(
        static_cast<scalar_t*>(a.x), static_cast<const scalar_t*>(a.eps_c), static_cast<const scalar_t*>(a.eps_u),
        static_cast<scalar_t*>(a.x0_prev), a.coefs, a.step, a.B, a.N, a.M);
  }
};

}  // namespace

void dpm_step_cuda(const DpmStepArgs& a, int device, uintptr_t stream_handle) {
  check_dpm_args(a, /*cpu=*/false);
  launch_step<Launch>("dpm_step_cuda", a, device, stream_handle);
}

}  // namespace cbdm
