// CUDA back end of the guided DDPM step: fp32 / fp16 / bf16 I/O, fp32 math, one thread per
// element (grid-stride over elements in x, over samples in y). Launched on the caller's stream:
// no synchronisation, no allocation, so it can be captured in a CUDA graph.
#include <stdexcept>
#include <string>

#include "ddpm_step.h"
#include "step_common.cuh"

namespace cbdm {
namespace {

// out, x, ec, eu, nz: (B, N) scalar_t; t: (B,) int64; table: (5, T) float32.
template <typename scalar_t, bool HasU, bool Clip>
__global__ void ddpm_step_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const scalar_t* __restrict__ ec, const scalar_t* __restrict__ eu,
                                 const int64_t* __restrict__ t, const scalar_t* __restrict__ nz,
                                 const float* __restrict__ table, int64_t B, int64_t N, int64_t T, float omega) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t tb = t[b];
    const bool bad = tb < 0 || tb >= T;  // guard: never read the table out of bounds
    const int64_t tt = bad ? 0 : tb;
    const float c0 = table[tt], c1 = table[T + tt], c2 = table[2 * T + tt], c3 = table[3 * T + tt];
    const float sigma = table[4 * T + tt];
    const int64_t off = b * N;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < N; i += (int64_t)gridDim.x * blockDim.x) {
      const int64_t k = off + i;
      if (bad) {
        store(out, k, nan_marker());  // NaN marks a bad timestep
        continue;
      }
      const float xv = load(x, k);
      const float eps = guided_eps<HasU>(load(ec, k), HasU ? load(eu, k) : 0.0f, omega);
      const float x0 = clip_x0<Clip>(c0 * xv - c1 * eps);
      const float mean = c2 * x0 + c3 * xv;
      store(out, k, tb > 0 ? mean + sigma * load(nz, k) : mean);
    }
  }
}

template <typename scalar_t, bool HasU, bool Clip>
struct Launch {
  static void run(const DdpmStepArgs& a, cudaStream_t stream) {
    ddpm_step_kernel<scalar_t, HasU, Clip><<<step_grid(a.B, a.N), kStepThreads, 0, stream>>>(
        static_cast<scalar_t*>(a.out), static_cast<const scalar_t*>(a.x_t), static_cast<const scalar_t*>(a.eps_c),
        static_cast<const scalar_t*>(a.eps_u), a.t, static_cast<const scalar_t*>(a.noise), a.table, a.B, a.N, a.T,
        a.omega);
  }
};

}  // namespace

void ddpm_step_cuda(const DdpmStepArgs& a, int device, uintptr_t stream_handle) {
  check_args(a, /*cpu=*/false);
  launch_step<Launch>("ddpm_step_cuda", a, device, stream_handle);
}

const char* cuda_runtime_error() {
  thread_local std::string msg;
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    msg = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the (non-sticky) error
    return msg.c_str();
  }
  if (n == 0) return "no CUDA device";
  return "";
}

}  // namespace cbdm
