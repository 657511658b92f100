// TEAM's fused ops (SPEC §2) in CUDA C++: feature_summary and team_gate, forward and backward.
// fp32 / fp16 / bf16 storage, fp32 arithmetic. Inputs of any strides: when the channel axis is
// contiguous and 16-byte aligned the kernels move 16-byte packs (V = 16 / sizeof(T) elements),
// otherwise V = 1 with the strides as given. Outputs are contiguous.
//
//   feature_summary  f[b,c] = sum_n softmax_n(X[b,:,c])[n] X[b,n,c]
//     fwd: column blocks stream the tokens with an online (max, sum-exp, weighted sum) per
//          channel; when B x channel-blocks is too few blocks for the GPU the tokens are split
//          too, and the partial states are merged in a fixed order. Saves (max, sum-exp, f).
//     bwd: dX = P (1 + X - f) df, P = exp(X - max) / sum-exp: one pass.
//   team_gate  Y = s[n] g[c] X,  g = sigmoid(h),  s = softmax_n(s0),
//              s0[n] = sum_c softmax_c(X')[c] X'[c],  X' = g X
//     fwd: rows (one warp per token, online channel softmax) -> s0; one block per batch row:
//          s = softmax(s0); rows: Y. Reads X twice, writes Y once.
//     bwd: rows: s0, the row max and sum-exp, ds = dY . X'; per batch: ds0 = s (ds - s.ds);
//          rows: dX = g (s dY + ds0 Q (1 + X' - s0)) and per-block partial column sums of
//          dX' X, reduced in a fixed order into dh (no float atomics: bitwise reproducible).
//
// The same source builds for the GPU (nvcc) and for the CPU emulator (compat.h, VERIFY.md §3).
#include "compat.h"

