// pybind11 module cbdm_fast._C. Pointers arrive as integers (tensor.data_ptr()); the module does
// not link torch. std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cbdm_build_config.h"
#include "ddim_step.h"
#include "ddpm_step.h"
#include "dpm_step.h"

namespace py = pybind11;

namespace {

cbdm::DdpmStepArgs make_args(uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t,
                             uintptr_t noise, uintptr_t table, int64_t B, int64_t N, int64_t T, float omega,
                             bool clip, int dtype) {
  cbdm::DdpmStepArgs a;
  a.out = reinterpret_cast<void*>(out);
  a.x_t = reinterpret_cast<const void*>(x_t);
  a.eps_c = reinterpret_cast<const void*>(eps_c);
  a.eps_u = reinterpret_cast<const void*>(eps_u);
  a.t = reinterpret_cast<const int64_t*>(t);
  a.noise = reinterpret_cast<const void*>(noise);
  a.table = reinterpret_cast<const float*>(table);
  a.B = B;
  a.N = N;
  a.T = T;
  a.omega = omega;
  a.clip = clip;
  a.dtype = dtype;
  return a;
}

cbdm::DdimStepArgs make_ddim_args(uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t,
                                  uintptr_t t_prev, uintptr_t noise, uintptr_t alphas_bar, int64_t B, int64_t N,
                                  int64_t T, double eta, float omega, bool clip, int dtype) {
  cbdm::DdimStepArgs a;
  a.out = reinterpret_cast<void*>(out);
  a.x_t = reinterpret_cast<const void*>(x_t);
  a.eps_c = reinterpret_cast<const void*>(eps_c);
  a.eps_u = reinterpret_cast<const void*>(eps_u);
  a.t = reinterpret_cast<const int64_t*>(t);
  a.t_prev = reinterpret_cast<const int64_t*>(t_prev);
  a.noise = reinterpret_cast<const void*>(noise);
  a.alphas_bar = reinterpret_cast<const float*>(alphas_bar);
  a.B = B;
  a.N = N;
  a.T = T;
  a.eta = eta;
  a.omega = omega;
  a.clip = clip;
  a.dtype = dtype;
  return a;
}

cbdm::DpmStepArgs make_dpm_args(uintptr_t x, uintptr_t eps_c, uintptr_t eps_u, uintptr_t x0_prev, uintptr_t coefs,
                                uintptr_t step, int64_t B, int64_t N, int64_t M, bool clip, int dtype) {
  cbdm::DpmStepArgs a;
  a.x = reinterpret_cast<void*>(x);
  a.eps_c = reinterpret_cast<const void*>(eps_c);
  a.eps_u = reinterpret_cast<const void*>(eps_u);
  a.x0_prev = reinterpret_cast<void*>(x0_prev);
  a.coefs = reinterpret_cast<const float*>(coefs);
  a.step = reinterpret_cast<const int64_t*>(step);
  a.B = B;
  a.N = N;
  a.M = M;
  a.clip = clip;
  a.dtype = dtype;
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cbdm_fast C++/CUDA extension (no torch dependency; pointers are passed as integers)";

  m.def("has_cuda", [] { return CBDM_FAST_WITH_CUDA != 0; }, "True when the CUDA part was compiled in.");
  m.def("cuda_archs", [] { return std::string(CBDM_FAST_CUDA_ARCHS_STR); },
        "CUDA architectures compiled in, e.g. '80;90' ('' without CUDA).");
  m.def("has_openmp", [] {
#if defined(CBDM_FAST_WITH_OPENMP)
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_runtime_error", [] { return std::string(cbdm::cuda_runtime_error()); },
        "'' when the compiled CUDA part can run here, else the reason (driver too old, no device, ...).");

  m.def(
      "ddpm_step_cpu",
      [](uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t, uintptr_t noise,
         uintptr_t table, int64_t B, int64_t N, int64_t T, float omega, bool clip, int dtype) {
        auto a = make_args(out, x_t, eps_c, eps_u, t, noise, table, B, N, T, omega, clip, dtype);
        py::gil_scoped_release release;
        cbdm::ddpm_step_cpu(a);
      },
      py::arg("out"), py::arg("x_t"), py::arg("eps_c"), py::arg("eps_u"), py::arg("t"), py::arg("noise"),
      py::arg("table"), py::arg("B"), py::arg("N"), py::arg("T"), py::arg("omega"), py::arg("clip"),
      py::arg("dtype"),
      "Guided DDPM ancestral step on the CPU (float32, dtype code 0). eps_u = 0: no guidance.");

  m.def(
      "ddpm_step_cuda",
      [](uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t, uintptr_t noise,
         uintptr_t table, int64_t B, int64_t N, int64_t T, float omega, bool clip, int dtype, int device,
         uintptr_t stream) {
        auto a = make_args(out, x_t, eps_c, eps_u, t, noise, table, B, N, T, omega, clip, dtype);
        py::gil_scoped_release release;
        cbdm::ddpm_step_cuda(a, device, stream);
      },
      py::arg("out"), py::arg("x_t"), py::arg("eps_c"), py::arg("eps_u"), py::arg("t"), py::arg("noise"),
      py::arg("table"), py::arg("B"), py::arg("N"), py::arg("T"), py::arg("omega"), py::arg("clip"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "Guided DDPM ancestral step on `device`, launched on `stream` (cudaStream_t as int). "
      "dtype code: 0 float32, 1 float16, 2 bfloat16.");

  m.def(
      "ddim_step_cpu",
      [](uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t, uintptr_t t_prev,
         uintptr_t noise, uintptr_t alphas_bar, int64_t B, int64_t N, int64_t T, double eta, float omega, bool clip,
         int dtype) {
        auto a = make_ddim_args(out, x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, B, N, T, eta, omega, clip, dtype);
        py::gil_scoped_release release;
        cbdm::ddim_step_cpu(a);
      },
      py::arg("out"), py::arg("x_t"), py::arg("eps_c"), py::arg("eps_u"), py::arg("t"), py::arg("t_prev"),
      py::arg("noise"), py::arg("alphas_bar"), py::arg("B"), py::arg("N"), py::arg("T"), py::arg("eta"),
      py::arg("omega"), py::arg("clip"), py::arg("dtype"),
      "Guided DDIM step on the CPU (float32, dtype code 0). eps_u = 0: no guidance; noise = 0 allowed when eta == 0.");

  m.def(
      "ddim_step_cuda",
      [](uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t, uintptr_t t_prev,
         uintptr_t noise, uintptr_t alphas_bar, int64_t B, int64_t N, int64_t T, double eta, float omega, bool clip,
         int dtype, int device, uintptr_t stream) {
        auto a = make_ddim_args(out, x_t, eps_c, eps_u, t, t_prev, noise, alphas_bar, B, N, T, eta, omega, clip, dtype);
        py::gil_scoped_release release;
        cbdm::ddim_step_cuda(a, device, stream);
      },
      py::arg("out"), py::arg("x_t"), py::arg("eps_c"), py::arg("eps_u"), py::arg("t"), py::arg("t_prev"),
      py::arg("noise"), py::arg("alphas_bar"), py::arg("B"), py::arg("N"), py::arg("T"), py::arg("eta"),
      py::arg("omega"), py::arg("clip"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "Guided DDIM step on `device`, launched on `stream` (cudaStream_t as int). "
      "dtype code: 0 float32, 1 float16, 2 bfloat16.");

  m.def(
      "dpm_step_cpu",
      [](uintptr_t x, uintptr_t eps_c, uintptr_t eps_u, uintptr_t x0_prev, uintptr_t coefs, uintptr_t step, int64_t B,
         int64_t N, int64_t M, bool clip, int dtype) {
        auto a = make_dpm_args(x, eps_c, eps_u, x0_prev, coefs, step, B, N, M, clip, dtype);
        py::gil_scoped_release release;
        cbdm::dpm_step_cpu(a);
      },
      py::arg("x"), py::arg("eps_c"), py::arg("eps_u"), py::arg("x0_prev"), py::arg("coefs"), py::arg("step"),
      py::arg("B"), py::arg("N"), py::arg("M"), py::arg("clip"), py::arg("dtype"),
      "Guided DPM-Solver++(2M) step on the CPU (float32, dtype code 0), x and x0_prev in place. eps_u = 0: no guidance.");

  m.def(
      "dpm_step_cuda",
      [](uintptr_t x, uintptr_t eps_c, uintptr_t eps_u, uintptr_t x0_prev, uintptr_t coefs, uintptr_t step, int64_t B,
         int64_t N, int64_t M, bool clip, int dtype, int device, uintptr_t stream) {
        auto a = make_dpm_args(x, eps_c, eps_u, x0_prev, coefs, step, B, N, M, clip, dtype);
        py::gil_scoped_release release;
        cbdm::dpm_step_cuda(a, device, stream);
      },
      py::arg("x"), py::arg("eps_c"), py::arg("eps_u"), py::arg("x0_prev"), py::arg("coefs"), py::arg("step"),
      py::arg("B"), py::arg("N"), py::arg("M"), py::arg("clip"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "Guided DPM-Solver++(2M) step on `device`, launched on `stream` (cudaStream_t as int), x and x0_prev in "
      "place; the step index is read from device memory. dtype code: 0 float32, 1 float16, 2 bfloat16.");
}
