// Just enough of the Metal Shading Language to compile this folder's kernel
// bodies as C++, strict enough to fail where a GPU could misbehave:
//
// - fp16 (float16_t) and bfloat16 (bfloat16_t) storage with
//   round-to-nearest-even conversion, metal:: math.
// - Threadgroups run as real threads, several groups at once, each group's
//   threads started in a random order. threadgroup_barrier records its call
//   site: a round whose threads arrive from different sites, a thread that
//   leaves the kernel while others wait, or a round not complete within
//   HARNESS_TIMEOUT_S seconds is reported and exits with status 3.
// - SIMD groups of 32 lanes: simd_sum, simd_max, simd_min, simd_shuffle and
//   simd_shuffle_xor exchange values of any type between the 32 real threads
//   of a group, with the same call-site and arrival checks.
// - metal::min/max on floats follow Metal (fmin/fmax: a NaN argument gives
//   the other one), also inside simd_max/simd_min.
// - Threadgroup memory is one linker section per concurrently running group,
//   filled with a NaN pattern before every group starts, so a read of memory
//   no thread of this group wrote gives NaN (or a wild integer).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <type_traits>
#include <vector>

typedef uint32_t uint;
typedef uint16_t ushort;

struct uint3 {
  uint x, y, z;
};

// Operation counts (a build with -DHARNESS_COUNT): every lane's SIMD-group
// function calls, exp calls and fp16/bfloat16 -> float conversions (each one
// a load of a cache scale or bias, or of a query), printed at exit.
#ifdef HARNESS_COUNT
struct HarnessCounts {
  std::atomic<unsigned long long> simd{0}, exp{0}, convert{0};
  ~HarnessCounts() {
    std::fprintf(stderr, "harness: counts simd %llu exp %llu convert %llu\n", simd.load(), exp.load(), convert.load());
  }
};
inline HarnessCounts harness_counts;
#define HARNESS_COUNT_OP(what) harness_counts.what.fetch_add(1, std::memory_order_relaxed)
#else
#define HARNESS_COUNT_OP(what)
#endif

// IEEE binary16 with round-to-nearest-even conversion from float, as Metal's
// half. NaN keeps its sign and quiet bit.
struct float16_t {
  uint16_t bits;

  float16_t() = default;

  explicit float16_t(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint16_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffff;
    if (ax > 0x7f800000) {  // NaN
      bits = sign | 0x7e00 | ((ax >> 13) & 0x3ff);
    } else if (ax >= 0x477ff000) {  // >= 65520 rounds to infinity
      bits = sign | 0x7c00;
    } else if (ax < 0x38800000) {  // below 2^-14: subnormal result, units of 2^-24
      if (ax <= 0x33000000) {      // <= 2^-25 (a tie goes to even, i.e. 0)
        bits = sign;
        return;
      }
      uint32_t m = (ax & 0x7fffff) | 0x800000;
      int shift = 126 - int(ax >> 23);
      uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
      if (rem > half || (rem == half && (q & 1))) q++;
      bits = sign | q;
    } else {
      uint32_t h = (((ax >> 23) - 112) << 10) | ((ax >> 13) & 0x3ff);
      uint32_t rem = ax & 0x1fff;
      if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
      bits = sign | h;
    }
  }

  explicit operator float() const {
    HARNESS_COUNT_OP(convert);
    uint32_t sign = uint32_t(bits & 0x8000) << 16, e = (bits >> 10) & 0x1f, m = bits & 0x3ff;
    if (e == 0) {
      float f = std::ldexp(float(m), -24);
      return sign ? -f : f;
    }
    uint32_t x = sign | (e == 31 ? 0x7f800000 | (m << 13) : ((e + 112) << 23) | (m << 13));
    float f;
    std::memcpy(&f, &x, 4);
    return f;
  }
};

// bfloat16: the top 16 bits of a float32, rounded to nearest even; NaN stays
// a quiet NaN of the same sign.
struct bfloat16_t {
  uint16_t bits;

