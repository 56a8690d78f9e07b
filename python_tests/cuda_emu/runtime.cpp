// The CUDA emulator's runtime (see README.md): fibers for CUDA threads, the block scheduler,
// barriers, warp rendezvous, shared memory, cp.async, and the few CUDA runtime API calls the
// launchers make.
//
// One CUDA thread = one fiber with its own stack. The fibers of a block run on one OS thread,
// each until it blocks (a barrier, a warp operation, its end); blocks run one after another,
// or, with RunOptions::workers > 1 (the TSan build), spread over that many OS threads with no
// synchronization between them, so that ThreadSanitizer sees blocks as concurrent.
//
// In the TSan build this file is NOT instrumented (only the kernels and the harness are): its
// own bookkeeping is invisible to TSan, and it tells TSan about the CUDA-level
// synchronization explicitly (__tsan_release / __tsan_acquire at barriers and __syncwarp,
// fibers switched without implicit synchronization), so that a missing barrier between two
// threads of one block is a data race TSan reports, as is a non-atomic update shared by blocks.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif
#if defined(EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__)
#error "emu: the fiber switch is written for x86-64"
#endif

// ---- context switch (x86-64 System V): callee-saved registers on the old stack ----------------
extern "C" void emu_switch(void** save_sp, void* new_sp);
extern "C" void emu_fiber_trampoline();
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch, @function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .globl emu_fiber_trampoline
  .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");

