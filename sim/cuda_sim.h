// cuda_sim.h — runs our CUDA kernels on the CPU with exact block, barrier and warp
// semantics (docs: ../shared/docs/CUDA.md, "The simulation harness").
//
// The same kernels/*.cu sources are compiled by g++ (-std=c++20 -x c++) with this header
// force-included instead of nvcc's device compilation (build.rs, feature `cuda-sim`).
//
// Execution model:
// - Blocks run one after another (so `__shared__` as function-static, thread-local storage is
//   per block; arrays declared with EDM2_SHARED are poisoned — NaN — at every block start).
// - The threads of a block are fibers (ucontext, each with its own stack) on the launching
//   OS thread; exactly one runs at a time: a baton passes between them in a fixed schedule
//   order (forward 0..n-1 or reverse) at every `__syncthreads`, warp collective or thread
//   exit (a direct fiber-to-fiber switch). That makes a run deterministic and
//   turns a missing barrier into a reproducible wrong result (a reader runs before the
//   writer it did not wait for) under one of the two schedules; tests run both.
// - `__syncthreads` releases when every thread of the block that has not returned is
//   waiting at it (threads that returned leave the barrier, as on hardware); a state in
//   which nobody can run is reported as a deadlock and aborts.
// - Warp collectives (`__shfl_*_sync`, `__syncwarp`) exchange values through a per-warp
//   buffer between two warp barriers over the lanes of the warp that have not returned.
// - Tensor-core helpers (mma, ldmatrix) gather the lanes' registers or addresses through a
//   per-warp exchange and compute with the PTX ISA's fragment layouts; cp.async is a copy
//   held back until the issuing thread waits for it.
// - Device memory is host memory; the launch is synchronous; stream arguments are ignored.
//
// Race-hunting mode (EDM2_SIM_THREADS, feature `cuda-sim-tsan`, built with
// -fsanitize=thread): the threads of a block are OS threads that run concurrently, with
// real barriers (a mutex and condition variable per block and per warp) and shared
// memory shared between them; ThreadSanitizer then reports any two accesses to the same
// shared or global memory, one a write, that no barrier orders — also races inside a
// barrier segment, which the fiber mode cannot expose. Launches are serialized.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>
#include <ucontext.h>
#ifdef EDM2_SIM_THREADS
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#endif

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// CUDA's 16-byte vector type: a float4 load or store must be 16-byte aligned on the device,
// and here too (the aligned type lets the compiler use aligned vector moves, so a
// misaligned access faults in the tests as it would on a GPU).
struct alignas(16) float4 {
  float x, y, z, w;
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
// Per launching OS thread.
inline int &schedule() {
  static thread_local int s = 0;
  return s;
}

enum class St { Ready, AtBlockBarrier, AtWarpBarrier, Done };

// A cp.async copy issued but not yet performed (see cp_async_16).
struct AsyncCopy {
  void *dst;
  const void *src;  // nullptr: zero fill
};

struct Tls {
  int me = 0;
  uint3 tid{0, 0, 0}, bid{0, 0, 0};
  dim3 bdim, gdim;
  std::vector<AsyncCopy> cp_open;                 // issued since the last commit
  std::vector<std::vector<AsyncCopy>> cp_groups;  // committed, oldest first
};

// A fiber's execution context. On x86-64 a switch saves the callee-saved registers and
// the floating-point control words on the fiber's own stack and swaps stack pointers
// (edm2sim_swap below): glibc's swapcontext also saves and restores the signal mask, a
// system call per switch, which made it ~60% of a simulated training step. Elsewhere
// ucontext.
#if defined(__x86_64__) && !defined(EDM2_SIM_THREADS)
#define EDM2_SIM_FAST_SWITCH 1
struct Ctx {
  void *sp = nullptr;
};
// Saves the current context on its stack, stores its stack pointer in *save and resumes
// the context whose stack pointer is `load`. A weak symbol: every kernel file includes
// this header; the linker keeps one copy.
extern "C" void edm2sim_swap(void **save, void *load);
__asm__(
    ".pushsection .text\n"
    ".weak edm2sim_swap\n"
    ".type edm2sim_swap,@function\n"
    "edm2sim_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $16, %rsp\n  fnstcw (%rsp)\n  stmxcsr 8(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  fldcw (%rsp)\n  ldmxcsr 8(%rsp)\n  addq $16, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size edm2sim_swap, .-edm2sim_swap\n"
    ".popsection\n");
#else
struct Ctx {
  ucontext_t uc;
};
#endif

// A simulated CUDA thread: a fiber with its own stack on the launching OS thread. Stacks
// are reused across launches.
struct Fiber {
  Ctx ctx;
  Tls tls;
};

#ifdef EDM2_SIM_THREADS
#ifdef __SANITIZE_THREAD__
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreSyncBegin(const char *file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char *file, int line);
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
// Inside a barrier's own bookkeeping ThreadSanitizer sees neither its synchronization nor
// its memory accesses (its fields are guarded by the mutex it is told to ignore).
#define EDM2_SIM_IGNORE_SYNC_BEGIN() (AnnotateIgnoreSyncBegin(__FILE__, __LINE__), __tsan_ignore_thread_begin())
#define EDM2_SIM_IGNORE_SYNC_END() (__tsan_ignore_thread_end(), AnnotateIgnoreSyncEnd(__FILE__, __LINE__))
#define EDM2_SIM_RELEASE(p) __tsan_release(p)
#define EDM2_SIM_ACQUIRE(p) __tsan_acquire(p)
#else
#define EDM2_SIM_IGNORE_SYNC_BEGIN()
#define EDM2_SIM_IGNORE_SYNC_END()
#define EDM2_SIM_RELEASE(p)
#define EDM2_SIM_ACQUIRE(p)
#endif
// A barrier over the threads (of a block, or of a warp) that have not returned: the last
// of them to arrive releases the others; a thread that returns leaves it, which may
// complete it (as on hardware).
//
// The happens-before it shows ThreadSanitizer is exactly a barrier's: every arrival
// before every departure of the same generation, nothing else. The mutex and condition
// variable would add more — a thread woken late re-takes the mutex after others have
// run on past the barrier, or even returned, which would order their later work before
// its own and hide races — so ThreadSanitizer ignores them here, and the barrier's edges
// are annotated on one address per generation parity (a thread can be one generation
// ahead of a late waker, never two).
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  int live = 0, waiting = 0;
  // Read without the lock (relaxed: no happens-before) to pick the annotation address
  // before the ignored region; it cannot change before this thread arrives.
  std::atomic<unsigned long long> gen{0};
  char sync[2];
  void arrive_and_wait() {
    const unsigned long long g = gen.load(std::memory_order_relaxed);
    EDM2_SIM_RELEASE(&sync[g & 1]);  // (annotations inside the ignored region are ignored too)
    EDM2_SIM_IGNORE_SYNC_BEGIN();
    {
      std::unique_lock<std::mutex> lk(mu);
      if (++waiting == live) {
        waiting = 0;
        gen.fetch_add(1, std::memory_order_relaxed);
        cv.notify_all();
      } else if (!cv.wait_for(lk, std::chrono::seconds(120), [&] { return gen.load(std::memory_order_relaxed) != g; })) {
        std::fprintf(stderr, "cuda_sim: a barrier waited 120 s (deadlock?): %d of %d threads arrived\n", waiting, live);
        std::abort();
      }
    }
    EDM2_SIM_IGNORE_SYNC_END();
    EDM2_SIM_ACQUIRE(&sync[g & 1]);
  }
  // A returning thread orders nothing (no release): the check stays strict.
  void leave() {
    EDM2_SIM_IGNORE_SYNC_BEGIN();
    {
      std::lock_guard<std::mutex> lk(mu);
      live--;
      if (waiting > 0 && waiting == live) {
        waiting = 0;
        gen.fetch_add(1, std::memory_order_relaxed);
        cv.notify_all();
      }
    }
    EDM2_SIM_IGNORE_SYNC_END();
  }
};
#endif