namespace {

using vk::cdiv;
using vk::imin;
using vk::load_row;
using vk::pack_width;
using vk::packable;
using vk::SoftmaxState;
using vk::with_pack;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerBlock = 32;  // tokens per block of the row kernels (4 per warp)
#ifndef VK_TEAM_MAX_CHANNELS
#error "VK_TEAM_MAX_CHANNELS comes from kernels/limits.py (cpp_defines): build through setup.py or the emulator loader"
#endif
constexpr int kMaxChannels = VK_TEAM_MAX_CHANNELS;  // the backward keeps (1 + warps) x D floats in shared memory

// ------------------------------------------------------------------------ feature_summary
// Column tiles: CT threads across channels (V each, 128 contiguous bytes per token row when
// packed), RT threads across tokens.
template <int V>
struct ColumnTile {
  static constexpr int CT = V == 1 ? 32 : 8;
  static constexpr int RT = kThreads / CT;
  static constexpr int C = CT * V;  // channels per block
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
summary_fwd_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxd, int N, int D, int rows_per_split,
                   float* __restrict__ partial, T* __restrict__ f, float* __restrict__ stats) {
  using Tile = ColumnTile<V>;
  __shared__ SoftmaxState states[Tile::RT][Tile::C];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.z;
  const int split = blockIdx.y, splits = gridDim.y;
  const int c0 = blockIdx.x * Tile::C + tx * V;
  const int n_end = imin(N, (split + 1) * rows_per_split);
  SoftmaxState st[V];
#pragma unroll
  for (int i = 0; i < V; ++i) st[i] = vk::empty_state();
  if (c0 < D) {  // packed: D % V == 0, so a pack is wholly in or out
    const T* base = x + b * sxb + c0 * sxd;
    for (int n = split * rows_per_split + ty; n < n_end; n += Tile::RT) {
      float v[V];
      load_row<T, V>(base + n * sxn, 0, sxd, v);
#pragma unroll
      for (int i = 0; i < V; ++i) vk::push(st[i], v[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) states[ty][tx * V + i] = st[i];
  __syncthreads();
  // One thread per channel merges the token threads' states, always in the same order.
  const int t = ty * Tile::CT + tx;
  const int c = blockIdx.x * Tile::C + t;
  if (t < Tile::C && c < D) {
    SoftmaxState acc = states[0][t];
    for (int r = 1; r < Tile::RT; ++r) acc = vk::merge(acc, states[r][t]);
    if (splits == 1) {
      const float fv = acc.w / acc.z;
      vk::st(f + b * D + c, vk::from_float<T>(fv));
      vk::st(stats + b * 3 * D + c, acc.m);
      vk::st(stats + b * 3 * D + D + c, acc.z);
      vk::st(stats + b * 3 * D + 2 * D + c, fv);
    } else {
      float* out = partial + (b * splits + split) * 3 * D + c;
      vk::st(out, acc.m);
      vk::st(out + D, acc.z);
      vk::st(out + 2 * D, acc.w);
    }
  }
}

// Merges the token splits' partial states (B, splits, 3, D) in split order: one thread per (b, c).
template <typename T>
__global__ void __launch_bounds__(kThreads)
summary_merge_kernel(const float* __restrict__ partial, int B, int D, int splits, T* __restrict__ f,
                     float* __restrict__ stats) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * D) return;
  const int64_t b = i / D, c = i % D;
  SoftmaxState acc = vk::empty_state();
  for (int s = 0; s < splits; ++s) {
    const float* p = partial + (b * splits + s) * 3 * D + c;
    acc = vk::merge(acc, {vk::ld(p), vk::ld(p + D), vk::ld(p + 2 * D)});
  }
  const float fv = acc.w / acc.z;
  vk::st(f + i, vk::from_float<T>(fv));
  vk::st(stats + b * 3 * D + c, acc.m);
  vk::st(stats + b * 3 * D + D + c, acc.z);
  vk::st(stats + b * 3 * D + 2 * D + c, fv);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
summary_bwd_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxd, const float* __restrict__ stats,
                   const T* __restrict__ df, int64_t sdfb, int64_t sdfd, T* __restrict__ dx, int N, int D,
                   int rows_per_block) {
  using Tile = ColumnTile<V>;
  const int64_t b = blockIdx.z;
  const int c0 = blockIdx.x * Tile::C + threadIdx.x * V;
  if (c0 >= D) return;  // no barrier in this kernel
  float m[V], inv_z[V], fv[V], g[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    m[i] = vk::ld(stats + b * 3 * D + c0 + i);
    inv_z[i] = 1.f / vk::ld(stats + b * 3 * D + D + c0 + i);
    fv[i] = vk::ld(stats + b * 3 * D + 2 * D + c0 + i);
    g[i] = vk::ldf(df + b * sdfb + (c0 + i) * sdfd);
  }
  const T* base = x + b * sxb + c0 * sxd;
  T* out = dx + b * N * D + c0;
  const int n_end = imin(N, (blockIdx.y + 1) * rows_per_block);
  for (int n = blockIdx.y * rows_per_block + threadIdx.y; n < n_end; n += Tile::RT) {
    float v[V];
    load_row<T, V>(base + n * sxn, 0, sxd, v);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = expf(v[i] - m[i]) * inv_z[i] * (1.f + v[i] - fv[i]) * g[i];
    vk::store<T, V>(out + static_cast<int64_t>(n) * D, v);
  }
}

// ------------------------------------------------------------------------------ team_gate
// Row kernels: blocks of kRowsPerBlock tokens of one batch row, one warp per token, lanes across
// channels (V each); g = sigmoid(h[b]) is staged in shared memory first.
// Calls row(n) for each of this warp's tokens in the block (warp w: the block's tokens w, w + 8, ...).
template <typename F>
__device__ __forceinline__ void for_each_row(int N, F&& row) {
  for (int r = threadIdx.x / 32; r < kRowsPerBlock; r += kWarps) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + r;
    if (n >= N) break;  // uniform across the warp
    row(n);
  }
}

// Calls f(c, v) for this lane's packs of a token row: c the first channel, v its V values as float.
template <typename T, int V, typename F>
__device__ __forceinline__ void for_each_pack(const T* row, int64_t sxd, int D, F&& f) {
  for (int c = (threadIdx.x % 32) * V; c < D; c += 32 * V) {
    float v[V];
    load_row<T, V>(row, c, sxd, v);
    f(c, v);
  }
}

// Calls f(c, v, d) for this lane's packs of two token rows (X and dY): c the first channel, v and
// d their V values as float.
template <typename T, int V, typename F>
__device__ __forceinline__ void for_each_pack_pair(const T* xrow, int64_t sxd, const T* dyrow, int64_t syd, int D,
                                                   F&& f) {
  for (int c = (threadIdx.x % 32) * V; c < D; c += 32 * V) {
    float v[V], d[V];
    load_row<T, V>(xrow, c, sxd, v);
    load_row<T, V>(dyrow, c, syd, d);
    f(c, v, d);
  }
}

template <typename T>
__device__ __forceinline__ void stage_gate(const T* h, int64_t shb, int64_t shd, int D, float* g) {
  const int64_t b = blockIdx.y;
  for (int c = threadIdx.x; c < D; c += blockDim.x) g[c] = vk::sigmoid(vk::ldf(h + b * shb + c * shd));
  __syncthreads();
}

// Per token: s0 = sum_c softmax_c(X') X'.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
gate_rows_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxd, const T* __restrict__ h, int64_t shb,
                 int64_t shd, int N, int D, float* __restrict__ s0) {
  VK_DYNAMIC_SHARED(float, g);
  stage_gate(h, shb, shd, D, g);
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y;
  for_each_row(N, [&](int64_t n) {
    const T* row = x + b * sxb + n * sxn;
    SoftmaxState st = vk::empty_state();
    for_each_pack<T, V>(row, sxd, D, [&](int c, float (&v)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) vk::push(st, g[c + i] * v[i]);
    });
    st = vk::warp_merge(st);
    if (lane == 0) vk::st(s0 + b * N + n, st.w / st.z);
  });
}

