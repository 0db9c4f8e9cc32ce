// Check and dtype-dispatch macros.
//
// The first part is torch-free (CUDA runtime only) and used by the kernel sources; the second part
// is defined only when torch's headers came first (csrc/bindings.cpp), so nvcc compiles every
// kernel source without torch.
#pragma once

#include <cuda_runtime_api.h>

// Host launchers return cudaError_t: propagate the first failure to the binding, which raises.
#define GRADCLIP_RETURN_IF_ERROR(expr)          \
  do {                                          \
    const cudaError_t gradclip_err_ = (expr);   \
    if (gradclip_err_ != cudaSuccess) {         \
      return gradclip_err_;                     \
    }                                           \
  } while (0)

// Device-side dispatch on a per-tensor dtype tag (gradclip::DType): binds `scalar_t` to float,
// __half or __nv_bfloat16 and runs the body. The including .cu provides cuda_fp16.h/cuda_bf16.h.
#define GRADCLIP_DISPATCH_DTYPE(tag, scalar_t, ...) \
  switch (tag) {                                    \
    case ::gradclip::DType::kFloat32: {             \
      using scalar_t = float;                       \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case ::gradclip::DType::kFloat16: {             \
      using scalar_t = __half;                      \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
    case ::gradclip::DType::kBFloat16: {            \
      using scalar_t = __nv_bfloat16;               \
      __VA_ARGS__;                                  \
      break;                                        \
    }                                               \
  }

#if defined(TORCH_CHECK)
// Torch-facing checks (binding only): raise a Python RuntimeError naming the offending gradient.
#define GRADCLIP_CHECK_GRAD(cond, index, ...) \
  TORCH_CHECK((cond), "gradclip cuda backend: gradient ", (index), " ", __VA_ARGS__)

// Every launcher's cudaError_t goes through this right after the launch. A failed launch also
// leaves its (non-sticky) error in the runtime's last-error slot; it is cleared before raising,
// or the next torch kernel's C10_CUDA_KERNEL_LAUNCH_CHECK would report our failure as its own.
#define GRADCLIP_CHECK_LAUNCH(expr)                                                                \
  do {                                                                                             \
    const cudaError_t gradclip_err_ = (expr);                                                      \
    if (gradclip_err_ != cudaSuccess) (void)cudaGetLastError();                                    \
    TORCH_CHECK(gradclip_err_ == cudaSuccess, "gradclip cuda backend: ", #expr, " failed: ",      \
                cudaGetErrorString(gradclip_err_));                                                \
  } while (0)
#endif