struct BlockRun {
  unsigned long long token = 0;  // unique per block run on this OS thread (process-wide with threads)
  int n = 0;
  int turn = -1;  // thread index allowed to run; -1 when the block is finished
  std::vector<St> st;
  std::vector<int> order;  // schedule order of thread indices
  std::vector<int> pos;    // position of each thread in `order`
  std::vector<float> warp_buf_f;
  std::vector<const void *> warp_buf_p;  // per lane: the row address given to ldmatrix
  std::vector<uint32_t> mma_frag;        // per lane: a[4], b[2] of an mma in flight
  Ctx sched;  // the launching thread's context
  Fiber *fibers = nullptr;
  const std::function<void()> *body = nullptr;
#ifdef EDM2_SIM_THREADS
  std::unique_ptr<Gate> block_gate;
  std::vector<std::unique_ptr<Gate>> warp_gates;
#endif
};

inline unsigned long long &block_counter() {
  static thread_local unsigned long long c = 0;
  return c;
}

// The fiber running now (on this OS thread) and its block.
inline thread_local Tls *cur = nullptr;
inline thread_local BlockRun *cur_run = nullptr;

inline std::vector<Fiber> &fiber_pool() {
  static thread_local std::vector<Fiber> f;
  return f;
}
inline std::vector<std::unique_ptr<char[]>> &stack_pool() {
  static thread_local std::vector<std::unique_ptr<char[]>> s;
  return s;
}
constexpr size_t kStackBytes = 256 * 1024;