// Block-wide reductions (blockDim.x == kThreads), the same order every run.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  v = kMax ? vk::warp_max(v) : vk::warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
  for (int w = 1; w < kWarps; ++w) v = kMax ? fmaxf(v, scratch[w]) : v + scratch[w];
  return v;
}

// s[b, :] = softmax(s0[b, :]): one block per batch row.
__global__ void __launch_bounds__(kThreads) token_softmax_kernel(const float* __restrict__ s0, float* __restrict__ s,
                                                                 int N) {
  __shared__ float scratch[kWarps];
  const float* in = s0 + static_cast<int64_t>(blockIdx.x) * N;
  float* out = s + static_cast<int64_t>(blockIdx.x) * N;
  float m = -INFINITY;
  for (int n = threadIdx.x; n < N; n += kThreads) m = fmaxf(m, vk::ld(in + n));
  m = block_reduce<true>(m, scratch);
  float z = 0.f;
  for (int n = threadIdx.x; n < N; n += kThreads) z += expf(vk::ld(in + n) - m);
  const float inv_z = 1.f / block_reduce<false>(z, scratch);
  for (int n = threadIdx.x; n < N; n += kThreads) vk::st(out + n, expf(vk::ld(in + n) - m) * inv_z);
}

// Y = s[n] g[c] X.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
gate_apply_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxd, const T* __restrict__ h, int64_t shb,
                  int64_t shd, const float* __restrict__ s, int N, int D, T* __restrict__ y) {
  VK_DYNAMIC_SHARED(float, g);
  stage_gate(h, shb, shd, D, g);
  const int64_t b = blockIdx.y;
  for_each_row(N, [&](int64_t n) {
    const T* row = x + b * sxb + n * sxn;
    T* out = y + (b * N + n) * D;
    const float sn = vk::ld_warp(s + b * N + n);
    for_each_pack<T, V>(row, sxd, D, [&](int c, float (&v)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] *= sn * g[c + i];
      vk::store<T, V>(out + c, v);
    });
  });
}

