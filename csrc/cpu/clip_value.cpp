// CPU kernel of gradclip::cpu_clip_grad_value_ (schema in gradclip/ops.py).
//
// Math: g <- clamp_max(clamp_min(g, -clip_value), clip_value) in place, exactly CPU torch's
// _foreach_clamp_min_ then _foreach_clamp_max_: the bounds are rounded to each gradient's dtype (a
// bound the dtype cannot hold raises, as torch does), an element is replaced only when strictly past
// a bound (so NaN stays NaN and a zero keeps its sign: clip_value=0 turns -1 into -0.0), and fp16/bf16
// compare through fp32 (exact). Same fixed chunks and thread ranges as the norm kernels.
// Bytes: reads and writes every gradient once.
#include <c10/core/Scalar.h>
#include <torch/library.h>

#include "cpu_kernels.h"

namespace gradclip {
namespace cpu {
namespace {

template <class T>
void clamp_chunk(T* p, int64_t n, T lo_t, T hi_t) {
  constexpr int64_t kStep = 2 * fVec::size();
  const float lo = static_cast<float>(lo_t);
  const float hi = static_cast<float>(hi_t);
  const fVec lo_v(lo), hi_v(hi);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    auto [a, b] = load2(p + i);
    // at::vec::clamp_min/clamp_max are the vector ops of torch's own clamp kernels.
    store2(p + i, at::vec::clamp_max(at::vec::clamp_min(a, lo_v), hi_v),
           at::vec::clamp_max(at::vec::clamp_min(b, lo_v), hi_v));
  }
  for (; i < n; ++i) {
    T x = p[i];
    if (static_cast<float>(x) < lo) x = lo_t;  // std::max(x, lo): x unless x < lo
    if (hi < static_cast<float>(x)) x = hi_t;  // std::min(x, hi): x unless hi < x
    p[i] = x;
  }
}

struct ValueState {
  Prepared prep;
  std::vector<int64_t> bounds;
};

void cpu_clip_grad_value_(at::TensorList grads, double clip_value) {
  if (grads.empty()) return;
  thread_local ValueState st;
  prepare(grads, true, st.prep);
  // Bounds per dtype, converted as torch converts a Scalar (raises when the dtype overflows).
  const c10::Scalar lo(-clip_value), hi(clip_value);
  bool has[3] = {false, false, false};
  for (const HostTensor& h : st.prep.host) has[static_cast<int>(h.dtype)] = true;
  const float lo32 = has[0] ? lo.to<float>() : 0.0f, hi32 = has[0] ? hi.to<float>() : 0.0f;
  const c10::Half lo16 = has[1] ? lo.to<c10::Half>() : c10::Half(0.0f);
  const c10::Half hi16 = has[1] ? hi.to<c10::Half>() : c10::Half(0.0f);
  const c10::BFloat16 lob = has[2] ? lo.to<c10::BFloat16>() : c10::BFloat16(0.0f);
  const c10::BFloat16 hib = has[2] ? hi.to<c10::BFloat16>() : c10::BFloat16(0.0f);
  thread_ranges(st.prep, st.bounds);
  for_each_range(st.bounds, [&](int64_t begin, int64_t end) {
    for_each_chunk(st.prep, begin, end, /*reverse=*/false, [&](const ChunkView& v) {
      switch (v.dtype) {
        case DType::kFloat32:
          clamp_chunk<float>(static_cast<float*>(v.ptr), v.count, lo32, hi32);
          break;
        case DType::kFloat16:
          clamp_chunk<c10::Half>(static_cast<c10::Half*>(v.ptr), v.count, lo16, hi16);
          break;
        case DType::kBFloat16:
          clamp_chunk<c10::BFloat16>(static_cast<c10::BFloat16*>(v.ptr), v.count, lob, hib);
          break;
      }
    });
  });
  st.prep.finish();
}

}  // namespace
}  // namespace cpu
}  // namespace gradclip

TORCH_LIBRARY_IMPL(gradclip, CPU, m) { m.impl("cpu_clip_grad_value_", &gradclip::cpu::cpu_clip_grad_value_); }
