// A CPU stand-in for the CUDA runtime and device built-ins that csrc/attention/cuda uses, so that the kernels' own
// source (not a re-implementation) runs on a machine without a GPU: tests/cuda_sim.py compiles the .cu files with
// the host compiler against this directory's headers (after rewriting the launches, the extern shared array and
// the cp.async PTX, which no header can supply) and links tests/csrc/attention_cuda_sim.cpp.
//
// Each block runs as THREADS fibers (ucontext) on one OS thread. A fiber runs until it blocks (__syncthreads, a
// warp-wide operation, the end); the scheduler then picks a random runnable fiber, so that a missing barrier shows
// up as a read of data not yet written. What it checks, failing the run with a message:
//   - shared memory: poisoned (all bits set: NaN in float, half and bfloat16) at the start of every block, with an
//     inaccessible page right after the dynamic bytes the launch asked for (a read or write past them faults);
//   - cp.async: the destination is poisoned when the copy is issued and written only at cp.async.wait_all, so a
//     tile read before its wait (or overwritten while another warp still reads it) is NaN; both addresses
//     16-byte aligned; no copy left unwaited at a thread's end;
//   - barriers: a __syncthreads that not every live thread of the block reaches, a warp operation that not all
//     32 lanes reach (or reach in different numbers), are deadlocks, reported;
//   - WMMA: 32-byte aligned fragment pointers and leading dimensions of 16 bytes' elements, the same in every lane,
//     computed once per warp (lane 0) after all lanes arrive;
//   - launches: dynamic shared memory within the device's opt-in limit and within what cudaFuncSetAttribute
//     allowed the kernel (48 KiB without it); a failed call leaves its error for cudaGetLastError, as CUDA does.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <tuple>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------------------------- CUDA spellings
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
// The fast intrinsics as the hardware computes them: through base 2 (ex2.approx, lg2.approx), the argument
// rounded to float on the way; the approximation of 2**x and log2 itself (within 2 ulp) is taken exact.
inline float __expf(float x) { return std::exp2(x * 1.44269504088896341f); }
inline float __logf(float x) { return std::log2(x) * 0.693147180559945309f; }

namespace sim {

inline float float_of_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint32_t bits_of_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

[[noreturn]] inline void fail(const char* what) {
  std::printf("SIM FAIL: %s\n", what);
  std::fflush(stdout);
  std::_Exit(1);
}

// Memory with no access right before and after [data, data + bytes): a stray access faults.
struct Guarded {
  unsigned char* region = nullptr;
  size_t region_bytes = 0;
  unsigned char* data = nullptr;