namespace emu {

thread_local const Builtins* tls_builtins = nullptr;

namespace {

constexpr unsigned char kPoison = 0xFF;  // NaN in float, half, bfloat16 and double
constexpr size_t kCanary = 64;           // poisoned bytes after every shared region
constexpr int kMaxThreads = 1024;
#if defined(EMU_ASAN) || defined(EMU_TSAN)
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

// ---- global state (set by the host thread between launches) ------------------------------------
RunOptions g_options;
std::vector<DeviceConfig> g_devices(1);
int g_current_device = 0;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_fault;
std::vector<LaunchRecord> g_launch_log;
struct FuncAttr {
  int device;
  const void* func;
  int max_dynamic_smem;
};
std::vector<FuncAttr> g_func_attrs;
struct GlobalRange {
  const char* lo;
  const char* hi;
};
std::vector<GlobalRange> g_globals;
// Kernels seen by kernel_entered; written by fibers on any worker, so lock-free (a mutex would
// order the workers and hide cross-block races from TSan).
constexpr int kMaxKernels = 256;
std::atomic<const char*> g_kernels[kMaxKernels];
std::string g_kernels_text;
unsigned g_launch_counter = 0;

// ---- fibers -------------------------------------------------------------------------------------
struct Context {
  void* sp = nullptr;
  const void* stack_lo = nullptr;
  size_t stack_size = 0;
  void* asan_fake = nullptr;
  void* tsan_fiber = nullptr;
};

struct Copy {
  char* dst;
  const char* src;
  int cp_size, src_size;
};

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Block;
struct Worker;

struct Fiber {
  Context ctx;
  Builtins bi{};
  Worker* worker = nullptr;
  int tid = 0;  // linear thread index in the block
  State state = State::kReady;
  const char* wait_file = nullptr;
  int wait_line = 0;
  // warp operation in progress
  uint64_t payload = 0, result = 0;
  int arg = 0, width = 32;
  // cp.async: issued copies not yet waited for, committed groups first
  std::vector<Copy> copies;
  std::vector<size_t> group_end;  // copies[0, group_end[g]) are in committed groups 0..g
  std::string tsan_name;
};

struct Region {
  char* host;
  size_t bytes;
  uint32_t saddr;
  const char* name;
  const char* file;
  int line;
  bool owned;  // a heap block of its own (the dynamic region), else a slice of the static arena
};

// Static __shared__ variables are slices of one arena per worker, poisoned by the worker
// before each block (a variable is created by whichever thread reaches it first; memory that
// thread allocated itself would, for TSan, not be ordered before the other threads' accesses).
constexpr size_t kStaticArena = 48 * 1024 + 64 * (kCanary + 128);

struct WarpGroup {
  unsigned mask, arrived;
  WarpOp op;
  int kind;  // 0: shuffle/vote, 1: __syncwarp
  const char* file;
  int line;
};

struct Block {
  int nthreads = 0;
  dim3 idx;
  // __syncthreads
  int bar_arrived = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  unsigned bar_gen = 0;
  char bar_token[2];  // TSan sync objects, one per barrier generation parity
  int exited = 0;
  int first_exited = -1;
  // warps
  std::vector<std::vector<WarpGroup>> warp_groups;
  std::vector<char> warp_token;  // TSan sync object per warp (__syncwarp)
  // shared memory
  std::vector<Region> regions;
  uint32_t next_saddr = 0;
  size_t static_bytes = 0;
  char* arena = nullptr;  // kStaticArena bytes, owned by the worker
  size_t arena_used = 0;
  // scheduling
  std::vector<uint64_t> ready;  // bitset over threads
  int cursor = 0;
  bool faulted = false;
};

struct Worker {
  int index = 0;
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  Context main;
  Context* switching_from = nullptr;
  Block block;
  std::mt19937 rng;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  std::string fault;
  bool need_stack_reset = false;
  char start_token = 0, exit_token = 0;  // TSan sync objects: worker -> block, block -> worker
};

thread_local Worker* tls_worker = nullptr;
thread_local Fiber* tls_fiber = nullptr;

std::atomic<bool> g_abort_grid{false};

void tsan_release(void* addr) {
#if defined(EMU_TSAN)
  __tsan_release(addr);
#else
  (void)addr;
#endif
}
void tsan_acquire(void* addr) {
#if defined(EMU_TSAN)
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

const char* base_name(const char* path) {
  const char* s = std::strrchr(path, '/');
  return s != nullptr ? s + 1 : path;
}

std::string site(const char* file, int line) { return format("%s:%d", base_name(file), line); }

std::string thread_name(const Fiber* f) {
  const Builtins& b = f->bi;
  return format("thread (%u,%u,%u) of block (%u,%u,%u)", b.thread_idx.x, b.thread_idx.y,
                b.thread_idx.z, b.block_idx.x, b.block_idx.y, b.block_idx.z);
}

// ---- switching ------------------------------------------------------------------------------------
void switch_context(Worker& w, Context& from, Context& to, Fiber* to_fiber, bool from_exiting) {
  tls_fiber = to_fiber;
  tls_builtins = to_fiber != nullptr ? &to_fiber->bi : nullptr;
  w.switching_from = &from;
#if defined(EMU_ASAN)
  __sanitizer_start_switch_fiber(from_exiting ? nullptr : &from.asan_fake, to.stack_lo, to.stack_size);
#else
  (void)from_exiting;
#endif
#if defined(EMU_TSAN)
  __tsan_switch_to_fiber(to.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  emu_switch(&from.sp, to.sp);
#if defined(EMU_ASAN)
  const void* lo = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(from.asan_fake, &lo, &size);
  Context* prev = tls_worker->switching_from;
  if (prev != nullptr && prev->stack_lo == nullptr) {
    prev->stack_lo = lo;
    prev->stack_size = size;
  }
#endif
}

// Next ready fiber after the cursor in the run order, or nullptr; clears nothing.
Fiber* pick_next(Worker& w) {
  Block& b = w.block;
  const int n = b.nthreads;
  const int words = (n + 63) / 64;
  int count = 0;
  for (int i = 0; i < words; ++i) count += __builtin_popcountll(b.ready[i]);
  if (count == 0) return nullptr;
  int pick = -1;
  if (g_options.order == Order::kRandom) {
    int k = int(w.rng() % unsigned(count));
    for (int i = 0; i < words && pick < 0; ++i) {
      uint64_t word = b.ready[i];
      const int c = __builtin_popcountll(word);
      if (k >= c) {
        k -= c;
        continue;
      }
      while (k-- > 0) word &= word - 1;
      pick = i * 64 + __builtin_ctzll(word);
    }
  } else {
    const bool fwd = g_options.order == Order::kForward;
    for (int step = 1; step <= n; ++step) {
      const int t = fwd ? (b.cursor + step) % n : (b.cursor - step + 2 * n) % n;
      if (b.ready[t >> 6] >> (t & 63) & 1) {
        pick = t;
        break;
      }
    }
  }
  b.cursor = pick;
  return &w.fibers[pick];
}

void set_ready(Block& b, int t, bool on) {
  if (on) b.ready[t >> 6] |= uint64_t(1) << (t & 63);
  else b.ready[t >> 6] &= ~(uint64_t(1) << (t & 63));
}

// The current fiber stops running (blocked, finished, or yielding while still ready): run the
// next ready fiber, or go back to the worker's main context when there is none.
void suspend(Fiber* self, bool exiting) {
  Worker& w = *self->worker;
  Fiber* next = w.block.faulted ? nullptr : pick_next(w);
  if (next == self) return;
  if (next == nullptr) {
    switch_context(w, self->ctx, w.main, nullptr, exiting);
  } else {
    switch_context(w, self->ctx, next->ctx, next, exiting);
  }
}

// The current fiber blocks in `state` (a warp collective or a barrier) at file:line until the
// fiber that completes the rendezvous sets it ready again.
void block_in(Block& b, Fiber* f, State state, const char* file, int line) {
  f->state = state;
  f->wait_file = file;
  f->wait_line = line;
  set_ready(b, f->tid, false);
  suspend(f, false);
}

// Ends the block with a fault; `who` names the CUDA thread at fault (default: the running one).
[[noreturn]] void fault(const std::string& what, const Fiber* who = nullptr) {
  Fiber* f = tls_fiber;
  if (f == nullptr) fatal(__FILE__, __LINE__, what.c_str());
  Worker& w = *f->worker;
  if (w.fault.empty()) w.fault = what + " [" + thread_name(who != nullptr ? who : f) + "]";
  w.block.faulted = true;
  g_abort_grid.store(true, std::memory_order_relaxed);
  tsan_release(&w.exit_token);  // the worker reads the message
  // The fiber is abandoned where it stands; the block ends.
  switch_context(w, f->ctx, w.main, nullptr, false);
  fatal(__FILE__, __LINE__, "emu: an abandoned fiber was resumed");
}

Fiber* current(const char* what) {
  Fiber* f = tls_fiber;
  if (f == nullptr) fatal(__FILE__, __LINE__, (std::string(what) + " called outside a kernel").c_str());
  return f;
}

// Random schedules also switch threads at operations where the order between threads
// matters (cp.async, atomics), not only where a thread must wait.
void maybe_preempt(Fiber* f) {
  if (g_options.order != Order::kRandom) return;
  Worker& w = *f->worker;
  if (w.rng() % 4 != 0) return;
  suspend(f, false);
}

// ---- shared memory ---------------------------------------------------------------------------------
// A shared region of `bytes` followed by kCanary poisoned bytes; at `host` when given (a slice
// of the static arena, already poisoned), else a heap block of its own.
Region* add_region(Block& b, size_t bytes, size_t align, const char* name, const char* file, int line,
                   char* host) {
  if (align < 16) align = 16;
  const bool owned = host == nullptr;
  if (owned) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, bytes + kCanary) != 0) fatal(__FILE__, __LINE__, "emu: out of memory");
    host = static_cast<char*>(p);
    std::memset(host, kPoison, bytes + kCanary);
#if defined(EMU_ASAN)
    ASAN_POISON_MEMORY_REGION(host + bytes, kCanary);
#endif
  } else {
#if defined(EMU_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(host, bytes);
#endif
  }
  const uint32_t saddr = uint32_t((b.next_saddr + align - 1) / align * align);
  b.next_saddr = uint32_t(saddr + bytes);
  b.regions.push_back(Region{host, bytes, saddr, name, file, line, owned});
  return &b.regions.back();
}

void reset_static_arena(Block& b) {
  if (b.arena == nullptr) {
    void* p = nullptr;
    if (posix_memalign(&p, 128, kStaticArena) != 0) fatal(__FILE__, __LINE__, "emu: out of memory");
    b.arena = static_cast<char*>(p);
  }
#if defined(EMU_ASAN)
  ASAN_UNPOISON_MEMORY_REGION(b.arena, kStaticArena);
#endif
  std::memset(b.arena, kPoison, kStaticArena);
#if defined(EMU_ASAN)
  ASAN_POISON_MEMORY_REGION(b.arena, kStaticArena);
#endif
  b.arena_used = 0;
}

// Bytes written past the end of a region (the canary), as a fault message, or "".
std::string check_and_free_regions(Block& b) {
  std::string bad;
#if defined(EMU_ASAN)
  if (b.arena != nullptr) ASAN_UNPOISON_MEMORY_REGION(b.arena, kStaticArena);
#endif
  for (Region& r : b.regions) {
#if defined(EMU_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(r.host + r.bytes, kCanary);
#endif
    for (size_t i = 0; i < kCanary && bad.empty(); ++i) {
      if (static_cast<unsigned char>(r.host[r.bytes + i]) != kPoison) {
        bad = format("write past the end of shared memory: %s (%zu bytes) was written at byte %zu",
                     r.name, r.bytes, r.bytes + i);
      }
    }
    if (r.owned) std::free(r.host);
  }
  b.regions.clear();
  return bad;
}

const Region* find_region_host(const Block& b, const void* p) {
  const char* c = static_cast<const char*>(p);
  for (const Region& r : b.regions)
    if (c >= r.host && c < r.host + r.bytes) return &r;
  return nullptr;
}

// Host pointer of `bytes` at shared address `addr`, all inside one region.
char* resolve_shared(const Block& b, uint32_t addr, size_t bytes, const std::string& what) {
  for (const Region& r : b.regions) {
    if (addr < r.saddr || addr >= r.saddr + r.bytes) continue;
    if (addr + bytes > r.saddr + r.bytes) {
      fault(format("%s: %zu bytes at offset %u of %s, which has %zu bytes (a layout too short?)", what.c_str(),
                   bytes, addr - r.saddr, r.name, r.bytes));
    }
    return r.host + (addr - r.saddr);
  }
  fault(format("%s: shared address %u (%zu bytes) is outside every shared region of the block", what.c_str(),
               addr, bytes));
}

// ---- cp.async -----------------------------------------------------------------------------------------
bool inside_globals(const char* p, size_t n) {
  if (g_globals.empty()) return true;
  for (const GlobalRange& g : g_globals)
    if (p >= g.lo && p + n <= g.hi) return true;
  return false;
}

void do_copy(const Copy& c) {
  if (c.src_size > 0) std::memcpy(c.dst, c.src, size_t(c.src_size));
  if (c.cp_size > c.src_size) std::memset(c.dst + c.src_size, 0, size_t(c.cp_size - c.src_size));
}

void cp_async(const char* kind, uint32_t dst, const void* src, int cp_size, int src_size) {
  Fiber* f = current("cp.async");
  const bool cg = kind[0] == 'c' && kind[1] == 'g';
  if (cg ? cp_size != 16 : (cp_size != 4 && cp_size != 8 && cp_size != 16))
    fault(format("cp.async.%s with cp-size %d (allowed: %s)", kind, cp_size, cg ? "16" : "4, 8, 16"));
  if (src_size < 0 || src_size > cp_size)
    fault(format("cp.async src-size %d outside [0, %d]", src_size, cp_size));
  if (dst % uint32_t(cp_size) != 0) fault(format("cp.async shared address %u not %d-byte aligned", dst, cp_size));
  if (reinterpret_cast<uintptr_t>(src) % uintptr_t(cp_size) != 0)
    fault(format("cp.async global address %p not %d-byte aligned", src, cp_size));
  char* d = resolve_shared(f->worker->block, dst, size_t(cp_size), format("cp.async.%s", kind));
  const char* s = static_cast<const char*>(src);
  if (src_size > 0 && !inside_globals(s, size_t(src_size)))
    fault(format("cp.async reads %d bytes at %p, outside every device allocation", src_size, src));
  maybe_preempt(f);
  const Copy c{d, s, cp_size, src_size};
  if (g_options.copy_timing == CopyTiming::kAtIssue) {
    do_copy(c);
  } else {
    std::memset(d, kPoison, size_t(cp_size));  // reads before the wait see NaN
  }
  f->copies.push_back(c);
}

// ---- warps --------------------------------------------------------------------------------------------
const char* op_name(WarpOp op, int kind) {
  if (kind == 1) return "__syncwarp";
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

// Source lane of a shuffle as the CUDA programming guide defines it (-1: keep own value).
int shuffle_source(WarpOp op, int lane, int arg, int width) {
  const int seg = lane / width * width;
  switch (op) {
    case WarpOp::kShflIdx: return seg + ((arg % width) + width) % width;
    case WarpOp::kShflUp: return lane - seg - arg >= 0 ? lane - arg : -1;
    case WarpOp::kShflDown: return lane - seg + arg < width ? lane + arg : -1;
    case WarpOp::kShflXor: {
      const int src = lane ^ arg;
      return src >= seg + width || src < 0 || src > 31 ? -1 : src;  // later groups: own value
    }
    default: return -1;
  }
}

void complete_group(Worker& w, int warp, const WarpGroup& g) {
  Block& b = w.block;
  Fiber* lanes = &w.fibers[size_t(warp) * 32];
  const int nlanes = b.nthreads - warp * 32 < 32 ? b.nthreads - warp * 32 : 32;
  uint64_t vote = 0;
  bool any = false, all = true;
  for (int l = 0; l < nlanes; ++l) {
    if (!(g.mask >> l & 1)) continue;
    const bool p = (lanes[l].payload & 1) != 0;
    vote |= uint64_t(p) << l;
    any = any || p;
    all = all && p;
  }
  for (int l = 0; l < nlanes; ++l) {
    if (!(g.mask >> l & 1)) continue;
    Fiber& f = lanes[l];
    if (g.kind == 1) {
      f.result = 0;
    } else if (g.op == WarpOp::kBallot) {
      f.result = vote;
    } else if (g.op == WarpOp::kAny) {
      f.result = any;
    } else if (g.op == WarpOp::kAll) {
      f.result = all;
    } else {
      const int src = shuffle_source(g.op, l, f.arg, f.width);
      if (src >= 0 && !(g.mask >> src & 1)) {
        fault(format("%s at %s: lane %d reads lane %d, which is not in the mask 0x%08x",
                     op_name(g.op, g.kind), site(g.file, g.line).c_str(), l, src, g.mask), &f);
      }
      f.result = src < 0 ? f.payload : lanes[src].payload;
    }
    if (f.state == State::kWarp) {
      f.state = State::kReady;
      set_ready(b, f.tid, true);
    }
  }
}

// Faults unless `mask` can complete: it names this lane and only lanes that exist and run.
void check_warp_call(const Fiber* f, WarpOp op, int kind, const char* file, int line, unsigned mask, int width) {
  const Worker& w = *f->worker;
  const Block& b = w.block;
  const int lane = f->tid & 31, warp = f->tid >> 5;
  const char* name = op_name(op, kind);
  const int nlanes = b.nthreads - warp * 32 < 32 ? b.nthreads - warp * 32 : 32;
  const unsigned valid = nlanes == 32 ? 0xffffffffu : (1u << nlanes) - 1;
  if (!(mask >> lane & 1))
    fault(format("%s at %s: lane %d is not in its mask 0x%08x", name, site(file, line).c_str(), lane, mask));
  if (mask & ~valid)
    fault(format("%s at %s: mask 0x%08x names lanes that do not exist", name, site(file, line).c_str(), mask));
  if (kind == 0 && op <= WarpOp::kShflXor && (width < 1 || width > 32 || (width & (width - 1)) != 0))
    fault(format("%s at %s: width %d is not a power of two in [1, 32]", name, site(file, line).c_str(), width));
  for (int l = 0; l < nlanes; ++l) {
    if ((mask >> l & 1) && w.fibers[size_t(warp) * 32 + size_t(l)].state == State::kDone)
      fault(format("%s at %s: lane %d of the mask 0x%08x has exited", name, site(file, line).c_str(), l, mask));
  }
}

// A warp operation: waits until every lane of `mask` has called the same operation at the same
// place with the same mask, then gives each lane its result. Lanes run independently (no
// lockstep): a lane that reaches a different warp operation first is a fault.
uint64_t warp_op(WarpOp op, int kind, const char* file, int line, unsigned mask, uint64_t payload,
                 int arg, int width) {
  Fiber* f = current(op_name(op, kind));
  check_warp_call(f, op, kind, file, line, mask, width);
  Worker& w = *f->worker;
  Block& b = w.block;
  const int lane = f->tid & 31, warp = f->tid >> 5;
  const char* name = op_name(op, kind);
  std::vector<WarpGroup>& groups = b.warp_groups[size_t(warp)];
  WarpGroup* g = nullptr;
  for (WarpGroup& x : groups) {
    if (!(x.mask & mask)) continue;
    if (x.mask != mask || x.kind != kind || x.op != op || x.line != line || std::strcmp(x.file, file) != 0) {
      fault(format("warp %d: lane %d calls %s at %s with mask 0x%08x while lanes 0x%08x wait in %s at "
                   "%s with mask 0x%08x (lanes are not in lockstep: every lane of a mask must "
                   "reach the same warp operation)",
                   warp, lane, name, site(file, line).c_str(), mask, x.arrived, op_name(x.op, x.kind),
                   site(x.file, x.line).c_str(), x.mask));
    }
    g = &x;
  }
  if (g == nullptr) {
    groups.push_back(WarpGroup{mask, 0u, op, kind, file, line});
    g = &groups.back();
  }
  f->payload = payload;
  f->arg = arg;
  f->width = width;
  g->arrived |= 1u << lane;
  if (kind == 1) tsan_release(&b.warp_token[size_t(warp)]);
  if (g->arrived == g->mask) {
    const WarpGroup done = *g;
    groups.erase(groups.begin() + (g - groups.data()));
    complete_group(w, warp, done);
  } else {
    block_in(b, f, State::kWarp, file, line);
  }
  if (kind == 1) tsan_acquire(&b.warp_token[size_t(warp)]);
  return f->result;
}

// ---- fibers: entry, exit, block execution ------------------------------------------------------------
[[noreturn]] void fiber_exit(Fiber* f) {
  Worker& w = *f->worker;
  Block& b = w.block;
  if (!f->copies.empty()) {
    fault(format("thread ended with %zu cp.async copies never waited for (%zu in committed groups)",
                 f->copies.size(), f->group_end.empty() ? size_t(0) : f->group_end.back()));
  }
  if (b.bar_arrived > 0) {
    fault(format("thread ended while %d threads wait at __syncthreads at %s", b.bar_arrived,
                 site(b.bar_file, b.bar_line).c_str()));
  }
  const int warp = f->tid >> 5, lane = f->tid & 31;
  for (const WarpGroup& g : b.warp_groups[size_t(warp)]) {
    if (g.mask >> lane & 1) {
      fault(format("thread ended while lanes 0x%08x wait for it in %s at %s (mask 0x%08x)", g.arrived,
                   op_name(g.op, g.kind), site(g.file, g.line).c_str(), g.mask));
    }
  }
  f->state = State::kDone;
  set_ready(b, f->tid, false);
  if (b.exited++ == 0) b.first_exited = f->tid;
  tsan_release(&w.exit_token);
  suspend(f, true);
  fatal(__FILE__, __LINE__, "emu: a finished fiber was resumed");
}

void emu_fiber_entry(Fiber* f) {
#if defined(EMU_ASAN)
  const void* lo = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &lo, &size);
  Context* prev = f->worker->switching_from;
  if (prev != nullptr && prev->stack_lo == nullptr) {
    prev->stack_lo = lo;
    prev->stack_size = size;
  }
#endif
  Worker& w = *f->worker;
  tsan_acquire(&w.start_token);
  w.body(w.body_ctx);
  fiber_exit(f);
}

void reset_fiber_stack(Fiber& f) {
  // Initial frame for emu_switch: r15, r14, r13 (entry), r12 (argument), rbx, rbp, return address.
  char* top = static_cast<char*>(const_cast<void*>(f.ctx.stack_lo)) + f.ctx.stack_size;
  void** sp = reinterpret_cast<void**>(top - 72);
  sp[0] = nullptr;
  sp[1] = nullptr;
  sp[2] = reinterpret_cast<void*>(&emu_fiber_entry);
  sp[3] = &f;
  sp[4] = nullptr;
  sp[5] = nullptr;
  sp[6] = reinterpret_cast<void*>(&emu_fiber_trampoline);
  f.ctx.sp = sp;
}

void worker_release(Worker& w);

// Fibers and their stacks (a guard page below each) for blocks of up to `nthreads` threads.
void worker_prepare(Worker& w, int nthreads) {
  if (int(w.fibers.size()) >= nthreads) return;
  worker_release(w);
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t per = kStackBytes + page;
  w.stacks_bytes = per * size_t(nthreads);
  void* mem = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) fatal(__FILE__, __LINE__, "emu: cannot map fiber stacks");
  w.stacks = static_cast<char*>(mem);
  w.fibers.resize(size_t(nthreads));
  for (int t = 0; t < nthreads; ++t) {
    char* base = w.stacks + per * size_t(t);
    mprotect(base, page, PROT_NONE);
    Fiber& f = w.fibers[size_t(t)];
    f.worker = &w;
    f.tid = t;
    f.ctx.stack_lo = base + page;
    f.ctx.stack_size = kStackBytes;
#if defined(EMU_TSAN)
    f.ctx.tsan_fiber = __tsan_create_fiber(0);
    f.tsan_name = format("CUDA thread %d of a block on emulator worker %d", t, w.index);
    __tsan_set_fiber_name(f.ctx.tsan_fiber, f.tsan_name.c_str());
#endif
  }
}

