// CPU unit test of the torch-free host logic in csrc/tensor_list.h: chunk partitioning (every
// element covered exactly once, 64-bit offsets past 2^31), the chunk -> tensor binary search, the
// 16-byte vector split, inline-vs-device table choice, and persistent grid sizing. Built and run
// by csrc/check_compile.sh with g++ (or nvcc as a host compiler); needs no GPU.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../tensor_list.h"

using namespace gradclip;

static int failures = 0;
#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

// A DeviceTable viewed on the host (its arrays are host vectors here).
static DeviceTable view(const std::vector<TensorRef>& refs, const std::vector<uint8_t>& dtypes, int n, int64_t total) {
  return DeviceTable{n, 0, total, refs.data(), dtypes.data()};
}

template <class Table>
static void check_cover(const Table& table, const std::vector<HostTensor>& tensors) {
  // Walk the chunks in the kernel's grid-stride order for a few grid sizes; every element of every
  // non-empty tensor must be visited exactly once, by chunks that stay inside the tensor.
  for (int grid : {1, 3, 132, 2048}) {
    std::vector<int64_t> covered(table.n, 0);
    std::vector<int64_t> next_begin(table.n, 0);
    for (int b = 0; b < grid; ++b) {
      for (int64_t c = b; c < table.total_chunks; c += grid) {
        const int t = find_tensor(table, c);
        EXPECT(t >= 0 && t < table.n);
        const TensorRef& ref = table.ref(t);
        EXPECT(ref.first_chunk <= c && c < ref.first_chunk + chunks_of(ref.numel));
        const ElemRange r = chunk_elems(ref, c);
        EXPECT(0 <= r.begin && r.begin < r.end && r.end <= ref.numel);
        EXPECT(r.end - r.begin <= kChunkElems);
        EXPECT(r.begin % kChunkElems == 0);
        covered[t] += r.end - r.begin;
      }
    }
    int k = 0;
    for (const HostTensor& h : tensors) {
      if (h.numel <= 0) continue;
      EXPECT(covered[k] == h.numel);
      EXPECT(table.ref(k).ptr == h.ptr);
      EXPECT(table.dtype(k) == h.dtype);
      ++k;
    }
    EXPECT(k == table.n);
  }
}

static void test_partition() {
  const int64_t C = kChunkElems;
  std::vector<std::vector<int64_t>> cases = {
      {},
      {0, 0},
      {1},
      {3, 0, 127, 9},
      {C - 1, C, C + 1},
      {3 * C + 5, 0, 1, 2 * C},
      {(int64_t{1} << 31) + 5},               // > 2^31 elements: int64 offsets
      {7, (int64_t{1} << 33) + 3, 11},        // 8.6e9 elements between tiny ones
  };
  std::mt19937_64 rng(1234);
  std::vector<int64_t> many;
  for (int i = 0; i < 2000; ++i) many.push_back(static_cast<int64_t>(rng() % 5));  // 2,000 tiny, some empty
  cases.push_back(many);
  std::vector<int64_t> over;
  for (int i = 0; i < kInlineCapacity + 7; ++i) over.push_back(1 + static_cast<int64_t>(rng() % (3 * C)));
  cases.push_back(over);

  for (const auto& sizes : cases) {
    std::vector<HostTensor> tensors;
    for (size_t i = 0; i < sizes.size(); ++i) {
      tensors.push_back(HostTensor{reinterpret_cast<void*>(0x10000 * (i + 1)), sizes[i], static_cast<DType>(i % 3)});
    }
    const int count = static_cast<int>(tensors.size());
    const int nonempty = count_nonempty(tensors.data(), count);
    int64_t expected_chunks = 0;
    for (int64_t s : sizes) expected_chunks += s > 0 ? (s + C - 1) / C : 0;

    std::vector<TensorRef> refs(count + 1);
    std::vector<uint8_t> dtypes(count + 1);
    int64_t total = -1;
    const int n = plan_table(tensors.data(), count, refs.data(), dtypes.data(), &total);
    EXPECT(n == nonempty);
    EXPECT(total == expected_chunks);
    check_cover(view(refs, dtypes, n, total), tensors);

    if (fits_inline(nonempty)) {
      static InlineTable table;
      table.n = plan_table(tensors.data(), count, table.refs, table.dtypes, &table.total_chunks);
      EXPECT(table.n == n && table.total_chunks == total);
      check_cover(table, tensors);
    } else {
      EXPECT(nonempty > kInlineCapacity);
    }
  }
  EXPECT(fits_inline(kInlineCapacity));
  EXPECT(!fits_inline(kInlineCapacity + 1));
  EXPECT(device_table_bytes(3) == 3 * sizeof(TensorRef) + 3);
}