// Backward rows, pass 1: per token the channel-softmax state of X' (s0, max, sum-exp: recomputed
// exactly as in the forward, no log-sum-exp round trip) and ds = sum_c dY X'.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
gate_bwd_rows_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxd, const T* __restrict__ h,
                     int64_t shb, int64_t shd, const T* __restrict__ dy, int64_t syb, int64_t syn, int64_t syd, int N,
                     int D, float* __restrict__ row_stats /* (B, 4, N): s0, max, sum-exp, ds */) {
  VK_DYNAMIC_SHARED(float, g);
  stage_gate(h, shb, shd, D, g);
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.y;
  for_each_row(N, [&](int64_t n) {
    const T* xrow = x + b * sxb + n * sxn;
    const T* dyrow = dy + b * syb + n * syn;
    SoftmaxState st = vk::empty_state();
    float ds = 0.f;
    for_each_pack_pair<T, V>(xrow, sxd, dyrow, syd, D, [&](int c, float (&v)[V], float (&d)[V]) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xp = g[c + i] * v[i];
        vk::push(st, xp);
        ds += d[i] * xp;
      }
    });
    st = vk::warp_merge(st);
    ds = vk::warp_sum(ds);
    if (lane == 0) {
      float* out = row_stats + b * 4 * N + n;
      vk::st(out, st.w / st.z);
      vk::st(out + N, st.m);
      vk::st(out + 2 * N, st.z);
      vk::st(out + 3 * N, ds);
    }
  });
}

// ds0[b, :] = s (ds - sum_n s ds): the gradient through the token softmax; one block per batch row.
__global__ void __launch_bounds__(kThreads) token_softmax_bwd_kernel(const float* __restrict__ s,
                                                                     const float* __restrict__ row_stats,
                                                                     float* __restrict__ ds0, int N) {
  __shared__ float scratch[kWarps];
  const int64_t b = blockIdx.x;
  const float* sb = s + b * N;
  const float* ds = row_stats + b * 4 * N + 3 * N;
  float dot = 0.f;
  for (int n = threadIdx.x; n < N; n += kThreads) dot += vk::ld(sb + n) * vk::ld(ds + n);
  dot = block_reduce<false>(dot, scratch);
  for (int n = threadIdx.x; n < N; n += kThreads) vk::st(ds0 + b * N + n, vk::ld(sb + n) * (vk::ld(ds + n) - dot));
}

// Backward rows, pass 2: dX' = s dY + ds0 Q (1 + X' - s0), dX = g dX'. Each lane owns the same
// channels (c = lane V + 32 V k) in every row, so it keeps their g and its running sums of dX' X
// in registers through the row loop; after it each warp writes its sums to its own shared-memory
// row once, and the block writes the sum over warps (in warp order) as its partial dg.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
gate_bwd_kernel(const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxd, const T* __restrict__ h, int64_t shb,
                int64_t shd, const T* __restrict__ dy, int64_t syb, int64_t syn, int64_t syd,
                const float* __restrict__ s, const float* __restrict__ row_stats, const float* __restrict__ ds0, int N,
                int D, T* __restrict__ dx, float* __restrict__ dg_partial /* (B, blocks, D) */) {
  VK_DYNAMIC_SHARED(float, smem);  // g (D floats), then one row of D partial sums per warp
  constexpr int kPacks = kMaxChannels / (32 * V);  // a lane's packs per row, at most
  stage_gate(h, shb, shd, D, smem);
  const int lane = threadIdx.x % 32;
  float g[kPacks][V], acc[kPacks][V];
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int c = (lane + 32 * k) * V;  // packed: D % V == 0, so a pack is wholly in or out
#pragma unroll
    for (int i = 0; i < V; ++i) {
      g[k][i] = c < D ? smem[c + i] : 0.f;
      acc[k][i] = 0.f;
    }
  }
  const int64_t b = blockIdx.y;
  for_each_row(N, [&](int64_t n) {
    const T* xrow = x + b * sxb + n * sxn;
    const T* dyrow = dy + b * syb + n * syn;
    const float* st = row_stats + b * 4 * N + n;
    const float s0 = vk::ld_warp(st), m = vk::ld_warp(st + N), inv_z = 1.f / vk::ld_warp(st + 2 * N);
    const float sn = vk::ld_warp(s + b * N + n), d0 = vk::ld_warp(ds0 + b * N + n);
    T* out = dx + (b * N + n) * D;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int c = (lane + 32 * k) * V;
      if (c < D) {
        float v[V], d[V];
        load_row<T, V>(xrow, c, sxd, v);
        load_row<T, V>(dyrow, c, syd, d);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float xp = g[k][i] * v[i];
          const float q = expf(xp - m) * inv_z;
          const float dxp = sn * d[i] + d0 * q * (1.f + xp - s0);
          acc[k][i] += dxp * v[i];
          d[i] = g[k][i] * dxp;
        }
        vk::store<T, V>(out + c, d);
      }
    }
  });
  float* part = smem + D + (threadIdx.x / 32) * D;  // this warp's row
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int c = (lane + 32 * k) * V;
    if (c < D) {
#pragma unroll
      for (int i = 0; i < V; ++i) part[c + i] = acc[k][i];
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < D; c += kThreads) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += smem[D + w * D + c];
    vk::st(dg_partial + (b * gridDim.x + blockIdx.x) * D + c, total);
  }
}