void worker_release(Worker& w) {
#if defined(EMU_TSAN)
  for (Fiber& f : w.fibers) __tsan_destroy_fiber(f.ctx.tsan_fiber);
#endif
  if (w.stacks != nullptr) munmap(w.stacks, w.stacks_bytes);
  w.stacks = nullptr;
  w.fibers.clear();
  std::free(w.block.arena);
  w.block.arena = nullptr;
}

std::string describe_deadlock(Worker& w) {
  Block& b = w.block;
  std::string s = "deadlock: no thread can run;";
  if (b.bar_arrived > 0)
    s += format(" %d threads wait at __syncthreads at %s;", b.bar_arrived, site(b.bar_file, b.bar_line).c_str());
  for (size_t warp = 0; warp < b.warp_groups.size(); ++warp) {
    for (const WarpGroup& g : b.warp_groups[warp]) {
      s += format(" warp %zu: lanes 0x%08x wait in %s at %s for the rest of mask 0x%08x;", warp, g.arrived,
                  op_name(g.op, g.kind), site(g.file, g.line).c_str(), g.mask);
    }
  }
  if (b.exited > 0) s += format(" %d threads have ended (first: thread %d);", b.exited, b.first_exited);
  return s;
}

// Fresh state for a block: barrier and warp bookkeeping, poisoned shared memory, every fiber
// at the start of the kernel and ready.
void reset_block(Worker& w, const LaunchConfig& cfg, dim3 bidx, size_t dyn_bytes) {
  Block& b = w.block;
  const int nthreads = int(cfg.block.x * cfg.block.y * cfg.block.z);
  b.nthreads = nthreads;
  b.idx = bidx;
  b.bar_arrived = 0;
  b.bar_gen = 0;
  b.exited = 0;
  b.first_exited = -1;
  b.faulted = false;
  const size_t nwarps = size_t((nthreads + 31) / 32);
  b.warp_groups.assign(nwarps, {});
  b.warp_token.assign(nwarps, 0);
  b.regions.clear();
  b.next_saddr = 0;
  b.static_bytes = 0;
  add_region(b, dyn_bytes, 16, "dynamic shared memory", "", 0, nullptr);
  reset_static_arena(b);
  b.ready.assign(size_t((nthreads + 63) / 64), 0);
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = w.fibers[size_t(t)];
#if defined(EMU_ASAN)
    // The frames a fiber leaves live when it ends (it switches away inside fiber_exit) keep
    // their redzones poisoned; clear them before the stack is used again (all of it after a
    // fault, which abandons deeper frames).
    const char* top = static_cast<const char*>(f.ctx.stack_lo) + f.ctx.stack_size;
    const char* low = w.need_stack_reset || f.ctx.sp == nullptr ? static_cast<const char*>(f.ctx.stack_lo)
                                                                 : static_cast<const char*>(f.ctx.sp) - 512;
    ASAN_UNPOISON_MEMORY_REGION(low, size_t(top - low));
#endif
    reset_fiber_stack(f);
    f.state = State::kReady;
    f.copies.clear();
    f.group_end.clear();
    f.bi.thread_idx = uint3{unsigned(t) % cfg.block.x, unsigned(t) / cfg.block.x % cfg.block.y,
                            unsigned(t) / (cfg.block.x * cfg.block.y)};
    f.bi.block_idx = uint3{bidx.x, bidx.y, bidx.z};
    f.bi.block_dim = cfg.block;
    f.bi.grid_dim = cfg.grid;
    set_ready(b, t, true);
  }
  w.need_stack_reset = false;
  b.cursor = g_options.order == Order::kReverse ? 0 : nthreads - 1;  // first pick: 0 or n-1
}

