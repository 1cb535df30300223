// The emulated GPU's runtime: memory, streams, events and kernel execution on the host (what it
// checks and why: include/cuda_runtime.h). Built only with PYSAFE_CUDA_EMULATOR=ON.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "backend/emu/emu.h"
#include "cuda_runtime.h"

#if !defined(__x86_64__)
#error "the CUDA emulator's fibers switch stacks with x86-64 code"
#endif

// Switches stacks: saves the callee-saved registers and the stack pointer into *save, loads `load`'s
// (what a previous switch saved there, or a frame made by `fresh_stack`) and returns into it.
extern "C" void pysafe_emu_switch(void** save, void* load);
asm(R"(
  .text
  .globl pysafe_emu_switch
  .hidden pysafe_emu_switch
  .type pysafe_emu_switch, @function
pysafe_emu_switch:
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
  .size pysafe_emu_switch, .-pysafe_emu_switch
)");

namespace emu {

namespace {

// ---- errors ----------------------------------------------------------------------------------------

thread_local cudaError_t last_error = cudaSuccess;  // what cudaGetLastError returns (launches, API calls)
std::atomic<int> sticky{cudaSuccess};                // an asynchronous failure: every later sync reports it

cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

// ---- memory ----------------------------------------------------------------------------------------

enum class Kind { Device, Pinned };
struct Alloc {
  size_t bytes;
  Kind kind;
  uint8_t* data;      // where the bytes are
  void* map;          // the data's mapping
  size_t map_bytes;
  void* view;         // device memory: the inaccessible range whose addresses cudaMalloc hands out
  size_t view_bytes;
};
std::mutex mem_mu;
std::map<uintptr_t, Alloc> allocs;  // by the first address handed out
size_t device_held = 0;
const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));
constexpr size_t kTotal = size_t(16) << 30;  // the emulated device's memory

// The allocation holding [p, p + bytes) (p may be its end when bytes is 0), or null.
const Alloc* find(const void* p, size_t bytes, uintptr_t* start = nullptr) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = allocs.upper_bound(a);
  if (it == allocs.begin()) return nullptr;
  --it;
  if (a < it->first || a + bytes > it->first + std::max<size_t>(it->second.bytes, bytes ? 1 : 0)) return nullptr;
  if (start) *start = it->first;
  return &it->second;
}

// The bytes end 256-aligned right before a PROT_NONE page, so that reading or writing past the end of
// an allocation faults, and start filled with 0xFF (NaN as float and double), like memory nobody wrote.
// Device memory is handed out at the same offset inside a range of its own that is PROT_NONE: the host
// code that dereferences a device pointer crashes, as it would with a GPU, while the emulated device
// (kernels, copies, cuBLAS/cuSOLVER) reaches the bytes through `to_data`.
void* map_alloc(size_t bytes, Kind kind) {
  const size_t body = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  const size_t span = (body + kPage - 1) / kPage * kPage + kPage;
  void* m = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return nullptr;
  uint8_t* guard = static_cast<uint8_t*>(m) + span - kPage;
  mprotect(guard, kPage, PROT_NONE);
  uint8_t* p = guard - body;
  std::memset(p, 0xFF, body);
  void* view = nullptr;
  uint8_t* handle = p;
  if (kind == Kind::Device) {
    view = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (view == MAP_FAILED) {
      munmap(m, span);
      return nullptr;
    }
    handle = static_cast<uint8_t*>(view) + (p - static_cast<uint8_t*>(m));
  }
  std::lock_guard<std::mutex> lock(mem_mu);
  allocs[reinterpret_cast<uintptr_t>(handle)] = Alloc{bytes, kind, p, m, span, view, view ? span : 0};
  if (kind == Kind::Device) device_held += bytes;
  return handle;
}

// ---- fibers: the threads of a block ------------------------------------------------------------------

constexpr size_t kFiberStack = size_t(128) << 10;

struct Fiber {
  void* sp = nullptr;
  uint8_t* stack = nullptr;  // lowest page is a guard
  size_t color = 0;          // the stack starts this many bytes below its top (see fresh_stack)
  enum State { Ready, AtBarrier, Done } state = Ready;
  Where where;
};