// dh[b, c] = g (1 - g) sum_blocks dg_partial[b, :, c], blocks in order: one thread per (b, c).
template <typename T>
__global__ void __launch_bounds__(kThreads)
gate_dh_kernel(const float* __restrict__ dg_partial, const T* __restrict__ h, int64_t shb, int64_t shd, int B, int D,
               int blocks, T* __restrict__ dh) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(B) * D) return;
  const int64_t b = i / D, c = i % D;
  float total = 0.f;
  for (int k = 0; k < blocks; ++k) total += vk::ld(dg_partial + (b * blocks + k) * D + c);
  const float g = vk::sigmoid(vk::ldf(h + b * shb + c * shd));
  vk::st(dh + i, vk::from_float<T>(total * g * (1.f - g)));
}

// =================================================================================== host side
void check_bnd(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be (B, N, D), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) > 0, name, " must have at least one token");
  TORCH_CHECK(x.size(2) <= kMaxChannels, name, " has ", x.size(2), " channels; at most ", kMaxChannels);
}

void check_like(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> feature_summary_fwd(const at::Tensor& x, int64_t splits) {
  check_bnd(x, "x");
  VK_DEVICE_GUARD(x);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto f = at::empty({B, D}, x.options());
  auto stats = at::empty({B, 3, D}, x.options().dtype(at::kFloat));
  if (B == 0 || D == 0) return {f, stats};
  VK_DISPATCH_FLOATS(x.scalar_type(), "feature_summary_fwd", [&] {
    with_pack<scalar_t>(packable({&x}, pack_width<scalar_t>()), [&]<int V>() {
      using Tile = ColumnTile<V>;
      const int channel_blocks = cdiv(D, Tile::C);
      int64_t n_splits = splits;
      if (n_splits <= 0) {  // enough blocks for two waves, at least 2 tokens per thread per split
        const int64_t wanted = cdiv(2 * vk::multiprocessors(), channel_blocks * B);
        n_splits = std::max<int64_t>(1, std::min<int64_t>(wanted, N / (2 * Tile::RT)));
      }
      n_splits = std::min<int64_t>(n_splits, N);
      const int rows_per_split = cdiv(N, n_splits);
      n_splits = cdiv(N, rows_per_split);
      TORCH_CHECK(n_splits < 65536 && B < 65536, "feature_summary: grid too large");
      at::Tensor partial;
      if (n_splits > 1) partial = at::empty({B, n_splits, 3, D}, stats.options());
      auto summary_fwd = &summary_fwd_kernel<scalar_t, V>;
      VK_LAUNCH(summary_fwd, dim3(channel_blocks, n_splits, B), dim3(Tile::CT, Tile::RT), 0, x.data_ptr<scalar_t>(),
                x.stride(0), x.stride(1), x.stride(2), static_cast<int>(N), static_cast<int>(D), rows_per_split,
                n_splits > 1 ? partial.data_ptr<float>() : nullptr, f.data_ptr<scalar_t>(), stats.data_ptr<float>());
      if (n_splits > 1) {
        auto summary_merge = &summary_merge_kernel<scalar_t>;
        VK_LAUNCH(summary_merge, dim3(cdiv(B * D, kThreads)), dim3(kThreads), 0, partial.data_ptr<float>(),
                  static_cast<int>(B), static_cast<int>(D), static_cast<int>(n_splits), f.data_ptr<scalar_t>(),
                  stats.data_ptr<float>());
      }
    });
  });
  return {f, stats};
}

at::Tensor feature_summary_bwd(const at::Tensor& grad_f, const at::Tensor& x, const at::Tensor& stats) {
  check_bnd(x, "x");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_like(grad_f, x, {B, D}, "grad_f");
  check_like(stats, x, {B, 3, D}, "stats");
  TORCH_CHECK(grad_f.scalar_type() == x.scalar_type(), "grad_f must have x's dtype");
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous(), "stats must be contiguous float32");
  VK_DEVICE_GUARD(x);
  auto dx = at::empty({B, N, D}, x.options());
  if (B == 0 || D == 0) return dx;
  VK_DISPATCH_FLOATS(x.scalar_type(), "feature_summary_bwd", [&] {
    with_pack<scalar_t>(packable({&x}, pack_width<scalar_t>()), [&]<int V>() {
      using Tile = ColumnTile<V>;
      const int rows_per_block = 8 * Tile::RT;
      TORCH_CHECK(cdiv(N, rows_per_block) < 65536 && B < 65536, "feature_summary: grid too large");
      auto summary_bwd = &summary_bwd_kernel<scalar_t, V>;
      VK_LAUNCH(summary_bwd, dim3(cdiv(D, Tile::C), cdiv(N, rows_per_block), B), dim3(Tile::CT, Tile::RT), 0,
                x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2), stats.data_ptr<float>(),
                grad_f.data_ptr<scalar_t>(), grad_f.stride(0), grad_f.stride(1), dx.data_ptr<scalar_t>(),
                static_cast<int>(N), static_cast<int>(D), rows_per_block);
    });
  });
  return dx;
}

