// Fused global norm + in-place rescale over every gradient of a device, in ONE cooperative launch;
// the same kernel with clipping off is the norm-only kernel, and a plain kernel rescales by a
// device-scalar norm (the distributed path runs an all-reduce between the two).
//
// Math. norm = (sum_i |g_i|^p)^(1/p) for p in {1, 2}, max_i |g_i| for p = inf, over all elements of
// all gradients. coef = min(max_norm * (1 / (norm + 1e-6)), 1), evaluated in fp32 with exactly
// torch's roundings (add, reciprocal, multiply, NaN-propagating clamp), so NaN norm -> NaN grads
// and inf norm -> coef 0 (inf * 0 = NaN, as in torch). When coef >= 1 nothing is written and the
// gradients stay bit-identical; otherwise g <- round_to_dtype(float(g) * coef), one rounding.
//
// Accumulation precision. Each element is widened to fp32 exactly, then to fp64: for p = 2 the
// square of an fp32 value is exact in fp64 (24 x 24 = 48 significant bits <= 53) and sums of up
// to 2^63 squares of 3.4e38 stay below fp64's 1.8e308, so finite inputs never overflow and no
// scaling pass is needed. Chosen over a running-max-scaled fp32 sum because it is exact per term,
// branch-free, and costs two fp64 ops per element: ~3.4e12 fp64 op/s at H100's 3.35 TB/s on
// 2-byte grads, 10x below H100's fp64 rate (A100: 2x below). Consumer parts with 1/64-rate fp64
// may become compute-bound (to be measured). p = 1 sums |x| in fp64; p = inf keeps an fp32
// NaN-propagating max (exact). Partials are fp64, one per block in its own slot (no atomics):
// for a given grid the norm is bitwise reproducible. The fp64 norm is rounded once to fp32.
//
// Grid barrier. Cooperative launch (cudaLaunchKernelEx + cudaLaunchAttributeCooperative) and
// cooperative_groups grid.sync(): the driver guarantees co-residency (the grid is sized by the
// occupancy API) and owns the barrier state, so there is no counter of ours to reset or to go
// stale under CUDA-graph replay. After the barrier every block sums the partials in the same
// fixed order (same code, same inputs) and so holds the same coefficient; block 0 writes the norm.
//
// Per-parameter norms (issue 14, the *_per_param launcher). The same kernel with kPerParam: each
// thread also keeps the sum of the current chunk (a second accumulator: the block's own partial,
// and so the total, take exactly the operations they take without it, bitwise the same norm), each
// warp reduces it with shuffles into its own fixed slot chunk_partials[chunk * 16 + warp] (fp64,
// no atomics, no block barrier), and after the grid barrier one warp per tensor sums that
// tensor's contiguous slots in a fixed order: norm_t, rounded once to fp32. Extra cost: one fp64
// add (p = 1, 2) or fp32 max per element, 128 B of slot writes per 64K-element chunk (0.1% of fp16
// bytes) and reading them back once, T warp reductions. The table keeps empty tensors
// (plan_table_keep_empty), so entry t is input tensor t and its norm lands at per_param[t].
//
// Bytes moved (N = total gradient bytes, G = grid): reads N, writes 8 G B of partials + 4 B of
// norm; with clipping (coef < 1) it reads N again and writes the elements that change (<= N).
// The rescale walks each block's chunks in reverse, so the chunks it read last (still in L2) are
// rewritten first. scale_by_norm reads 4-8 B, then reads N and writes <= N only when coef < 1.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>

#include "checks.h"
#include "launchers.h"
#include "tensor_list.h"
#include "vector_io.cuh"

