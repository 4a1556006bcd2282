// Body of mx.fast.metal_kernel "q4c_quantize_values" (header: q4_common.h):
// q4c values, symmetric groups of 32 (llama.cpp's q4_0 rule, fp16 scale d,
// x ~= d * (code - 8)), bit for bit q4_format.quantize_values.
// Inputs:  x (..., D) float16, D a multiple of 32.
// Outputs: packed (..., D/8) uint32, scales (..., D/32) float16.
// Grid (x.size / 32, 1, 1): one thread per group.
const size_t g = thread_position_in_grid.x;
const device float16_t* v = x + g * 32;
// The first element of largest magnitude; NaN counts as 0 (and never wins).
float peak = static_cast<float>(v[0]);
peak = peak == peak ? peak : 0.0f;
float top = metal::fabs(peak);
for (int i = 1; i < 32; i++) {
  float a = static_cast<float>(v[i]);
  if (metal::fabs(a) > top) {
    top = metal::fabs(a);
    peak = a;
  }
}
const float16_t d = static_cast<float16_t>(peak / -8.0f);
const float df = static_cast<float>(d);
const float inv = df != 0.0f ? 1.0f / df : 0.0f;
scales[g] = d;
for (int w = 0; w < 4; w++) {
  uint32_t word = 0;
  for (int j = 0; j < 8; j++) {
    word |= q4_clamp_code(metal::rint(static_cast<float>(v[8 * w + j]) * inv) + 8.0f) << (4 * j);
  }
  packed[g * 4 + w] = word;
}