// Runs one block to its end, a fault or a deadlock (w.fault tells which).
void run_block(Worker& w, const LaunchConfig& cfg, dim3 bidx, size_t dyn_bytes) {
  Block& b = w.block;
  reset_block(w, cfg, bidx, dyn_bytes);
  const int nthreads = b.nthreads;
  tsan_release(&w.start_token);
  Fiber* first = pick_next(w);
  switch_context(w, w.main, first->ctx, first, false);
  tls_fiber = nullptr;
  tls_builtins = nullptr;
  tsan_acquire(&w.exit_token);
  if (!b.faulted && b.exited != nthreads) {
    w.fault = describe_deadlock(w) + format(" [block (%u,%u,%u)]", bidx.x, bidx.y, bidx.z);
    b.faulted = true;
  }
  const std::string overflow = check_and_free_regions(b);
  if (w.fault.empty() && !overflow.empty())
    w.fault = overflow + format(" [block (%u,%u,%u)]", bidx.x, bidx.y, bidx.z);
  if (b.faulted) w.need_stack_reset = true;
}

// Workers live for the process: their fibers (TSan contexts included) and stacks are reused by
// every launch; a launch with several workers runs each on a new OS thread.
Worker& pooled_worker(size_t i) {
  static std::vector<Worker*> pool;
  while (pool.size() <= i) {
    pool.push_back(new Worker());
    pool.back()->index = int(pool.size() - 1);
  }
  return *pool[i];
}

