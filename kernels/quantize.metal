// Body of mx.fast.metal_kernel "q4_quantize" (header: q4_common.h).
// Inputs:  x (..., D) float16, D a multiple of 64.
// Outputs: packed (..., D/8) uint32, scales and biases (..., D/64) float16.
// Grid (x.size / 64, 1, 1): one thread per 64-value group.
q4_quantize_group(x, packed, scales, biases, thread_position_in_grid.x);
