// clip_grad_value_: clamp every element of every gradient to [-clip_value, clip_value] in place,
// in ONE launch over the whole tensor list (mixed fp32/fp16/bf16).
//
// Math, exactly as CUDA torch's _foreach_clamp_min_(-v) followed by _foreach_clamp_max_(v), each
// done in fp32 and rounded to the gradient dtype: y = round(min(float(round(max(x, -v))), v)), with
// torch's foreach functors (ATen ForeachMinMaxFunctors.cuh): max(a, b) = isnan(a) || a > b ? a : b,
// min(a, b) = isnan(a) || a < b ? a : b, so a tie returns the bound: for v = 0 every non-NaN
// element becomes +0.0, as CUDA torch gives (review fix: ties kept the element, CPU torch's -0.0).
// NaN elements stay NaN (torch's clamp propagates NaN); a NaN bound makes every element NaN. No
// accumulation.
//
// Bytes moved: reads every gradient once (N bytes); writes only the 16-byte vectors (or scalars)
// whose bits change, so a step where nothing exceeds the bound writes nothing. Plain (not
// cooperative) launch of a persistent grid striding over the chunks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>

#include "checks.h"
#include "launchers.h"
#include "tensor_list.h"
#include "vector_io.cuh"

namespace gradclip {
namespace {

constexpr int kMaxDevices = 64;
constexpr int kWantedBlocksPerSm = 2;

// CUDA torch's foreach clamp_min / clamp_max: NaN in, NaN out; a tie returns the bound.
__device__ __forceinline__ float clamp_min_nan(float x, float lo) { return (x != x || x > lo) ? x : lo; }
__device__ __forceinline__ float clamp_max_nan(float x, float hi) { return (x != x || x < hi) ? x : hi; }

template <class T>
struct ClampBy {
  float lo;
  float hi;
  __device__ __forceinline__ T operator()(T x) const {
    const T low_clamped = from_float<T>(clamp_min_nan(to_float(x), lo));
    return from_float<T>(clamp_max_nan(to_float(low_clamped), hi));
  }
};

template <class Table>
__global__ void __launch_bounds__(kThreads, kBlocksPerSmRescale)
    clip_value_kernel(const __grid_constant__ Table table, float lo, float hi) {
  for (int64_t c = blockIdx.x; c < table.total_chunks; c += gridDim.x) {
    const int t = find_tensor(table, c);
    const TensorRef& ref = table.ref(t);
    const ElemRange r = chunk_elems(ref, c);
    GRADCLIP_DISPATCH_DTYPE(table.dtype(t), scalar_t,
                            rewrite_range(static_cast<scalar_t*>(ref.ptr) + r.begin, r.end - r.begin,
                                          ClampBy<scalar_t>{lo, hi}))
  }
}

template <class Table>
cudaError_t launch_clip_value_table(const Table& table, float clip_value, int device, cudaStream_t stream) {
  static std::atomic<int> occupancy_cache[kMaxDevices];
  auto kernel = clip_value_kernel<Table>;
  int occupancy = occupancy_cache[device].load(std::memory_order_relaxed);
  if (occupancy <= 0) {
    GRADCLIP_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occupancy, kernel, kThreads, 0));
    if (occupancy <= 0) return cudaErrorInvalidConfiguration;
    occupancy_cache[device].store(occupancy, std::memory_order_relaxed);
  }
  const int grid = persistent_grid(device_sm_count(device), occupancy, kWantedBlocksPerSm, table.total_chunks);
  // -v is formed in fp32 from the fp32 bound, as torch forms the fp32 opmath scalar from -v.
  kernel<<<grid, kThreads, 0, stream>>>(table, -clip_value, clip_value);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_clip_value(const TableArg& table, float clip_value, int device, cudaStream_t stream) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (table.total_chunks() == 0) return cudaSuccess;
  if (table.inline_table != nullptr) return launch_clip_value_table(*table.inline_table, clip_value, device, stream);
  return launch_clip_value_table(table.device_table, clip_value, device, stream);
}

}  // namespace gradclip