  bfloat16_t() = default;

  explicit bfloat16_t(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffff) > 0x7f800000) {
      bits = uint16_t((x >> 16) | 0x40);
      return;
    }
    x += 0x7fff + ((x >> 16) & 1);
    bits = uint16_t(x >> 16);
  }

  explicit operator float() const {
    HARNESS_COUNT_OP(convert);
    uint32_t x = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
  }
};

namespace metal {
inline float rint(float x) { return std::rint(x); }  // default mode: nearest even
inline float fabs(float x) { return std::fabs(x); }
inline float exp(float x) {
  HARNESS_COUNT_OP(exp);
  return std::exp(x);
}
// Metal's min/max: on floats fmin/fmax (a NaN argument gives the other one).
template <typename T>
inline T min(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) return std::fmin(a, b);
  else return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) return std::fmax(a, b);
  else return a < b ? b : a;
}
}  // namespace metal

[[noreturn]] inline void harness_fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "harness: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
  std::fflush(stderr);
  std::_Exit(3);
}

inline double harness_timeout_s() {
  const char* s = std::getenv("HARNESS_TIMEOUT_S");
  return s ? std::atof(s) : 60.0;
}

// n participants meet; every round must be reached by all of them, from one
// call site. A participant that finishes the kernel calls leave(): if anyone
// is waiting then (or arrives later), an arrival is missing.
class Rendezvous {
 public:
  Rendezvous(int n, const char* what) : n_(n), what_(what) {}

  void arrive(const char* file, int line) {
    std::unique_lock<std::mutex> lock(m_);
    if (left_ > 0)
      harness_fail("%s at %s:%d: %d of %d threads already left the kernel, they will never arrive",
                   what_, file, line, left_, n_);
    if (waiting_ == 0) {
      file_ = file, line_ = line;
    } else if (line != line_ || std::strcmp(file, file_) != 0) {
      harness_fail("%s round mixes call sites %s:%d and %s:%d", what_, file_, line_, file, line);
    }
    unsigned gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      gen_++;
      cv_.notify_all();
      return;
    }
    auto limit = std::chrono::duration<double>(harness_timeout_s());
    if (!cv_.wait_for(lock, limit, [&] { return gen != gen_; }))
      harness_fail("%s at %s:%d: only %d of %d threads arrived within %.0f s", what_, file, line,
                   waiting_, n_, harness_timeout_s());
  }

  void leave() {
    std::lock_guard<std::mutex> lock(m_);
    left_++;
    if (waiting_ > 0)
      harness_fail("%s at %s:%d: a thread left the kernel while %d of %d wait", what_, file_, line_,
                   waiting_, n_);
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  const int n_;
  const char* what_;
  int waiting_ = 0, left_ = 0;
  unsigned gen_ = 0;
  const char* file_ = "";
  int line_ = 0;
};

// 32 lanes exchanging values of any type up to 8 bytes; two slot sets used
// alternately, so a lane can write round k+1 while slower lanes still read
// round k (never round k-1: everyone has arrived at round k, i.e. finished
// reading k-1).
struct SimdGroup {
  Rendezvous meet{32, "SIMD-group function"};
  alignas(8) unsigned char slots[2][32][8];
};

// Per thread: its threadgroup's barrier, its SIMD group and lane.
struct LaneContext {
  Rendezvous* group = nullptr;
  SimdGroup* simd = nullptr;
  uint lane = 0;
  unsigned round = 0;
};
inline thread_local LaneContext lane_context;

namespace mem_flags {
enum mem_flags { mem_none, mem_device, mem_threadgroup };
}

inline void threadgroup_barrier_at(mem_flags::mem_flags, const char* file, int line) {
  if (!lane_context.group) harness_fail("threadgroup_barrier outside a threadgroup launch");
  lane_context.group->arrive(file, line);
}
#define threadgroup_barrier(flags) threadgroup_barrier_at(flags, __FILE__, __LINE__)

