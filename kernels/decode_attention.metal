// Body of mx.fast.metal_kernel "q4_decode_attention", pass 1 of 2
// (header: q4_common.h). One new query token per sequence attends over a Q4
// key/value cache, reading the packed codes directly; pass 2
// (decode_combine.metal) merges the partial results of the sequence splits.
//
// Template: T (query/output dtype), D and DV (key/value head dims: 64, 128,
//           256 or 512), R (query heads per kv head, GQA), RT (query heads
//           per threadgroup, <= R), NSG (SIMD groups per threadgroup),
//           KC and VS: the layout (0, 0: q4; 128, 32: q4c, see below).
// Inputs:   queries (B, n_kv*R, 1, D) T; query head h uses kv head h / R.
//           k_packed (B, n_kv, N, D/8) uint32, k_scales/k_biases
//           (B, n_kv, N, D/64) float16; v_* the same with DV.
//           q4c (KC > 0, VS > 0): k_scales/k_biases (B, n_kv, N/KC, D), one
//           pair per channel and group of KC rows (N a multiple of KC);
//           v_scales (B, n_kv, N, DV/VS) symmetric (value = d * (code - 8)),
//           v_biases unused (any array).
//           lengths (B,) int32: tokens [0, lengths[b]) of sequence b count;
//           first (1,) int32: but not those before it (0 for q4; q4c's sink
//           rows, read exactly by the host instead).
//           scale (1,) float32; n_tokens (1,) int32 = N, the cache row count.
// Outputs:  partial (B, n_kv*R, S, DV) float32: sum_i exp(s_i - M) v_i over
//           the split's tokens; maxes and sums (B, n_kv*R, S) float32: M and
//           sum_i exp(s_i - M). An empty split gives 0, NO_SCORE and 0.
//           No infinities are used (NO_SCORE stands for "no token"), so a
//           fast-math compilation that assumes finite values keeps this exact.
// Grid (n_kv * ceil(R/RT) * 32*NSG, B, S), threadgroup (32*NSG, 1, 1): one
// threadgroup per (kv head, tile of RT query heads, sequence, split S of the
// sequence's tokens). The RT heads share every key and value read.
//
// Structure (that of MLX's sdpa_vector, for packed codes and GQA tiles):
// each SIMD group takes KT tokens at a time: KL lanes per key row, every lane
// loading whole uint32 words (8 codes) of TB consecutive rows, so that one
// butterfly of simd_shuffle_xor inside the KL lanes reduces TB dot products
// at once (its first stages halve the sums each lane carries, its last ones
// add up one); afterwards KLE = KL / TB lanes hold each token's score. TB
// keeps the per-lane partial scores (RT * TB floats) within 16 registers,
// beside the at most 64 of queries and accumulators. Each SIMD group keeps
// its own online softmax state (max and denominator per head, uniform over its lanes) and
// accumulates its tokens' values into per-lane registers (VL lanes per value
// row, whole words again). At the end, lanes holding the same value words are
// summed, then the NSG SIMD groups are merged through threadgroup memory.

constexpr int KW = D / 8, VW = DV / 8;       // uint32 words per key / value row
constexpr int KG = D / 64, VG = DV / 64;     // groups (scale, bias) per row
constexpr int KCG = KC > 0 ? KC : 1;         // q4c divisors (never 0, also where unused)
constexpr int VSG = VS > 0 ? VS : 1;
constexpr int KWL = KW > 32 ? KW / 32 : 1;   // key words per lane
constexpr int VWL = VW > 32 ? VW / 32 : 1;   // value words per lane
constexpr int KL = KW / KWL;                 // lanes per key row
constexpr int VL = VW / VWL;                 // lanes per value row
constexpr int TBR = 16 / RT;                 // scores a lane may carry per head (16 in all)
constexpr int TB0 = TBR >= 16 ? 16 : TBR >= 8 ? 8 : TBR >= 4 ? 4 : TBR >= 2 ? 2 : 1;
constexpr int TB = TB0 < KL ? TB0 : KL;      // key rows per lane and butterfly (a power of 2)
constexpr int KLE = KL / TB;                 // lanes holding one token's score after it
constexpr int KT = 32 / KLE;                 // key rows per SIMD-group step
constexpr int VT = 32 / VL;                  // value rows per pass over the lanes
constexpr int TILES = (R + RT - 1) / RT;
constexpr int NT = 32 * NSG;                 // threads per threadgroup
constexpr float NO_SCORE = -1e30f;           // below any real score; exp(NO_SCORE - s) == 0