void run_blocks(Worker& w, const LaunchConfig& cfg, const std::vector<dim3>& blocks, size_t first,
                size_t stride, size_t dyn_bytes) {
  tls_worker = &w;
#if defined(EMU_TSAN)
  w.main.tsan_fiber = __tsan_get_current_fiber();
#endif
  w.main.stack_lo = nullptr;  // learned at the first switch back (ASan)
  w.main.stack_size = 0;
  worker_prepare(w, int(cfg.block.x * cfg.block.y * cfg.block.z));
  for (size_t i = first; i < blocks.size(); i += stride) {
    if (g_abort_grid.load(std::memory_order_relaxed)) break;
    run_block(w, cfg, blocks[i], dyn_bytes);
    if (!w.fault.empty()) break;
  }
  tls_worker = nullptr;
}

int func_max_dynamic_smem(const void* func) {
  for (const FuncAttr& a : g_func_attrs)
    if (a.device == g_current_device && a.func == func) return a.max_dynamic_smem;
  return 48 * 1024;
}

bool set_launch_error(cudaError_t err, const std::string& why) {
  g_last_error = err;
  g_last_fault = why;
  return false;
}

bool check_config(const LaunchConfig& cfg) {
  const DeviceConfig& dev = g_devices[size_t(g_current_device)];
  const unsigned long long nthreads = 1ull * cfg.block.x * cfg.block.y * cfg.block.z;
  if (nthreads == 0 || nthreads > unsigned(kMaxThreads) || cfg.block.z > 64)
    return set_launch_error(cudaErrorInvalidConfiguration, format("block of %llu threads", nthreads));
  if (cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.grid.x > 2147483647u ||
      cfg.grid.y > 65535u || cfg.grid.z > 65535u)
    return set_launch_error(cudaErrorInvalidConfiguration,
                            format("grid (%u,%u,%u) outside the device limits", cfg.grid.x, cfg.grid.y, cfg.grid.z));
  const int limit = func_max_dynamic_smem(cfg.kernel);
  if (cfg.dynamic_smem > size_t(limit) || cfg.dynamic_smem > size_t(dev.smem_per_block_optin))
    return set_launch_error(cudaErrorInvalidValue,
                            format("%zu bytes of dynamic shared memory, the kernel is allowed %d (device "
                                   "opt-in limit %d; more than 48 KB needs cudaFuncSetAttribute)",
                                   cfg.dynamic_smem, limit, dev.smem_per_block_optin));
  return true;
}

}  // namespace

