// Device and launch pieces shared by the CUDA sampling-step back ends: fp32 loads/stores of the
// I/O dtypes, and a launcher that selects the device, dispatches on the dtype code and the two switches,
// launches on the caller's stream (no sync, no allocation: capturable in a CUDA graph) and reports
// launch errors.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "step_common.h"

namespace cbdm {

template <typename T> __device__ __forceinline__ float load(const T* p, int64_t i);
template <> __device__ __forceinline__ float load<float>(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ float nan_marker() { return __int_as_float(0x7fc00000); }

// Grid of the element-wise step kernels: elements of a sample in x (grid-stride), samples in y.
constexpr int kStepThreads = 256;
inline dim3 step_grid(int64_t B, int64_t N) {
  const int64_t gx = std::min<int64_t>((N + kStepThreads - 1) / kStepThreads, 1024);
  return dim3((unsigned)gx, (unsigned)std::min<int64_t>(B, 65535));
}

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": " + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

template <typename T> struct Tag { using type = T; };

// launch(Tag<scalar_t>{}, stream) runs on `device` (restored afterwards) for the dtype code.
template <typename Launch>
void launch_on_device(const char* op, int dtype, int device, uintptr_t stream_handle, Launch launch) {
  int prev = -1;
  check_cuda(cudaGetDevice(&prev), op, "cudaGetDevice");
  if (prev != device) check_cuda(cudaSetDevice(device), op, "cudaSetDevice");
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (dtype) {
    case kFloat32: launch(Tag<float>{}, stream); break;
    case kFloat16: launch(Tag<__half>{}, stream); break;
    default: launch(Tag<__nv_bfloat16>{}, stream); break;
  }
  const cudaError_t err = cudaGetLastError();
  if (prev != device) cudaSetDevice(prev);
  check_cuda(err, op, "kernel launch failed");
}

// The dispatch of every step kernel: Launch<scalar_t, HasU, Clip>::run(a, stream) for a's dtype code and
// its two switches (eps_u given, clip), on `device` and the caller's stream.
template <template <typename, bool, bool> class Launch, typename Args>
void launch_step(const char* op, const Args& a, int device, uintptr_t stream_handle) {
  launch_on_device(op, a.dtype, device, stream_handle, [&](auto tag, cudaStream_t stream) {
    using scalar_t = typename decltype(tag)::type;
    with_guidance_and_clip(a.eps_u != nullptr, a.clip, [&](auto has_u, auto clip) {
      Launch<scalar_t, decltype(has_u)::value, decltype(clip)::value>::run(a, stream);
    });
  });
}

}  // namespace cbdm
