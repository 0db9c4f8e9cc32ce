// The Python module gradclip._C. Op implementations register themselves with TORCH_LIBRARY_IMPL in
// their own files (csrc/cuda/ for the CUDA key); this file only builds the pybind11 module.
#include <torch/extension.h>

#include "module.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gradclip native core; importing it registers the compiled gradclip::* kernels";
  gradclip::bind_cpu(m);
#if defined(GRADCLIP_WITH_CUDA)
  m.attr("WITH_CUDA") = true;
  gradclip::bind_cuda(m);
#else
  m.attr("WITH_CUDA") = false;
#endif
}
