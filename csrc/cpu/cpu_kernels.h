// Shared pieces of the CPU backend (gradclip::cpu_* ops): the per-call view of a gradient list,
// the fixed chunk partition, the thread split, and the vector helpers.
//
// Work decomposition (the same as the GPU kernels, csrc/tensor_list.h): every non-empty gradient is
// cut into chunks of kChunkElems elements; a chunk never spans two tensors and the chunk size does
// not depend on the thread count. Each chunk's partial (sum of |x|, sum of x^2, or max |x|) goes to
// its own fp64 slot, and the slots are combined in chunk order on the calling thread, so a norm is
// bitwise the same whatever the number of threads and however chunks are split between them.
//
// Threads. A call whose gradients hold fewer than kParallelMinElems elements runs on the calling
// thread (waking the pool costs more than the work); otherwise the chunks are cut into one
// contiguous range per thread, balanced by element count, and at::parallel_for runs one range per
// thread. The rescale pass uses the same ranges, so each thread rescales the chunks it just read,
// walking them backwards (the last chunks read are the ones still in its cache).
//
// Vectors. at::vec::Vectorized<float> (8 lanes with AVX2, the build's CPU_CAPABILITY); fp16/bf16
// are widened with at::vec::convert_to_float, fp32 squares are widened to fp64 before accumulating.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "op_tags.h"
#include "tensor_list.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#if defined(CPU_CAPABILITY_AVX512)
#define GRADCLIP_CPU_CAPABILITY_NAME "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define GRADCLIP_CPU_CAPABILITY_NAME "avx2"
#else
#define GRADCLIP_CPU_CAPABILITY_NAME "default"
#endif

#define GRADCLIP_CPU_CHECK_GRAD(cond, index, ...) \
  TORCH_CHECK((cond), "gradclip cpu backend: gradient ", (index), " ", __VA_ARGS__)

namespace gradclip {
namespace cpu {

// Below this many elements in one call, everything runs on the calling thread: the pool's wake-up
// (~5-20 us on 2 cores) costs more than reading 256K fp32 elements from L2/L3. The result is the
// same either way (same chunks, same slots, same combine order).
constexpr int64_t kParallelMinElems = int64_t{1} << 18;

using fVec = at::vec::Vectorized<float>;
using dVec = at::vec::Vectorized<double>;

// ---- One call's view of the gradient list ----------------------------------------------------------
struct Prepared {
  std::vector<HostTensor> host;        // one entry per input gradient, in input order (empty ones too)
  std::vector<TensorRef> refs;         // the non-empty ones, with their first global chunk
  std::vector<uint8_t> dtypes;         // dtype tag per ref
  std::vector<int> input_index;        // refs[k] is grads[input_index[k]]
  int64_t total_chunks = 0;
  int64_t total_elems = 0;
  // Gradients that are not dense in memory run through a contiguous copy, written back afterwards.
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;

