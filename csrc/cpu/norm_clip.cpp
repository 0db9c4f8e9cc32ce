// CPU kernels of the norm family: gradclip::cpu_{total_norm, clip_grad_norm_, clip_grads_with_norm_,
// per_param_norms, clip_grad_norm_per_param_} (schemas in gradclip/ops.py).
//
// Math. For p = 1, 2: partial[c] = sum over chunk c of |x| or x^2, accumulated in fp64 (fp32 values
// are widened exactly, so a square is exact and no finite input can overflow: (3.4e38)^2 * 2^63 is
// far below 1.8e308); for p = inf: partial[c] = max |x| (exact). The slots are combined in chunk
// order in fp64 (inf: NaN-propagating max), then norm = sum (p = 1), sqrt(sum) (p = 2) or the max,
// rounded once to fp32. NaN anywhere gives NaN, an inf (and no NaN) gives inf, as in torch. The
// per-tensor norms combine the same slots per tensor, and the total is the same fixed-order sum of
// every slot, so it is bitwise the total of cpu_total_norm.
//
// Clip. coef = min(fp32(max_norm) * (1 / (norm + 1e-6f)), 1) in fp32, torch's exact roundings (as
// reference.clip_coefficient evaluates it for an fp32 norm); for an fp64 total_norm
// (clip_grads_with_norm_) the coefficient is evaluated in fp64 with max_norm unrounded and rounded to
// fp32, as torch's mul of an fp32 gradient by an fp64 scalar does. When coef is not below 1 nothing
// is written (the gradients stay bit-identical); a NaN coefficient rescales (to NaN), as torch does.
// Otherwise g <- round_to_dtype(float(g) * coef): one rounding per element.
//
// Bytes. The norm reads every gradient once and writes 8 B per chunk; the rescale, only when
// coef < 1, reads and writes every gradient once more, chunks in reverse order per thread.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_kernels.h"
#include "module.h"

