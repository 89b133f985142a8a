// cuda_sim.h — runs our CUDA kernels on the CPU with exact block, barrier and warp
// semantics (docs: ../shared/docs/CUDA.md, "The simulation harness").
//
// The same kernels/*.cu sources are compiled by g++ (-std=c++20 -x c++) with this header
// force-included instead of nvcc's device compilation (build.rs, feature `cuda-sim`).
//
// Execution model:
// - Blocks run one after another (so `__shared__` as function-static storage is
//   per block; it keeps the previous block's values — it is zeroed once).
// - The threads of a block are OS threads, but exactly one runs at a time: a baton passes
//   between them in a fixed schedule order (forward 0..n-1 or reverse) at every
//   `__syncthreads`, warp collective or thread exit. That makes a run deterministic and
//   turns a missing barrier into a reproducible wrong result (a reader runs before the
//   writer it did not wait for) under one of the two schedules; tests run both.
// - `__syncthreads` releases when every thread of the block that has not returned is
//   waiting at it (threads that returned leave the barrier, as on hardware); a state in
//   which nobody can run is reported as a deadlock and aborts.
// - Warp collectives (`__shfl_*_sync`, `__syncwarp`) exchange values through a per-warp
//   buffer between two warp barriers over the lanes of the warp that have not returned.
// - Device memory is host memory; the launch is synchronous; stream arguments are ignored.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <semaphore>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
typedef int cudaError_t;
static const cudaError_t cudaSuccess = 0;
static const cudaError_t cudaErrorInvalidConfiguration = 9;
#define EDM2_WARP_SIZE 32