const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const uint tid = sg * 32 + lane;
const uint tile = threadgroup_position_in_grid.x % TILES;
const uint h = threadgroup_position_in_grid.x / TILES;
const uint n_kv = threadgroups_per_grid.x / TILES;
const uint b = threadgroup_position_in_grid.y;
const uint split = threadgroup_position_in_grid.z;
const uint n_split = threadgroups_per_grid.z;
const int N = n_tokens[0];
const int len = metal::min(int(lengths[b]), N);
const int row_first = metal::min(int(first[0]), len);  // rows before it are skipped (q4c sinks)
const int per_split = (len - row_first + int(n_split) - 1) / int(n_split);
const int start = metal::min(len, row_first + int(split) * per_split);
const int end = metal::min(len, start + per_split);
const size_t row0 = (size_t(b) * n_kv + h) * size_t(N);  // first cache row
const int r0 = int(tile) * RT;                            // first query head of the tile
const size_t head0 = (size_t(b) * n_kv + h) * R + r0;
// This head's rows, so the loops below index with 32-bit offsets (Apple GPUs
// emulate 64-bit multiplies). `auto` keeps each input's address space.
const auto kp = k_packed + row0 * KW;
const auto ks = k_scales + (KC > 0 ? row0 / KCG * D : row0 * KG);
const auto kb = k_biases + (KC > 0 ? row0 / KCG * D : row0 * KG);
const auto vp = v_packed + row0 * VW;
const auto vsc = v_scales + row0 * (VS > 0 ? DV / VSG : VG);
const auto vbi = v_biases + (VS > 0 ? 0 : row0 * VG);  // q4c: not read

// This lane's words of a key row (all in one group: KWL divides 8) and its
// share of every query of the tile, pre-scaled by the attention scale and by
// 16^-j for code j of a word, so codes are read as word & (15 << 4j), without
// a shift (as MLX's qmv does); qsum: their plain sum (the bias term).
const int kw0 = int(lane % KL) * KWL;
const int vw0 = int(lane % VL) * VWL;
float q[RT][8 * KWL];
float qsum[RT];
for (int r = 0; r < RT; r++) {
  qsum[r] = 0.0f;
  for (int e = 0; e < 8 * KWL; e++) {
    float x = r0 + r < R ? scale[0] * static_cast<float>(queries[(head0 + r) * D + kw0 * 8 + e]) : 0.0f;
    q[r][e] = x * (1.0f / float(1u << (4 * (e % 8))));
    qsum[r] += x;
  }
}
// q4c: the queries folded with the channel scales of the current KC-row
// group (qk), and the bias term (qb); rebuilt when a lane's row enters a new
// group, not for every code.
float qk[KC > 0 ? RT : 1][KC > 0 ? 8 * KWL : 1];
float qb[RT];
int group = -1;

float m[RT], l[RT], acc[RT][8 * VWL];
for (int r = 0; r < RT; r++) {
  m[r] = NO_SCORE;
  l[r] = 0.0f;
  for (int e = 0; e < 8 * VWL; e++) {
    acc[r][e] = 0.0f;
  }
}