namespace gradclip {
namespace {

namespace cg = cooperative_groups;

constexpr int kMaxDevices = 64;
constexpr int kWantedBlocksPerSm = 2;

// Per-thread accumulator: fp64 for p = 1, 2; fp32 for p = inf (a max is exact in any precision).
template <NormType P>
struct Acc {
  using type = double;
};
template <>
struct Acc<NormType::kInf> {
  using type = float;
};

template <NormType P>
__device__ __forceinline__ void accumulate(typename Acc<P>::type& acc, float x) {
  if constexpr (P == NormType::kL2) {
    const double d = static_cast<double>(x);
    acc = fma(d, d, acc);
  } else if constexpr (P == NormType::kL1) {
    acc += fabs(static_cast<double>(x));
  } else {
    acc = nan_max(acc, fabsf(x));
  }
}

template <NormType P>
__device__ __forceinline__ double combine(double a, double b) {
  if constexpr (P == NormType::kInf) {
    return nan_max(a, b);
  } else {
    return a + b;
  }
}

// Block-wide reduction in a fixed order (xor-shuffle tree in each warp, then over the warps);
// every thread of the block returns the same value. `smem` holds kThreads / 32 doubles.
template <NormType P>
__device__ __forceinline__ double block_reduce(double v, double* smem) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine<P>(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? smem[lane] : 0.0;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine<P>(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();  // smem may be reused by the caller
  return v;
}

// Warp-wide reduction in a fixed order (xor-shuffle tree); every lane returns the same value.
template <NormType P>
__device__ __forceinline__ double warp_reduce(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine<P>(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

constexpr int kWarps = kThreads / 32;

// torch: clamp(max_norm / (norm + 1e-6), max=1) == clamp(reciprocal(norm + 1e-6) * max_norm, max=1)
// in the norm's dtype (Tensor.__rtruediv__ is reciprocal-then-multiply). NaN stays NaN.
__device__ __forceinline__ float clip_coefficient(float max_norm, float norm) {
  const float coef = __fmul_rn(__frcp_rn(__fadd_rn(norm, 1e-6f)), max_norm);
  return (coef < 1.0f || coef != coef) ? coef : 1.0f;
}
// fp64 total_norm (clip_grads_with_norm_): torch computes the coefficient in fp64 with the Python
// float max_norm unrounded, so max_norm arrives here as a double (rounding it to fp32 first would
// change the fp64 coefficient, and sometimes its fp32 rounding).
__device__ __forceinline__ float clip_coefficient(double max_norm, double norm) {
  const double coef = __dmul_rn(__drcp_rn(__dadd_rn(norm, 1e-6)), max_norm);
  return static_cast<float>((coef < 1.0 || coef != coef) ? coef : 1.0);
}

template <class T>
struct ScaleBy {
  float coef;
  __device__ __forceinline__ T operator()(T x) const { return from_float<T>(__fmul_rn(to_float(x), coef)); }
};

// Rescale the chunks b, b + G, ... of this block, last chunk first.
template <class Table>
__device__ __forceinline__ void rescale_chunks(const Table& table, float coef) {
  const int64_t grid = gridDim.x;
  const int64_t first = blockIdx.x;
  if (first >= table.total_chunks) return;
  const int64_t last = first + (table.total_chunks - 1 - first) / grid * grid;
  for (int64_t c = last; c >= first; c -= grid) {
    const int t = find_tensor(table, c);
    const TensorRef& ref = table.ref(t);
    const ElemRange r = chunk_elems(ref, c);
    GRADCLIP_DISPATCH_DTYPE(table.dtype(t), scalar_t,
                            rewrite_range(static_cast<scalar_t*>(ref.ptr) + r.begin, r.end - r.begin,
                                          ScaleBy<scalar_t>{coef}))
  }
}

template <NormType P, bool kClip, bool kPerParam, class Table>
__global__ void __launch_bounds__(kThreads, kClip ? kBlocksPerSmRescale : kBlocksPerSmReadOnly)
    norm_clip_kernel(const __grid_constant__ Table table, float max_norm, double* __restrict__ partials,
                     float* __restrict__ out_norm, double* __restrict__ chunk_partials, float* __restrict__ per_param) {
  __shared__ double smem[kThreads / 32];
  using AccT = typename Acc<P>::type;

  // Phase 1: this block's share, accumulated per thread, reduced per block, one slot per block.
  // kPerParam: each chunk's own sum is also kept per thread (a second accumulator, so `acc` takes
  // exactly the operations it takes without kPerParam: the total stays bitwise the same), reduced
  // per warp (shuffles, no block barrier) into its fixed slot chunk_partials[chunk * kWarps + warp].
  AccT acc = 0;
  for (int64_t c = blockIdx.x; c < table.total_chunks; c += gridDim.x) {
    const int t = find_tensor(table, c);
    const TensorRef& ref = table.ref(t);
    const ElemRange r = chunk_elems(ref, c);
    if constexpr (kPerParam) {
      AccT acc_chunk = 0;
      auto add = [&acc, &acc_chunk](float x) {
        accumulate<P>(acc, x);
        accumulate<P>(acc_chunk, x);
      };
      GRADCLIP_DISPATCH_DTYPE(table.dtype(t), scalar_t,
                              read_range(static_cast<const scalar_t*>(ref.ptr) + r.begin, r.end - r.begin, add))
      const double warp_sum = warp_reduce<P>(static_cast<double>(acc_chunk));
      if ((threadIdx.x & 31) == 0) chunk_partials[c * kWarps + (threadIdx.x >> 5)] = warp_sum;
    } else {
      auto add = [&acc](float x) { accumulate<P>(acc, x); };
      GRADCLIP_DISPATCH_DTYPE(table.dtype(t), scalar_t,
                              read_range(static_cast<const scalar_t*>(ref.ptr) + r.begin, r.end - r.begin, add))
    }
  }
  const double block_total = block_reduce<P>(static_cast<double>(acc), smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_total;

  cg::this_grid().sync();  // all partials written and visible

  if constexpr (kPerParam) {
    // Per-tensor norms: warp w of block b finishes tensors b * kWarps + w, then every G * kWarps
    // further. Tensor t's slots are the contiguous range [first_chunk * kWarps, (first_chunk +
    // chunks) * kWarps): lane l sums slots l, l + 32, ... in order, then a fixed shuffle tree. An
    // empty tensor (no chunks) gets 0. Table entry t is input tensor t (plan_table_keep_empty).
    const int lane = threadIdx.x & 31;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); t < table.n; t += stride) {
      const TensorRef& ref = table.ref(static_cast<int>(t));
      const int64_t end = (ref.first_chunk + chunks_of(ref.numel)) * kWarps;
      double s = 0.0;
      for (int64_t i = ref.first_chunk * kWarps + lane; i < end; i += 32) s = combine<P>(s, __ldcg(chunk_partials + i));
      s = warp_reduce<P>(s);
      if (lane == 0) per_param[t] = static_cast<float>(P == NormType::kL2 ? sqrt(s) : s);
    }
  }
  if (!kClip && blockIdx.x != 0) return;

  // Phase 2: every block sums all partials in the same order (L2 reads: bypass the incoherent L1).
  double total = 0.0;
  for (int i = threadIdx.x; i < static_cast<int>(gridDim.x); i += kThreads) total = combine<P>(total, __ldcg(partials + i));
  total = block_reduce<P>(total, smem);
  const float norm = static_cast<float>(P == NormType::kL2 ? sqrt(total) : total);
  if (blockIdx.x == 0 && threadIdx.x == 0) *out_norm = norm;
  if (!kClip) return;

  const float coef = clip_coefficient(max_norm, norm);
  if (coef >= 1.0f) return;  // no clipping: gradients untouched (a NaN coef falls through)
  rescale_chunks(table, coef);
}

// max_norm has the norm's type: fp32 for an fp32 total_norm, fp64 for an fp64 one (see clip_coefficient).
template <class Table, class NormT>
__global__ void __launch_bounds__(kThreads, kBlocksPerSmRescale)
    scale_by_norm_kernel(const __grid_constant__ Table table, NormT max_norm, const NormT* __restrict__ total_norm) {
  const float coef = clip_coefficient(max_norm, *total_norm);
  if (coef >= 1.0f) return;
  rescale_chunks(table, coef);
}

// Occupancy (blocks per SM) of one kernel on one device, cached: it is a pure function of both.
template <class Kernel>
int occupancy_per_sm(Kernel kernel, int device, std::atomic<int>* cache) {
  int cached = cache[device].load(std::memory_order_relaxed);
  if (cached > 0) return cached;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0) != cudaSuccess) return 0;
  cache[device].store(blocks, std::memory_order_relaxed);
  return blocks;
}

template <NormType P, bool kClip, bool kPerParam, class Table>
cudaError_t launch_norm_clip_typed(const Table& table, float max_norm, double* partials, float* out_norm,
                                   double* chunk_partials, float* per_param, int device, cudaStream_t stream) {
  static std::atomic<int> occupancy_cache[kMaxDevices];
  auto kernel = norm_clip_kernel<P, kClip, kPerParam, Table>;
  const int occupancy = occupancy_per_sm(kernel, device, occupancy_cache);
  if (occupancy <= 0) return cudaErrorInvalidConfiguration;
  const int grid = persistent_grid(device_sm_count(device), occupancy, kWantedBlocksPerSm, table.total_chunks);

  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;
  attribute[0].val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, table, max_norm, partials, out_norm, chunk_partials, per_param);
}

template <bool kPerParam, class Table>
cudaError_t launch_norm_clip_table(const Table& table, NormType norm_type, bool clip, float max_norm,
                                   double* partials, float* out_norm, double* chunk_partials, float* per_param,
                                   int device, cudaStream_t stream) {
#define GRADCLIP_NORM_CASE(P)                                                                                  \
  case P:                                                                                                       \
    return clip ? launch_norm_clip_typed<P, true, kPerParam>(table, max_norm, partials, out_norm, chunk_partials, \
                                                             per_param, device, stream)                         \
                : launch_norm_clip_typed<P, false, kPerParam>(table, max_norm, partials, out_norm,             \
                                                              chunk_partials, per_param, device, stream);
  switch (norm_type) {
    GRADCLIP_NORM_CASE(NormType::kL1)
    GRADCLIP_NORM_CASE(NormType::kL2)
    GRADCLIP_NORM_CASE(NormType::kInf)
  }
#undef GRADCLIP_NORM_CASE
  return cudaErrorInvalidValue;
}

template <class Table, class NormT>
cudaError_t launch_scale_typed(const Table& table, NormT max_norm, const NormT* total_norm, int device,
                               cudaStream_t stream) {
  static std::atomic<int> occupancy_cache[kMaxDevices];
  auto kernel = scale_by_norm_kernel<Table, NormT>;
  const int occupancy = occupancy_per_sm(kernel, device, occupancy_cache);
  if (occupancy <= 0) return cudaErrorInvalidConfiguration;
  const int grid = persistent_grid(device_sm_count(device), occupancy, kWantedBlocksPerSm, table.total_chunks);
  kernel<<<grid, kThreads, 0, stream>>>(table, max_norm, total_norm);
  return cudaGetLastError();
}

template <class Table>
cudaError_t launch_scale_table(const Table& table, double max_norm, const void* total_norm, bool norm_is_double,
                               int device, cudaStream_t stream) {
  return norm_is_double
             ? launch_scale_typed(table, max_norm, static_cast<const double*>(total_norm), device, stream)
             : launch_scale_typed(table, static_cast<float>(max_norm), static_cast<const float*>(total_norm), device,
                                  stream);
}

}  // namespace