// The next thread (in schedule order, after `from`) that may run, or -1 when all are done.
inline void pass_baton(BlockRun &r, int from) {
  int p = r.pos[from];
  for (int k = 1; k <= r.n; k++) {
    int t = r.order[(p + k) % r.n];
    if (r.st[t] == St::Ready) {
      r.turn = t;
      return;
    }
  }
  bool all_done = true;
  for (int t = 0; t < r.n; t++) all_done &= r.st[t] == St::Done;
  if (!all_done) {
    std::fprintf(stderr, "cuda_sim: deadlock: no thread of block (%u,%u,%u) can run\n", cur->bid.x, cur->bid.y, cur->bid.z);
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

// (Also compiled in the OS-thread mode, where the fiber functions below go unused.)
// Saves the running context in `save` and resumes `load`.
inline void ctx_swap(Ctx &save, Ctx &load) {
#ifdef EDM2_SIM_FAST_SWITCH
  edm2sim_swap(&save.sp, load.sp);
#else
  swapcontext(&save.uc, &load.uc);
#endif
}

// Resumes `load`; the running context is abandoned (a fiber whose thread returned).
[[noreturn]] inline void ctx_jump(Ctx &load) {
#ifdef EDM2_SIM_FAST_SWITCH
  void *abandoned;
  edm2sim_swap(&abandoned, load.sp);
#else
  setcontext(&load.uc);
#endif
  std::abort();
}

inline void fiber_main();

#ifdef EDM2_SIM_FAST_SWITCH
extern "C" inline void edm2sim_fiber_start() {
  fiber_main();  // never returns: it jumps to the next fiber or to the launcher
}
#endif

// A fresh context on `stack` that runs fiber_main.
inline void ctx_make(Ctx &c, char *stack, size_t bytes) {
#ifdef EDM2_SIM_FAST_SWITCH
  // The frame edm2sim_swap pops: 16 bytes of control words (x87 at +0, MXCSR at +8,
  // this thread's current ones), six callee-saved registers (zero), then the address its
  // `ret` goes to. That slot is 16-byte aligned, so fiber_start is entered with the
  // stack as after a call (rsp = 8 mod 16); above it a zero return address.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  void **slot = reinterpret_cast<void **>(top - 16);
  slot[1] = nullptr;
  slot[0] = reinterpret_cast<void *>(&edm2sim_fiber_start);
  for (int k = 1; k <= 6; k++) slot[-k] = nullptr;
  char *frame = reinterpret_cast<char *>(slot - 6) - 16;
  std::memset(frame, 0, 16);
  __asm__ volatile("fnstcw (%0)\n stmxcsr 8(%0)" : : "r"(frame) : "memory");
  c.sp = frame;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;  // fiber_main never returns
  makecontext(&c.uc, fiber_main, 0);
#endif
}

// Suspends the current fiber and resumes the one holding the baton (or the launcher).
inline void switch_from(BlockRun &r, int me) {
  if (r.turn == me) return;
  Fiber &self = r.fibers[me];
  if (r.turn < 0) {
    ctx_swap(self.ctx, r.sched);
  } else {
    cur = &r.fibers[r.turn].tls;
    ctx_swap(self.ctx, r.fibers[r.turn].ctx);
  }
  cur = &self.tls;  // resumed
}

#ifdef EDM2_SIM_THREADS
inline void block_barrier() { cur_run->block_gate->arrive_and_wait(); }
inline void warp_barrier() { cur_run->warp_gates[cur->me / EDM2_WARP_SIZE]->arrive_and_wait(); }
#else
inline void block_barrier() {
  BlockRun &r = *cur_run;
  int me = cur->me;
  r.st[me] = St::AtBlockBarrier;
  maybe_release(r, St::AtBlockBarrier, 0, r.n);
  pass_baton(r, me);
  switch_from(r, me);
}

inline void warp_barrier() {
  BlockRun &r = *cur_run;
  int me = cur->me;
  int lo = me / EDM2_WARP_SIZE * EDM2_WARP_SIZE;
  int hi = lo + EDM2_WARP_SIZE < r.n ? lo + EDM2_WARP_SIZE : r.n;
  r.st[me] = St::AtWarpBarrier;
  maybe_release(r, St::AtWarpBarrier, lo, hi);
  pass_baton(r, me);
  switch_from(r, me);
}
#endif

// A warp shuffle: every live lane publishes `v`, then reads lane `src(lane)`.
template <class F>
inline float shfl_f(float v, F src) {
  BlockRun &r = *cur_run;
  int me = cur->me;
  int lane = me % EDM2_WARP_SIZE, base = me - lane;
  warp_barrier();  // nobody still reads the previous exchange
  r.warp_buf_f[me] = v;
  warp_barrier();  // every lane has written
  int s = src(lane);
  float out = (s >= 0 && s < EDM2_WARP_SIZE && base + s < r.n) ? r.warp_buf_f[base + s] : v;
  return out;
}

inline float bf16_bits_to_float(uint32_t h) {
  uint32_t u = h << 16;
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, emulated: every live lane of the
// warp publishes its fragments, then each lane computes its own four accumulators from the
// lanes that hold the values it needs, with the register layouts of the PTX ISA ("Matrix
// Fragments for mma.m16n8k16 with floating point type"; g = lane>>2, t = lane&3):
//   A (16x16, row-major): a[r] holds row g + 8·(r&1), k = 2t + 8·(r>>1) (low half), k+1 (high);
//   B (16x8, column):     b[r] holds k = 2t + 8·r (low half), k+1 (high), column g;
//   C/D (16x8 f32):       c[i] is row g + 8·(i>>1), column 2t + (i&1).
// The products are summed over k in order in fp32 (the hardware's internal order is not
// specified; tests use data whose sums are exact).
inline void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  BlockRun &r = *cur_run;
  int me = cur->me;
  int lane = me % EDM2_WARP_SIZE, base = me - lane;
  warp_barrier();  // nobody still reads a previous exchange
  for (int i = 0; i < 4; i++) r.mma_frag[6 * me + i] = a[i];
  for (int i = 0; i < 2; i++) r.mma_frag[6 * me + 4 + i] = b[i];
  warp_barrier();  // every lane has published
  auto a_at = [&](int row, int k) {
    int l = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8) + 2 * (k >= 8);
    return bf16_bits_to_float((r.mma_frag[6 * (base + l) + reg] >> (16 * (k & 1))) & 0xFFFFu);
  };
  auto b_at = [&](int k, int col) {
    int l = col * 4 + (k % 8) / 2, reg = k >= 8;
    return bf16_bits_to_float((r.mma_frag[6 * (base + l) + 4 + reg] >> (16 * (k & 1))) & 0xFFFFu);
  };
  int g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; i++) {
    int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; k++) acc += a_at(row, k) * b_at(k, col);
    out[i] = acc;
  }
  warp_barrier();  // every lane has read the exchange
  for (int i = 0; i < 4; i++) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x{NUM}[.trans].shared.b16, emulated: every live lane
