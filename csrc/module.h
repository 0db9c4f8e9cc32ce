// What each part of gradclip._C adds to the Python module (csrc/bindings.cpp calls them).
#pragma once

#include <torch/extension.h>

namespace gradclip {

// CPU backend (csrc/cpu/norm_clip.cpp): build attributes and the bench's bandwidth floors.
void bind_cpu(pybind11::module_& m);

#if defined(GRADCLIP_WITH_CUDA)
// CUDA backend (csrc/cuda/cuda_ops.cpp): layout check and test hooks.
void bind_cuda(pybind11::module_& m);
#endif

}  // namespace gradclip
