// The CUDA entry points of a build without CUDA (no nvcc at build time): each says so, as a
// RuntimeError in Python. CMakeLists.txt compiles this file instead of the *_cuda.cu files.
#include <stdexcept>
#include <string>

#include "ddim_step.h"
#include "ddpm_step.h"
#include "dpm_step.h"

namespace cbdm {
namespace {

[[noreturn]] void built_without_cuda(const char* op) {
  throw std::runtime_error(std::string(op) + ": cbdm_fast._C was built without CUDA "
                                             "(rebuild with nvcc on PATH or CBDM_FAST_CUDA=1)");
}

}  // namespace

void ddpm_step_cuda(const DdpmStepArgs&, int, uintptr_t) { built_without_cuda("ddpm_step_cuda"); }
void ddim_step_cuda(const DdimStepArgs&, int, uintptr_t) { built_without_cuda("ddim_step_cuda"); }
void dpm_step_cuda(const DpmStepArgs&, int, uintptr_t) { built_without_cuda("dpm_step_cuda"); }
const char* cuda_runtime_error() { return "cbdm_fast._C was built without CUDA"; }

}  // namespace cbdm
