// A stand-in for MLX's Metal prelude (metal::utils()) so clang can type-check
// the source MLX builds for a launch (tests/test_metal_source.py). Only
// declarations: nothing is linked or run. What it keeps from Metal:
// - address spaces: `device`, `constant` and `threadgroup` are distinct clang
//   address spaces, so a `constant` pointer given where a `device` one is
//   expected (or the reverse) is an error, as in the Metal compiler;
// - half and bfloat16 as the built-in types of an arm64 target (_Float16,
//   __bf16), converted with static_cast like Metal's;
// - the metal:: functions and SIMD-group functions the kernels call.
// Compile with: clang++ --target=aarch64-linux-gnu -march=armv8.6-a+bf16
// -std=c++17 -fsyntax-only -Wno-unknown-attributes -include metal_clang.h.
#pragma once

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup static __attribute__((address_space(3)))

typedef __SIZE_TYPE__ size_t;
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef unsigned int uint;
typedef unsigned short ushort;
typedef _Float16 half;
typedef half float16_t;
typedef __bf16 bfloat16_t;

struct uint3 {
  uint x, y, z;
};

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")

namespace metal {
float rint(float);
float fabs(float);
float exp(float);
template <typename T>
T min(T, T);
template <typename T>
T max(T, T);
template <typename T>
T simd_sum(T);
template <typename T>
T simd_max(T);
template <typename T>
T simd_min(T);
template <typename T>
T simd_shuffle(T, ushort);
template <typename T>
T simd_shuffle_xor(T, ushort);
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags);
}  // namespace metal

using namespace metal;
