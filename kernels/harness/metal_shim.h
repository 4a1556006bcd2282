// Just enough of the Metal Shading Language to compile this folder's kernel
// bodies as C++: fp16 storage, address-space qualifiers, metal:: math,
// threadgroup memory and barriers. Threadgroups run one after another, each
// as real threads sharing a barrier, so barrier placement is exercised too.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

typedef uint32_t uint;

struct uint3 {
  uint x, y, z;
};

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

namespace metal {
inline float rint(float x) { return std::rint(x); }  // default mode: nearest even
inline float fabs(float x) { return std::fabs(x); }
inline float exp(float x) { return std::exp(x); }
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }
}  // namespace metal

// A reusable barrier for the threads of one threadgroup.
struct TgBarrier {
  explicit TgBarrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    unsigned gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      gen_++;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != gen_; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, waiting_ = 0;
  unsigned gen_ = 0;
};

inline thread_local TgBarrier* current_barrier = nullptr;

namespace mem_flags {
enum mem_flags { mem_none, mem_device, mem_threadgroup };
}
inline void threadgroup_barrier(mem_flags::mem_flags) { current_barrier->wait(); }

// One call per thread of a 1-D grid, in order (kernels without barriers).
template <typename F>
void run_grid(uint n, F fn) {
  for (uint i = 0; i < n; i++) fn(uint3{i, 0, 0});
}

// fn(threadgroup_position, thread_position_in_threadgroup) for every thread;
// each threadgroup's tg threads run concurrently and meet at its barriers.
template <typename F>
void run_threadgroups(uint3 groups, uint tg, F fn) {
  for (uint z = 0; z < groups.z; z++)
    for (uint y = 0; y < groups.y; y++)
      for (uint x = 0; x < groups.x; x++) {
        TgBarrier barrier{int(tg)};
        std::vector<std::thread> threads;
        for (uint t = 0; t < tg; t++)
          threads.emplace_back([&, t] {
            current_barrier = &barrier;
            fn(uint3{x, y, z}, uint3{t, 0, 0});
          });
        for (auto& th : threads) th.join();
      }
}

// Metal address spaces have no C++ meaning; threadgroup memory is a static
// local, shared by the threads of the (one running) threadgroup.
#define device
#define constant
#define threadgroup static