struct Runner;
// (initial-exec: read on every threadIdx, without a call into the dynamic loader)
thread_local Runner* runner __attribute__((tls_model("initial-exec"))) = nullptr;
std::mutex device_mu;  // one kernel at a time on the device: __shared__ arrays are plain statics

void fiber_main();

// A frame that `pysafe_emu_switch` returns into as if fiber_main had been called: six zero registers,
// fiber_main's address, and an unused return address, with the stack aligned as at a call. The frame
// starts `color` bytes below the top of the mapping: stacks whose tops sat at the same offset in their
// pages would all compete for the same cache sets, and every switch would miss.
void* fresh_stack(const Fiber& f) {
  auto* top = reinterpret_cast<void**>(f.stack + kFiberStack - f.color);
  void** sp = top - 8;
  for (int i = 0; i < 6; ++i) sp[i] = nullptr;
  sp[6] = reinterpret_cast<void*>(&fiber_main);
  sp[7] = nullptr;
  return sp;
}

// Runs kernels on the calling thread (a stream's): its blocks one after the other, the threads of a
// block as fibers that run until they reach __syncthreads or finish, in a random order each time.
struct Runner {
  std::vector<Fiber> fibers;
  void* home = nullptr;  // the scheduler's stack pointer while a fiber runs
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  std::mt19937_64 rng;

  explicit Runner(uint64_t seed) : rng(seed) {}

  void ensure(size_t n) {
    while (fibers.size() < n) {
      Fiber f;
      void* m = mmap(nullptr, kFiberStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (m == MAP_FAILED) {
        complain("cannot map a fiber stack");
        std::abort();
      }
      mprotect(m, kPage, PROT_NONE);
      f.stack = static_cast<uint8_t*>(m);
      f.color = fibers.size() * 64 * 37 % 32768;  // 64-byte steps over 32 KiB, every set of L1 and L2
      f.sp = fresh_stack(f);
      fibers.push_back(f);
    }
  }

  void enter(Fiber& f) {
    current = &f;
    pysafe_emu_switch(&home, f.sp);
  }

  // One block; false (and a message) when its threads disagree on a barrier.
  bool block(const char* name, const dim3& grid, const dim3& bdim, const uint3& b, std::string& why) {
    const size_t n = static_cast<size_t>(bdim.x) * bdim.y * bdim.z;
    ensure(n);
    std::vector<size_t> order(n);
    for (size_t t = 0; t < n; ++t) {
      Fiber& f = fibers[t];
      f.state = Fiber::Ready;
      f.where.thread = uint3{static_cast<unsigned>(t % bdim.x), static_cast<unsigned>(t / bdim.x % bdim.y),
                             static_cast<unsigned>(t / (static_cast<size_t>(bdim.x) * bdim.y))};
      f.where.block = b;
      f.where.block_dim = bdim;
      f.where.grid_dim = grid;
      order[t] = t;
    }
    std::shuffle(order.begin(), order.end(), rng);
    size_t live = n;
    for (int phase = 0; live > 0; ++phase) {
      size_t waiting = 0, finished = 0;
      for (size_t t : order) {
        Fiber& f = fibers[t];
        if (f.state != Fiber::Ready) continue;
        enter(f);
        if (f.state == Fiber::Done) ++finished;
        else ++waiting;
      }
      live -= finished;
      if (waiting > 0 && finished > 0) {  // every live thread ran: some finished, the others wait
        why = std::string(name) + ": in block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " +
              std::to_string(b.z) + "), " + std::to_string(n - live) + " of " + std::to_string(n) +
              " threads finished while the others waited at __syncthreads (barrier " + std::to_string(phase) + ")";
        for (Fiber& f : fibers)  // abandon the waiting threads' stacks
          if (f.state == Fiber::AtBarrier) f.sp = fresh_stack(f);
        return false;
      }
      for (size_t t : order)
        if (fibers[t].state == Fiber::AtBarrier) fibers[t].state = Fiber::Ready;
    }
    return true;
  }

  bool run(const char* name, const dim3& grid, const dim3& bdim, const std::function<void()>& fn, std::string& why) {
    body = &fn;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x)
          if (!block(name, grid, bdim, uint3{x, y, z}, why)) return false;
    return true;
  }
};

