// Helpers shared by the CUDA kernels: packed (up to 128-bit) memory access and
// block reductions.
#pragma once

#include <cstdint>

namespace myext {
namespace cuda {

constexpr int kWarpSize = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// N consecutive elements moved with one instruction: the alignment makes the
// compiler emit a single vector load or store (128 bits for 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, N>*>(ptr);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(ptr) = pack;
}

// Elements of T in 16 bytes: the widest load a thread can issue.
template <typename T>
constexpr int kPack16 = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ T shfl_xor(T value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}

// Reduces `value` over the block with `op`; the result is valid in thread 0
// only. `T` needs a shfl_xor overload. blockDim.x must be a multiple of 32
// and at most 1024, and every thread of the block must call it. Its shared
// buffer is not fenced for reuse: call it once per kernel.
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op) {
  __shared__ T warp_results[kWarpSize];
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = op(value, shfl_xor(value, offset));
  }
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) warp_results[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    // At most 32 warp results: a serial pass is cheaper than another shuffle
    // round that would need an identity element for the idle lanes.
    for (int w = 1; w < static_cast<int>(blockDim.x) / kWarpSize; ++w) {
      value = op(value, warp_results[w]);
    }
  }
  return value;
}

}  // namespace cuda
}  // namespace myext