int kernel_inline_capacity() { return kInlineCapacity; }

int64_t per_param_slots(int64_t total_chunks) { return total_chunks * kWarps; }

int device_sm_count(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 0;
  int count = cache[device].load(std::memory_order_relaxed);
  if (count > 0) return count;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  cache[device].store(count, std::memory_order_relaxed);
  return count;
}

cudaError_t launch_norm_clip(const TableArg& table, NormType norm_type, bool clip, float max_norm, double* partials,
                             float* out_norm, int device, cudaStream_t stream) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (table.inline_table != nullptr) {
    return launch_norm_clip_table<false>(*table.inline_table, norm_type, clip, max_norm, partials, out_norm, nullptr,
                                         nullptr, device, stream);
  }
  return launch_norm_clip_table<false>(table.device_table, norm_type, clip, max_norm, partials, out_norm, nullptr,
                                       nullptr, device, stream);
}

cudaError_t launch_norm_clip_per_param(const TableArg& table, NormType norm_type, bool clip, float max_norm,
                                       double* partials, float* out_norm, double* chunk_partials, float* per_param,
                                       int device, cudaStream_t stream) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (table.inline_table != nullptr) {
    return launch_norm_clip_table<true>(*table.inline_table, norm_type, clip, max_norm, partials, out_norm,
                                        chunk_partials, per_param, device, stream);
  }
  return launch_norm_clip_table<true>(table.device_table, norm_type, clip, max_norm, partials, out_norm,
                                      chunk_partials, per_param, device, stream);
}

cudaError_t launch_scale_by_norm(const TableArg& table, double max_norm, const void* total_norm, bool norm_is_double,
                                 int device, cudaStream_t stream) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (table.total_chunks() == 0) return cudaSuccess;
  if (table.inline_table != nullptr) {
    return launch_scale_table(*table.inline_table, max_norm, total_norm, norm_is_double, device, stream);
  }
  return launch_scale_table(table.device_table, max_norm, total_norm, norm_is_double, device, stream);
}

}  // namespace gradclip