namespace edm2sim {

// Schedule order of the threads of a block: 0 = forward, 1 = reverse.
inline int &schedule() {
  static int s = 0;
  return s;
}

enum class St { Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct BlockRun {
  std::mutex m;
  // One semaphore per thread: the baton wakes exactly the thread whose turn it is.
  std::vector<std::unique_ptr<std::binary_semaphore>> go;
  int n = 0;
  int turn = -1;  // thread index allowed to run
  std::vector<St> st;
  std::vector<int> order;  // schedule order of thread indices
  std::vector<int> pos;    // position of each thread in `order`
  std::vector<float> warp_buf_f;
  std::vector<unsigned> warp_buf_u;
};

struct Tls {
  BlockRun *run = nullptr;
  int me = 0;
  uint3 tid{0, 0, 0}, bid{0, 0, 0};
  dim3 bdim, gdim;
};
inline thread_local Tls tls;

// Under the lock: the next thread (in schedule order, after `from`) that may run.
inline void pass_baton(BlockRun &r, int from) {
  int p = r.pos[from];
  for (int k = 1; k <= r.n; k++) {
    int t = r.order[(p + k) % r.n];
    if (r.st[t] == St::Ready) {
      r.turn = t;
      r.go[t]->release();
      return;
    }
  }
  bool all_done = true;
  for (int t = 0; t < r.n; t++) all_done &= r.st[t] == St::Done;
  if (!all_done) {
    std::fprintf(stderr, "cuda_sim: deadlock: no thread of block (%u,%u,%u) can run\n", tls.bid.x, tls.bid.y, tls.bid.z);
    std::abort();
  }
  r.turn = -1;
}

// Releases the group `want` waits in when every live member waits there.
inline void maybe_release(BlockRun &r, St want, int lo, int hi) {
  for (int t = lo; t < hi; t++)
    if (r.st[t] != want && r.st[t] != St::Done) return;
  for (int t = lo; t < hi; t++)
    if (r.st[t] == want) r.st[t] = St::Ready;
}

// Gives up the lock and sleeps until the baton comes back to `me`.
inline void wait_turn(std::unique_lock<std::mutex> &lk, BlockRun &r, int me) {
  lk.unlock();
  r.go[me]->acquire();
  lk.lock();
}

inline void block_barrier() {
  BlockRun &r = *tls.run;
  std::unique_lock<std::mutex> lk(r.m);
  r.st[tls.me] = St::AtBlockBarrier;
  maybe_release(r, St::AtBlockBarrier, 0, r.n);
  pass_baton(r, tls.me);
  wait_turn(lk, r, tls.me);
}

inline void warp_barrier() {
  BlockRun &r = *tls.run;
  std::unique_lock<std::mutex> lk(r.m);
  int lo = tls.me / EDM2_WARP_SIZE * EDM2_WARP_SIZE;
  int hi = lo + EDM2_WARP_SIZE < r.n ? lo + EDM2_WARP_SIZE : r.n;
  r.st[tls.me] = St::AtWarpBarrier;
  maybe_release(r, St::AtWarpBarrier, lo, hi);
  pass_baton(r, tls.me);
  wait_turn(lk, r, tls.me);
}

// A warp shuffle: every live lane publishes `v`, then reads lane `src(lane)`.
template <class F>
inline float shfl_f(float v, F src) {
  BlockRun &r = *tls.run;
  int lane = tls.me % EDM2_WARP_SIZE, base = tls.me - lane;
  warp_barrier();  // nobody still reads the previous exchange
  r.warp_buf_f[tls.me] = v;
  warp_barrier();  // every lane has written
  int s = src(lane);
  float out = (s >= 0 && s < EDM2_WARP_SIZE && base + s < r.n) ? r.warp_buf_f[base + s] : v;
  return out;
}

// Runs `body` for every thread of every block of the grid.
inline cudaError_t launch(dim3 grid, dim3 block, const std::function<void()> &body) {
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidConfiguration;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        BlockRun r;
        r.n = n;
        r.st.assign(n, St::Ready);
        r.order.resize(n);
        r.pos.resize(n);
        for (int k = 0; k < n; k++) r.order[k] = schedule() ? n - 1 - k : k;
        for (int k = 0; k < n; k++) r.pos[r.order[k]] = k;
        r.warp_buf_f.assign(n, 0.0f);
        for (int t = 0; t < n; t++) r.go.emplace_back(std::make_unique<std::binary_semaphore>(0));
        r.turn = r.order[0];
        r.go[r.turn]->release();
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (int t = 0; t < n; t++) {
          threads.emplace_back([&, t] {
            tls.run = &r;
            tls.me = t;
            tls.tid = uint3{unsigned(t) % block.x, unsigned(t) / block.x % block.y, unsigned(t) / (block.x * block.y)};
            tls.bid = uint3{bx, by, bz};
            tls.bdim = block;
            tls.gdim = grid;
            r.go[t]->acquire();
            body();
            std::unique_lock<std::mutex> lk(r.m);
            r.st[t] = St::Done;
            // A thread that returned leaves pending barriers: they may now be complete.
            maybe_release(r, St::AtBlockBarrier, 0, r.n);
            int lo = t / EDM2_WARP_SIZE * EDM2_WARP_SIZE;
            maybe_release(r, St::AtWarpBarrier, lo, lo + EDM2_WARP_SIZE < n ? lo + EDM2_WARP_SIZE : n);
            pass_baton(r, t);
          });
        }
        for (auto &th : threads) th.join();
      }
  return cudaSuccess;
}

}  // namespace edm2sim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
// Function-static storage: per block because blocks run one at a time.
#define __shared__ static
#define threadIdx (edm2sim::tls.tid)
#define blockIdx (edm2sim::tls.bid)
#define blockDim (edm2sim::tls.bdim)
#define gridDim (edm2sim::tls.gdim)
#define warpSize EDM2_WARP_SIZE
#define __syncthreads() edm2sim::block_barrier()
#define __syncwarp(mask) edm2sim::warp_barrier()
inline float __shfl_down_sync(unsigned, float v, int delta) {
  return edm2sim::shfl_f(v, [delta](int lane) { return lane + delta; });
}
inline float __shfl_xor_sync(unsigned, float v, int m) {
  return edm2sim::shfl_f(v, [m](int lane) { return lane ^ m; });
}
inline float __shfl_sync(unsigned, float v, int src) {
  return edm2sim::shfl_f(v, [src](int) { return src; });
}
inline float __expf(float x) { return std::exp(x); }
using std::isfinite;
// Atomics: only one simulated thread runs at a time, so a plain read-modify-write is atomic.
inline unsigned atomicAdd(unsigned *a, unsigned v) {
  unsigned old = *a;
  *a = old + v;
  return old;
}
inline float atomicAdd(float *a, float v) {
  float old = *a;
  *a = old + v;
  return old;
}
namespace edm2sim {
inline cudaError_t &last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
}  // namespace edm2sim
// Returns and clears the last launch error, as the runtime does.
inline cudaError_t cudaGetLastError() {
  cudaError_t e = edm2sim::last_error();
  edm2sim::last_error() = cudaSuccess;
  return e;
}

// The one launch form every launcher uses (kernels/common.cuh defines the nvcc version).
#define EDM2_LAUNCH(kernel, grid, block, smem, stream, ...)                                   \
  do {                                                                                       \
    (void)(smem);                                                                            \
    (void)(stream);                                                                          \
    if (edm2sim::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); }) != cudaSuccess) \
      edm2sim::last_error() = cudaErrorInvalidConfiguration;                                 \
  } while (0)