namespace gradclip {
namespace cpu {
namespace {

// ---- Per-chunk partials --------------------------------------------------------------------------
template <class T, NormType P>
double chunk_partial(const T* p, int64_t n) {
  constexpr int64_t kStep = 2 * fVec::size();  // elements per iteration: two fp32 vectors
  int64_t i = 0;
  if constexpr (P == NormType::kInf) {
    fVec m0(0.0f), m1(0.0f);
    for (; i + kStep <= n; i += kStep) {
      auto [a, b] = load2(p + i);
      m0 = at::vec::maximum(m0, a.abs());  // NaN-propagating
      m1 = at::vec::maximum(m1, b.abs());
    }
    __at_align__ float lanes[fVec::size()];
    at::vec::maximum(m0, m1).store(lanes);
    double m = 0.0;
    for (int64_t k = 0; k < fVec::size(); ++k) m = nan_max(m, static_cast<double>(lanes[k]));
    for (; i < n; ++i) m = nan_max(m, std::fabs(static_cast<double>(static_cast<float>(p[i]))));
    return m;
  } else {
    dVec s0(0.0), s1(0.0), s2(0.0), s3(0.0);
    for (; i + kStep <= n; i += kStep) {
      auto [a, b] = load2(p + i);
      auto [a0, a1] = widen(a);
      auto [b0, b1] = widen(b);
      if constexpr (P == NormType::kL2) {
        s0 = at::vec::fmadd(a0, a0, s0);
        s1 = at::vec::fmadd(a1, a1, s1);
        s2 = at::vec::fmadd(b0, b0, s2);
        s3 = at::vec::fmadd(b1, b1, s3);
      } else {
        s0 = s0 + a0.abs();
        s1 = s1 + a1.abs();
        s2 = s2 + b0.abs();
        s3 = s3 + b1.abs();
      }
    }
    __at_align__ double lanes[dVec::size()];
    ((s0 + s1) + (s2 + s3)).store(lanes);
    double s = 0.0;
    for (int64_t k = 0; k < dVec::size(); ++k) s += lanes[k];
    for (; i < n; ++i) {
      const double x = static_cast<float>(p[i]);
      s += P == NormType::kL2 ? x * x : std::fabs(x);
    }
    return s;
  }
}

template <NormType P>
double chunk_partial(const ChunkView& v) {
  double out = 0.0;
  dispatch_dtype(v.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    out = chunk_partial<T, P>(static_cast<const T*>(v.ptr), v.count);
  });
  return out;
}

// fp64 combine of partials [begin, end) in order.
template <NormType P>
double combine(const double* partials, int64_t begin, int64_t end) {
  double acc = 0.0;
  for (int64_t c = begin; c < end; ++c) acc = P == NormType::kInf ? nan_max(acc, partials[c]) : acc + partials[c];
  return acc;
}

template <NormType P>
float finish_norm(double acc) {
  return static_cast<float>(P == NormType::kL2 ? std::sqrt(acc) : acc);
}

// ---- Rescale -------------------------------------------------------------------------------------
template <class T>
void scale_chunk(T* p, int64_t n, float coef) {
  constexpr int64_t kStep = 2 * fVec::size();
  const fVec c(coef);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    auto [a, b] = load2(p + i);
    store2(p + i, a * c, b * c);
  }
  for (; i < n; ++i) p[i] = static_cast<T>(static_cast<float>(p[i]) * coef);
}

// torch: clamp(max_norm / (norm + 1e-6), max=1) == clamp(reciprocal(norm + 1e-6) * max_norm, max=1),
// every operation in the norm's dtype (fp32 here), max_norm and 1e-6 rounded to it.
float coefficient_fp32(double max_norm, float norm) {
  volatile float sum = norm + 1e-6f;  // volatile: no contraction or reassociation of the three roundings
  volatile float recip = 1.0f / sum;
  const float coef = recip * static_cast<float>(max_norm);
  return (coef < 1.0f || std::isnan(coef)) ? coef : 1.0f;
}

// The same for an fp64 norm (torch computes it in fp64 with max_norm unrounded), rounded to the
// fp32 that multiplies an fp32/fp16/bf16 gradient.
float coefficient_fp64(double max_norm, double norm) {
  volatile double sum = norm + 1e-6;
  volatile double recip = 1.0 / sum;
  const double coef = recip * max_norm;
  return static_cast<float>((coef < 1.0 || std::isnan(coef)) ? coef : 1.0);
}

bool clips(float coef) { return !(coef >= 1.0f); }  // NaN clips (to NaN)

// ---- The passes ----------------------------------------------------------------------------------
struct CallState {
  Prepared prep;
  std::vector<int64_t> bounds;
  std::vector<double> partials;
};

CallState& call_state() {
  thread_local CallState state;
  return state;
}

// Fills state.partials[c] for every chunk; returns the fp64 combine of all of them (the total).
template <NormType P>
double norm_pass(CallState& st) {
  st.partials.resize(static_cast<size_t>(st.prep.total_chunks));
  double* partials = st.partials.data();
  for_each_range(st.bounds, [&](int64_t begin, int64_t end) {
    for_each_chunk(st.prep, begin, end, /*reverse=*/false,
                   [&](const ChunkView& v) { partials[v.chunk] = chunk_partial<P>(v); });
  });
  return combine<P>(partials, 0, st.prep.total_chunks);
}

void scale_pass(CallState& st, float coef) {
  for_each_range(st.bounds, [&](int64_t begin, int64_t end) {
    for_each_chunk(st.prep, begin, end, /*reverse=*/true, [&](const ChunkView& v) {
      dispatch_dtype(v.dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        scale_chunk<T>(static_cast<T*>(v.ptr), v.count, coef);
      });
    });
  });
}

template <class Fn>
void with_norm_type(NormType p, const Fn& fn) {
  switch (p) {
    case NormType::kL1:
      fn(std::integral_constant<NormType, NormType::kL1>{});
      break;
    case NormType::kL2:
      fn(std::integral_constant<NormType, NormType::kL2>{});
      break;
    case NormType::kInf:
      fn(std::integral_constant<NormType, NormType::kInf>{});
      break;
  }
}