// ---- public API ------------------------------------------------------------------------------------
[[noreturn]] void fatal(const char* file, int line, const char* what) {
  std::fprintf(stderr, "emu fatal (%s:%d): %s\n", base_name(file), line, what);
  std::fflush(stderr);
  std::abort();
}

void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  g_launch_log.push_back(LaunchRecord{cfg.kernel, cfg.grid, cfg.block, cfg.dynamic_smem});
  g_last_fault.clear();
  if (!check_config(cfg)) return;
  std::vector<dim3> blocks;
  blocks.reserve(size_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z);
  for (unsigned z = 0; z < cfg.grid.z; ++z)
    for (unsigned y = 0; y < cfg.grid.y; ++y)
      for (unsigned x = 0; x < cfg.grid.x; ++x) blocks.push_back(dim3(x, y, z));
  std::mt19937 rng(g_options.seed * 7919u + g_launch_counter++);
  if (g_options.order == Order::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (g_options.order == Order::kRandom) std::shuffle(blocks.begin(), blocks.end(), rng);
  g_abort_grid.store(false, std::memory_order_relaxed);
  const size_t nworkers = std::min(blocks.size(), size_t(g_options.workers > 0 ? g_options.workers : 1));
  std::string fault;
  for (size_t i = 0; i < nworkers; ++i) {
    Worker& w = pooled_worker(i);
    w.rng.seed(rng());
    w.body = body;
    w.body_ctx = ctx;
    w.fault.clear();
  }
  if (nworkers <= 1) {
    run_blocks(pooled_worker(0), cfg, blocks, 0, 1, cfg.dynamic_smem);
  } else {
    std::vector<std::thread> threads;
    for (size_t i = 0; i < nworkers; ++i)
      threads.emplace_back([&, i] { run_blocks(pooled_worker(i), cfg, blocks, i, nworkers, cfg.dynamic_smem); });
    for (std::thread& t : threads) t.join();
  }
  for (size_t i = 0; i < nworkers && fault.empty(); ++i) fault = pooled_worker(i).fault;
  if (!fault.empty()) {
    g_last_error = cudaErrorLaunchFailure;
    g_last_fault = fault;
  }
}