static void test_vector_split() {
  for (int elem : {2, 4}) {
    const int per = kVectorBytes / elem;
    for (uint64_t base = 0x1000; base < 0x1000 + 16; base += elem) {
      for (int64_t count = 0; count < 70; ++count) {
        const VectorSplit s = split_for_vectors(base, count, elem);
        EXPECT(s.head >= 0 && s.vectors >= 0 && s.tail >= 0);
        EXPECT(s.head + s.vectors * per + s.tail == count);
        EXPECT(s.tail < per || s.vectors == 0);
        EXPECT(s.head < per);
        if (s.vectors > 0) EXPECT((base + s.head * elem) % kVectorBytes == 0);
        if (base % kVectorBytes == 0) EXPECT(s.head == 0);
      }
    }
  }
  // A chunk boundary keeps the alignment of the tensor's base: chunk sizes are whole vectors.
  EXPECT((kChunkElems * 2) % kVectorBytes == 0);
}

static void test_grid() {
  EXPECT(persistent_grid(132, 4, 2, 1 << 20) == 264);   // capped by the wanted blocks per SM
  EXPECT(persistent_grid(132, 1, 2, 1 << 20) == 132);   // capped by the occupancy (co-residency)
  EXPECT(persistent_grid(132, 2, 2, 10) == 10);         // no more blocks than chunks
  EXPECT(persistent_grid(132, 2, 2, 0) == 1);           // empty list: one block writes the zero norm
  EXPECT(persistent_grid(4000, 2, 2, 1 << 20) == kMaxGrid);
  EXPECT(persistent_grid(132, 0, 2, 100) == 100);       // occupancy 0 is rejected by the launcher first
}

// plan_table_keep_empty (per-parameter kernels): entry i is tensor i, empties included, and every
// chunk still maps to the non-empty tensor that owns it.
static void test_keep_empty() {
  const int64_t big = 3 * kChunkElems + 5;
  std::vector<HostTensor> tensors = {{nullptr, 0, DType::kFloat32},          {(void*)0x1000, 7, DType::kFloat16},
                                     {nullptr, 0, DType::kBFloat16},         {nullptr, 0, DType::kFloat32},
                                     {(void*)0x2000, big, DType::kFloat32},  {(void*)0x3000, kChunkElems, DType::kFloat16},
                                     {nullptr, 0, DType::kFloat16}};
  const int count = static_cast<int>(tensors.size());
  std::vector<TensorRef> refs(count);
  std::vector<uint8_t> dtypes(count);
  int64_t total = -1;
  EXPECT(plan_table_keep_empty(tensors.data(), count, refs.data(), dtypes.data(), &total) == count);
  EXPECT(total == 1 + 4 + 1);
  for (int i = 0; i < count; ++i) {
    EXPECT(refs[i].numel == tensors[i].numel && dtypes[i] == static_cast<uint8_t>(tensors[i].dtype));
  }
  const DeviceTable table = view(refs, dtypes, count, total);
  const int owner[] = {1, 4, 4, 4, 4, 5};
  for (int64_t c = 0; c < total; ++c) EXPECT(find_tensor(table, c) == owner[c]);
  std::vector<int64_t> covered(count, 0);
  for (int64_t c = 0; c < total; ++c) {
    const int t = find_tensor(table, c);
    const ElemRange r = chunk_elems(table.ref(t), c);
    EXPECT(0 <= r.begin && r.begin < r.end && r.end <= table.ref(t).numel);
    covered[t] += r.end - r.begin;
  }
  for (int i = 0; i < count; ++i) EXPECT(covered[i] == tensors[i].numel);
}

int main() {
  test_partition();
  test_keep_empty();
  test_vector_split();
  test_grid();
  if (failures != 0) {
    std::fprintf(stderr, "host_logic_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("host_logic_test: ok (inline capacity %d tensors, table %zu B, chunk %lld elements)\n",
              kInlineCapacity, sizeof(InlineTable), static_cast<long long>(kChunkElems));
  return 0;
}
