// Tensor-list metadata shared by every gradclip kernel, and the pure host logic around it.
//
// Plain C++17 with no CUDA and no torch includes: the same code compiles under nvcc (device and
// host) and under g++ for the CPU unit test (csrc/tests/host_logic_test.cpp), so chunk
// partitioning, table splitting and grid sizing are tested on machines without a GPU.
//
// Work decomposition. Every non-empty gradient is cut into chunks of kChunkElems elements (the
// last chunk of a tensor is ragged). Chunks are numbered globally: tensor i owns chunks
// [first_chunk[i], first_chunk[i] + ceil(numel[i] / kChunkElems)). A persistent grid of G blocks
// walks the chunk space with stride G (block b takes b, b + G, b + 2G, ...) and finds the tensor
// of a chunk by binary search over first_chunk. Offsets are int64: a tensor may hold more than
// 2^31 elements (up to 2^63 / kChunkElems chunks).
//
// Table transport. A list of at most kInlineCapacity tensors travels inside the kernel
// parameters (InlineTable, a __grid_constant__ struct of ~25 KB; CUDA >= 12.1 accepts 32 KB of
// parameters on sm_70+, older toolkits get a 4 KB table). Longer lists live in a device buffer
// (DeviceTable) that the binding caches by content, so a repeated call copies nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define GRADCLIP_HD __host__ __device__ __forceinline__
#else
#define GRADCLIP_HD inline
#endif

namespace gradclip {

// Gradient dtypes the kernels serve; the tag travels per tensor, so one launch mixes them.
enum class DType : uint8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum class NormType : int { kL1 = 1, kL2 = 2, kInf = 3 };

GRADCLIP_HD int dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// 64K elements: 256 KB of fp32 or 128 KB of fp16/bf16 per chunk. Large enough that the binary
// search and the per-chunk bookkeeping are noise, small enough that a 1B-element model gives
// every block of a full persistent grid dozens of chunks.
constexpr int64_t kChunkElems = int64_t{1} << 16;

// Bytes of one vector load/store.
constexpr int kVectorBytes = 16;

// The persistent grid is capped: the partial-sum scratch holds kMaxGrid slots.
constexpr int kMaxGrid = 2048;

#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
constexpr int kInlineCapacity = 1024;  // 24 B * 1024 + 1 B * 1024 + 16 B = 25,616 B < 32,764 B
#elif defined(__CUDACC__)
constexpr int kInlineCapacity = 128;  // 3,216 B < the classic 4 KB parameter limit
#else
constexpr int kInlineCapacity = 1024;  // host-only builds (unit test): same as CUDA >= 12.1
#endif

// One gradient: base address, element count, and the global index of its first chunk.
struct TensorRef {
  void* ptr;
  int64_t numel;
  int64_t first_chunk;
};

// The table passed by value as a __grid_constant__ kernel parameter.
struct InlineTable {
  int32_t n;
  int32_t reserved;
  int64_t total_chunks;
  TensorRef refs[kInlineCapacity];
  uint8_t dtypes[kInlineCapacity];

  GRADCLIP_HD const TensorRef& ref(int i) const { return refs[i]; }
  GRADCLIP_HD DType dtype(int i) const { return static_cast<DType>(dtypes[i]); }
};

// Kernel parameters: the table plus at most 32 B of other arguments must fit the launch limit.
#if defined(__CUDACC__) && !(__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 1))
static_assert(sizeof(InlineTable) + 32 <= 4096, "inline tensor table exceeds the 4 KB parameter limit");
#else
static_assert(sizeof(InlineTable) + 32 <= 32764, "inline tensor table exceeds the 32 KB parameter limit");
#endif

// The same table when it lives in device memory: refs[n] followed by dtypes[n] in one buffer.
struct DeviceTable {
  int32_t n;
  int32_t reserved;
  int64_t total_chunks;
  const TensorRef* refs;
  const uint8_t* dtypes;