at::TensorOptions norm_options() { return at::TensorOptions().dtype(at::kFloat).device(at::kCPU); }

// Norm, per-tensor norms (optional), and the rescale (optional), in one call.
std::tuple<at::Tensor, at::Tensor> norm_call(at::TensorList grads, double norm_type, bool clip, double max_norm,
                                             bool per_param) {
  const NormType p = norm_tag(norm_type);
  at::Tensor per = per_param ? at::zeros({static_cast<int64_t>(grads.size())}, norm_options()) : at::Tensor();
  if (grads.empty()) return {at::zeros({}, norm_options()), per};
  CallState& st = call_state();
  prepare(grads, clip, st.prep);
  thread_ranges(st.prep, st.bounds);
  float norm = 0.0f;
  with_norm_type(p, [&](auto tag) {
    constexpr NormType P = decltype(tag)::value;
    norm = finish_norm<P>(norm_pass<P>(st));
    if (per_param) {
      float* out = per.data_ptr<float>();
      for (size_t k = 0; k < st.prep.refs.size(); ++k) {
        const int64_t first = st.prep.refs[k].first_chunk;
        const double acc = combine<P>(st.partials.data(), first, first + chunks_of(st.prep.refs[k].numel));
        out[st.prep.input_index[k]] = finish_norm<P>(acc);
      }
    }
  });
  if (clip) {
    const float coef = coefficient_fp32(max_norm, norm);
    if (clips(coef)) {
      scale_pass(st, coef);
      st.prep.finish();
    }
  }
  st.prep.write_back.clear();
  return {at::scalar_tensor(norm, norm_options()), per};
}

// ---- The ops -------------------------------------------------------------------------------------
at::Tensor cpu_total_norm(at::TensorList grads, double norm_type) {
  return std::get<0>(norm_call(grads, norm_type, false, 0.0, false));
}

at::Tensor cpu_clip_grad_norm_(at::TensorList grads, double max_norm, double norm_type) {
  return std::get<0>(norm_call(grads, norm_type, true, max_norm, false));
}

std::tuple<at::Tensor, at::Tensor> cpu_per_param_norms(at::TensorList grads, double norm_type) {
  return norm_call(grads, norm_type, false, 0.0, true);
}

std::tuple<at::Tensor, at::Tensor> cpu_clip_grad_norm_per_param_(at::TensorList grads, double max_norm,
                                                                 double norm_type) {
  return norm_call(grads, norm_type, true, max_norm, true);
}

void cpu_clip_grads_with_norm_(at::TensorList grads, double max_norm, const at::Tensor& total_norm) {
  TORCH_CHECK(total_norm.numel() == 1, "gradclip cpu backend: total_norm must hold one value, got ",
              total_norm.numel());
  TORCH_CHECK(total_norm.is_floating_point(), "gradclip cpu backend: total_norm must be floating point, got ",
              total_norm.scalar_type());
  TORCH_CHECK(total_norm.device().is_cpu(), "gradclip cpu backend: total_norm must be on the CPU, got ",
              total_norm.device());
  if (grads.empty()) return;
  CallState& st = call_state();
  prepare(grads, true, st.prep);  // validates every gradient before any is written
  float coef = 1.0f;
  switch (total_norm.scalar_type()) {
    case at::kFloat:
      coef = coefficient_fp32(max_norm, total_norm.item<float>());
      break;
    case at::kDouble:
      coef = coefficient_fp64(max_norm, total_norm.item<double>());
      break;
    default: {
      // fp16/bf16 norms (a user's own): torch's ops in that dtype, exactly as the reference runs them.
      const at::Tensor c = at::clamp_max(at::reciprocal(total_norm.reshape({}).add(1e-6)).mul(max_norm), 1.0);
      coef = c.item<float>();
    }
  }
  if (clips(coef)) {
    thread_ranges(st.prep, st.bounds);
    scale_pass(st, coef);
    st.prep.finish();
  }
  st.prep.write_back.clear();
}

