// CUDA back end of the guided DDIM step: fp32 / fp16 / bf16 I/O, fp32 math, one thread per element
// (grid-stride over elements in x, over samples in y). Launched on the caller's stream: no
// synchronisation, no allocation, so it can be captured in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "ddim_step.h"

namespace cbdm {
namespace {

template <typename T> __device__ __forceinline__ float ld(const T* p, int64_t i);
template <> __device__ __forceinline__ float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float ld<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float ld<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

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
        st(out, k, __int_as_float(0x7fc00000));  // NaN marks a bad timestep pair
        continue;
      }
      const float xv = ld(x, k);
      const float e_c = ld(ec, k);
      float eps = e_c;
      if (HasU) eps = e_c + omega * (e_c - ld(eu, k));
      float x0 = (xv - c.sqrt_1m_ab_t * eps) / c.sqrt_ab_t;
      if (Clip) {  // comparisons are false for NaN, so NaN propagates like torch.clamp
        x0 = x0 < -1.0f ? -1.0f : x0;
        x0 = x0 > 1.0f ? 1.0f : x0;
      }
      const float mean = c.sqrt_ab_s * x0 + c.c_dir * eps;
      st(out, k, noisy ? mean + c.sigma * ld(nz, k) : mean);
    }
  }
}

template <typename scalar_t>
void launch(const DdimStepArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t gx = std::min<int64_t>((a.N + kThreads - 1) / kThreads, 1024);
  const int64_t gy = std::min<int64_t>(a.B, 65535);
  const dim3 grid((unsigned)gx, (unsigned)gy);
  auto* out = static_cast<scalar_t*>(a.out);
  auto* x = static_cast<const scalar_t*>(a.x_t);
  auto* ec = static_cast<const scalar_t*>(a.eps_c);
  auto* eu = static_cast<const scalar_t*>(a.eps_u);
  auto* nz = static_cast<const scalar_t*>(a.noise);
  const bool has_u = eu != nullptr;
#define CBDM_LAUNCH(U, C)                                                                                  \
  ddim_step_kernel<scalar_t, U, C><<<grid, kThreads, 0, stream>>>(out, x, ec, eu, a.t, a.t_prev, nz,     \
                                                                 a.alphas_bar, a.B, a.N, a.T, a.eta, a.omega)
  if (has_u && a.clip) CBDM_LAUNCH(true, true);
  else if (has_u) CBDM_LAUNCH(true, false);
  else if (a.clip) CBDM_LAUNCH(false, true);
  else CBDM_LAUNCH(false, false);
#undef CBDM_LAUNCH
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ddim_step_cuda: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

}  // namespace

void ddim_step_cuda(const DdimStepArgs& a, int device, uintptr_t stream_handle) {
  check_ddim_args(a, /*cpu=*/false);
  int prev = -1;
  check_cuda(cudaGetDevice(&prev), "cudaGetDevice");
  if (prev != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.dtype) {
    case kFloat32: launch<float>(a, stream); break;
    case kFloat16: launch<__half>(a, stream); break;
    default: launch<__nv_bfloat16>(a, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (prev != device) cudaSetDevice(prev);
  check_cuda(err, "kernel launch failed");
}

}  // namespace cbdm