void check_gate(const at::Tensor& x, const at::Tensor& h) {
  check_bnd(x, "x");
  check_like(h, x, {x.size(0), x.size(2)}, "h");
  TORCH_CHECK(h.scalar_type() == x.scalar_type(), "h must have x's dtype");
  TORCH_CHECK(x.size(0) < 65536, "team_gate: at most 65535 batch rows");
}

std::tuple<at::Tensor, at::Tensor> team_gate_fwd(const at::Tensor& x, const at::Tensor& h) {
  check_gate(x, h);
  VK_DEVICE_GUARD(x);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  auto y = at::empty({B, N, D}, x.options());
  auto fopts = x.options().dtype(at::kFloat);
  auto s0 = at::empty({B, N}, fopts), s = at::empty({B, N}, fopts);
  if (B == 0 || D == 0) return {y, s};
  const dim3 grid(cdiv(N, kRowsPerBlock), B);
  const size_t smem = D * sizeof(float);
  VK_DISPATCH_FLOATS(x.scalar_type(), "team_gate_fwd", [&] {
    with_pack<scalar_t>(packable({&x}, pack_width<scalar_t>()), [&]<int V>() {
      auto gate_rows = &gate_rows_kernel<scalar_t, V>;
      VK_LAUNCH(gate_rows, grid, dim3(kThreads), smem, x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
                h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), static_cast<int>(N), static_cast<int>(D),
                s0.data_ptr<float>());
      auto token_softmax = &token_softmax_kernel;
      VK_LAUNCH(token_softmax, dim3(B), dim3(kThreads), 0, s0.data_ptr<float>(), s.data_ptr<float>(), static_cast<int>(N));
      auto gate_apply = &gate_apply_kernel<scalar_t, V>;
      VK_LAUNCH(gate_apply, grid, dim3(kThreads), smem, x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
                h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), s.data_ptr<float>(), static_cast<int>(N),
                static_cast<int>(D), y.data_ptr<scalar_t>());
    });
  });
  return {y, s};
}