  GRADCLIP_HD const TensorRef& ref(int i) const { return refs[i]; }
  GRADCLIP_HD DType dtype(int i) const { return static_cast<DType>(dtypes[i]); }
};

// Bytes of the device buffer behind a DeviceTable of n tensors (refs, then dtype tags).
inline size_t device_table_bytes(int n) { return static_cast<size_t>(n) * (sizeof(TensorRef) + 1); }

GRADCLIP_HD int64_t chunks_of(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

// Index of the tensor owning global chunk `chunk` (0 <= chunk < total_chunks): the last i with
// first_chunk[i] <= chunk. Tensors in a table are never empty, so the answer is unique.
template <class Table>
GRADCLIP_HD int find_tensor(const Table& table, int64_t chunk) {
  int lo = 0;
  int hi = table.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.ref(mid).first_chunk <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Element range [begin, end) of global chunk `chunk` inside tensor `ref`.
struct ElemRange {
  int64_t begin;
  int64_t end;
};

GRADCLIP_HD ElemRange chunk_elems(const TensorRef& ref, int64_t chunk) {
  const int64_t begin = (chunk - ref.first_chunk) * kChunkElems;
  const int64_t end = begin + kChunkElems < ref.numel ? begin + kChunkElems : ref.numel;
  return {begin, end};
}

// How a range of `count` elements starting at byte address `addr` splits into a scalar head (up
// to the first 16-byte boundary), a body of whole 16-byte vectors, and a scalar tail. Tensors are
// element-aligned, so the head is a whole number of elements.
struct VectorSplit {
  int64_t head;     // scalar elements before the first aligned vector
  int64_t vectors;  // whole vectors of kVectorBytes / elem_size elements
  int64_t tail;     // scalar elements after the last vector
};

GRADCLIP_HD VectorSplit split_for_vectors(uint64_t addr, int64_t count, int elem_size) {
  const int per_vector = kVectorBytes / elem_size;
  const uint64_t misalign = addr % kVectorBytes;
  int64_t head = misalign == 0 ? 0 : static_cast<int64_t>((kVectorBytes - misalign) / elem_size);
  if ((misalign % elem_size) != 0) head = count;  // not element-aligned: all scalar (never for tensors)
  if (head > count) head = count;
  const int64_t vectors = (count - head) / per_vector;
  return {head, vectors, count - head - vectors * per_vector};
}

// ---- Host-side planning (binding and unit test) ---------------------------------------------

// One gradient as the binding sees it.
struct HostTensor {
  void* ptr;
  int64_t numel;
  DType dtype;
};

// Fill `table` (refs and dtype tags for the non-empty tensors of `tensors[0, count)`) and return
// the number of table entries. `refs` and `dtypes` must hold `count` entries. Empty tensors are
// dropped (they contribute 0 to every norm and have nothing to rescale).
inline int plan_table(const HostTensor* tensors, int count, TensorRef* refs, uint8_t* dtypes, int64_t* total_chunks) {
  int n = 0;
  int64_t chunk = 0;
  for (int i = 0; i < count; ++i) {
    if (tensors[i].numel <= 0) continue;
    refs[n] = TensorRef{tensors[i].ptr, tensors[i].numel, chunk};
    dtypes[n] = static_cast<uint8_t>(tensors[i].dtype);
    chunk += chunks_of(tensors[i].numel);
    ++n;
  }
  *total_chunks = chunk;
  return n;
}

// Number of non-empty tensors in a list: decides inline (<= kInlineCapacity) vs device table.
inline int count_nonempty(const HostTensor* tensors, int count) {
  int n = 0;
  for (int i = 0; i < count; ++i) n += tensors[i].numel > 0 ? 1 : 0;
  return n;
}

inline bool fits_inline(int nonempty) { return nonempty <= kInlineCapacity; }

// The table of the per-parameter kernels (issue 14): like plan_table, but every tensor keeps its
// entry, empty ones included (numel 0, no chunks), so entry i is input tensor i and per-tensor
// results land in input order. find_tensor still answers a non-empty tensor for every chunk: an
// empty tensor's first_chunk equals the next entry's, find_tensor returns the LAST entry with
// first_chunk <= chunk, and trailing empties start at total_chunks, above every chunk.
inline int plan_table_keep_empty(const HostTensor* tensors, int count, TensorRef* refs, uint8_t* dtypes,
                                 int64_t* total_chunks) {
  int64_t chunk = 0;
  for (int i = 0; i < count; ++i) {
    const int64_t numel = tensors[i].numel > 0 ? tensors[i].numel : 0;
    refs[i] = TensorRef{tensors[i].ptr, numel, chunk};
    dtypes[i] = static_cast<uint8_t>(tensors[i].dtype);
    chunk += chunks_of(numel);
  }
  *total_chunks = chunk;
  return count;
}

// Persistent grid: min(sm_count * blocks_per_sm, kMaxGrid, total_chunks), at least 1. For a
// cooperative launch blocks_per_sm must not exceed the occupancy API's answer, so every block is
// co-resident and the grid barrier cannot deadlock. `wanted_per_sm` caps the occupancy (2 blocks
// of 512 threads keep ~64 KB of loads in flight per SM, more than the bandwidth-delay product).
inline int persistent_grid(int sm_count, int occupancy_per_sm, int wanted_per_sm, int64_t total_chunks) {
  const int per_sm = occupancy_per_sm < wanted_per_sm ? occupancy_per_sm : wanted_per_sm;
  int64_t grid = static_cast<int64_t>(sm_count) * (per_sm > 0 ? per_sm : 1);
  if (grid > kMaxGrid) grid = kMaxGrid;
  if (grid > total_chunks) grid = total_chunks;
  return grid < 1 ? 1 : static_cast<int>(grid);
}

}  // namespace gradclip
