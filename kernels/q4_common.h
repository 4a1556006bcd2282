// Helpers shared by the kernel bodies in this folder. MLX gets this file as
// the `header` of mx.fast.metal_kernel; the CPU harness #includes it after
// harness/metal_shim.h. Byte layouts and rounding rules: README.md.

// Scale and bias of one affine group from its range: every float operation
// is the one MLX's CPU mx.quantize (affine, bits=4) performs, in the same
// order, so the bytes are identical.
struct q4_params {
  float scale;
  float bias;
};

inline q4_params q4_affine_params(float lo, float hi) {
  // The edge with the larger magnitude is represented exactly (code 0).
  bool low_edge = metal::fabs(lo) > metal::fabs(hi);
  float scale = (hi - lo) / 15.0f;
  scale = scale < 1e-7f ? 1e-7f : scale;
  scale = low_edge ? scale : -scale;
  float edge = low_edge ? lo : hi;
  float q0 = metal::rint(edge / scale);
  float bias = 0.0f;
  if (q0 != 0.0f) {
    scale = edge / q0;
    bias = edge;
  }
  return q4_params{scale, bias};
}

// Clamp to [0, 15]; NaN gets code 0 (what mx.quantize yields on x86 and arm64).
inline uint32_t q4_clamp_code(float c) {
  return c > 15.0f ? 15u : (c > 0.0f ? uint32_t(c) : 0u);
}

inline uint32_t q4_affine_code(float v, q4_params p) {
  return q4_clamp_code(metal::rint((v - p.bias) / p.scale));
}

// Quantize group g of x (64 fp16 values) into 8 packed words, one fp16 scale
// and one fp16 bias. Comparisons instead of min/max keep NaN out of the range
// like std::min/max.
inline void q4_quantize_group(
    const device float16_t* x,
    device uint32_t* packed,
    device float16_t* scales,
    device float16_t* biases,
    uint g) {
  x += size_t(g) * 64;
  float lo = INFINITY;
  float hi = -INFINITY;
  for (int i = 0; i < 64; i++) {
    float v = static_cast<float>(x[i]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  q4_params p = q4_affine_params(lo, hi);
  scales[g] = static_cast<float16_t>(p.scale);
  biases[g] = static_cast<float16_t>(p.bias);
  for (int w = 0; w < 8; w++) {
    uint32_t word = 0;
    for (int j = 0; j < 8; j++) {
      word |= q4_affine_code(static_cast<float>(x[8 * w + j]), p) << (4 * j);
    }
    packed[size_t(g) * 8 + w] = word;
  }
}