std::tuple<at::Tensor, at::Tensor> team_gate_bwd(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h,
                                                 const at::Tensor& s) {
  check_gate(x, h);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_like(grad_y, x, x.sizes(), "grad_y");
  check_like(s, x, {B, N}, "s");
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), "grad_y must have x's dtype");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "s must be contiguous float32");
  VK_DEVICE_GUARD(x);
  auto dx = at::empty({B, N, D}, x.options());
  auto dh = at::empty({B, D}, h.options());
  if (B == 0 || D == 0) return {dx, dh};
  const dim3 grid(cdiv(N, kRowsPerBlock), B);
  auto fopts = x.options().dtype(at::kFloat);
  auto row_stats = at::empty({B, 4, N}, fopts);
  auto ds0 = at::empty({B, N}, fopts);
  auto dg_partial = at::empty({B, grid.x, D}, fopts);
  VK_DISPATCH_FLOATS(x.scalar_type(), "team_gate_bwd", [&] {
    with_pack<scalar_t>(packable({&x, &grad_y}, pack_width<scalar_t>()), [&]<int V>() {
      auto gate_bwd_rows = &gate_bwd_rows_kernel<scalar_t, V>;
      VK_LAUNCH(gate_bwd_rows, grid, dim3(kThreads), D * sizeof(float), x.data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                x.stride(2), h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), grad_y.data_ptr<scalar_t>(),
                grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), static_cast<int>(N), static_cast<int>(D),
                row_stats.data_ptr<float>());
      auto token_softmax_bwd = &token_softmax_bwd_kernel;
      VK_LAUNCH(token_softmax_bwd, dim3(B), dim3(kThreads), 0, s.data_ptr<float>(), row_stats.data_ptr<float>(),
                ds0.data_ptr<float>(), static_cast<int>(N));
      auto gate_bwd = &gate_bwd_kernel<scalar_t, V>;
      VK_LAUNCH(gate_bwd, grid, dim3(kThreads), (1 + kWarps) * D * sizeof(float), x.data_ptr<scalar_t>(), x.stride(0),
                x.stride(1), x.stride(2), h.data_ptr<scalar_t>(), h.stride(0), h.stride(1),
                grad_y.data_ptr<scalar_t>(), grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), s.data_ptr<float>(),
                row_stats.data_ptr<float>(), ds0.data_ptr<float>(), static_cast<int>(N), static_cast<int>(D),
                dx.data_ptr<scalar_t>(), dg_partial.data_ptr<float>());
      auto gate_dh = &gate_dh_kernel<scalar_t>;
      VK_LAUNCH(gate_dh, dim3(cdiv(B * D, kThreads)), dim3(kThreads), 0, dg_partial.data_ptr<float>(),
                h.data_ptr<scalar_t>(), h.stride(0), h.stride(1), static_cast<int>(B), static_cast<int>(D),
                static_cast<int>(grid.x), dh.data_ptr<scalar_t>());
    });
  });
  return {dx, dh};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(VK_NAMESPACE, m) {
  m.def("feature_summary_fwd(Tensor x, int splits=0) -> (Tensor f, Tensor stats)");
  m.def("feature_summary_bwd(Tensor grad_f, Tensor x, Tensor stats) -> Tensor");
  m.def("team_gate_fwd(Tensor x, Tensor h) -> (Tensor y, Tensor s)");
  m.def("team_gate_bwd(Tensor grad_y, Tensor x, Tensor h, Tensor s) -> (Tensor dx, Tensor dh)");
}

TORCH_LIBRARY_IMPL(VK_NAMESPACE, VK_DISPATCH_KEY, m) {
  m.impl("feature_summary_fwd", &feature_summary_fwd);
  m.impl("feature_summary_bwd", &feature_summary_bwd);
  m.impl("team_gate_fwd", &team_gate_fwd);
  m.impl("team_gate_bwd", &team_gate_bwd);
}