// publishes the row address it was given (16-byte aligned, as the hardware requires);
// matrix i's eight rows come from lanes 8i..8i+7. Lane l = 4g + t receives in r[i] row g,
// elements 2t and 2t+1 of matrix i (low half first); with .trans, rows 2t and 2t+1 of
// column g (PTX ISA, "Warp-level matrix load instruction: ldmatrix").
template <int NUM>
inline void ldmatrix(uint32_t r[NUM], const void *row, bool trans) {
  BlockRun &br = *cur_run;
  int me = cur->me;
  int lane = me % EDM2_WARP_SIZE, base = me - lane;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    std::fprintf(stderr, "cuda_sim: ldmatrix: lane %d's row address %p is not 16-byte aligned\n", lane, row);
    std::abort();
  }
  warp_barrier();  // nobody still reads a previous exchange
  br.warp_buf_p[me] = row;
  warp_barrier();  // every lane has published
  int g = lane >> 2, t = lane & 3;
  uint32_t out[NUM];
  for (int i = 0; i < NUM; i++) {
    auto at = [&](int rr, int c) -> uint32_t { return static_cast<const uint16_t *>(br.warp_buf_p[base + 8 * i + rr])[c]; };
    uint32_t lo = trans ? at(2 * t, g) : at(g, 2 * t), hi = trans ? at(2 * t + 1, g) : at(g, 2 * t + 1);
    out[i] = lo | (hi << 16);
  }
  warp_barrier();  // every lane has read the exchange
  for (int i = 0; i < NUM; i++) r[i] = out[i];
}