void fiber_main() {
  for (;;) {
    Runner* r = runner;
    (*r->body)();
    r->current->state = Fiber::Done;
    pysafe_emu_switch(&r->current->sp, r->home);
  }
}

// ---- streams and events ----------------------------------------------------------------------------

int jitter_us() {
  static const int j = [] {
    const char* s = std::getenv("PYSAFE_CUDA_EMU_JITTER_US");
    return s ? std::max(0, std::atoi(s)) : 20;
  }();
  return j;
}
std::atomic<uint64_t> stream_seed{0x5eed};

}  // namespace

struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> queue;
  uint64_t queued = 0, completed = 0;
  std::mt19937_64 rng;
  Runner kernels;

  Stream() : rng(stream_seed.fetch_add(1)), kernels(rng()) {
    std::thread([this] { work(); }).detach();  // streams live until the process exits
  }
  uint64_t push(std::function<void()> op) {
    std::lock_guard<std::mutex> lock(mu);
    queue.push_back(std::move(op));
    cv.notify_all();
    return ++queued;
  }
  uint64_t tail() {
    std::lock_guard<std::mutex> lock(mu);
    return queued;
  }
  void wait(uint64_t ticket) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return completed >= ticket; });
  }
  void work() {
    runner = &kernels;
    for (;;) {
      std::function<void()> op;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return !queue.empty(); });
        op = std::move(queue.front());
        queue.pop_front();
      }
      if (const int j = jitter_us()) std::this_thread::sleep_for(std::chrono::microseconds(rng() % (j + 1)));
      op();
      std::lock_guard<std::mutex> lock(mu);
      ++completed;
      cv.notify_all();
    }
  }
};

struct Event {
  std::mutex mu;
  Stream* stream = nullptr;  // where it was last recorded (null: never; complete)
  uint64_t ticket = 0;

  // The last recording: complete when `stream` has completed `ticket` operations.
  std::pair<Stream*, uint64_t> mark() {
    std::lock_guard<std::mutex> lock(mu);
    return {stream, ticket};
  }
};

namespace {

std::mutex streams_mu;
std::vector<Stream*> streams;
Stream* legacy = nullptr;

Stream* resolve(cudaStream_t s) {
  if (s) return s;
  std::lock_guard<std::mutex> lock(streams_mu);
  if (!legacy) {
    legacy = new Stream;
    streams.push_back(legacy);
  }
  return legacy;
}

cudaError_t sync_error() { return static_cast<cudaError_t>(sticky.load()); }

// An asynchronous failure (as a kernel fault): one line on stderr, and every later synchronisation
// returns the error.
void report(const std::string& what, cudaError_t e = cudaErrorLaunchFailure) {
  complain(what);
  int expected = cudaSuccess;
  sticky.compare_exchange_strong(expected, e);
}

// Checks a copy's range against the kind of memory its direction names.
bool device_range(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(mem_mu);
  const Alloc* a = find(p, bytes);
  return a && a->kind == Kind::Device;
}
bool host_range(const void* p, size_t bytes, bool* pinned) {
  std::lock_guard<std::mutex> lock(mem_mu);
  const Alloc* a = find(p, bytes);
  if (!a) {
    *pinned = false;
    return p != nullptr || bytes == 0;
  }
  *pinned = a->kind == Kind::Pinned;
  return a->kind == Kind::Pinned;
}

thread_local int current_device = 0;

}  // namespace

const Where& where() { return runner->current->where; }

void syncthreads() {
  Runner* r = runner;
  r->current->state = Fiber::AtBarrier;
  pysafe_emu_switch(&r->current->sp, r->home);
}

