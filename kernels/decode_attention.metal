// Body of mx.fast.metal_kernel "q4_decode_attention" (header: q4_common.h):
// one new query token per sequence attends over a Q4 key/value cache, reading
// the packed codes directly; no full-precision copy of the cache is made.
//
// Template: T (query/output dtype), D and DV (key/value head dims, multiples
//           of 64), R (query heads per kv head, GQA), TG (threads per group).
// Inputs:   queries (B, n_kv*R, 1, D) T; query head h uses kv head h / R.
//           k_packed (B, n_kv, N, D/8) uint32, k_scales/k_biases
//           (B, n_kv, N, D/64) float16; v_* the same with DV.
//           lengths (B,) int32: tokens [0, lengths[b]) of sequence b count.
//           scale (1,) float32; n_tokens (1,) int32 = N, the cache row count.
// Output:   out (B, n_kv*R, 1, DV) T; zeros for a sequence of length 0.
// Grid (n_kv*TG, B, 1), threadgroup (TG, 1, 1): one threadgroup per
// (kv head, sequence), so its R query heads share every key and value read.
// Tokens are taken TG at a time: each thread scores one token for all R
// heads, then R threads update the running max and sum (online softmax),
// then every thread accumulates its own (head, value dim) outputs.

const uint t = thread_position_in_threadgroup.x;
const uint h = threadgroup_position_in_grid.x;
const uint b = threadgroup_position_in_grid.y;
const uint n_kv = threadgroups_per_grid.x;
const int N = n_tokens[0];
const int len = metal::min(int(lengths[b]), N);
const size_t row0 = (size_t(b) * n_kv + h) * size_t(N);  // first cache row
const size_t head0 = (size_t(b) * n_kv + h) * R;          // first query head
constexpr int KW = D / 8, KG = D / 64, VW = DV / 8, VG = DV / 64;
constexpr int NO = (R * DV + TG - 1) / TG;  // outputs per thread

threadgroup float q_s[R * D];      // scaled queries
threadgroup float qsum_s[R * KG];  // their sum per key group (bias term)
threadgroup float p_s[R * TG];     // chunk scores, then probabilities
threadgroup float m_s[R];          // running max per head
threadgroup float l_s[R];          // running softmax denominator
threadgroup float c_s[R];          // rescale factor of the current chunk

for (int i = t; i < R * D; i += TG) {
  q_s[i] = scale[0] * static_cast<float>(queries[head0 * D + i]);
}
if (int(t) < R) {
  m_s[t] = -INFINITY;
  l_s[t] = 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
for (int i = t; i < R * KG; i += TG) {
  float s = 0.0f;
  for (int j = 0; j < 64; j++) {
    s += q_s[i * 64 + j];
  }
  qsum_s[i] = s;
}
float acc[NO];
for (int k = 0; k < NO; k++) {
  acc[k] = 0.0f;
}
threadgroup_barrier(mem_flags::mem_threadgroup);

for (int c0 = 0; c0 < len; c0 += TG) {
  const int cn = metal::min(TG, len - c0);

  // 1. Scores of token c0 + t: sum_j q_j (s q_j' + b) = s (q . codes) + b sum(q).
  if (int(t) < cn) {
    const size_t row = row0 + c0 + t;
    float sc[R];
    for (int r = 0; r < R; r++) {
      sc[r] = 0.0f;
    }
    for (int g = 0; g < KG; g++) {
      float dot[R];
      for (int r = 0; r < R; r++) {
        dot[r] = 0.0f;
      }
      for (int w = 0; w < 8; w++) {
        uint32_t word = k_packed[row * KW + g * 8 + w];
        for (int j = 0; j < 8; j++) {
          float q = float((word >> (4 * j)) & 15u);
          for (int r = 0; r < R; r++) {
            dot[r] += q_s[r * D + g * 64 + w * 8 + j] * q;
          }
        }
      }
      float ks = static_cast<float>(k_scales[row * KG + g]);
      float kb = static_cast<float>(k_biases[row * KG + g]);
      for (int r = 0; r < R; r++) {
        sc[r] += ks * dot[r] + kb * qsum_s[r * KG + g];
      }
    }
    for (int r = 0; r < R; r++) {
      p_s[r * TG + t] = sc[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. Per head: new running max, rescale factor, probabilities of the chunk.
  if (int(t) < R) {
    float m_old = m_s[t];
    float m = m_old;
    for (int i = 0; i < cn; i++) {
      m = metal::max(m, p_s[t * TG + i]);
    }
    float corr = metal::exp(m_old - m);
    float l = l_s[t] * corr;
    for (int i = 0; i < cn; i++) {
      float p = metal::exp(p_s[t * TG + i] - m);
      p_s[t * TG + i] = p;
      l += p;
    }
    m_s[t] = m;
    l_s[t] = l;
    c_s[t] = corr;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 3. Each thread rescales its outputs and adds this chunk's values.
  for (int k = 0; k < NO; k++) {
    const int o = t + k * TG;
    if (o < R * DV) {
      const int r = o / DV;
      const int d = o % DV;
      float a = acc[k] * c_s[r];
      for (int i = 0; i < cn; i++) {
        const size_t row = row0 + c0 + i;
        uint32_t q = (v_packed[row * VW + d / 8] >> (4 * (d % 8))) & 15u;
        float vs = static_cast<float>(v_scales[row * VG + d / 64]);
        float vb = static_cast<float>(v_biases[row * VG + d / 64]);
        a += p_s[r * TG + i] * (vs * float(q) + vb);
      }
      acc[k] = a;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

for (int k = 0; k < NO; k++) {
  const int o = t + k * TG;
  if (o < R * DV) {
    const int r = o / DV;
    const float l = l_s[r];
    out[(head0 + r) * DV + o % DV] = static_cast<T>(l > 0.0f ? acc[k] / l : 0.0f);
  }
}
