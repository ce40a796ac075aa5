// CUDA back end of the guided DDIM step: fp32 / fp16 / bf16 I/O, fp32 math, one thread per element
// (grid-stride over elements in x, over samples in y). Launched on the caller's stream: no
// synchronisation, no allocation, so it can be captured in a CUDA graph.
#include <stdexcept>
#include <string>

#include "ddim_step.h"
#include "step_common.cuh"

namespace cbdm {
namespace {

// out, x, ec, eu, nz: (B, N) scalar_t; t, t_prev: (B,) int64; alphas_bar: (T,) float32.
template <typename scalar_t, bool HasU, bool Clip>
__global__ void ddim_step_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ ec, const scalar_t* __restrict__ eu,
                                 const int64_t* __restrict__ t, const int64_t* __restrict__ t_prev,
                                 const scalar_t* __restrict__ nz, const float* __restrict__ alphas_bar, int64_t B,
                                 int64_t N, int64_t T, double eta, float omega) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t tb = t[b], sb = t_prev[b];
    const bool bad = tb < 0 || tb >= T || sb < -1 || sb >= tb;  // guard: never read out of bounds
    const DdimCoefs c = ddim_coefs(alphas_bar, bad ? 0 : tb, bad ? -1 : sb, eta);
    const bool noisy = !bad && c.sigma > 0.0f && nz != nullptr;
    const int64_t off = b * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x) {
      const int64_t k = off + i;
      if (bad) {
        store(out, k, nan_marker());  // NaN marks a bad timestep pair
        continue;
      }
      const float xv = load(x, k);
      const float eps = guided_eps<HasU>(load(ec, k), HasU ? load(eu, k) : 0.0f, omega);
      const float x0 = clip_x0<Clip>((xv - c.sqrt_1m_ab_t * eps) / c.sqrt_ab_t);
      const float mean = c.sqrt_ab_s * x0 + c.c_dir * eps;
      store(out, k, noisy ? mean + c.sigma * load(nz, k) : mean);
    }
  }
}

template <typename scalar_t, bool HasU, bool Clip>
struct Launch {
  static void run(const DdimStepArgs& a, cudaStream_t stream) {
    ddim_step_kernel<scalar_t, HasU, Clip><<<step_grid(a.B, a.N), kStepThreads, 0, stream>>>(
        static_cast<scalar_t*>(a.out), static_cast<const scalar_t*>(a.x_t), static_cast<const scalar_t*>(a.eps_c),
        static_cast<const scalar_t*>(a.eps_u), a.t, a.t_prev, static_cast<const scalar_t*>(a.noise), a.alphas_bar,
        a.B, a.N, a.T, a.eta, a.omega);
  }
};

}  // namespace

void ddim_step_cuda(const DdimStepArgs& a, int device, uintptr_t stream_handle) {
  check_ddim_args(a, /*cpu=*/false);
  launch_step<Launch>("ddim_step_cuda", a, device, stream_handle);
}

}  // namespace cbdm