void enqueue_kernel(const char* name, const Config& cfg, std::function<void()> body, int bad_pointer) {
  const dim3 g = cfg.grid, b = cfg.block;
  const unsigned long long threads = static_cast<unsigned long long>(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 2147483647u || g.y > 65535 || g.z > 65535 || threads == 0 ||
      threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64 || cfg.shared_bytes > 0) {
    std::fprintf(stderr, "pysafe CUDA emulator: %s launched with grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of "
                 "dynamic shared memory: invalid configuration\n", name, g.x, g.y, g.z, b.x, b.y, b.z, cfg.shared_bytes);
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  Stream* s = resolve(cfg.stream);
  s->push([s, name, g, b, body = std::move(body), bad_pointer] {
    if (sticky.load() != cudaSuccess) return;  // the context is broken: nothing more runs
    if (bad_pointer >= 0) {
      report(std::string(name) + ": argument " + std::to_string(bad_pointer) +
             " is a pointer outside device memory (an illegal address on a GPU)", cudaErrorIllegalAddress);
      return;
    }
    std::string why;
    std::lock_guard<std::mutex> lock(device_mu);
    if (!s->kernels.run(name, g, b, body, why)) report(why);
  });
}

void enqueue(cudaStream_t s, std::function<void()> op) { resolve(s)->push(std::move(op)); }

bool is_device(const void* p, size_t bytes) { return device_range(p, bytes); }

void* to_data(const void* p) {
  std::lock_guard<std::mutex> lock(mem_mu);
  uintptr_t start = 0;
  const Alloc* a = find(p, 0, &start);
  if (!a || a->kind != Kind::Device) return const_cast<void*>(p);
  return a->data + (reinterpret_cast<uintptr_t>(p) - start);
}

void complain(const std::string& what) { std::fprintf(stderr, "pysafe CUDA emulator: %s\n", what.c_str()); }

}  // namespace emu

using emu::fail;

// ---- the runtime API ---------------------------------------------------------------------------------

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* d) {
  *d = emu::current_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d != 0) return fail(cudaErrorInvalidDevice);
  emu::current_device = d;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return fail(cudaErrorInvalidDevice);
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "pysafe CUDA emulator");
  p->totalGlobalMem = emu::kTotal;
  p->major = 9;
  p->minor = 0;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error != cudaSuccess ? emu::last_error : emu::sync_error();
  emu::last_error = cudaSuccess;
  return e;
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(emu::mem_mu);
    if (emu::device_held + bytes > emu::kTotal) return fail(cudaErrorMemoryAllocation);
  }
  *p = emu::map_alloc(bytes, emu::Kind::Device);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = emu::map_alloc(bytes, emu::Kind::Pinned);
  return *p ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  cudaDeviceSynchronize();  // cudaFree waits for the device, as the real one does
  std::lock_guard<std::mutex> lock(emu::mem_mu);
  auto it = emu::allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == emu::allocs.end() || it->second.kind != emu::Kind::Device) {
    emu::complain("cudaFree of an address cudaMalloc did not return");
    return fail(cudaErrorInvalidValue);
  }
  emu::device_held -= it->second.bytes;
  munmap(it->second.map, it->second.map_bytes);
  munmap(it->second.view, it->second.view_bytes);
  emu::allocs.erase(it);
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  std::lock_guard<std::mutex> lock(emu::mem_mu);
  *total_bytes = emu::kTotal;
  *free_bytes = emu::kTotal - emu::device_held;
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  std::lock_guard<std::mutex> lock(emu::mem_mu);
  const emu::Alloc* al = emu::find(p, 1);
  a->type = !al ? cudaMemoryTypeUnregistered : al->kind == emu::Kind::Device ? cudaMemoryTypeDevice : cudaMemoryTypeHost;
  a->device = al ? 0 : -2;
  a->devicePointer = al && al->kind == emu::Kind::Device ? const_cast<void*>(p) : nullptr;
  a->hostPointer = al && al->kind == emu::Kind::Pinned ? const_cast<void*>(p) : nullptr;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
  if (bytes == 0) return cudaSuccess;
  if (!emu::device_range(p, bytes)) {
    emu::complain("cudaMemsetAsync of " + std::to_string(bytes) + " bytes outside device memory");
    return fail(cudaErrorInvalidValue);
  }
  emu::enqueue(s, [p = emu::to_data(p), value, bytes] { std::memset(p, value, bytes); });
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s) {
  if (bytes == 0) return cudaSuccess;
  bool pinned = false;
  switch (kind) {
    case cudaMemcpyHostToDevice: {
      if (!emu::device_range(dst, bytes) || !emu::host_range(src, bytes, &pinned)) break;
      void* to = emu::to_data(dst);
      if (pinned) {  // DMA from page-locked memory: read when the stream gets there
        emu::enqueue(s, [to, src, bytes] { std::memcpy(to, src, bytes); });
      } else {  // pageable: staged at the call
        auto copy = std::make_shared<std::vector<uint8_t>>(static_cast<const uint8_t*>(src),
                                                           static_cast<const uint8_t*>(src) + bytes);
        emu::enqueue(s, [to, copy] { std::memcpy(to, copy->data(), copy->size()); });
      }
      return cudaSuccess;
    }
    case cudaMemcpyDeviceToHost: {
      if (!emu::device_range(src, bytes) || !emu::host_range(dst, bytes, &pinned)) break;
      emu::Stream* st = emu::resolve(s);
      const uint64_t ticket = st->push([dst, from = emu::to_data(src), bytes] { std::memcpy(dst, from, bytes); });
      if (!pinned) st->wait(ticket);  // to pageable memory: returns when the copy is done
      return cudaSuccess;
    }
    case cudaMemcpyDeviceToDevice: {
      if (!emu::device_range(src, bytes) || !emu::device_range(dst, bytes)) break;
      emu::enqueue(s, [to = emu::to_data(dst), from = emu::to_data(src), bytes] { std::memmove(to, from, bytes); });
      return cudaSuccess;
    }
    default: break;
  }
  emu::complain("cudaMemcpyAsync of " + std::to_string(bytes) + " bytes (kind " + std::to_string(kind) +
                "): a range is not memory of the kind the direction names");
  return fail(cudaErrorInvalidValue);
}

cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind kind, cudaStream_t s) {
  if (width == 0 || height == 0) return cudaSuccess;
  if (kind != cudaMemcpyDeviceToDevice || width > dpitch || width > spitch ||
      !emu::device_range(dst, dpitch * (height - 1) + width) || !emu::device_range(src, spitch * (height - 1) + width)) {
    emu::complain("cudaMemcpy2DAsync: pitches or ranges outside device memory (only device to device is emulated)");
    return fail(cudaErrorInvalidValue);
  }
  emu::enqueue(s, [=, to = static_cast<uint8_t*>(emu::to_data(dst)), from = static_cast<const uint8_t*>(emu::to_data(src))] {
    for (size_t r = 0; r < height; ++r) std::memmove(to + r * dpitch, from + r * spitch, width);
  });
  return cudaSuccess;
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = new emu::Stream;
  std::lock_guard<std::mutex> lock(emu::streams_mu);
  emu::streams.push_back(*s);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  emu::Stream* st = emu::resolve(s);
  st->wait(st->tail());
  return emu::sync_error();
}
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  const auto [on, ticket] = e->mark();
  if (on) emu::enqueue(s, [on = on, ticket = ticket] { on->wait(ticket); });
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = new emu::Event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  emu::Stream* st = emu::resolve(s);
  std::lock_guard<std::mutex> lock(e->mu);
  e->stream = st;
  e->ticket = st->tail();
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
  if (!e) return fail(cudaErrorInvalidResourceHandle);
  const auto [on, ticket] = e->mark();
  if (on) on->wait(ticket);
  return emu::sync_error();
}
cudaError_t cudaDeviceSynchronize() {
  std::vector<emu::Stream*> all;
  {
    std::lock_guard<std::mutex> lock(emu::streams_mu);
    all = emu::streams;
  }
  for (emu::Stream* s : all) s->wait(s->tail());
  return emu::sync_error();
}
