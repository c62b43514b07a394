// askd._C: the compiled extension's entry point and the `askd` op library.
//
// The schemas of every compiled op live here; csrc/cpu/*.cpp and csrc/cuda/*.cu register their kernels with
// TORCH_LIBRARY_IMPL(askd, CPU / CUDA). The contracts (what each output holds, the gradient formulas) are
// written out in askd/ops/cbam.py, askd/ops/cosine_distill.py and askd/ops/prelu.py, whose fake kernels serve
// torch.compile.
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
  m.def(
      "cbam_forward(Tensor x, Tensor w1, Tensor w2, Tensor ws) -> (Tensor y, Tensor a_c, Tensor a_s, "
      "Tensor chan, Tensor idx_c, Tensor pooled, Tensor idx_s)");
  m.def(
      "cbam_backward(Tensor dy, Tensor da_c, Tensor da_s, Tensor x, Tensor w1, Tensor w2, Tensor ws, Tensor a_c, "
      "Tensor a_s, Tensor chan, Tensor idx_c, Tensor pooled, Tensor idx_s) -> (Tensor dx, Tensor dw1, Tensor dw2, "
      "Tensor dws)");
  m.def("cosine_distill_forward(Tensor[] teacher, Tensor[] student, float weight) -> (Tensor loss, Tensor stats)");
  m.def(
      "cosine_distill_backward(Tensor grad, Tensor[] teacher, Tensor[] student, Tensor stats, float weight) "
      "-> Tensor[]");
  // forward and the student gradients (for a unit upstream gradient) in one pass, each row still in cache;
  // CPU only: there the backward pass would read every map again for nothing
  m.def(
      "cosine_distill_forward_grad(Tensor[] teacher, Tensor[] student, float weight) -> (Tensor loss, Tensor stats, "
      "Tensor[] dstudent)");
  // PReLU's gradients for 4-D x and one weight per channel, in one pass over x and grad (askd/ops/prelu.py)
  m.def("prelu_backward(Tensor grad, Tensor x, Tensor weight) -> (Tensor dx, Tensor dweight)");
}

// Empty on purpose: importing the module only has to load the library so TORCH_LIBRARY runs.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "askd compiled ops; call them through torch.ops.askd";
}