template <typename T, typename Pick>
inline T simd_exchange(T v, const char* file, int line, Pick pick) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "SIMD exchange of a small value type");
  HARNESS_COUNT_OP(simd);
  LaneContext& c = lane_context;
  if (!c.simd) harness_fail("SIMD-group function outside a threadgroup launch (%s:%d)", file, line);
  auto& slot = c.simd->slots[c.round++ & 1];
  std::memcpy(slot[c.lane], &v, sizeof(T));
  c.simd->meet.arrive(file, line);
  T all[32];
  for (int i = 0; i < 32; i++) std::memcpy(&all[i], slot[i], sizeof(T));
  return pick(all, c.lane);
}

// Tree order, as a hardware reduction would; every lane gets the same bits.
template <typename T, typename Op>
inline T simd_reduce(const T* s, Op op) {
  T t[32];
  std::copy(s, s + 32, t);
  for (int w = 16; w > 0; w /= 2)
    for (int i = 0; i < w; i++) t[i] = op(t[i], t[i + w]);
  return t[0];
}
template <typename T>
inline T simd_sum_at(T v, const char* file, int line) {
  return simd_exchange(v, file, line, [](const T* s, uint) { return simd_reduce(s, [](T a, T b) { return T(a + b); }); });
}
template <typename T>
inline T simd_max_at(T v, const char* file, int line) {
  return simd_exchange(v, file, line, [](const T* s, uint) { return simd_reduce(s, metal::max<T>); });
}
template <typename T>
inline T simd_min_at(T v, const char* file, int line) {
  return simd_exchange(v, file, line, [](const T* s, uint) { return simd_reduce(s, metal::min<T>); });
}
template <typename T>
inline T simd_shuffle_at(T v, ushort src, const char* file, int line) {
  if (src >= 32) harness_fail("simd_shuffle from lane %u at %s:%d", unsigned(src), file, line);
  return simd_exchange(v, file, line, [src](const T* s, uint) { return s[src]; });
}
template <typename T>
inline T simd_shuffle_xor_at(T v, ushort mask, const char* file, int line) {
  if (mask >= 32) harness_fail("simd_shuffle_xor mask %u at %s:%d", unsigned(mask), file, line);
  return simd_exchange(v, file, line, [mask](const T* s, uint lane) { return s[lane ^ mask]; });
}
#define simd_sum(v) simd_sum_at((v), __FILE__, __LINE__)
#define simd_max(v) simd_max_at((v), __FILE__, __LINE__)
#define simd_min(v) simd_min_at((v), __FILE__, __LINE__)
#define simd_shuffle(v, lane) simd_shuffle_at((v), (lane), __FILE__, __LINE__)
#define simd_shuffle_xor(v, mask) simd_shuffle_xor_at((v), (mask), __FILE__, __LINE__)

// A fill for threadgroup memory: NaN as float32 and as either half of it as fp16.
constexpr uint32_t POISON = 0x7fc07fc0u;

inline void poison(char* begin, char* end) {
  for (char* p = begin; p + 4 <= end; p += 4) std::memcpy(p, &POISON, 4);
}

inline uint32_t harness_seed() {
  static uint32_t seed = [] {
    const char* s = std::getenv("HARNESS_SEED");
    uint32_t v = s ? uint32_t(std::strtoul(s, nullptr, 10)) : std::random_device{}();
    std::fprintf(stderr, "harness: seed %u\n", v);
    return v;
  }();
  return seed;
}

// The values of the thread attributes MLX may declare (mx.fast.metal_kernel).
struct Attrs {
  uint3 thread_position_in_grid, threadgroup_position_in_grid, threadgroups_per_grid, threads_per_grid, grid_size;
  uint3 thread_position_in_threadgroup, threads_per_threadgroup;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup, threads_per_simdgroup, thread_execution_width;
};

