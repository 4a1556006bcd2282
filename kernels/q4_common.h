// Helpers shared by the Q4 kernel bodies in this folder. MLX gets this file as
// the `header` of mx.fast.metal_kernel; the CPU harness #includes it after
// harness/metal_shim.h. Byte layout and rounding rules: README.md.

// Quantize group g of x (64 fp16 values) into 8 packed words, one fp16 scale
// and one fp16 bias. Every float operation is the one MLX's CPU mx.quantize
// (affine, bits=4) performs, in the same order, so the bytes are identical.
// Comparisons instead of min/max keep NaN out of the range like std::min/max.
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
  scales[g] = static_cast<float16_t>(scale);
  biases[g] = static_cast<float16_t>(bias);
  for (int w = 0; w < 8; w++) {
    uint32_t word = 0;
    for (int j = 0; j < 8; j++) {
      float c = metal::rint((static_cast<float>(x[8 * w + j]) - bias) / scale);
      // Clamp to [0, 15]; NaN gets code 0 (what mx.quantize yields on x86 and arm64).
      uint32_t q = c > 15.0f ? 15u : (c > 0.0f ? uint32_t(c) : 0u);
      word |= q << (4 * j);
    }
    packed[size_t(g) * 8 + w] = word;
  }
}