void syncthreads(const char* file, int line) {
  Fiber* f = current("__syncthreads");
  Block& b = f->worker->block;
  if (b.exited > 0)
    fault(format("__syncthreads at %s after thread %d of the block ended", site(file, line).c_str(), b.first_exited));
  if (b.bar_arrived == 0) {
    b.bar_file = file;
    b.bar_line = line;
  } else if (b.bar_line != line || std::strcmp(b.bar_file, file) != 0) {
    fault(format("threads wait at different barriers: __syncthreads at %s, while %d threads wait at %s",
                 site(file, line).c_str(), b.bar_arrived, site(b.bar_file, b.bar_line).c_str()));
  }
  char* token = &b.bar_token[b.bar_gen & 1];
  tsan_release(token);
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    ++b.bar_gen;
    Worker& w = *f->worker;
    for (int t = 0; t < b.nthreads; ++t) {
      Fiber& o = w.fibers[size_t(t)];
      if (o.state == State::kBarrier) {
        o.state = State::kReady;
        set_ready(b, t, true);
      }
    }
  } else {
    block_in(b, f, State::kBarrier, file, line);
  }
  tsan_acquire(token);
}

void syncwarp(const char* file, int line, unsigned mask) {
  warp_op(WarpOp::kShflIdx, 1, file, line, mask, 0, 0, 32);
}

uint64_t warp_exchange(WarpOp op, const char* file, int line, unsigned mask, uint64_t payload, int arg,
                       int width) {
  return warp_op(op, 0, file, line, mask, payload, arg, width);
}

void* dynamic_smem(size_t align) {
  Fiber* f = current("extern __shared__");
  if (align > 128) fault(format("dynamic shared memory aligned to %zu bytes", align));
  return f->worker->block.regions[0].host;
}

void* shared_object(const char* name, const char* file, int line, size_t bytes, size_t align) {
  Fiber* f = current("__shared__");
  Block& b = f->worker->block;
  for (size_t i = 1; i < b.regions.size(); ++i) {
    const Region& r = b.regions[i];
    if (r.line == line && std::strcmp(r.name, name) == 0 && std::strcmp(r.file, file) == 0) return r.host;
  }
  const DeviceConfig& dev = g_devices[size_t(g_current_device)];
  b.static_bytes += bytes;
  if (b.static_bytes > 48 * 1024 || b.static_bytes + b.regions[0].bytes > size_t(dev.smem_per_block_optin))
    fault(format("__shared__ %s at %s: %zu bytes of static and %zu of dynamic shared memory exceed the device",
                 name, site(file, line).c_str(), b.static_bytes, b.regions[0].bytes));
  const size_t at = (b.arena_used + align - 1) / align * align;
  if (at + bytes + kCanary > kStaticArena) fault("emu: too many static __shared__ variables");
  b.arena_used = at + bytes + kCanary;
  return add_region(b, bytes, align, name, file, line, b.arena + at)->host;
}

uint32_t shared_address(const void* p, const char* file, int line) {
  Fiber* f = current("__cvta_generic_to_shared");
  const Region* r = find_region_host(f->worker->block, p);
  if (r == nullptr)
    fault(format("__cvta_generic_to_shared at %s: %p is not in this block's shared memory", site(file, line).c_str(), p));
  return r->saddr + uint32_t(static_cast<const char*>(p) - r->host);
}