inline Attrs attrs_of(uint3 grid, uint3 group, uint3 groups, uint3 g, uint t) {
  uint3 tp{t % group.x, t / group.x % group.y, t / (group.x * group.y)};
  uint3 pos{g.x * group.x + tp.x, g.y * group.y + tp.y, g.z * group.z + tp.z};
  uint threads = group.x * group.y * group.z;
  return Attrs{pos, g, groups, grid, grid, tp, group, t, t % 32, t / 32, (threads + 31) / 32, 32, 32};
}

// A launch as MLX dispatches it (dispatchThreads: `grid` threads, groups of
// min(threadgroup, grid) per dimension); fn(slot, attributes) per thread.
// A kernel that shares nothing between threads (`cooperative` false) runs
// its threads one after another, skipping those past the grid. Otherwise
// SLOTS threadgroups run at a time: group i in slot i % SLOTS (its own
// threadgroup memory, poisoned first) as real threads, started in a random
// order; such a grid must be whole threadgroups.
template <int SLOTS, typename F>
void run_launch(uint3 grid, uint3 tg, bool cooperative, std::function<std::pair<char*, char*>(int)> memory, F fn) {
  uint3 group{std::min(tg.x, grid.x), std::min(tg.y, grid.y), std::min(tg.z, grid.z)};
  uint3 groups{(grid.x + group.x - 1) / group.x, (grid.y + group.y - 1) / group.y, (grid.z + group.z - 1) / group.z};
  uint threads = group.x * group.y * group.z;
  std::vector<uint3> all;
  for (uint z = 0; z < groups.z; z++)
    for (uint y = 0; y < groups.y; y++)
      for (uint x = 0; x < groups.x; x++) all.push_back(uint3{x, y, z});
  if (!cooperative) {
    for (uint3 g : all)
      for (uint t = 0; t < threads; t++) {
        Attrs a = attrs_of(grid, group, groups, g, t);
        uint3 p = a.thread_position_in_grid;
        if (p.x < grid.x && p.y < grid.y && p.z < grid.z) fn(0, a);
      }
    return;
  }
  if (grid.x % group.x || grid.y % group.y || grid.z % group.z)
    harness_fail("grid (%u, %u, %u) is not whole threadgroups of (%u, %u, %u)", grid.x, grid.y, grid.z, group.x,
                 group.y, group.z);
  if (threads % 32) harness_fail("threadgroup size %u is not a multiple of the SIMD width 32", threads);
  std::vector<std::thread> drivers;
  for (int slot = 0; slot < SLOTS; slot++) {
    drivers.emplace_back([&, slot] {
      std::mt19937 rng(harness_seed() + slot);
      for (size_t i = slot; i < all.size(); i += SLOTS) {
        auto [begin, end] = memory(slot);
        poison(begin, end);
        Rendezvous barrier(int(threads), "threadgroup_barrier");
        std::vector<SimdGroup> simd(threads / 32);
        std::vector<uint> order(threads);
        for (uint t = 0; t < threads; t++) order[t] = t;
        std::shuffle(order.begin(), order.end(), rng);
        std::vector<std::thread> workers;
        for (uint t : order)
          workers.emplace_back([&, t] {
            lane_context = LaneContext{&barrier, &simd[t / 32], t % 32, 0};
            fn(slot, attrs_of(grid, group, groups, all[i], t));
            simd[t / 32].meet.leave();
            barrier.leave();
          });
        for (auto& w : workers) w.join();
      }
    });
  }
  for (auto& d : drivers) d.join();
}

// Metal address spaces have no C++ meaning. Threadgroup memory is a static
// local placed in the linker section TG_SECTION, which the including file
// defines per concurrently running copy of a kernel body; `used`, so the
// compiler never takes memory no thread writes for zeros.
#define device
#define constant
#define threadgroup static __attribute__((section(TG_SECTION), used))
