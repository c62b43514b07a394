// askd._C: the compiled extension's entry point and the `askd` op library.
//
// For now it holds one op, askd::build_info, so the build path (compiler flags, OpenMP, torch headers)
// is exercised from day one; fused kernels register into the same TORCH_LIBRARY later.
// Python reaches the ops through torch.ops.askd.* once `import askd._C` has loaded this library.

#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <sstream>
#include <string>

namespace {

std::string build_info() {
  std::ostringstream out;
#if defined(__GNUC__) && !defined(__clang__)
  out << "compiler gcc " << __VERSION__;  // gcc's __VERSION__ is the bare number; clang's names itself
#else
  out << "compiler " << __VERSION__;
#endif
  out << "; C++ " << __cplusplus;
#ifdef _OPENMP
  // queried at call time, so it reflects this process (e.g. OMP_NUM_THREADS), not the build machine
  out << "; OpenMP " << _OPENMP << " (max threads " << omp_get_max_threads() << ")";
#else
  out << "; OpenMP off";
#endif
  out << "; torch " << TORCH_VERSION;
#ifdef ASKD_WITH_CUDA
  out << "; CUDA on";
#else
  out << "; CUDA off";
#endif
  return out.str();
}

}  // namespace

TORCH_LIBRARY(askd, m) {
  m.def("build_info() -> str", &build_info);
}

// Empty on purpose: importing the module only has to load the library so TORCH_LIBRARY runs.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "askd compiled ops; call them through torch.ops.askd";
}
