// Runs the Metal kernel bodies of kernels/ on the CPU, through metal_shim.h.
// Arrays travel as raw little-endian files in a directory:
//   harness quantize    DIR NG          x            -> packed scales biases
//   harness quantize_kv DIR NGK NGV     k v          -> k_packed k_scales k_biases
//                                                       v_packed v_scales v_biases
//   harness dequantize  DIR NW          packed scales biases -> out
//   harness decode      DIR B NKV N     queries k_* v_* lengths scale -> out
// The decode kernel's template arguments come from -D at compile time:
// DEC_T (float or float16_t), DEC_D, DEC_DV, DEC_R, DEC_TG.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "metal_shim.h"

#include "../q4_common.h"

void quantize_kernel(const float16_t* x, uint32_t* packed, float16_t* scales,
                     float16_t* biases, uint3 thread_position_in_grid) {
#include "../quantize.metal"
}

void quantize_kv_kernel(const float16_t* k, const float16_t* v, const uint32_t* n_k_groups,
                        uint32_t* k_packed, float16_t* k_scales, float16_t* k_biases,
                        uint32_t* v_packed, float16_t* v_scales, float16_t* v_biases,
                        uint3 thread_position_in_grid) {
#include "../quantize_kv.metal"
}

void dequantize_kernel(const uint32_t* packed, const float16_t* scales, const float16_t* biases,
                       float16_t* out, uint3 thread_position_in_grid) {
#include "../dequantize.metal"
}

template <typename T, int D, int DV, int R, int TG>
void decode_kernel(const T* queries, const uint32_t* k_packed, const float16_t* k_scales,
                   const float16_t* k_biases, const uint32_t* v_packed,
                   const float16_t* v_scales, const float16_t* v_biases,
                   const int32_t* lengths, const float* scale, const int32_t* n_tokens,
                   T* out, uint3 threadgroup_position_in_grid,
                   uint3 thread_position_in_threadgroup, uint3 threadgroups_per_grid) {
#include "../decode_attention.metal"
}

#undef device
#undef constant
#undef threadgroup

#ifndef DEC_T
#define DEC_T float
#define DEC_D 64
#define DEC_DV 64
#define DEC_R 1
#define DEC_TG 32
#endif

static std::string dir;

template <typename T>
std::vector<T> load(const char* name, size_t count) {
  std::vector<T> v(count);
  std::string path = dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f || std::fread(v.data(), sizeof(T), count, f) != count) {
    std::fprintf(stderr, "cannot read %zu items from %s\n", count, path.c_str());
    std::exit(2);
  }
  std::fclose(f);
  return v;
}

template <typename T>
void save(const char* name, const std::vector<T>& v) {
  std::string path = dir + "/" + name + ".bin";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(v.data(), sizeof(T), v.size(), f) != v.size()) {
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
  } else if (op == "quantize_kv" && argc == 5) {
    size_t ngk = arg(3), ngv = arg(4);
    auto k = load<float16_t>("k", ngk * 64);
    auto v = load<float16_t>("v", ngv * 64);
    std::vector<uint32_t> nk{uint32_t(ngk)}, kp(ngk * 8), vp(ngv * 8);
    std::vector<float16_t> ks(ngk), kb(ngk), vs(ngv), vb(ngv);
    run_grid(ngk + ngv, [&](uint3 pos) {
      quantize_kv_kernel(k.data(), v.data(), nk.data(), kp.data(), ks.data(), kb.data(),
                         vp.data(), vs.data(), vb.data(), pos);
    });
    save("k_packed", kp), save("k_scales", ks), save("k_biases", kb);
    save("v_packed", vp), save("v_scales", vs), save("v_biases", vb);
  } else if (op == "dequantize") {
    size_t nw = arg(3);
    auto packed = load<uint32_t>("packed", nw);
    auto scales = load<float16_t>("scales", nw / 8);
    auto biases = load<float16_t>("biases", nw / 8);
    std::vector<float16_t> out(nw * 8);
    run_grid(nw, [&](uint3 pos) {
      dequantize_kernel(packed.data(), scales.data(), biases.data(), out.data(), pos);
    });
    save("out", out);
  } else if (op == "decode" && argc == 6) {
    constexpr int D = DEC_D, DV = DEC_DV, R = DEC_R, TG = DEC_TG;
    size_t B = arg(3), nkv = arg(4), N = arg(5), rows = B * nkv * N;
    auto q = load<DEC_T>("queries", B * nkv * R * D);
    auto kp = load<uint32_t>("k_packed", rows * D / 8);
    auto ks = load<float16_t>("k_scales", rows * D / 64);
    auto kb = load<float16_t>("k_biases", rows * D / 64);
    auto vp = load<uint32_t>("v_packed", rows * DV / 8);
    auto vs = load<float16_t>("v_scales", rows * DV / 64);
    auto vb = load<float16_t>("v_biases", rows * DV / 64);
    auto lengths = load<int32_t>("lengths", B);
    auto scale = load<float>("scale", 1);
    std::vector<int32_t> n_tokens{int32_t(N)};
    std::vector<DEC_T> out(B * nkv * R * DV);
    uint3 groups{uint(nkv), uint(B), 1};
    run_threadgroups(groups, TG, [&](uint3 tgpos, uint3 tpos) {
      decode_kernel<DEC_T, D, DV, R, TG>(q.data(), kp.data(), ks.data(), kb.data(), vp.data(),
                                         vs.data(), vb.data(), lengths.data(), scale.data(),
                                         n_tokens.data(), out.data(), tgpos, tpos, groups);
    });
    save("out", out);
  } else {
    std::fprintf(stderr, "unknown op or wrong arguments: %s\n", op.c_str());
    return 2;
  }
  return 0;
}