// ---- Bandwidth floors (bench/ only) ---------------------------------------------------------------
// The least work that touches every gradient byte, with the same chunks and thread ranges: an XOR of
// 64-bit words (read once), and that read followed by an in-place XOR with a runtime zero (read, then
// read + write: the clipping floor). The gradients are left unchanged.
uint64_t xor_chunk(const ChunkView& v, bool write, uint64_t mask) {
  using iVec = at::vec::Vectorized<int64_t>;
  auto* bytes = static_cast<unsigned char*>(v.ptr);
  const int64_t nbytes = v.count * dtype_size(v.dtype);
  const int64_t words = nbytes / 8;
  auto* w = reinterpret_cast<int64_t*>(bytes);
  const iVec m(static_cast<int64_t>(mask));
  iVec acc(0);
  int64_t i = 0;
  for (; i + iVec::size() <= words; i += iVec::size()) {
    const iVec x = iVec::loadu(w + i);
    if (write) {
      (x ^ m).store(w + i);
    } else {
      acc = acc ^ x;
    }
  }
  __at_align__ int64_t lanes[iVec::size()];
  acc.store(lanes);
  uint64_t out = 0;
  for (int64_t k = 0; k < iVec::size(); ++k) out ^= static_cast<uint64_t>(lanes[k]);
  for (int64_t b = i * 8; b < nbytes; ++b) {
    if (write) bytes[b] ^= static_cast<unsigned char>(mask);
    else out ^= bytes[b];
  }
  return out;
}

uint64_t floor_pass(const std::vector<at::Tensor>& grads, bool write, uint64_t mask) {
  CallState& st = call_state();
  prepare(grads, write, st.prep);
  thread_ranges(st.prep, st.bounds);
  st.partials.assign(static_cast<size_t>(st.prep.total_chunks), 0.0);
  std::vector<uint64_t> slots(static_cast<size_t>(st.prep.total_chunks), 0);
  for_each_range(st.bounds, [&](int64_t begin, int64_t end) {
    for_each_chunk(st.prep, begin, end, false, [&](const ChunkView& v) { slots[v.chunk] = xor_chunk(v, false, 0); });
  });
  if (write) {
    for_each_range(st.bounds, [&](int64_t begin, int64_t end) {
      for_each_chunk(st.prep, begin, end, true, [&](const ChunkView& v) { xor_chunk(v, true, mask); });
    });
  }
  st.prep.write_back.clear();
  uint64_t out = 0;
  for (uint64_t s : slots) out ^= s;
  return out;
}

}  // namespace
}  // namespace cpu

void bind_cpu(pybind11::module_& m) {
  m.attr("CPU_CAPABILITY") = GRADCLIP_CPU_CAPABILITY_NAME;
  m.attr("CPU_CHUNK_ELEMS") = kChunkElems;
  m.attr("CPU_PARALLEL_MIN_ELEMS") = cpu::kParallelMinElems;
  m.def(
      "cpu_floor_read", [](const std::vector<at::Tensor>& grads) { return cpu::floor_pass(grads, false, 0); },
      "Bandwidth floor (bench): read every gradient byte once with the CPU kernels' chunks and threads");
  m.def(
      "cpu_floor_read_write",
      [](const std::vector<at::Tensor>& grads, uint64_t zero) { return cpu::floor_pass(grads, true, zero); },
      "Bandwidth floor (bench): read every byte, then read and write it in place (XOR with `zero`, pass 0)");
}

}  // namespace gradclip

TORCH_LIBRARY_IMPL(gradclip, CPU, m) {
  m.impl("cpu_total_norm", &gradclip::cpu::cpu_total_norm);
  m.impl("cpu_clip_grad_norm_", &gradclip::cpu::cpu_clip_grad_norm_);
  m.impl("cpu_clip_grads_with_norm_", &gradclip::cpu::cpu_clip_grads_with_norm_);
  m.impl("cpu_per_param_norms", &gradclip::cpu::cpu_per_param_norms);
  m.impl("cpu_clip_grad_norm_per_param_", &gradclip::cpu::cpu_clip_grad_norm_per_param_);
}
