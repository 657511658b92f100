// What differs between the real CUDA build (nvcc, `vidkern._C`) and the CPU emulation build
// (host compiler, VIDKERN_EMULATE, loaded by the tests): the execution model, kernel launch,
// dynamic shared memory, the device guard and the op namespace. Kernel sources include only
// this header and use the helpers below, so both builds compile the same source.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef VIDKERN_EMULATE
#include "emulate.h"
#define VK_NAMESPACE vidkern_emu
#define VK_DISPATCH_KEY CPU
#define VK_DEVICE_GUARD(tensor) (void)0
#define VK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(vk_emu::dynamic_shared())
// `kernel` names the launch in the emulator's work log (vidkern.work.emulator): launchers keep
// the kernel's pointer in a variable named after the kernel, less its `_kernel` suffix.
#define VK_LAUNCH(kernel, grid, block, dynamic_bytes, ...) \
  vk_emu::launch(#kernel, grid, block, dynamic_bytes, kernel, __VA_ARGS__)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#define VK_NAMESPACE vidkern_cuda
#define VK_DISPATCH_KEY CUDA
#define VK_DEVICE_GUARD(tensor) const c10::cuda::OptionalCUDAGuard vk_device_guard_(device_of(tensor))
#define VK_DYNAMIC_SHARED(T, name)                                    \
  extern __shared__ __align__(16) unsigned char vk_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(vk_dynamic_shared_)
// `kernel` is a function pointer (so template arguments with commas need no extra parentheses).
#define VK_LAUNCH(kernel, grid, block, dynamic_bytes, ...)                                       \
  do {                                                                                           \
    kernel<<<grid, block, dynamic_bytes, at::cuda::getCurrentCUDAStream().stream()>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                              \
  } while (0)
#endif

namespace vk {

constexpr unsigned kFullMask = 0xffffffffu;

// Streaming multiprocessors, for sizing grids (the emulator pretends to have 4, so small test
// shapes take the multi-block paths).
inline int multiprocessors() {
#ifdef VIDKERN_EMULATE
  return 4;
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

// The most dynamic shared memory one block may opt in to (the emulator: an H100's 227 KiB, or
// VIDKERN_EMU_SMEM_LIMIT bytes, so tests can take the paths for GPUs with less).
inline size_t max_dynamic_shared() {
#ifdef VIDKERN_EMULATE
  const char* limit = std::getenv("VIDKERN_EMU_SMEM_LIMIT");
  return limit ? static_cast<size_t>(std::atoll(limit)) : 227 * 1024;
#else
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
#endif
}

// Lets `kernel` take `bytes` of dynamic shared memory (above 48 KiB needs the opt-in).
template <typename Kernel>
inline void allow_dynamic_shared(Kernel kernel, size_t bytes) {
#ifndef VIDKERN_EMULATE
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#else
  (void)kernel;
  (void)bytes;
#endif
}

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }

// V consecutive elements, 16 bytes when vectorised (V = 16 / sizeof(T)); V = 1 is the scalar,
// any-stride fallback.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Loads V consecutive elements (one 16-byte transaction when V > 1; the launcher checks alignment).
// Global-memory accesses go through ld / st / load / store (load_row below), so the emulator can
// tally the bytes each launch moves (vk_emu::count_*); in the GPU build they are plain accesses.
// Shared memory is accessed directly (it is not counted).
#ifdef VIDKERN_EMULATE
#define VK_COUNT_LOAD(bytes) vk_emu::count_load(bytes)
#define VK_COUNT_STORE(bytes) vk_emu::count_store(bytes)
#define VK_COUNT_MACS(n) vk_emu::count_macs(n)
#else
#define VK_COUNT_LOAD(bytes) (void)0
#define VK_COUNT_STORE(bytes) (void)0
#define VK_COUNT_MACS(n) (void)0
#endif

// One scalar global load / store.
template <typename T>
__device__ __forceinline__ T ld(const T* p) {
  VK_COUNT_LOAD(sizeof(T));
  return *p;
}

template <typename T>
__device__ __forceinline__ void st(T* p, T v) {
  VK_COUNT_STORE(sizeof(T));
  *p = v;
}

// A load every lane of a warp makes from the same address (a row's scalar): one transaction
// per warp, so the emulator counts it once per warp (lane 0).
template <typename T>
__device__ __forceinline__ T ld_warp(const T* p) {
#ifdef VIDKERN_EMULATE
  if (vk_emu::linear_thread() % 32 == 0) VK_COUNT_LOAD(sizeof(T));
#endif
  return *p;
}

// A global element of storage type T, as float.
template <typename T>
__device__ __forceinline__ float ldf(const T* p) { return to_float(ld(p)); }

template <typename T, int V>
__device__ __forceinline__ void load(const T* p, float (&out)[V]) {
  Pack<T, V> pack;
  VK_COUNT_LOAD(sizeof(pack));
#ifdef VIDKERN_EMULATE
  std::memcpy(&pack, p, sizeof(pack));
#else
  pack = *reinterpret_cast<const Pack<T, V>*>(p);
#endif
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store(T* p, const float (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = from_float<T>(in[i]);
  VK_COUNT_STORE(sizeof(pack));
#ifdef VIDKERN_EMULATE
  std::memcpy(p, &pack, sizeof(pack));
#else
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
#endif
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Online-softmax state of a set of values: max m, sum of exp(x - m), and sum of x exp(x - m).
// `m == -inf` marks the empty set.
struct SoftmaxState {
  float m, z, w;
};

__device__ __forceinline__ SoftmaxState empty_state() { return {-INFINITY, 0.f, 0.f}; }

__device__ __forceinline__ void push(SoftmaxState& st, float x) {
  if (x > st.m) {  // one exp per element: rescale the old sums instead of exponentiating x
    const float r = expf(st.m - x);
    st.z = st.z * r + 1.f;
    st.w = st.w * r + x;
    st.m = x;
  } else {
    const float e = expf(x - st.m);
    st.z += e;
    st.w += e * x;
  }
}

__device__ __forceinline__ SoftmaxState merge(SoftmaxState a, SoftmaxState b) {
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const float m = fmaxf(a.m, b.m);
  const float ra = expf(a.m - m), rb = expf(b.m - m);
  return {m, a.z * ra + b.z * rb, a.w * ra + b.w * rb};
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    SoftmaxState other{__shfl_xor_sync(kFullMask, st.m, offset), __shfl_xor_sync(kFullMask, st.z, offset),
                       __shfl_xor_sync(kFullMask, st.w, offset)};
    st = merge(st, other);
  }
  return st;
}

// Division and inverse square root without IEEE's slow-path subroutine (a CALL whose frame the
// resource check counts as stack): about 2 ulp, for operands of ordinary magnitude. The emulator
// uses the exact operations.
__device__ __forceinline__ float fast_div(float a, float b) {
#ifdef VIDKERN_EMULATE
  return a / b;
#else
  return __fdividef(a, b);
#endif
}

__device__ __forceinline__ float fast_rsqrt(float x) {
#ifdef VIDKERN_EMULATE
  return 1.f / std::sqrt(x);
#else
  return rsqrtf(x);
#endif
}

__device__ __forceinline__ float sigmoid(float h) { return 1.f / (1.f + expf(-h)); }

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

template <typename T>
constexpr int pack_width() { return 16 / static_cast<int>(sizeof(T)); }

// V elements of a row starting at channel c (V > 1: the channel stride is 1).
template <typename T, int V>
__device__ __forceinline__ void load_row(const T* row, int c, int64_t stride, float (&v)[V]) {
  if constexpr (V > 1) {
    load<T, V>(row + c, v);
  } else {
    v[0] = ldf(row + c * stride);
  }
}

// ---------------------------------------------------------------------------- host helpers
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Whether every (B, N, D) tensor can be read in packs of V channels: unit channel stride, D and
// the other strides multiples of V, 16-byte aligned base.
inline bool packable(std::initializer_list<const at::Tensor*> tensors, int V) {
  for (const at::Tensor* t : tensors) {
    if (!(t->stride(2) == 1 && t->size(2) % V == 0 && t->stride(1) % V == 0 && t->stride(0) % V == 0 &&
          aligned16(t->data_ptr())))
      return false;
  }
  return true;
}

// Calls fn.template operator()<V>() with V = the pack width of T if `packed`, else 1.
template <typename T, typename Fn>
void with_pack(bool packed, Fn&& fn) {
  if (packed) {
    fn.template operator()<pack_width<T>()>();
  } else {
    fn.template operator()<1>();
  }
}

inline int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace vk

// The storage dtypes every kernel here is instantiated for.
#define VK_DISPATCH_FLOATS(dtype, name, ...)                   \
  AT_DISPATCH_SWITCH(dtype, name,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
