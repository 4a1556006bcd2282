// Runs the Metal kernel bodies of kernels/ on the CPU, through metal_shim.h.
// Arrays travel as raw little-endian files in a directory:
//   harness quantize DIR NG            x -> packed scales biases
//   harness quantize_keys DIR ROWS     x (ROWS x DEC_D) -> packed scales biases (q4c keys)
//   harness quantize_values DIR NG     x -> packed scales (q4c values)
//   harness decode   DIR B NKV N S     queries k_* v_* lengths first scale
//                                      -> partial maxes sums (pass 1), out (pass 2)
//   harness combine  DIR ROWS S        partial maxes sums -> out (pass 2 alone)
//   harness round    DIR N             x (float32) -> f16 bf16 (the shim's conversions)
// The decode kernel's template arguments come from -D at compile time:
// DEC_T (float, float16_t or bfloat16_t), DEC_D, DEC_DV, DEC_R, DEC_RT,
// DEC_NSG, DEC_KC, DEC_VS (0 0: q4; 128 32: q4c). Pass 1 runs two threadgroups at a time (see metal_shim.h);
// HARNESS_SEED fixes the thread start order. Exit status 3: the shim caught a
// barrier or SIMD-group error.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "metal_shim.h"

#include "../q4_common.h"

void quantize_kernel(const float16_t* x, uint32_t* packed, float16_t* scales,
                     float16_t* biases, uint3 thread_position_in_grid) {
#include "../quantize.metal"
}

// Defaults for what a command line leaves out.
#ifndef DEC_T
#define DEC_T float
#endif
#ifndef DEC_D
#define DEC_D 64
#endif
#ifndef DEC_DV
#define DEC_DV 64
#endif
#ifndef DEC_R
#define DEC_R 1
#endif
#ifndef DEC_RT
#define DEC_RT 1
#endif
#ifndef DEC_NSG
#define DEC_NSG 2
#endif
#ifndef DEC_KC
#define DEC_KC 0
#endif
#ifndef DEC_VS
#define DEC_VS 0
#endif

using T = DEC_T;
constexpr int D = DEC_D, DV = DEC_DV, R = DEC_R, RT = DEC_RT, NSG = DEC_NSG, KC = DEC_KC, VS = DEC_VS;
constexpr int QKC = KC > 0 ? KC : 128;  // the key kernel's group (q4c's when not given)

void quantize_keys_kernel(const float16_t* x, uint32_t* packed, float16_t* scales,
                          float16_t* biases, uint3 thread_position_in_grid) {
  constexpr int KC = QKC;
#include "../quantize_keys.metal"
}

void quantize_values_kernel(const float16_t* x, uint32_t* packed, float16_t* scales,
                            uint3 thread_position_in_grid) {
#include "../quantize_values.metal"
}

#define DECODE_PARAMS                                                                         \
  const T *queries, const uint32_t *k_packed, const float16_t *k_scales,                      \
      const float16_t *k_biases, const uint32_t *v_packed, const float16_t *v_scales,         \
      const float16_t *v_biases, const int32_t *lengths, const int32_t *first, const float *scale,                  \
      const int32_t *n_tokens, float *partial, float *maxes, float *sums,                     \
      uint3 threadgroup_position_in_grid, uint3 threadgroups_per_grid,                        \
      uint thread_index_in_simdgroup, uint simdgroup_index_in_threadgroup

// Two copies of pass 1, each with its own threadgroup memory section, so two
// threadgroups can run at once.
#define TG_SECTION "q4_tg_slot0"
void decode_slot0(DECODE_PARAMS) {
#include "../decode_attention.metal"
}
#undef TG_SECTION
#define TG_SECTION "q4_tg_slot1"
void decode_slot1(DECODE_PARAMS) {
#include "../decode_attention.metal"
}

void combine_kernel(const float* partial, const float* maxes, const float* sums,
                    const int32_t* n_split, T* out, uint3 thread_position_in_grid) {
#include "../decode_combine.metal"
}

