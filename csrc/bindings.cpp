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

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// The Args struct of each step from the Python arguments, field by field (by name: the structs hold several
// fields of one type, which positional initialisation would let a reordering swap silently).
cbdm::DdpmStepArgs ddpm_args(uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t,
                             uintptr_t noise, uintptr_t table, int64_t B, int64_t N, int64_t T, float omega,
                             bool clip, int dtype) {
  cbdm::DdpmStepArgs a;
  a.out = ptr<void>(out); a.x_t = ptr<const void>(x_t); a.eps_c = ptr<const void>(eps_c);
  a.eps_u = ptr<const void>(eps_u); a.t = ptr<const int64_t>(t); a.noise = ptr<const void>(noise);
  a.table = ptr<const float>(table); a.B = B; a.N = N; a.T = T; a.omega = omega; a.clip = clip; a.dtype = dtype;
  return a;
}

cbdm::DdimStepArgs ddim_args(uintptr_t out, uintptr_t x_t, uintptr_t eps_c, uintptr_t eps_u, uintptr_t t,
                             uintptr_t t_prev, uintptr_t noise, uintptr_t alphas_bar, int64_t B, int64_t N,
                             int64_t T, double eta, float omega, bool clip, int dtype) {
  cbdm::DdimStepArgs a;
  a.out = ptr<void>(out); a.x_t = ptr<const void>(x_t); a.eps_c = ptr<const void>(eps_c);
  a.eps_u = ptr<const void>(eps_u); a.t = ptr<const int64_t>(t); a.t_prev = ptr<const int64_t>(t_prev);
  a.noise = ptr<const void>(noise); a.alphas_bar = ptr<const float>(alphas_bar); a.B = B; a.N = N; a.T = T;
  a.eta = eta; a.omega = omega; a.clip = clip; a.dtype = dtype;
  return a;
}

cbdm::DpmStepArgs dpm_args(uintptr_t x, uintptr_t eps_c, uintptr_t eps_u, uintptr_t x0_prev, uintptr_t coefs,
                           uintptr_t step, int64_t B, int64_t N, int64_t M, bool clip, int dtype) {
  cbdm::DpmStepArgs a;
  a.x = ptr<void>(x); a.eps_c = ptr<const void>(eps_c); a.eps_u = ptr<const void>(eps_u);
  a.x0_prev = ptr<void>(x0_prev); a.coefs = ptr<const float>(coefs); a.step = ptr<const int64_t>(step);
  a.B = B; a.N = N; a.M = M; a.clip = clip; a.dtype = dtype;
  return a;
}

// Registers NAME_cpu(args...) and NAME_cuda(args..., device, stream) over one argument list: `make` builds
// the step's Args from the Python arguments, `names` are their keywords, `what` and `note` make the
// docstrings. The GIL is released while the step runs.
template <typename Args, typename... P, typename... Names>
void def_step(py::module_& m, const std::string& name, Args (*make)(P...), void (*cpu)(const Args&),
              void (*cuda)(const Args&, int, uintptr_t), const std::string& what, const std::string& note,
              Names... names) {
  m.def((name + "_cpu").c_str(),
        [make, cpu](P... p) {
          const Args a = make(p...);
          py::gil_scoped_release release;
          cpu(a);
        },
        py::arg(names)..., (what + " on the CPU (float32, dtype code 0). " + note).c_str());
  m.def((name + "_cuda").c_str(),
        [make, cuda](P... p, int device, uintptr_t stream) {
          const Args a = make(p...);
          py::gil_scoped_release release;
          cuda(a, device, stream);
        },
        py::arg(names)..., py::arg("device"), py::arg("stream"),
        (what + " on `device`, launched on `stream` (cudaStream_t as int). dtype code: 0 float32, 1 float16, "
                "2 bfloat16. " + note).c_str());
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

  def_step(m, "ddpm_step", &ddpm_args, &cbdm::ddpm_step_cpu, &cbdm::ddpm_step_cuda,
           "Guided DDPM ancestral step", "eps_u = 0: no guidance.", "out", "x_t", "eps_c", "eps_u", "t", "noise",
           "table", "B", "N", "T", "omega", "clip", "dtype");
  def_step(m, "ddim_step", &ddim_args, &cbdm::ddim_step_cpu, &cbdm::ddim_step_cuda,
           "Guided DDIM step", "eps_u = 0: no guidance; noise = 0 allowed when eta == 0.", "out", "x_t",
           "eps_c", "eps_u", "t", "t_prev", "noise", "alphas_bar", "B", "N", "T", "eta", "omega", "clip", "dtype");
  def_step(m, "dpm_step", &dpm_args, &cbdm::dpm_step_cpu, &cbdm::dpm_step_cuda,
           "Guided DPM-Solver++(2M) step", "x and x0_prev in place, the step index read from memory; eps_u = 0: "
           "no guidance.", "x", "eps_c", "eps_u", "x0_prev", "coefs", "step", "B", "N", "M", "clip", "dtype");
}