// cp.async, emulated as a copy held back until the issuing thread waits for its group:
// a thread that reads the destination without waiting (or another thread without the
// __syncthreads after the wait) reads what was there before — the poison of EDM2_SHARED.
inline void cp_async_16(void *dst, const void *src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    std::fprintf(stderr, "cuda_sim: cp.async of 16 bytes needs 16-byte aligned addresses (%p <- %p)\n", dst, src);
    std::abort();
  }
  cur->cp_open.push_back(AsyncCopy{dst, src});
}
// cp.async with src-size 0 or 16: 0 reads nothing and writes zeros (when the copy is performed).
inline void cp_async_16_zfill(void *dst, const void *src, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) {
    std::fprintf(stderr, "cuda_sim: cp.async zfill with src-size %d (only 0 or 16 are used)\n", src_bytes);
    std::abort();
  }
  cp_async_16(dst, src);
  if (src_bytes == 0) cur->cp_open.back().src = nullptr;
}
inline void cp_async_commit() {
  cur->cp_groups.push_back(std::move(cur->cp_open));
  cur->cp_open.clear();
}
inline void cp_async_wait_group(size_t pending) {
  auto &gs = cur->cp_groups;
  while (gs.size() > pending) {
    for (const AsyncCopy &c : gs.front()) {
      if (c.src)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
    }
    gs.erase(gs.begin());
  }
}