#undef device
#undef constant
#undef threadgroup

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
  if (argc < 4) {
    std::fprintf(stderr, "usage: harness OP DIR N...\n");
    return 2;
  }
  std::string op = argv[1];
  dir = argv[2];
  auto arg = [&](int i) { return size_t(std::strtoull(argv[i], nullptr, 10)); };

  if (op == "quantize") {
    size_t ng = arg(3);
    auto x = load<float16_t>("x", ng * 64);
    std::vector<uint32_t> packed(ng * 8);
    std::vector<float16_t> scales(ng), biases(ng);
    run_grid(ng, [&](uint3 pos) {
      quantize_kernel(x.data(), packed.data(), scales.data(), biases.data(), pos);
    });
    save("packed", packed), save("scales", scales), save("biases", biases);
  } else if (op == "quantize_keys") {
    size_t rows = arg(3);
    auto x = load<float16_t>("x", rows * D);
    std::vector<uint32_t> packed(rows * D / 8);
    std::vector<float16_t> scales(rows / QKC * D), biases(rows / QKC * D);
    run_grid(rows / QKC * D / 8, [&](uint3 pos) {
      quantize_keys_kernel(x.data(), packed.data(), scales.data(), biases.data(), pos);
    });
    save("packed", packed), save("scales", scales), save("biases", biases);
  } else if (op == "quantize_values") {
    size_t ng = arg(3);
    auto x = load<float16_t>("x", ng * 32);
    std::vector<uint32_t> packed(ng * 4);
    std::vector<float16_t> scales(ng);
    run_grid(ng, [&](uint3 pos) { quantize_values_kernel(x.data(), packed.data(), scales.data(), pos); });
    save("packed", packed), save("scales", scales);
  } else if (op == "combine") {
    size_t rows = arg(3), S = arg(4);
    auto partial = load<float>("partial", rows * S * DV);
    auto maxes = load<float>("maxes", rows * S);
    auto sums = load<float>("sums", rows * S);
    std::vector<int32_t> n_split{int32_t(S)};
    std::vector<T> out(rows * DV, T(NAN));
    for (size_t row = 0; row < rows; row++)
      for (uint d = 0; d < DV; d++)
        combine_kernel(partial.data(), maxes.data(), sums.data(), n_split.data(), out.data(), uint3{d, uint(row), 0});
    save("out", out);
  } else if (op == "round") {
    size_t n = arg(3);
    auto x = load<float>("x", n);
    std::vector<float16_t> f16(n);
    std::vector<bfloat16_t> bf16(n);
    for (size_t i = 0; i < n; i++) f16[i] = float16_t(x[i]), bf16[i] = bfloat16_t(x[i]);
    save("f16", f16), save("bf16", bf16);
  } else if (op == "decode" && argc == 7) {
    size_t B = arg(3), nkv = arg(4), N = arg(5), S = arg(6), rows = B * nkv * N;
    size_t heads = B * nkv * R;
    auto q = load<T>("queries", heads * D);
    auto kp = load<uint32_t>("k_packed", rows * D / 8);
    auto ks = load<float16_t>("k_scales", KC ? rows / QKC * D : rows * D / 64);
    auto kb = load<float16_t>("k_biases", KC ? rows / QKC * D : rows * D / 64);
    auto vp = load<uint32_t>("v_packed", rows * DV / 8);
    auto vs = load<float16_t>("v_scales", VS ? rows * DV / (VS ? VS : 1) : rows * DV / 64);
    auto vb = VS ? std::vector<float16_t>(1, float16_t(NAN)) : load<float16_t>("v_biases", rows * DV / 64);
    auto lengths = load<int32_t>("lengths", B);
    auto first = load<int32_t>("first", 1);
    auto scale = load<float>("scale", 1);
    std::vector<int32_t> n_tokens{int32_t(N)}, n_split{int32_t(S)};
    // Outputs start as NaN too: every value must be written.
    std::vector<float> partial(heads * S * DV, NAN), maxes(heads * S, NAN), sums(heads * S, NAN);
    uint3 groups{uint(nkv * ((R + RT - 1) / RT)), uint(B), uint(S)};
    auto memory = [](int slot) -> std::pair<char*, char*> {
      if (slot == 0) return {__start_q4_tg_slot0, __stop_q4_tg_slot0};
      return {__start_q4_tg_slot1, __stop_q4_tg_slot1};
    };
    run_threadgroups<2>(groups, 32 * NSG, memory, [&](int slot, uint3 tgpos, uint3 tpos) {
      auto kernel = slot == 0 ? decode_slot0 : decode_slot1;
      kernel(q.data(), kp.data(), ks.data(), kb.data(), vp.data(), vs.data(), vb.data(),
             lengths.data(), first.data(), scale.data(), n_tokens.data(), partial.data(), maxes.data(),
             sums.data(), tgpos, groups, tpos.x % 32, tpos.x / 32);
    });
    std::vector<T> out(heads * DV, T(NAN));
    for (size_t row = 0; row < heads; row++)
      for (uint d = 0; d < DV; d++)
        combine_kernel(partial.data(), maxes.data(), sums.data(), n_split.data(), out.data(),
                       uint3{d, uint(row), 0});
    save("partial", partial), save("maxes", maxes), save("sums", sums), save("out", out);
  } else {
    std::fprintf(stderr, "unknown op or wrong arguments: %s\n", op.c_str());
    return 2;
  }
  return 0;
}