void* shared_pointer(uint32_t addr, size_t bytes, const char* file, int line) {
  Fiber* f = current("__cvta_shared_to_generic");
  return resolve_shared(f->worker->block, addr, bytes, "__cvta_shared_to_generic at " + site(file, line));
}

void atomic_hook() {
  if (tls_fiber != nullptr) maybe_preempt(tls_fiber);
}

void kernel_entered(const char* name) {
  for (int i = 0; i < kMaxKernels; ++i) {
    const char* cur = g_kernels[i].load(std::memory_order_relaxed);
    if (cur != nullptr) {
      if (std::strcmp(cur, name) == 0) return;
      continue;
    }
    if (g_kernels[i].compare_exchange_strong(cur, name, std::memory_order_relaxed)) return;
    if (cur != nullptr && std::strcmp(cur, name) == 0) return;
  }
}

const char* kernels_entered() {
  g_kernels_text.clear();
  for (int i = 0; i < kMaxKernels; ++i) {
    const char* k = g_kernels[i].load(std::memory_order_relaxed);
    if (k == nullptr) break;
    g_kernels_text += k;
    g_kernels_text += '\n';
  }
  return g_kernels_text.c_str();
}

namespace ptx {
void cp_async_cg_shared_global(uint32_t dst, const void* src, int cp_size, int src_size) {
  cp_async("cg", dst, src, cp_size, src_size);
}
void cp_async_ca_shared_global(uint32_t dst, const void* src, int cp_size, int src_size) {
  cp_async("ca", dst, src, cp_size, src_size);
}
void cp_async_commit_group() {
  Fiber* f = current("cp.async.commit_group");
  f->group_end.push_back(f->copies.size());
}
void cp_async_wait_group(int n) {
  Fiber* f = current("cp.async.wait_group");
  if (n < 0) fault(format("cp.async.wait_group %d", n));
  const size_t groups = f->group_end.size();
  if (groups <= size_t(n)) return;
  const size_t done = groups - size_t(n);
  const size_t upto = f->group_end[done - 1];
  if (g_options.copy_timing == CopyTiming::kAtWait)
    for (size_t i = 0; i < upto; ++i) do_copy(f->copies[i]);
  f->copies.erase(f->copies.begin(), f->copies.begin() + std::ptrdiff_t(upto));
  f->group_end.erase(f->group_end.begin(), f->group_end.begin() + std::ptrdiff_t(done));
  for (size_t& e : f->group_end) e -= upto;
}
void cp_async_wait_all() {
  cp_async_commit_group();
  cp_async_wait_group(0);
}
}  // namespace ptx

void set_device_config(int index, const DeviceConfig& cfg) {
  if (index < 0) fatal(__FILE__, __LINE__, "emu: negative device index");
  if (size_t(index) >= g_devices.size()) g_devices.resize(size_t(index) + 1);
  g_devices[size_t(index)] = cfg;
}

void register_global(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  g_globals.push_back(GlobalRange{c, c + bytes});
}
void unregister_global(const void* p) {
  for (size_t i = 0; i < g_globals.size(); ++i) {
    if (g_globals[i].lo == p) {
      g_globals.erase(g_globals.begin() + std::ptrdiff_t(i));
      return;
    }
  }
}

const LaunchRecord* launch_log(size_t* count) {
  *count = g_launch_log.size();
  return g_launch_log.data();
}
void clear_launch_log() { g_launch_log.clear(); }

void set_run_options(const RunOptions& o) { g_options = o; }
const RunOptions& run_options() { return g_options; }
const char* last_fault() { return g_last_fault.c_str(); }

}  // namespace emu

// ---- the CUDA runtime API calls the launchers make ----------------------------------------------------
using emu::g_current_device;
using emu::g_devices;

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = g_current_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || size_t(device) >= g_devices.size()) return cudaErrorInvalidDevice;
  g_current_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || size_t(device) >= g_devices.size()) return cudaErrorInvalidDevice;
  const emu::DeviceConfig& d = g_devices[size_t(device)];
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.smem_per_block_optin; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = d.smem_per_sm; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = d.max_threads_per_sm; return cudaSuccess;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *value = d.max_blocks_per_sm; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  const emu::DeviceConfig& d = g_devices[size_t(g_current_device)];
  if (value < 0 || value > d.smem_per_block_optin) return cudaErrorInvalidValue;
  for (emu::FuncAttr& a : emu::g_func_attrs) {
    if (a.device == g_current_device && a.func == func) {
      a.max_dynamic_smem = value;
      return cudaSuccess;
    }
  }
  emu::g_func_attrs.push_back(emu::FuncAttr{g_current_device, func, value});
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks, const void* func,
                                                                   int block_size, size_t dynamic_smem,
                                                                   unsigned int flags) {
  (void)flags;
  const emu::DeviceConfig& d = g_devices[size_t(g_current_device)];
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  if (dynamic_smem > size_t(emu::func_max_dynamic_smem(func))) {
    *num_blocks = 0;
    return cudaSuccess;
  }
  int n = d.max_threads_per_sm / block_size;
  if (n > d.max_blocks_per_sm) n = d.max_blocks_per_sm;
  const size_t per_block = dynamic_smem + 1024;  // the runtime reserves 1 KB per block
  const int by_smem = int(size_t(d.smem_per_sm) / per_block);
  *num_blocks = n < by_smem ? n : by_smem;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void* func, int block_size,
                                                          size_t dynamic_smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(num_blocks, func, block_size, dynamic_smem, 0);
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return emu::g_last_error; }

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator fault)";
    default: return "emulated CUDA error";
  }
}

}  // extern "C"
