// CPU emulation of the CUDA execution model, so the kernels in this folder run on a machine
// without a GPU (VERIFY.md §3). Included instead of the CUDA headers when VIDKERN_EMULATE is
// defined (see compat.h); the kernel source is unchanged.
//
// Model: one OS thread per CUDA thread of a block; the blocks of a grid run one after another
// (so `__shared__` storage is a function-local static, reused block after block);
// `__syncthreads()` is a std::barrier over the block; warp shuffles go through a per-warp
// exchange buffer between two warp barriers; atomics through std::atomic_ref. Launches are
// serialised. A kernel must reach every `__syncthreads()` from every thread (no early return
// before a barrier) — on a GPU that is undefined behaviour, here it deadlocks.
//
// Schedule jitter (a race check by perturbation): with VIDKERN_EMU_JITTER_US=N in the environment
// (read at each launch), after each block barrier every warp either goes on at once or sleeps N
// microseconds, drawn per warp and per barrier (all lanes of a warp draw alike, so the warp stays
// together through its shuffles and a fast warp can run far ahead of a slow one). Tightly
// scheduled OS threads otherwise run in near lock-step, so a missing __syncthreads() before shared
// scratch is reused went unseen; with jitter a lagging warp reads the scratch after a faster one
// rewrote it, and the result changes. Correct kernels are unaffected (shared memory is only read
// between the barriers that order it).
//
// Work counting (vidkern.work.emulator): every launch appends a WorkRecord to a log — its
// name, grid, block, dynamic shared bytes, and the global-memory bytes loaded and stored and
// the multiply-adds its threads reported (compat.h routes the kernels' global accesses through
// vk::ld / vk::st / vk::load / vk::store, and their product loops call VK_COUNT_MACS).
#pragma once

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
constexpr int warpSize = 32;

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace vk_emu {

struct BlockContext {
  explicit BlockContext(unsigned threads, size_t dynamic_bytes)
      : block_barrier(threads), exchange(threads), dynamic(dynamic_bytes / 16 + 1) {
    for (unsigned first = 0; first < threads; first += warpSize) {
      warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min<unsigned>(warpSize, threads - first)));
    }
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  struct alignas(16) Slot { unsigned char bytes[16]; };
  std::vector<Slot> exchange;  // one slot per thread, for shuffles
  std::vector<Slot> dynamic;   // `extern __shared__` storage, 16-byte aligned
  unsigned jitter_us = 0;      // VIDKERN_EMU_JITTER_US (0: none)
  unsigned threads() const { return static_cast<unsigned>(exchange.size()); }
};

inline thread_local BlockContext* current = nullptr;
inline thread_local uint64_t jitter_state = 0;   // seeded by warp and launch: a warp's lanes draw alike

// After a block barrier: sleep 0 or jitter_us microseconds (a per-warp LCG).
inline void jitter() {
  if (current == nullptr || current->jitter_us == 0) return;
  jitter_state = jitter_state * 6364136223846793005ULL + 1442695040888963407ULL;
  if ((jitter_state >> 40) & 1) std::this_thread::sleep_for(std::chrono::microseconds(current->jitter_us));
}

// Per-thread tallies of the running launch (summed over the block's threads when it ends).
struct Tally {
  uint64_t load = 0, store = 0, macs = 0;
};
inline thread_local Tally tally;
inline void count_load(uint64_t bytes) { tally.load += bytes; }
inline void count_store(uint64_t bytes) { tally.store += bytes; }
inline void count_macs(uint64_t n) { tally.macs += n; }

struct WorkRecord {
  std::string kernel;
  dim3 grid, block;
  uint64_t dynamic_bytes, load_bytes, store_bytes, macs;
};

inline std::mutex& log_mutex() {
  static std::mutex m;
  return m;
}

inline std::vector<WorkRecord>& work_log() {
  static std::vector<WorkRecord> log;
  return log;
}

inline unsigned linear_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void* dynamic_shared() { return current->dynamic.data(); }

// Runs kernel(args...) over the grid. Arguments are copied once and shared by all threads,
// as kernel parameters are.
template <typename Kernel, typename... Args>
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_bytes, Kernel kernel, Args... args) {
  static std::mutex serial;
  std::lock_guard<std::mutex> lock(serial);
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || grid.x * grid.y * grid.z == 0) return;
  BlockContext ctx(threads, dynamic_bytes);
  if (const char* env = std::getenv("VIDKERN_EMU_JITTER_US")) ctx.jitter_us = static_cast<unsigned>(std::atoi(env));
  static uint64_t launches = 0;
  const uint64_t launch_id = ++launches;
  std::atomic<uint64_t> loads{0}, stores{0}, macs{0};
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      current = &ctx;
      jitter_state = 0x9E3779B97F4A7C15ULL * (t / warpSize + 1) + launch_id;
      tally = Tally{};
      blockDim = block;
      gridDim = grid;
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            ctx.block_barrier.arrive_and_wait();  // the next block reuses the shared storage
            jitter();
          }
      current = nullptr;
      loads += tally.load;
      stores += tally.store;
      macs += tally.macs;
    });
  }
  for (auto& th : pool) th.join();
  std::lock_guard<std::mutex> log_lock(log_mutex());
  work_log().push_back({name, grid, block, dynamic_bytes, loads.load(), stores.load(), macs.load()});
}

template <typename T>
T shuffle(T value, unsigned source_lane) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>, "shuffle of a small trivial type");
  const unsigned tid = linear_thread();
  const unsigned first = tid - tid % warpSize;
  std::barrier<>& bar = *current->warp_barriers[tid / warpSize];
  std::memcpy(current->exchange[tid].bytes, &value, sizeof(T));
  bar.arrive_and_wait();
  T out = value;
  const unsigned src = first + source_lane;
  if (source_lane < static_cast<unsigned>(warpSize) && src < current->threads())
    std::memcpy(&out, current->exchange[src].bytes, sizeof(T));
  bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return out;
}

}  // namespace vk_emu

inline void __syncthreads() {
  vk_emu::current->block_barrier.arrive_and_wait();
  vk_emu::jitter();
}

// The mask argument is ignored: the kernels here always shuffle with the whole warp.
template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int /*width*/ = warpSize) {
  return vk_emu::shuffle(value, (vk_emu::linear_thread() % warpSize) ^ static_cast<unsigned>(lane_mask));
}

template <typename T>
T __shfl_sync(unsigned /*mask*/, T value, int source_lane, int /*width*/ = warpSize) {
  return vk_emu::shuffle(value, static_cast<unsigned>(source_lane));
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