// Entry of every fiber: run the kernel body, leave pending barriers, pass the baton, then
// resume the fiber holding it or, when the block is done, the launcher.
inline void fiber_main() {
  BlockRun &r = *cur_run;
  int me = cur->me;
  (*r.body)();
  r.st[me] = St::Done;
  // A thread that returned leaves pending barriers: they may now be complete.
  maybe_release(r, St::AtBlockBarrier, 0, r.n);
  int lo = me / EDM2_WARP_SIZE * EDM2_WARP_SIZE;
  maybe_release(r, St::AtWarpBarrier, lo, lo + EDM2_WARP_SIZE < r.n ? lo + EDM2_WARP_SIZE : r.n);
  pass_baton(r, me);
  if (r.turn >= 0) {
    cur = &r.fibers[r.turn].tls;
    ctx_jump(r.fibers[r.turn].ctx);
  }
  ctx_jump(r.sched);
}

// Poisons a shared array (all bits set) the first time a thread of the current block
// reaches its declaration (EDM2_SHARED).
inline void poison_shared(void *p, size_t bytes) {
#ifdef EDM2_SIM_THREADS
  // Shared arrays are shared by the block's OS threads: the first to arrive poisons.
  static std::mutex mu;
  static std::vector<std::pair<void *, unsigned long long>> seen;
  std::lock_guard<std::mutex> lk(mu);
#else
  static thread_local std::vector<std::pair<void *, unsigned long long>> seen;
#endif
  for (auto &e : seen)
    if (e.first == p) {
      if (e.second != cur_run->token) {
        std::memset(p, 0xFF, bytes);
        e.second = cur_run->token;
      }
      return;
    }
  std::memset(p, 0xFF, bytes);
  seen.emplace_back(p, cur_run->token);
}

// Runs `body` for every thread of every block of the grid.
// GCC treats getcontext/swapcontext as returning twice and warns that locals may be
// clobbered; here no context ever resumes the launcher twice (fresh fiber contexts are
// always makecontext'ed, the launcher's is resumed once per block), so the warning does
// not apply.
#ifdef EDM2_SIM_THREADS
// Persistent worker threads (creating an OS thread per CUDA thread of every block is what
// made this mode slow): worker i runs thread i of each block; the launcher starts a block
// by bumping `generation` and waits until all `active` workers are done. Starting and
// finishing use separate mutexes: with one, a worker that finished its job before another
// took the start lock would be ordered before that worker's whole job — a happens-before
// edge no GPU has, which hid the positive control's race. Never destroyed (workers wait
// forever; the process exit ends them).
struct WorkerPool {
  std::mutex start_mu, done_mu;
  std::condition_variable start, done;
  std::vector<std::thread> threads;
  unsigned long long generation = 0;             // guarded by start_mu
  int active = 0;                                // guarded by start_mu
  const std::function<void(int)> *job = nullptr;  // guarded by start_mu
  int remaining = 0;                             // guarded by done_mu

  void worker(int i) {
    unsigned long long seen = 0;
    for (;;) {
      const std::function<void(int)> *j;
      {
        std::unique_lock<std::mutex> lk(start_mu);
        start.wait(lk, [&] { return generation != seen && i < active; });
        seen = generation;
        j = job;
      }
      (*j)(i);
      std::lock_guard<std::mutex> lk(done_mu);
      if (--remaining == 0) done.notify_one();
    }
  }
  // Runs job(0..n-1) on n workers at once and waits for all of them.
  void run(int n, const std::function<void(int)> &f) {
    {
      std::lock_guard<std::mutex> lk(done_mu);
      remaining = n;
    }
    {
      std::lock_guard<std::mutex> lk(start_mu);
      while ((int)threads.size() < n) threads.emplace_back([this, i = (int)threads.size()] { worker(i); });
      job = &f;
      active = n;
      generation++;
    }
    start.notify_all();
    std::unique_lock<std::mutex> lk(done_mu);
    done.wait(lk, [&] { return remaining == 0; });
  }
};

