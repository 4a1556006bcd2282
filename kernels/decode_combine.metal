// Body of mx.fast.metal_kernel "q4_decode_combine", pass 2 of 2 of decode
// attention (see decode_attention.metal): merges the S splits of every query
// head into the normalised output.
//
// Template: T (output dtype), DV (value head dim).
// Inputs:   partial (B*H, S, DV), maxes and sums (B*H, S) float32, from pass 1;
//           n_split (1,) int32 = S.
// Output:   out (B, H, 1, DV) T; zeros where every split is empty (length 0).
// Grid (DV, B*H, 1): one thread per output value.

const uint d = thread_position_in_grid.x;
const size_t row = thread_position_in_grid.y;
const int S = n_split[0];
if (d < DV) {
  // Empty splits carry a max of -1e30 and a sum of 0: weight 0 next to any
  // real split, and all-empty rows end with L = 0. No infinities involved.
  float M = -1e30f;
  for (int s = 0; s < S; s++) {
    M = metal::max(M, maxes[row * S + s]);
  }
  float o = 0.0f;
  float L = 0.0f;
  for (int s = 0; s < S; s++) {
    const float w = metal::exp(maxes[row * S + s] - M);
    o += w * partial[(row * S + s) * DV + d];
    L += w * sums[row * S + s];
  }
  out[row * DV + d] = static_cast<T>(L > 0.0f ? o / L : 0.0f);
}