  // Copy the rescaled contiguous copies back into the original (strided) gradients.
  void finish() {
    for (auto& [original, copy] : write_back) {
      if (original.defined()) original.copy_(copy);
    }
    write_back.clear();
  }
};

inline DType dtype_tag(at::ScalarType t, size_t index) {
  const std::optional<DType> tag = kernel_dtype(t);
  GRADCLIP_CPU_CHECK_GRAD(tag.has_value(), index, "has dtype ", t,
                          "; the CPU kernels take float32/float16/bfloat16 (use backend='reference')");
  return *tag;
}

inline NormType norm_tag(double norm_type) {
  const std::optional<NormType> tag = kernel_norm(norm_type);
  TORCH_CHECK(tag.has_value(), "gradclip cpu backend: norm_type must be 1, 2 or inf, got ", norm_type,
              " (use backend='reference' for other p)");
  return *tag;
}

// Validates every gradient before anything is touched, then builds the chunk table. `mutates`:
// non-dense gradients get a contiguous copy that finish() writes back.
inline void prepare(at::TensorList grads, bool mutates, Prepared& prep) {
  prep.host.clear();
  prep.write_back.clear();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    GRADCLIP_CPU_CHECK_GRAD(g.defined(), i, "is undefined");
    GRADCLIP_CPU_CHECK_GRAD(g.device().is_cpu(), i, "is on ", g.device(), ", not the CPU");
    GRADCLIP_CPU_CHECK_GRAD(g.layout() == at::kStrided, i, "is not a strided (dense) tensor");
    const DType tag = dtype_tag(g.scalar_type(), i);
    void* ptr = nullptr;
    const int64_t numel = g.numel();
    if (numel > 0) {
      if (g.is_non_overlapping_and_dense()) {
        ptr = g.data_ptr();  // any dense layout: the elements fill [ptr, ptr + numel)
      } else {
        at::Tensor copy = g.contiguous();
        ptr = copy.data_ptr();
        prep.write_back.emplace_back(mutates ? g : at::Tensor(), copy);
      }
    }
    prep.host.push_back(HostTensor{ptr, numel, tag});
  }
  const int count = static_cast<int>(prep.host.size());
  prep.refs.resize(count);
  prep.dtypes.resize(count);
  const int n = plan_table(prep.host.data(), count, prep.refs.data(), prep.dtypes.data(), &prep.total_chunks);
  prep.refs.resize(n);
  prep.dtypes.resize(n);
  prep.input_index.clear();
  prep.total_elems = 0;
  for (int i = 0; i < count; ++i) {
    if (prep.host[i].numel > 0) {
      prep.input_index.push_back(i);
      prep.total_elems += prep.host[i].numel;
    }
  }
}

// One chunk as a kernel sees it: its table entry, base pointer of its elements, count, dtype.
struct ChunkView {
  int64_t chunk;
  int ref;
  void* ptr;
  int64_t count;
  DType dtype;
};

// Calls fn(ChunkView) for the global chunks [begin, end), in order (reverse: from end - 1 down).
template <class Fn>
void for_each_chunk(const Prepared& prep, int64_t begin, int64_t end, bool reverse, const Fn& fn) {
  if (begin >= end) return;
  const int n = static_cast<int>(prep.refs.size());
  // The table entry owning chunk `c`: the last k with first_chunk[k] <= c (entries are non-empty).
  auto owner = [&](int64_t c) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (prep.refs[mid].first_chunk <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  auto view = [&](int k, int64_t c) {
    const TensorRef& ref = prep.refs[k];
    const ElemRange r = chunk_elems(ref, c);
    const DType d = static_cast<DType>(prep.dtypes[k]);
    return ChunkView{c, k, static_cast<char*>(ref.ptr) + r.begin * dtype_size(d), r.end - r.begin, d};
  };
  if (!reverse) {
    int k = owner(begin);
    for (int64_t c = begin; c < end; ++c) {
      while (k + 1 < n && prep.refs[k + 1].first_chunk <= c) ++k;
      fn(view(k, c));
    }
  } else {
    int k = owner(end - 1);
    for (int64_t c = end - 1; c >= begin; --c) {
      while (prep.refs[k].first_chunk > c) --k;
      fn(view(k, c));
    }
  }
}

// The chunk ranges of each thread: [bounds[t], bounds[t + 1]), balanced by element count. One range
// (the calling thread) when the call is small or the pool has one thread. Chunk boundaries do not
// depend on this split, so neither does any result.
inline void thread_ranges(const Prepared& prep, std::vector<int64_t>& bounds) {
  const int64_t chunks = prep.total_chunks;
  int64_t tasks = at::get_num_threads();
  if (prep.total_elems < kParallelMinElems || at::in_parallel_region()) tasks = 1;
  if (tasks > chunks) tasks = chunks > 0 ? chunks : 1;
  bounds.assign(static_cast<size_t>(tasks) + 1, chunks);
  bounds[0] = 0;
  if (tasks <= 1) return;
  // Cut at chunk granularity: task t starts at the first chunk whose start element is at or past
  // t / tasks of the elements.
  int64_t t = 1;
  int64_t seen = 0;
  for (const TensorRef& ref : prep.refs) {
    const int64_t nchunks = chunks_of(ref.numel);
    for (int64_t j = 0; j < nchunks && t < tasks; ++j) {
      while (t < tasks && seen >= (prep.total_elems * t) / tasks) bounds[t++] = ref.first_chunk + j;
      seen += (j + 1 < nchunks) ? kChunkElems : ref.numel - j * kChunkElems;
    }
    if (t >= tasks) break;
  }
  for (; t < tasks; ++t) bounds[t] = chunks;
  for (size_t i = 1; i < bounds.size(); ++i) {  // never decreasing (ranges may be empty)
    if (bounds[i] < bounds[i - 1]) bounds[i] = bounds[i - 1];
  }
}

// Runs body(begin_chunk, end_chunk) for every thread range: on the calling thread when there is
// one range, else one range per pool thread (the same range -> thread mapping on every call with
// the same ranges, as at::parallel_for with OpenMP assigns task t to thread t).
template <class Body>
void for_each_range(const std::vector<int64_t>& bounds, const Body& body) {
  const int64_t tasks = static_cast<int64_t>(bounds.size()) - 1;
  if (tasks <= 1) {
    body(bounds[0], bounds[tasks > 0 ? 1 : 0]);
    return;
  }
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(bounds[t], bounds[t + 1]);
  });
}