inline cudaError_t launch(dim3 grid, dim3 block, const std::function<void()> &body) {
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidConfiguration;
  // One launch at a time in the process: shared arrays are process-wide statics here.
  static std::mutex serial;
  static unsigned long long tokens = 0;
  static WorkerPool *pool = new WorkerPool;
  std::lock_guard<std::mutex> one_at_a_time(serial);
  std::vector<Tls> tls(n);
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        BlockRun r;
        r.n = n;
        r.warp_buf_f.assign(n, 0.0f);
        r.warp_buf_p.assign(n, nullptr);
        r.mma_frag.assign(6 * (size_t)n, 0u);
        r.token = ++tokens;
        r.block_gate = std::make_unique<Gate>();
        r.block_gate->live = n;
        for (int w = 0; w * EDM2_WARP_SIZE < n; w++) {
          r.warp_gates.push_back(std::make_unique<Gate>());
          r.warp_gates.back()->live = n - w * EDM2_WARP_SIZE < EDM2_WARP_SIZE ? n - w * EDM2_WARP_SIZE : EDM2_WARP_SIZE;
        }
        for (int t = 0; t < n; t++) {
          tls[t] = Tls{};
          tls[t].me = t;
          tls[t].tid = uint3{unsigned(t) % block.x, unsigned(t) / block.x % block.y, unsigned(t) / (block.x * block.y)};
          tls[t].bid = uint3{bx, by, bz};
          tls[t].bdim = block;
          tls[t].gdim = grid;
        }
        pool->run(n, [&](int t) {
          cur = &tls[t];
          cur_run = &r;
          body();
          cur = nullptr;
          cur_run = nullptr;
          r.warp_gates[t / EDM2_WARP_SIZE]->leave();
          r.block_gate->leave();
        });
      }
  return cudaSuccess;
}
#else
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wclobbered"
inline cudaError_t launch(dim3 grid, dim3 block, const std::function<void()> &body) {
  const int n = int(block.x * block.y * block.z);
  if (n <= 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidConfiguration;
  std::vector<Fiber> &fibers = fiber_pool();
  std::vector<std::unique_ptr<char[]>> &stacks = stack_pool();
  if ((int)fibers.size() < n) fibers.resize(n);
  while ((int)stacks.size() < n) stacks.emplace_back(new char[kStackBytes]);
  Tls *outer = cur;
  BlockRun *outer_run = cur_run;
  BlockRun r;
  r.n = n;
  r.order.resize(n);
  r.pos.resize(n);
  for (int k = 0; k < n; k++) r.order[k] = schedule() ? n - 1 - k : k;
  for (int k = 0; k < n; k++) r.pos[r.order[k]] = k;
  r.fibers = fibers.data();
  r.body = &body;
  cur_run = &r;
  for (unsigned bz = 0; bz < grid.z; bz++)
    for (unsigned by = 0; by < grid.y; by++)
      for (unsigned bx = 0; bx < grid.x; bx++) {
        r.st.assign(n, St::Ready);
        r.warp_buf_f.assign(n, 0.0f);
        r.warp_buf_p.assign(n, nullptr);
        r.mma_frag.assign(6 * (size_t)n, 0u);
        r.token = ++block_counter();
        for (int t = 0; t < n; t++) {
          Fiber &f = fibers[t];
          f.tls.me = t;
          f.tls.tid = uint3{unsigned(t) % block.x, unsigned(t) / block.x % block.y, unsigned(t) / (block.x * block.y)};
          f.tls.bid = uint3{bx, by, bz};
          f.tls.bdim = block;
          f.tls.gdim = grid;
          f.tls.cp_open.clear();  // copies a thread never waited for end with it
          f.tls.cp_groups.clear();
          ctx_make(f.ctx, stacks[t].get(), kStackBytes);
        }
        r.turn = r.order[0];
        cur = &fibers[r.turn].tls;
        ctx_swap(r.sched, fibers[r.turn].ctx);
        // Back here when the last thread of the block has finished.
        if (r.turn != -1) {
          std::fprintf(stderr, "cuda_sim: block (%u,%u,%u) returned to the launcher unfinished\n", bx, by, bz);
          std::abort();
        }
      }
  cur = outer;
  cur_run = outer_run;
  return cudaSuccess;
}
#pragma GCC diagnostic pop
#endif

}  // namespace edm2sim

