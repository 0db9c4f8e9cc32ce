// Torch glue of the CUDA backend: registers the gradclip::cuda_* ops (schemas defined in Python,
// gradclip/ops.py) for the CUDA dispatch key; csrc/bindings.cpp adds its module attributes.
//
// `from gradclip import _C` runs gradclip/__init__.py first, which imports gradclip.ops and so
// defines the schemas before this library registers its implementations.
//
// Per call: validate (CUDA, one device, fp32/fp16/bf16), device guard, current stream, build the
// tensor table (inline kernel parameter, or a device table cached by content), one launch, check
// the launch error. No host sync and no host allocation on the hot path: the inline table and the
// host vectors are thread-local and reused, scratch is cached per (device, stream).
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "checks.h"
#include "launchers.h"
#include "module.h"
#include "op_tags.h"
#include "tensor_list.h"

namespace gradclip {
namespace {

DType dtype_tag(at::ScalarType t, size_t index) {
  const std::optional<DType> tag = kernel_dtype(t);
  GRADCLIP_CHECK_GRAD(tag.has_value(), index, "has dtype ", t,
                      "; the CUDA kernels take float32/float16/bfloat16 (use backend='reference')");
  return *tag;
}

NormType norm_tag(double norm_type) {
  const std::optional<NormType> tag = kernel_norm(norm_type);
  TORCH_CHECK(tag.has_value(), "gradclip cuda backend: norm_type must be 1, 2 or inf, got ", norm_type,
              " (use backend='reference' for other p)");
  return *tag;
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// ---- Scratch: kMaxGrid fp64 partial slots per (device, stream) ----------------------------------
// Launches on one stream are ordered, so they can share the slots (each launch writes a slot before
// any block reads it). Under stream capture a fresh buffer comes from the graph's private memory
// pool instead, so a replayed graph never shares slots with eager work on another stream.
std::mutex scratch_mutex;
std::map<std::pair<int, cudaStream_t>, at::Tensor> scratch_cache;

at::Tensor partials_for(const at::Device& device, cudaStream_t stream, bool capturing) {
  auto options = at::TensorOptions().dtype(at::kDouble).device(device);
  if (capturing) return at::empty({kMaxGrid}, options);
  std::lock_guard<std::mutex> lock(scratch_mutex);
  at::Tensor& slot = scratch_cache[{device.index(), stream}];
  if (!slot.defined()) slot = at::empty({kMaxGrid}, options);
  return slot;
}

// ---- Device tables for lists longer than kInlineCapacity, cached by content -------------------
struct TableEntry {
  std::vector<TensorRef> refs;
  std::vector<uint8_t> dtypes;
  at::Tensor buffer;  // refs then dtype tags, on the device
  bool captured = false;  // referenced by a captured graph: never evicted
  // Eager streams other than the allocating one that have read `buffer`. Each is recorded with
  // the caching allocator once (recordStream), so an eviction while a kernel on such a stream
  // may still read the table does not hand the memory to a new allocation on the allocating
  // stream before that kernel finishes (use-after-free otherwise).
  std::vector<cudaStream_t> streams_recorded;
};

void record_use(TableEntry& e, const at::Device& device, cudaStream_t stream, bool capturing) {
  if (capturing) return;  // captured entries are never evicted
  for (cudaStream_t s : e.streams_recorded) {
    if (s == stream) return;
  }
  e.streams_recorded.push_back(stream);
  c10::cuda::CUDACachingAllocator::recordStream(e.buffer.storage().data_ptr(),
                                                c10::cuda::getStreamFromExternal(stream, device.index()));
}
constexpr size_t kMaxTableEntries = 256;
std::mutex table_mutex;
std::map<int, std::vector<std::unique_ptr<TableEntry>>> table_cache;

DeviceTable device_table_for(const at::Device& device, cudaStream_t stream, bool capturing,
                             const std::vector<TensorRef>& refs, const std::vector<uint8_t>& dtypes, int n,
                             int64_t total_chunks) {
  std::lock_guard<std::mutex> lock(table_mutex);
  auto& entries = table_cache[device.index()];
  for (auto& e : entries) {
    if (static_cast<int>(e->refs.size()) == n &&
        std::memcmp(e->refs.data(), refs.data(), n * sizeof(TensorRef)) == 0 &&
        std::memcmp(e->dtypes.data(), dtypes.data(), n) == 0) {
      e->captured = e->captured || capturing;
      record_use(*e, device, stream, capturing);
      auto* base = static_cast<uint8_t*>(e->buffer.data_ptr());
      return DeviceTable{n, 0, total_chunks, reinterpret_cast<const TensorRef*>(base),
                         base + n * sizeof(TensorRef)};
    }
  }
  TORCH_CHECK(!capturing, "gradclip cuda backend: a list of ", n, " gradients (more than ", kInlineCapacity,
              ") needs its device table copied before CUDA-graph capture; run the call once eagerly "
              "(a warm-up step, as torch.cuda.graph recommends) before capturing");
  if (entries.size() >= kMaxTableEntries) {
    for (auto it = entries.begin(); it != entries.end(); ++it) {
      if (!(*it)->captured) {
        entries.erase(it);
        break;
      }
    }
  }
  auto entry = std::make_unique<TableEntry>();
  entry->refs.assign(refs.begin(), refs.begin() + n);
  entry->dtypes.assign(dtypes.begin(), dtypes.begin() + n);
  const size_t bytes = device_table_bytes(n);
  std::vector<uint8_t> staging(bytes);
  std::memcpy(staging.data(), refs.data(), n * sizeof(TensorRef));
  std::memcpy(staging.data() + n * sizeof(TensorRef), dtypes.data(), n);
  entry->buffer = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  // Cold path only (first call with this list): copy and wait, so any stream may use it next.
  C10_CUDA_CHECK(cudaMemcpyAsync(entry->buffer.data_ptr(), staging.data(), bytes, cudaMemcpyHostToDevice, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  entry->streams_recorded.push_back(stream);  // the allocating stream: nothing to record
  auto* base = static_cast<uint8_t*>(entry->buffer.data_ptr());
  entries.push_back(std::move(entry));
  return DeviceTable{n, 0, total_chunks, reinterpret_cast<const TensorRef*>(base), base + n * sizeof(TensorRef)};
}

// ---- One call's view of the gradient list -------------------------------------------------------
struct Prepared {
  at::Device device{at::kCUDA};
  cudaStream_t stream = nullptr;
  bool capturing = false;
  TableArg table{};
  // Gradients that are not dense in memory run through a contiguous copy, written back afterwards.
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;

  void finish() {
    for (auto& [original, copy] : write_back) original.copy_(copy);
  }
};

struct ThreadBuffers {
  std::vector<HostTensor> host;
  std::vector<TensorRef> refs;
  std::vector<uint8_t> dtypes;
  std::unique_ptr<InlineTable> inline_table = std::make_unique<InlineTable>();
};

ThreadBuffers& thread_buffers() {
  thread_local ThreadBuffers buffers;
  return buffers;
}

// Validates every gradient, then makes their device current through `guard` (the caller's, so it
// outlives the launch). The guard is set only after gradient 0 is known to be a defined CUDA
// tensor: constructing a CUDAGuard from grads[0].device() up front threw an unhelpful c10 error
// ("Expected a CUDA device type") for a CPU or undefined first gradient.
// keep_empty (per-parameter ops): the table keeps every tensor, empty ones included, so entry i is
// gradient i (plan_table_keep_empty).
Prepared prepare(at::TensorList grads, bool mutates, c10::cuda::OptionalCUDAGuard& guard, bool keep_empty = false) {
  Prepared prep;
  ThreadBuffers& buf = thread_buffers();
  buf.host.clear();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    GRADCLIP_CHECK_GRAD(g.defined(), i, "is undefined");
    GRADCLIP_CHECK_GRAD(g.is_cuda(), i, "is on ", g.device(), ", not a CUDA device");
    if (i == 0) prep.device = g.device();
    GRADCLIP_CHECK_GRAD(g.device() == prep.device, i, "is on ", g.device(), " but gradient 0 is on ", prep.device,
                        "; one call takes the gradients of one device");
    GRADCLIP_CHECK_GRAD(g.layout() == at::kStrided, i, "is not a strided (dense) tensor");
    const DType tag = dtype_tag(g.scalar_type(), i);
    void* ptr = nullptr;
    if (g.numel() > 0) {
      if (g.is_non_overlapping_and_dense()) {
        ptr = g.data_ptr();  // any dense layout: the elements fill [ptr, ptr + numel)
      } else {
        at::Tensor copy = g.contiguous();
        ptr = copy.data_ptr();
        if (mutates) prep.write_back.emplace_back(g, copy);
        else prep.write_back.emplace_back(at::Tensor(), copy);  // keeps the copy alive for the launch
      }
    }
    buf.host.push_back(HostTensor{ptr, g.numel(), tag});
  }
  const int count = static_cast<int>(buf.host.size());
  const int entries = keep_empty ? count : count_nonempty(buf.host.data(), count);
  const auto plan = keep_empty ? plan_table_keep_empty : plan_table;
  guard.set_device(prep.device);
  prep.stream = c10::cuda::getCurrentCUDAStream(prep.device.index()).stream();
  prep.capturing = stream_is_capturing(prep.stream);
  if (fits_inline(entries)) {
    InlineTable& t = *buf.inline_table;
    t.n = plan(buf.host.data(), count, t.refs, t.dtypes, &t.total_chunks);
    prep.table.inline_table = &t;
  } else {
    buf.refs.resize(count);
    buf.dtypes.resize(count);
    int64_t total_chunks = 0;
    const int n = plan(buf.host.data(), count, buf.refs.data(), buf.dtypes.data(), &total_chunks);
    prep.table.inline_table = nullptr;
    prep.table.device_table =
        device_table_for(prep.device, prep.stream, prep.capturing, buf.refs, buf.dtypes, n, total_chunks);
  }
  return prep;
}

void finish_read_only(Prepared& prep) { prep.write_back.clear(); }

at::Tensor norm_launch(at::TensorList grads, double norm_type, bool clip, double max_norm) {
  const NormType p = norm_tag(norm_type);
  if (grads.empty()) return at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  c10::cuda::OptionalCUDAGuard guard;
  Prepared prep = prepare(grads, clip, guard);
  at::Tensor norm = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(prep.device));
  at::Tensor partials = partials_for(prep.device, prep.stream, prep.capturing);
  GRADCLIP_CHECK_LAUNCH(launch_norm_clip(prep.table, p, clip, static_cast<float>(max_norm),
                                         partials.data_ptr<double>(), norm.data_ptr<float>(), prep.device.index(),
                                         prep.stream));
  if (clip) {
    prep.finish();
  } else {
    finish_read_only(prep);
  }
  return norm;
}

// Per-parameter norms (issue 14): the same fused launch, also writing each gradient's fp32 norm.
// Allocates the two outputs and total_chunks * 16 fp64 slots per call (the caching allocator;
// under capture the graph's pool), copies nothing from the host on a cached table.
// Test hook: when set, the per-tensor slots are filled with NaN before the launch (an extra kernel),
// so a slot read before it is written shows up as a NaN per-parameter norm.
std::atomic<bool> poison_per_param_slots{false};

std::tuple<at::Tensor, at::Tensor> per_param_launch(at::TensorList grads, double norm_type, bool clip, double max_norm) {
  const NormType p = norm_tag(norm_type);
  if (grads.empty()) {
    const auto options = at::TensorOptions().dtype(at::kFloat);
    return {at::zeros({}, options), at::zeros({0}, options)};
  }
  c10::cuda::OptionalCUDAGuard guard;
  Prepared prep = prepare(grads, clip, guard, /*keep_empty=*/true);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(prep.device);
  at::Tensor norm = at::empty({}, options);
  at::Tensor per_param = at::empty({static_cast<int64_t>(grads.size())}, options);
  at::Tensor partials = partials_for(prep.device, prep.stream, prep.capturing);
  at::Tensor chunk_partials =
      at::empty({per_param_slots(prep.table.total_chunks())}, options.dtype(at::kDouble));
  if (poison_per_param_slots.load(std::memory_order_relaxed)) chunk_partials.fill_(std::numeric_limits<double>::quiet_NaN());
  GRADCLIP_CHECK_LAUNCH(launch_norm_clip_per_param(prep.table, p, clip, static_cast<float>(max_norm),
                                                   partials.data_ptr<double>(), norm.data_ptr<float>(),
                                                   chunk_partials.data_ptr<double>(), per_param.data_ptr<float>(),
                                                   prep.device.index(), prep.stream));
  if (clip) {
    prep.finish();
  } else {
    finish_read_only(prep);
  }
  return {norm, per_param};
}

// ---- The four ops --------------------------------------------------------------------------------
at::Tensor cuda_total_norm(at::TensorList grads, double norm_type) { return norm_launch(grads, norm_type, false, 0.0); }

at::Tensor cuda_clip_grad_norm_(at::TensorList grads, double max_norm, double norm_type) {
  return norm_launch(grads, norm_type, true, max_norm);
}

void cuda_clip_grads_with_norm_(at::TensorList grads, double max_norm, const at::Tensor& total_norm) {
  if (grads.empty()) return;
  c10::cuda::OptionalCUDAGuard guard;
  TORCH_CHECK(total_norm.numel() == 1, "gradclip cuda backend: total_norm must hold one value, got ",
              total_norm.numel());
  TORCH_CHECK(total_norm.scalar_type() == at::kFloat || total_norm.scalar_type() == at::kDouble,
              "gradclip cuda backend: total_norm must be float32 or float64, got ", total_norm.scalar_type());
  Prepared prep = prepare(grads, true, guard);
  // A norm on another device (or the host) is moved with a stream-ordered copy, never a sync.
  const at::Tensor norm = total_norm.to(prep.device, /*non_blocking=*/true).contiguous();
  // max_norm stays a double: the fp64-norm coefficient uses it unrounded, as torch does.
  GRADCLIP_CHECK_LAUNCH(launch_scale_by_norm(prep.table, max_norm, norm.data_ptr(),
                                             norm.scalar_type() == at::kDouble, prep.device.index(), prep.stream));
  prep.finish();
}

void cuda_clip_grad_value_(at::TensorList grads, double clip_value) {
  if (grads.empty()) return;
  c10::cuda::OptionalCUDAGuard guard;
  Prepared prep = prepare(grads, true, guard);
  GRADCLIP_CHECK_LAUNCH(
      launch_clip_value(prep.table, static_cast<float>(clip_value), prep.device.index(), prep.stream));
  prep.finish();
}

std::tuple<at::Tensor, at::Tensor> cuda_per_param_norms(at::TensorList grads, double norm_type) {
  return per_param_launch(grads, norm_type, false, 0.0);
}

std::tuple<at::Tensor, at::Tensor> cuda_clip_grad_norm_per_param_(at::TensorList grads, double max_norm,
                                                                  double norm_type) {
  return per_param_launch(grads, norm_type, true, max_norm);
}

// Test hook: fill every cached partial-sum slot with NaN, so a slot read before written fails.
void poison_scratch() {
  std::lock_guard<std::mutex> lock(scratch_mutex);
  for (auto& [key, slot] : scratch_cache) {
    const c10::cuda::CUDAGuard guard(slot.device());
    c10::cuda::CUDAStreamGuard stream_guard(c10::cuda::getStreamFromExternal(key.second, key.first));
    slot.fill_(std::numeric_limits<double>::quiet_NaN());
  }
}

size_t cached_device_tables() {
  std::lock_guard<std::mutex> lock(table_mutex);
  size_t n = 0;
  for (auto& [device, entries] : table_cache) n += entries.size();
  return n;
}

}  // namespace
}  // namespace gradclip

TORCH_LIBRARY_IMPL(gradclip, CUDA, m) {
  m.impl("cuda_total_norm", &gradclip::cuda_total_norm);
  m.impl("cuda_clip_grad_norm_", &gradclip::cuda_clip_grad_norm_);
  m.impl("cuda_clip_grads_with_norm_", &gradclip::cuda_clip_grads_with_norm_);
  m.impl("cuda_clip_grad_value_", &gradclip::cuda_clip_grad_value_);
  m.impl("cuda_per_param_norms", &gradclip::cuda_per_param_norms);
  m.impl("cuda_clip_grad_norm_per_param_", &gradclip::cuda_clip_grad_norm_per_param_);
}

namespace gradclip {

void bind_cuda(pybind11::module_& m) {
  // The InlineTable layout must be the same in the kernels (nvcc) and here (host compiler).
  TORCH_CHECK(kernel_inline_capacity() == kInlineCapacity, "gradclip._C: kernels were compiled with an inline table of ",
              kernel_inline_capacity(), " tensors but the binding with ", kInlineCapacity, " (nvcc older than 12.1?)");
  m.attr("INLINE_CAPACITY") = kInlineCapacity;
  m.attr("CHUNK_ELEMS") = kChunkElems;
  m.attr("MAX_GRID") = kMaxGrid;
  m.def("poison_scratch", &poison_scratch, "Fill cached partial-sum slots with NaN (tests)");
  m.def(
      "set_poison_per_param_scratch", [](bool on) { poison_per_param_slots.store(on); },
      "Fill the per-parameter slots with NaN before each per-param launch (tests)");
  m.def("cached_device_tables", &cached_device_tables, "Number of cached device tensor tables");
}

}  // namespace gradclip
