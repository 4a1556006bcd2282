// Body of mx.fast.metal_kernel "q4_quantize_kv" (header: q4_common.h):
// keys and values of a block quantized by one launch.
// Inputs:  k (..., D) float16, v (..., Dv) float16, n_k_groups (1,) uint32
//          = k.size / 64.
// Outputs: k_packed, k_scales, k_biases, v_packed, v_scales, v_biases in the
//          layout of quantize.metal.
// Grid (k.size / 64 + v.size / 64, 1, 1): thread g < n_k_groups takes key
// group g, the others value group g - n_k_groups.
uint g = thread_position_in_grid.x;
uint nk = n_k_groups[0];
if (g < nk) {
  q4_quantize_group(k, k_packed, k_scales, k_biases, g);
} else {
  q4_quantize_group(v, v_packed, v_scales, v_biases, g - nk);
}
