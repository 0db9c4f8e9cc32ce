// Device helpers shared by the kernel families: dtype conversion through fp32 and the walk over
// one chunk's element range with 16-byte vector accesses (scalar head/tail when misaligned or
// ragged). CUDA headers only.
//
// Every element is read once as its own dtype and widened to fp32 exactly; writes narrow one fp32
// value to the gradient dtype with a single round-to-nearest-even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensor_list.h"

namespace gradclip {

constexpr int kThreads = 512;  // threads per block of every kernel
constexpr int kUnroll = 4;     // 16-byte vectors in flight per thread per loop trip (64 B)
// Resident blocks per SM asked of ptxas (__launch_bounds__): 2 caps a kernel at 64 registers per
// thread, which the norm-only kernels fit without spilling; kernels that rewrite gradients in
// place need ~100 registers and run one 512-thread block per SM (32 KB of loads in flight per SM,
// above H100's ~18 KB bandwidth-delay product per SM).
constexpr int kBlocksPerSmReadOnly = 2;
constexpr int kBlocksPerSmRescale = 1;
// Trips of the in-place rewrite (loaded and rewritten vectors are live at once).
constexpr int kRewriteUnroll = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// The raw bits of one element (to tell a changed element from an unchanged one).
template <class T>
__device__ __forceinline__ auto bits_of(T x) {
  using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;
  U u;
  memcpy(&u, &x, sizeof(T));
  return u;
}

// 16 bytes reinterpreted as kVectorBytes / sizeof(T) elements.
template <class T>
union Vec {
  static constexpr int kN = kVectorBytes / sizeof(T);
  uint4 raw;
  T e[kN];
};

// Calls f(float x) for every element of p[0, count), the block's threads striding the range.
// Per thread the visiting order is fixed (head, vectors in trips of kUnroll, tail), so an
// accumulation inside f is deterministic for a given grid and block size.
template <class T, class F>
__device__ __forceinline__ void read_range(const T* __restrict__ p, int64_t count, F&& f) {
  const VectorSplit split = split_for_vectors(reinterpret_cast<uint64_t>(p), count, sizeof(T));
  for (int64_t i = threadIdx.x; i < split.head; i += kThreads) f(to_float(p[i]));
  const uint4* __restrict__ body = reinterpret_cast<const uint4*>(p + split.head);
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < split.vectors; i += kUnroll * kThreads) {
    Vec<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u].raw = body[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int k = 0; k < Vec<T>::kN; ++k) f(to_float(v[u].e[k]));
    }
  }
  for (; i < split.vectors; i += kThreads) {
    Vec<T> v;
    v.raw = body[i];
#pragma unroll
    for (int k = 0; k < Vec<T>::kN; ++k) f(to_float(v.e[k]));
  }
  const T* __restrict__ tail = p + split.head + split.vectors * Vec<T>::kN;
  for (int64_t j = threadIdx.x; j < split.tail; j += kThreads) f(to_float(tail[j]));
}

// Rewrites p[0, count) in place with y = g(x), where g maps the element to its new value of
// type T. A vector (or scalar) whose bits do not change is not stored, so the bytes written are
// those of the elements that actually change.
template <class T, class G>
__device__ __forceinline__ void rewrite_range(T* __restrict__ p, int64_t count, G&& g) {
  const VectorSplit split = split_for_vectors(reinterpret_cast<uint64_t>(p), count, sizeof(T));
  auto scalar = [&](T* q) {
    const T old = *q;
    const T neu = g(old);
    if (bits_of(old) != bits_of(neu)) *q = neu;
  };
  for (int64_t i = threadIdx.x; i < split.head; i += kThreads) scalar(p + i);
  uint4* __restrict__ body = reinterpret_cast<uint4*>(p + split.head);
  auto vector = [&](Vec<T>& v, int64_t at) {
    Vec<T> out;
#pragma unroll
    for (int k = 0; k < Vec<T>::kN; ++k) out.e[k] = g(v.e[k]);
    if (out.raw.x != v.raw.x || out.raw.y != v.raw.y || out.raw.z != v.raw.z || out.raw.w != v.raw.w) {
      body[at] = out.raw;
    }
  };
  int64_t i = threadIdx.x;
  for (; i + (kRewriteUnroll - 1) * kThreads < split.vectors; i += kRewriteUnroll * kThreads) {
    Vec<T> v[kRewriteUnroll];
#pragma unroll
    for (int u = 0; u < kRewriteUnroll; ++u) v[u].raw = body[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kRewriteUnroll; ++u) vector(v[u], i + u * kThreads);
  }
  for (; i < split.vectors; i += kThreads) {
    Vec<T> v;
    v.raw = body[i];
    vector(v, i);
  }
  T* __restrict__ tail = p + split.head + split.vectors * Vec<T>::kN;
  for (int64_t j = threadIdx.x; j < split.tail; j += kThreads) scalar(tail + j);
}

// NaN-propagating max of magnitudes (fmaxf would drop a NaN): once NaN, stays NaN.
__device__ __forceinline__ float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }
__device__ __forceinline__ double nan_max(double a, double b) { return (b > a || b != b) ? b : a; }

}  // namespace gradclip
