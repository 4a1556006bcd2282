// Runs one recorded mx.fast.metal_kernel launch on the CPU, through metal_shim.h.
//
// The build directory (on the include path) holds two generated files:
//   launch_kernel.metal  the source MLX builds for the launch: header, the
//                        signature MLX writes, the body, the template
//                        instantiation (tests/metal_launch.py: mlx_source)
//   launch.h             HARNESS_COOPERATIVE (whether threads share anything),
//                        HARNESS_THREADGROUP_MEMORY (whether it declares any),
//                        HARNESS_BUFFERS(IN, OUT): each input and output as
//                        (type, name), and HARNESS_CALL(NS, A): the call of
//                        the kernel in namespace NS with the buffers and the
//                        attributes A its signature declares
// Usage: harness DIR GX GY GZ TX TY TZ COUNT...: the grid and threadgroup as
// passed to MLX, then the element count of every buffer in HARNESS_BUFFERS
// order. Reads DIR/<input>.bin, writes DIR/<output>.bin (raw little-endian
// arrays). Outputs start as 0xff bytes (NaN for floats), so an
// element no thread writes shows. Exit status 3: the shim caught a barrier or
// SIMD-group error; 2: a file could not be read or written.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "metal_shim.h"

// Two copies of the kernel, each with its own threadgroup memory section, so
// two threadgroups run at once. Build with clang: g++ ignores the section of
// a template's static locals.
#define TG_SECTION "q4_tg_slot0"
namespace slot0 {
#include "launch_kernel.metal"
}
#undef TG_SECTION
#define TG_SECTION "q4_tg_slot1"
namespace slot1 {
#include "launch_kernel.metal"
}

#undef device
#undef constant
#undef threadgroup

#include "launch.h"

// Bounds of each slot's section (weak: a kernel without threadgroup memory has none).
extern "C" char __start_q4_tg_slot0[] __attribute__((weak));
extern "C" char __stop_q4_tg_slot0[] __attribute__((weak));
extern "C" char __start_q4_tg_slot1[] __attribute__((weak));
extern "C" char __stop_q4_tg_slot1[] __attribute__((weak));

static std::string dir;

template <typename V>
std::vector<V> load(const char* name, size_t count) {
  std::vector<V> v(count);
  std::string path = dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(V), count, f) != count) {
    std::fprintf(stderr, "cannot read %zu items from %s\n", count, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

template <typename V>
std::vector<V> poisoned(size_t count) {
  std::vector<V> v(count);
  std::memset(static_cast<void*>(v.data()), 0xff, count * sizeof(V));
  return v;
}

template <typename V>
void save(const char* name, const std::vector<V>& v) {
  std::string path = dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(V), v.size(), f) != v.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(2);
  }
  std::fclose(f);
}

int main(int argc, char** argv) {
  int arg = 1;
  auto next = [&] {
    if (arg >= argc) {
      std::fprintf(stderr, "usage: harness DIR GX GY GZ TX TY TZ COUNT...\n");
      std::exit(2);
    }
    return argv[arg++];
  };
  dir = next();
  auto number = [&] { return size_t(std::strtoull(next(), nullptr, 10)); };
  uint3 grid{uint(number()), uint(number()), uint(number())};
  uint3 group{uint(number()), uint(number()), uint(number())};
#define HARNESS_LOAD(T, name) auto name = load<T>(#name, number());
#define HARNESS_ALLOC(T, name) auto name = poisoned<T>(number());
  HARNESS_BUFFERS(HARNESS_LOAD, HARNESS_ALLOC)
  auto memory = [](int slot) -> std::pair<char*, char*> {
    if (HARNESS_COOPERATIVE && HARNESS_THREADGROUP_MEMORY && !__start_q4_tg_slot0)
      harness_fail("the kernel's threadgroup memory is not in its section");
    if (slot == 0) return {__start_q4_tg_slot0, __stop_q4_tg_slot0};
    return {__start_q4_tg_slot1, __stop_q4_tg_slot1};
  };
  run_launch<2>(grid, group, HARNESS_COOPERATIVE, memory, [&](int slot, const Attrs& a) {
    if (slot == 0) {
      HARNESS_CALL(slot0, a);
    } else {
      HARNESS_CALL(slot1, a);
    }
  });
#define HARNESS_SKIP(T, name)
#define HARNESS_SAVE(T, name) save(#name, name);
  HARNESS_BUFFERS(HARNESS_SKIP, HARNESS_SAVE)
  return 0;
}
