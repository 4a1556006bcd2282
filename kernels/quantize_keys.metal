// Body of mx.fast.metal_kernel "q4c_quantize_keys" (header: q4_common.h):
// q4c keys, each channel quantized over groups of KC tokens (affine, the rule
// of q4_quantize_group over KC values), codes packed along the head dim.
// Template: KC (tokens per group), D (head dim, a multiple of 8).
// Inputs:  x (..., T, D) float16, T a multiple of KC.
// Outputs: packed (..., T, D/8) uint32; scales, biases (..., T/KC, D) float16.
// Grid (x.size / KC / 8, 1, 1): one thread per (group of KC rows, 8 channels).
// Rows of all leading indices are contiguous, so group g is rows g*KC .. g*KC+KC-1.
const uint id = thread_position_in_grid.x;
const uint w = id % (D / 8);
const size_t g = id / (D / 8);
const size_t row0 = g * KC;
q4_params p[8];
for (int j = 0; j < 8; j++) {
  const size_t c = w * 8 + j;
  float lo = INFINITY;
  float hi = -INFINITY;
  for (int t = 0; t < KC; t++) {
    float v = static_cast<float>(x[(row0 + t) * D + c]);
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  p[j] = q4_affine_params(lo, hi);
  scales[g * D + c] = static_cast<float16_t>(p[j].scale);
  biases[g * D + c] = static_cast<float16_t>(p[j].bias);
}
for (int t = 0; t < KC; t++) {
  uint32_t word = 0;
  for (int j = 0; j < 8; j++) {
    word |= q4_affine_code(static_cast<float>(x[(row0 + t) * D + w * 8 + j]), p[j]) << (4 * j);
  }
  packed[(row0 + t) * (D / 8) + w] = word;
}