  // `bytes` end at a page boundary, the start rounded down to `align`.
  Guarded(size_t bytes, size_t align) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t inner = (bytes + align + page - 1) / page * page;
    region_bytes = inner + 2 * page;
    void* p = mmap(nullptr, region_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("mmap");
    region = static_cast<unsigned char*>(p);
    mprotect(region, page, PROT_NONE);
    mprotect(region + page + inner, page, PROT_NONE);
    const uintptr_t end = reinterpret_cast<uintptr_t>(region + page + inner);
    data = reinterpret_cast<unsigned char*>((end - bytes) / align * align);
  }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  ~Guarded() { munmap(region, region_bytes); }
};

inline void on_segfault(int) {
  const char message[] = "SIM FAIL: memory access outside a tensor or past the block's dynamic shared memory\n";
  if (write(1, message, sizeof(message) - 1) < 0) {
  }
  _exit(1);
}

// ---------------------------------------------------------------------------------------------- device state
struct Device {
  int optin_shared_memory = 232448;  // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int fail_set_attribute = 0;        // > 0: that many cudaFuncSetAttribute calls fail (error paths)
  int last_error = 0;                // cudaError_t of the last failed call, until cudaGetLastError
  std::map<const void*, int> max_dynamic_shared;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
  uint64_t seed = 1;
  int64_t blocks_run = 0;
};
inline Device device;

// ---------------------------------------------------------------------------------------------- fibers
// A fiber starts by setcontext on its own stack; afterwards the scheduler and the fibers switch with
// _setjmp/_longjmp, which save no signal mask (swapcontext's system call per switch dominated the run time). The
// build leaves _FORTIFY_SOURCE off: its longjmp check refuses a jump to another stack.
enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Pending {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  ucontext_t context;
  jmp_buf resume;
  bool started = false;
  State state = State::Runnable;
  std::vector<char> stack;
  std::vector<Pending> copies;  // cp.async in flight
  int64_t warp_ops = 0;         // warp-wide operations reached, compared at each release
};

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr int MAX_THREADS = 1024;

struct Block {
  std::vector<Fiber> fibers;
  jmp_buf scheduler;
  int current = -1;
  unsigned index = 0;
  std::function<void()> body;
  unsigned char* shared = nullptr;
  float exchange[2][MAX_THREADS];  // shuffles, double-buffered by the warp's release parity
  struct Operand {
    const void* pointer;
    unsigned ld;
  } operands[2][MAX_THREADS];  // WMMA loads and stores, likewise
  int parity[MAX_THREADS / 32] = {};
  int at_warp[MAX_THREADS / 32] = {};
  int at_barrier = 0, done = 0;
  std::vector<int> runnable;
};
inline Block* block = nullptr;

inline Fiber& self() { return block->fibers[block->current]; }

inline void yield(State state) {
  Block& b = *block;
  Fiber& f = self();
  f.state = state;
  if (state == State::AtWarp && ++b.at_warp[b.current / 32] == 32) {  // the last lane releases its warp
    const int w = b.current / 32;
    for (int t = w * 32; t < w * 32 + 32; ++t) {
      if (b.fibers[t].warp_ops != f.warp_ops) fail("lanes of a warp at different warp operations");
      b.fibers[t].state = State::Runnable;
      b.runnable.push_back(t);
    }
    b.at_warp[w] = 0;
    b.parity[w] ^= 1;
  }
  if (state == State::AtBarrier) ++b.at_barrier;
  if (state == State::Done) ++b.done;
  if (!_setjmp(f.resume)) _longjmp(b.scheduler, 1);
}

inline void fiber_entry() {
  block->body();
  if (!self().copies.empty()) fail("a thread ended with cp.async copies it never waited for");
  yield(State::Done);
}

// Runs body as one block of `threads` threads with `shared_bytes` of poisoned dynamic shared memory.
inline void run_block(unsigned index, int threads, size_t shared_bytes, std::mt19937_64& rng,
                      const std::function<void()>& body) {
  static Block storage;
  static Guarded* shared = nullptr;
  static size_t shared_size = 0;
  if (shared == nullptr || shared_size != shared_bytes) {
    delete shared;
    shared = new Guarded(shared_bytes ? shared_bytes : 1, 128);
    shared_size = shared_bytes;
  }
  std::memset(shared->data, 0xff, shared_bytes);
  Block& b = storage;
  b.fibers.resize(threads);
  b.index = index;
  b.body = body;
  b.shared = shared->data;
  for (int w = 0; w < MAX_THREADS / 32; ++w) b.parity[w] = b.at_warp[w] = 0;
  b.at_barrier = b.done = 0;
  b.runnable.clear();
  block = &b;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack.resize(STACK_BYTES);
    f.started = false;
    f.state = State::Runnable;
    f.copies.clear();
    f.warp_ops = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
    b.runnable.push_back(t);
  }
  for (;;) {
    if (!b.runnable.empty()) {
      const size_t pick = rng() % b.runnable.size();
      b.current = b.runnable[pick];
      b.runnable[pick] = b.runnable.back();
      b.runnable.pop_back();
      Fiber& f = b.fibers[b.current];
      if (!_setjmp(b.scheduler)) {
        if (!f.started) {
          f.started = true;
          setcontext(&f.context);
        }
        _longjmp(f.resume, 1);
      }
      continue;
    }
    if (b.done == threads) break;
    if (b.done + b.at_barrier != threads) {
      char message[160];
      std::snprintf(message, sizeof(message), "deadlock in block %u: threads wait at a warp operation that not all "
                    "32 lanes reach, or at a __syncthreads that others skip", index);
      fail(message);
    }
    for (int t = 0; t < threads; ++t)
      if (b.fibers[t].state == State::AtBarrier) {
        b.fibers[t].state = State::Runnable;
        b.runnable.push_back(t);
      }
    b.at_barrier = 0;
  }
  block = nullptr;
  ++device.blocks_run;
}

