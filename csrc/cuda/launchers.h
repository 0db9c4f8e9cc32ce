// Host launchers of the gradclip kernels (defined in norm_clip.cu and clip_value.cu).
//
// Torch-free: they take the tensor table, plain pointers and the stream, launch exactly one
// kernel, and return the launch's cudaError_t for the binding to check. The caller has already
// made `device` current (device guard) and validated the inputs.
#pragma once

#include <cuda_runtime_api.h>

#include "tensor_list.h"

namespace gradclip {

// Exactly one of the two is used: the inline table when non-null, else the device table.
struct TableArg {
  const InlineTable* inline_table;
  DeviceTable device_table;

  int64_t total_chunks() const { return inline_table ? inline_table->total_chunks : device_table.total_chunks; }
};

// Global p-norm of every gradient, and with `clip` the in-place rescale by
// min(max_norm / (norm + 1e-6), 1), in ONE cooperative launch. `partials` holds kMaxGrid doubles
// (overwritten, never read before written); `out_norm` receives the fp32 norm.
cudaError_t launch_norm_clip(const TableArg& table, NormType norm_type, bool clip, float max_norm, double* partials,
                             float* out_norm, int device, cudaStream_t stream);

// launch_norm_clip that also writes the norm of every table entry to per_param[0, n) (fp32) from
// the same pass, in the same ONE cooperative launch; the total is bitwise launch_norm_clip's. The
// table must come from plan_table_keep_empty (entry i = tensor i). `chunk_partials` holds
// total_chunks * (kThreads / 32) doubles (every slot written before it is read).
cudaError_t launch_norm_clip_per_param(const TableArg& table, NormType norm_type, bool clip, float max_norm,
                                       double* partials, float* out_norm, double* chunk_partials, float* per_param,
                                       int device, cudaStream_t stream);

// Doubles of chunk_partials that launch_norm_clip_per_param needs for `total_chunks` chunks.
int64_t per_param_slots(int64_t total_chunks);

// In-place rescale by min(max_norm / (total_norm + 1e-6), 1) read from a device scalar (fp32, or
// fp64 when `norm_is_double`): no host sync. Writes nothing when the coefficient is >= 1.
// `max_norm` is the op's double: the fp64 path uses it unrounded (torch multiplies the fp64
// reciprocal by the Python float), the fp32 path rounds it to fp32 (torch's fp32 opmath scalar).
cudaError_t launch_scale_by_norm(const TableArg& table, double max_norm, const void* total_norm, bool norm_is_double,
                                 int device, cudaStream_t stream);

// In-place clamp of every element to [-clip_value, clip_value], NaN kept, in one launch.
cudaError_t launch_clip_value(const TableArg& table, float clip_value, int device, cudaStream_t stream);

// Multiprocessor count of `device`, cached.
int device_sm_count(int device);

// kInlineCapacity as nvcc saw it when compiling the kernels. tensor_list.h picks the capacity from
// __CUDACC_VER_*, which the host compiler of bindings.cpp does not define: the binding checks at
// import that both sides agree on the InlineTable layout (nvcc < 12.1 would silently disagree).
int kernel_inline_capacity();

}  // namespace gradclip