// The bounds are the same for the 32 lanes of a SIMD group, so every
// SIMD-group function below is reached by all of them.
for (int t0 = start + int(sg) * KT; t0 < end; t0 += NSG * KT) {
  // 1. Scores of rows t0 + (lane / KL) * TB + i, i < TB: s[r][i] (q . codes)
  //    + b sum(q) per group; rows at or past the end add 0.
  const int trow = t0 + int(lane) / KL * TB;
  float s[RT][TB];
  for (int r = 0; r < RT; r++) {
    for (int i = 0; i < TB; i++) {
      s[r][i] = 0.0f;
    }
  }
  for (int i = 0; i < TB; i++) {
    const int row = trow + i;
    if (row >= end) {
      break;
    }
    if (KC > 0) {
      if (row / KCG != group) {
        group = row / KCG;
        const int p0 = group * D + kw0 * 8;
        for (int r = 0; r < RT; r++) {
          qb[r] = 0.0f;
        }
        for (int e = 0; e < 8 * KWL; e++) {
          const float kscale = static_cast<float>(ks[p0 + e]);
          const float kbias = static_cast<float>(kb[p0 + e]);
          for (int r = 0; r < RT; r++) {
            qk[r][e] = q[r][e] * kscale;
            qb[r] += q[r][e] * float(1u << (4 * (e % 8))) * kbias;
          }
        }
      }
      for (int w = 0; w < KWL; w++) {
        const uint32_t word = kp[row * KW + kw0 + w];
        for (int j = 0; j < 8; j++) {
          const float c = float(word & (15u << (4 * j)));
          for (int r = 0; r < RT; r++) {
            s[r][i] += qk[r][w * 8 + j] * c;
          }
        }
      }
      for (int r = 0; r < RT; r++) {
        s[r][i] += qb[r];
      }
    } else {
      const float kscale = static_cast<float>(ks[row * KG + kw0 / 8]);
      const float kbias = static_cast<float>(kb[row * KG + kw0 / 8]);
      for (int w = 0; w < KWL; w++) {
        const uint32_t word = kp[row * KW + kw0 + w];
        for (int j = 0; j < 8; j++) {
          const float c = float(word & (15u << (4 * j)));
          for (int r = 0; r < RT; r++) {
            s[r][i] += q[r][w * 8 + j] * c;
          }
        }
      }
      for (int r = 0; r < RT; r++) {
        s[r][i] = kscale * s[r][i] + kbias * qsum[r];
      }
    }
  }
  // The butterfly. While a lane carries n > 1 sums, the lane with bit `off`
  // set keeps the upper half and gives its partner the lower one (the
  // partner the reverse), so one shuffle adds two sums: TB - 1 shuffles leave
  // lane l with row t0 + l / KLE summed over TB lanes; the log2(KLE) stages
  // after that sum one value each.
  for (int n = TB, off = KL / 2; n > 1; n /= 2, off /= 2) {
    const bool upper = (lane & uint(off)) != 0;
    for (int r = 0; r < RT; r++) {
      for (int i = 0; i < n / 2; i++) {
        const float give = upper ? s[r][i] : s[r][n / 2 + i];
        const float keep = upper ? s[r][n / 2 + i] : s[r][i];
        s[r][i] = keep + simd_shuffle_xor(give, ushort(off));
      }
    }
  }
  const int tok = t0 + int(lane) / KLE;
  const bool valid = tok < end;
  for (int r = 0; r < RT; r++) {
    for (int off = KLE / 2; off > 0; off /= 2) {
      s[r][0] += simd_shuffle_xor(s[r][0], ushort(off));
    }
  }

  // 2. Online softmax of the SIMD group: the max over its KT tokens; what
  //    it has so far is rescaled only when that max grows (m is the same in
  //    all 32 lanes, so the branch is too); the tokens' weights (0 past the end).
  float p[RT];
  for (int r = 0; r < RT; r++) {
    const float sv = valid ? s[r][0] : NO_SCORE;
    const float m_new = metal::max(m[r], simd_max(sv));  // finite: token t0 is valid
    if (m_new > m[r]) {
      const float factor = metal::exp(m[r] - m_new);
      l[r] *= factor;
      for (int e = 0; e < 8 * VWL; e++) {
        acc[r][e] *= factor;
      }
      m[r] = m_new;
    }
    p[r] = metal::exp(sv - m[r]);
    l[r] += simd_sum(lane % KLE == 0 ? p[r] : 0.0f);
  }

  // 3. Values: VT of the KT tokens per pass, VL lanes each, weights taken
  //    from the first of the KLE lanes holding the token's score.
  for (int j0 = 0; j0 < KT; j0 += VT) {
    const int j = j0 + int(lane) / VL;
    const int vtok = t0 + j;
    float pv[RT];
    for (int r = 0; r < RT; r++) {
      pv[r] = simd_shuffle(p[r], ushort(metal::min(j, KT - 1) * KLE));
    }
    if (j < KT && vtok < end) {
      // q4c: symmetric groups of VS (the lane's VWL words lie in one group), bias -8 d
      const float vs = VS > 0 ? static_cast<float>(vsc[vtok * (DV / VSG) + vw0 * 8 / VSG])
                              : static_cast<float>(vsc[vtok * VG + vw0 / 8]);
      const float vb = VS > 0 ? -8.0f * vs : static_cast<float>(vbi[vtok * VG + vw0 / 8]);
      for (int i = 0; i < VWL; i++) {
        const uint32_t word = vp[vtok * VW + vw0 + i];
        for (int e = 0; e < 8; e++) {
          const float v = vs * float((word >> (4 * e)) & 15u) + vb;
          for (int r = 0; r < RT; r++) {
            acc[r][i * 8 + e] += pv[r] * v;
          }
        }
      }
    }
  }
}

// 4. Sum the lanes that hold the same value words (one per token slot).
for (int r = 0; r < RT; r++) {
  for (int e = 0; e < 8 * VWL; e++) {
    for (int off = VL; off < 32; off *= 2) {
      acc[r][e] += simd_shuffle_xor(acc[r][e], ushort(off));
    }
  }
}

// 5. Merge the SIMD groups: common max, rescaled sums, one row at a time.
threadgroup float m_s[NSG * RT];
threadgroup float l_s[NSG * RT];
threadgroup float o_s[NSG * DV];
if (lane == 0) {
  for (int r = 0; r < RT; r++) {
    m_s[sg * RT + r] = m[r];
    l_s[sg * RT + r] = l[r];
  }
}
for (int r = 0; r < RT; r++) {
  if (int(lane) < VL) {
    for (int e = 0; e < 8 * VWL; e++) {
      o_s[sg * DV + vw0 * 8 + e] = acc[r][e];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float M = NO_SCORE;
  for (int g = 0; g < NSG; g++) {
    M = metal::max(M, m_s[g * RT + r]);
  }
  float w[NSG];  // a SIMD group without tokens has m = NO_SCORE, l = 0 and zero sums
  for (int g = 0; g < NSG; g++) {
    w[g] = metal::exp(m_s[g * RT + r] - M);
  }
  const size_t part = (head0 + r) * n_split + split;
  if (r0 + r < R) {
    for (int d = tid; d < DV; d += NT) {
      float o = 0.0f;
      for (int g = 0; g < NSG; g++) {
        o += w[g] * o_s[g * DV + d];
      }
      partial[part * DV + d] = o;
    }
    if (tid == 0) {
      float L = 0.0f;
      for (int g = 0; g < NSG; g++) {
        L += w[g] * l_s[g * RT + r];
      }
      maxes[part] = M;
      sums[part] = L;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