#define __global__
#define __device__
#define __launch_bounds__(...)
#define __host__
#define __forceinline__ inline
#define __restrict__
// Function-static, thread-local storage: per block because a launching thread runs its
// blocks one at a time, and separate for launches from different OS threads (parallel
// tests each have their own simulated device).
// (With OS threads: plain statics, shared by the block's threads; launches are serialized.)
#ifdef EDM2_SIM_THREADS
#define EDM2_SIM_SHARED_STORAGE static
#else
#define EDM2_SIM_SHARED_STORAGE static thread_local
#endif
#define __shared__ EDM2_SIM_SHARED_STORAGE
#define EDM2_SHARED(type, name, dims)                       \
  alignas(16) EDM2_SIM_SHARED_STORAGE type name dims; \
  edm2sim::poison_shared(&name, sizeof(name))
#define threadIdx (edm2sim::cur->tid)
#define blockIdx (edm2sim::cur->bid)
#define blockDim (edm2sim::cur->bdim)
#define gridDim (edm2sim::cur->gdim)
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
// IEEE round-to-nearest operations that nvcc never contracts into an FMA (the host
// compiler here runs with -ffp-contract=off, so plain operators are the same).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
// The tensor-core helper of kernels/common.cuh, emulated with the PTX fragment layouts.
inline void edm2_mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  edm2sim::mma_m16n8k16_bf16(d, a, b, c);
}
inline void edm2_ldmatrix_x4(uint32_t r[4], const void *row) { edm2sim::ldmatrix<4>(r, row, false); }
inline void edm2_ldmatrix_x4_trans(uint32_t r[4], const void *row) { edm2sim::ldmatrix<4>(r, row, true); }
inline void edm2_ldmatrix_x2(uint32_t r[2], const void *row) { edm2sim::ldmatrix<2>(r, row, false); }
inline void edm2_ldmatrix_x2_trans(uint32_t r[2], const void *row) { edm2sim::ldmatrix<2>(r, row, true); }
inline void edm2_cp_async_16(void *dst, const void *src) { edm2sim::cp_async_16(dst, src); }
inline void edm2_cp_async_16_zfill(void *dst, const void *src, int src_bytes) { edm2sim::cp_async_16_zfill(dst, src, src_bytes); }
inline void edm2_cp_async_commit() { edm2sim::cp_async_commit(); }
template <int N>
inline void edm2_cp_async_wait_group() {
  edm2sim::cp_async_wait_group(N);
}
// PTX: cp.async.wait_all = commit_group + wait_group 0.
inline void edm2_cp_async_wait_all() {
  edm2sim::cp_async_commit();
  edm2sim::cp_async_wait_group(0);
}
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
using std::isfinite;
// Atomics (real ones: in the race-hunting mode the threads run concurrently).
inline unsigned atomicAdd(unsigned *a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline float atomicAdd(float *a, float v) {
  float old, sum;
  __atomic_load(a, &old, __ATOMIC_RELAXED);
  do sum = old + v;
  while (!__atomic_compare_exchange(a, &old, &sum, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
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
    edm2_count_launch();                                                                     \
    if (edm2sim::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); }) != cudaSuccess) \
      edm2sim::last_error() = cudaErrorInvalidConfiguration;                                 \
  } while (0)
