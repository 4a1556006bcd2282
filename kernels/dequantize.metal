// Body of mx.fast.metal_kernel "q4_dequantize" (header: q4_common.h).
// Inputs:  packed (..., D/8) uint32, scales and biases (..., D/64) float16.
// Output:  out (..., D) float16, bit-identical to mx.dequantize.
// Grid (packed.size, 1, 1): one thread per packed word (8 values).
uint w = thread_position_in_grid.x;
uint32_t word = packed[w];
float16_t s = scales[w / 8];
float16_t b = biases[w / 8];
for (int j = 0; j < 8; j++) {
  out[size_t(w) * 8 + j] = q4_dequantize_value((word >> (4 * j)) & 15u, s, b);
}