// ---- Vector helpers --------------------------------------------------------------------------------
// fp32 -> two fp64 vectors (low and high halves), exact.
inline std::pair<dVec, dVec> widen(const fVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = x;
  return {dVec(_mm512_cvtps_pd(_mm512_castps512_ps256(v))),
          dVec(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 v = x;
  return {dVec(_mm256_cvtps_pd(_mm256_castps256_ps128(v))), dVec(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)))};
#else
  __at_align__ float f[fVec::size()];
  __at_align__ double d[fVec::size()];
  x.store(f);
  for (int64_t i = 0; i < fVec::size(); ++i) d[i] = static_cast<double>(f[i]);
  return {dVec::loadu(d), dVec::loadu(d + dVec::size())};
#endif
}

// Loads 2 * fVec::size() elements of T as two fp32 vectors.
template <class T>
inline std::pair<fVec, fVec> load2(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return {fVec::loadu(p), fVec::loadu(p + fVec::size())};
  } else {
    auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    return {a, b};
  }
}

// Stores two fp32 vectors as 2 * fVec::size() elements of T (one round-to-nearest-even each).
template <class T>
inline void store2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(p);
    b.store(p + fVec::size());
  } else {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define GRADCLIP_CPU_BF16_PAIRS 1
// bf16 in pairs: a 256-bit load of 16 bf16 is 8 words w, whose two halves are exactly the fp32
// values (w << 16) (low element) and (w & 0xFFFF0000) (high element), so a kernel can compute in
// fp32 and put both halves back with shifts and masks, instead of at::vec's widening converts and
// pack/permute. Element order is kept: word k still holds elements 2k and 2k + 1.
inline __m256 bf16_low(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
inline __m256 bf16_high(__m256i w) {
  return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// fp32 -> bf16 round-to-nearest-even (NaN -> 0x7FC0, c10's choice), left in the high half.
inline __m256i bf16_round_high(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
  return _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
// The same without the NaN blend, for a product x * c of a bf16 x: a NaN product is x's NaN
// quieted (low 16 bits zero, as x came from a bf16) or the default NaN 0xFFC00000, and adding at
// most 0x8000 to zero low bits never carries into bit 16, so the NaN survives the rounding as is.
inline __m256i bf16_round_high_of_product(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  return _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
// Two fp32 vectors whose values are exact bf16 (low bits zero) back into 8 words.
inline __m256i bf16_join(__m256 low, __m256 high) {
  return _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(high), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))),
                         _mm256_srli_epi32(_mm256_castps_si256(low), 16));
}
#endif

// NaN wins over everything (inf included), as torch's max reduction does.
inline double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return a > b ? a : b;
}

template <class Fn>
void dispatch_dtype(DType d, const Fn& fn) {
  switch (d) {
    case DType::kFloat32:
      fn(static_cast<float*>(nullptr));
      break;
    case DType::kFloat16:
      fn(static_cast<c10::Half*>(nullptr));
      break;
    case DType::kBFloat16:
      fn(static_cast<c10::BFloat16*>(nullptr));
      break;
  }
}

}  // namespace cpu
}  // namespace gradclip
