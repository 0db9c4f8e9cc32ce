// The kernels' dtype and norm codes (csrc/tensor_list.h) from torch's values, shared by the CPU and
// CUDA backends; each words its own error for what its kernels do not take.
#pragma once

#include <c10/core/ScalarType.h>

#include <cmath>
#include <optional>

#include "tensor_list.h"

namespace gradclip {

inline std::optional<DType> kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return DType::kFloat32;
    case c10::ScalarType::Half:
      return DType::kFloat16;
    case c10::ScalarType::BFloat16:
      return DType::kBFloat16;
    default:
      return std::nullopt;
  }
}

inline std::optional<NormType> kernel_norm(double norm_type) {
  if (norm_type == 1.0) return NormType::kL1;
  if (norm_type == 2.0) return NormType::kL2;
  if (std::isinf(norm_type) && norm_type > 0) return NormType::kInf;
  return std::nullopt;
}

}  // namespace gradclip