// ---------------------------------------------------------------------------------------------- built-ins
inline dim3 thread_idx() { return {static_cast<unsigned>(block->current), 0, 0}; }
inline dim3 block_idx() { return {block->index, 0, 0}; }
inline unsigned char* shared_memory() { return block->shared; }

inline void warp_wait() {
  ++self().warp_ops;
  yield(State::AtWarp);
}

inline float shuffle_xor(float value, int offset) {
  const int t = block->current, w = t / 32, parity = block->parity[w];
  block->exchange[parity][t] = value;
  warp_wait();
  return block->exchange[parity][w * 32 + ((t % 32) ^ offset)];
}

// cp.async.cg.shared.global [shared], [src], 16: `shared` an address in the block's shared window
// (__cvta_generic_to_shared).
inline void cp_async_shared(size_t shared, const void* src) {
  void* dst = block->shared + shared;
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    fail("cp.async with an address not 16-byte aligned");
  Pending p;
  p.dst = dst;
  std::memcpy(p.bytes, src, 16);
  std::memset(dst, 0xff, 16);  // undefined until waited for
  self().copies.push_back(p);
}

inline void cp_async_wait_all() {
  for (const Pending& p : self().copies) std::memcpy(p.dst, p.bytes, 16);
  self().copies.clear();
}

// WMMA loads and stores: true in lane 0 once all 32 lanes have arrived, with the same pointer and leading
// dimension (the API requires them warp-uniform; lane 0 then does the warp's work).
inline bool warp_leader(const void* pointer, unsigned ld) {
  const int t = block->current, w = t / 32, parity = block->parity[w];
  block->operands[parity][t] = {pointer, ld};
  warp_wait();
  if (t % 32) return false;
  for (int lane = w * 32; lane < w * 32 + 32; ++lane)
    if (block->operands[parity][lane].pointer != pointer || block->operands[parity][lane].ld != ld)
      fail("a WMMA load or store whose pointer or leading dimension differs between the lanes of a warp");
  return true;
}

// ---------------------------------------------------------------------------------------------- launches
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  unsigned grid;
  int threads;
  size_t shared_bytes;

  template <typename... Args>
  void operator()(Args&&... args) const {
    const auto allowed = device.max_dynamic_shared.find(reinterpret_cast<const void*>(kernel));
    const size_t limit = allowed == device.max_dynamic_shared.end() ? 48 * 1024 : size_t(allowed->second);
    if (grid == 0 || threads <= 0 || threads > MAX_THREADS || shared_bytes > limit ||
        shared_bytes > size_t(device.optin_shared_memory)) {
      device.last_error = 1;  // cudaErrorInvalidValue: the kernel does not run
      return;
    }
    std::mt19937_64 rng(device.seed++);
    const std::tuple<std::decay_t<Args>...> copies(args...);  // kernel parameters are copies
    for (unsigned index = 0; index < grid; ++index)
      run_block(index, threads, shared_bytes, rng, [&] { std::apply(kernel, copies); });
  }
};

template <typename... Params, typename Stream>
Launch<Params...> launch(void (*kernel)(Params...), unsigned grid, int threads, size_t shared_bytes, Stream) {
  return {kernel, grid, threads, shared_bytes};
}

}  // namespace sim

#define threadIdx (::sim::thread_idx())
#define blockIdx (::sim::block_idx())

inline void __syncthreads() { ::sim::yield(::sim::State::AtBarrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::sim::warp_wait(); }
inline float __shfl_xor_sync(unsigned mask, float value, int offset) {
  if (mask != 0xffffffffu) ::sim::fail("__shfl_xor_sync with a partial mask");
  return ::sim::shuffle_xor(value, offset);
}
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const unsigned char*>(p) - ::sim::shared_memory());
}
