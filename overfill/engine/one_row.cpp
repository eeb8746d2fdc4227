// y[M, N] = x[M, K] @ w[N, K]^T in bf16 for the few rows of a decode step (M <= 8), on AVX512-BF16.
// Each weight row is loaded once and dotted with every x row (vdpbf16ps, fp32 accumulation), so
// the product streams the weight once at memory speed; the rows are split between threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int kMaxRows = 8;

#define OVERFILL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Lane n of the result: the sum of v[n]'s 16 lanes (a transposing tree: 15 adds for 16 sums).
OVERFILL_TARGET inline __m512 sum16(const __m512* v) {
  __m512 s[8], t[4], w[2];
  for (int i = 0; i < 8; ++i)  // block pairs: lanes of v[2i] then v[2i+1], 8 each
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // block j holds 4 lanes of v[4i + j]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // block j: 2 lanes of v[8i + j], then 2 of v[8i + 4 + j]
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  // block j: v[j], v[4 + j], v[8 + j], v[12 + j]; lane 4j + i holds v[4i + j]
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// The M sums of one block of `rows` (<= 16) weight rows starting at w, each dotted with the M x
// rows: sums[m] lane r = x[m] . w[r]. Per x row, 16 accumulators over the K chunks, then one tree.
// The block's weights (16 x K bf16) stay in L1 for the next x row, so memory is read once; the
// block `kPrefetch` ahead is prefetched as this one is read, which keeps enough lines in flight
// for one core to stream at memory speed (the hardware prefetchers alone fall short on 16 rows).
constexpr int kPrefetch = 2;

OVERFILL_TARGET inline void dot_block(int M, const c10::BFloat16* x, int64_t x_stride, const c10::BFloat16* w,
                                      int64_t w_stride, int64_t K, int rows, __m512* sums) {
  const int64_t full = K / 32;
  const int rem = static_cast<int>(K % 32);
  const __mmask32 tail = rem ? ((1u << rem) - 1) : 0;
  const char* ahead = reinterpret_cast<const char*>(w + kPrefetch * 16 * w_stride);
  for (int m = 0; m < M; ++m) {
    const c10::BFloat16* xm = x + m * x_stride;
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c <= full; ++c) {
      if (c == full && !rem) break;
      const __mmask32 mask = c < full ? ~__mmask32(0) : tail;
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, xm + c * 32);
      for (int r = 0; r < rows; ++r) {
        if (m == 0) _mm_prefetch(ahead + (r * w_stride + c * 32) * 2, _MM_HINT_T0);
        const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + r * w_stride + c * 32);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)xv);
      }
    }
    sums[m] = sum16(acc);
  }
}

// Output rows [begin, end) of y = x @ w^T, in blocks of 16: fp32, or rounded to bf16 (nearest even,
// as c10::BFloat16).
template <typename Out>
OVERFILL_TARGET void rows_range(int M, const c10::BFloat16* x, const c10::BFloat16* w, Out* y, int64_t K, int64_t N,
                                int64_t begin, int64_t end) {
  __m512 sums[kMaxRows];
  for (int64_t n0 = begin; n0 < end; n0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, end - n0));
    const auto mask = static_cast<__mmask16>((1u << rows) - 1);
    dot_block(M, x, K, w + n0 * K, K, K, rows, sums);
    for (int m = 0; m < M; ++m) {
      if constexpr (std::is_same_v<Out, float>)
        _mm512_mask_storeu_ps(y + m * N + n0, mask, sums[m]);
      else
        _mm256_mask_storeu_epi16(y + m * N + n0, mask, (__m256i)_mm512_cvtneps_pbh(sums[m]));
    }
  }
}

template <typename Out>
void product(int M, const c10::BFloat16* x, const c10::BFloat16* w, Out* y, int64_t K, int64_t N) {
  // blocks of 16 rows, at least 64 rows per thread: below that, waking a second thread costs more
  // than it saves
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) { rows_range(M, x, w, y, K, N, begin, end); });
}

// fp32_out: the sums as they are (an output layer's logits: no ties from rounding them to bf16).
at::Tensor rows_product(const at::Tensor& x, const at::Tensor& weight, bool fp32_out) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "one_row_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "one_row_linear: bf16 tensors only");
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1), "one_row_linear: x [..., K] and weight [N, K]");
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t M = x2.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "one_row_linear: 1 to 8 rows, got ", M);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty({M, N}, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  const auto* xp = x2.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  if (fp32_out)
    product(static_cast<int>(M), xp, wp, y.data_ptr<float>(), K, N);
  else
    product(static_cast<int>(M), xp, wp, y.data_ptr<c10::BFloat16>(), K, N);
  return y.view(sizes);
}

at::Tensor one_row_linear(const at::Tensor& x, const at::Tensor& weight) { return rows_product(x, weight, false); }

at::Tensor one_row_logits(const at::Tensor& x, const at::Tensor& weight) { return rows_product(x, weight, true); }

// ------------------------------------------------------------------------------------------------
// The decoder's layer stack for one decode step (one token per row), in one parallel region: the
// threads split each product's output rows and the attention heads, with a barrier between
// dependent phases, so a layer costs six barriers instead of a dozen library calls. Rounding
// follows the bf16 reference (model.py): every product, norm, rotary and residual result is
// rounded to bf16 where the eager step rounds it; sums and softmax are fp32.

using bf16 = c10::BFloat16;

inline float rounded(float v) { return static_cast<float>(static_cast<bf16>(v)); }

struct LayerWeights {
  const bf16 *input_norm, *qkv, *o, *post_norm, *gate_up, *down;
  const bf16 *qkv_bias, *q_norm, *k_norm;  // nullptr where the architecture has none (Qwen2: the bias; Qwen3: the norms)
};

struct StackShape {
  int64_t rows, hidden, heads, kv_heads, head_dim, ffn, slots;  // slots: the mask's S
  float eps;
};

// RMSNorm of one vector [n] into out (which may be x), rounded as model.RMSNorm: bf16(w * bf16(x * r)).
inline void norm_row(const bf16* x, const bf16* weight, bf16* out, int64_t n, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  const float scale = 1.f / std::sqrt(ss / n + eps);
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<bf16>(static_cast<float>(weight[i]) * rounded(static_cast<float>(x[i]) * scale));
}

// Qwen3's q/k norms, one head [D] in place; nothing where the architecture has none.
inline void head_norm(bf16* x, const bf16* weight, int64_t D, float eps) {
  if (weight != nullptr) norm_row(x, weight, x, D, eps);
}

// This thread's share of n outputs, in whole blocks of 16.
inline std::pair<int64_t, int64_t> share(int64_t n, int threads, int tid) {
  const int64_t blocks = (n + 15) / 16;
  return {std::min(n, blocks * tid / threads * 16), std::min(n, blocks * (tid + 1) / threads * 16)};
}

// Each thread's own copy of RMSNorm(x) [rows, d]: cheaper than a barrier.
inline void rms_norm(const bf16* x, const bf16* weight, bf16* out, const StackShape& s) {
  for (int64_t m = 0; m < s.rows; ++m) norm_row(x + m * s.hidden, weight, out + m * s.hidden, s.hidden, s.eps);
}

// y[m, n] = epilogue(m, n, x[m] . w[n]) for this thread's share of w's N rows.
template <typename Epilogue>
OVERFILL_TARGET void product_share(int M, const bf16* x, const bf16* w, int64_t K, int64_t N, int threads, int tid,
                                   Epilogue epilogue) {
  const auto [begin, end] = share(N, threads, tid);
  __m512 sums[kMaxRows];
  alignas(64) float lanes[16];
  for (int64_t n0 = begin; n0 < end; n0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, end - n0));
    dot_block(M, x, K, w + n0 * K, K, K, rows, sums);
    for (int m = 0; m < M; ++m) {
      _mm512_store_ps(lanes, sums[m]);
      for (int r = 0; r < rows; ++r) epilogue(m, n0 + r, lanes[r]);
    }
  }
}

// The rotary embedding of one head [D] in place, as model.apply_rope in bf16: x*cos + rotate_half(x)*sin.
inline void rope(bf16* x, const bf16* cos, const bf16* sin, int64_t D) {
  float out[512];
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rotated = i < half ? -static_cast<float>(x[i + half]) : static_cast<float>(x[i - half]);
    out[i] = rounded(rounded(static_cast<float>(x[i]) * static_cast<float>(cos[i])) +
                     rounded(rotated * static_cast<float>(sin[i])));
  }
  for (int64_t i = 0; i < D; ++i) x[i] = static_cast<bf16>(out[i]);
}

struct CacheLayout {
  int64_t row, head, slot;  // strides of a layer's [B, H_kv, S_max, D] buffer
};

// e^x for 16 lanes: 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by its Taylor series to f^6
// (relative error ~1e-7); -inf and anything below -87 give 0.
OVERFILL_TARGET inline __m512 exp16(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718f));  // e^f, |f| <= ln2 / 2
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GT_OQ);
  return _mm512_maskz_scalef_ps(live, p, n);
}

OVERFILL_TARGET inline __m512 bf16x16_to_fp32(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One query head over the masked slots of its KV head: softmax(q k^T / sqrt(D)) v, fp32, into out [D].
// The scores of 16 slots at a time come from the product loop (the keys as the rows of a weight),
// over the slots between the first and the last the mask lets through.
OVERFILL_TARGET void attend(const bf16* q, const bf16* k, const bf16* v, const bool* mask, const CacheLayout& c,
                            int64_t S, int64_t D, float* scores, bf16* out) {
  int64_t lo = 0, hi = S;
  while (lo < hi && !mask[lo]) ++lo;
  while (hi > lo && !mask[hi - 1]) --hi;
  const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(static_cast<float>(D)));
  const __m512 masked = _mm512_set1_ps(-INFINITY);
  __m512 top = masked;
  for (int64_t s0 = lo; s0 < hi; s0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, hi - s0));
    const auto in_range = static_cast<__mmask16>((1u << rows) - 1);
    __m512 dots;
    dot_block(1, q, D, k + s0 * c.slot, c.slot, D, rows, &dots);
    const __mmask16 seen = _mm_test_epi8_mask(_mm_maskz_loadu_epi8(in_range, mask + s0), _mm_set1_epi8(1));
    const __m512 block = _mm512_mask_mul_ps(masked, seen, dots, scale);  // -inf where masked
    _mm512_mask_storeu_ps(scores + (s0 - lo), in_range, block);
    top = _mm512_max_ps(top, block);
  }
  const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t s0 = lo; s0 < hi; s0 += 16) {
    const auto in_range = static_cast<__mmask16>((1u << std::min<int64_t>(16, hi - s0)) - 1);
    const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(in_range, scores + (s0 - lo)), peak));
    _mm512_mask_storeu_ps(scores + (s0 - lo), in_range, p);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(in_range, p));
  }
  __m512 o[32];  // D <= 512
  for (int64_t i = 0; i < D / 16; ++i) o[i] = _mm512_setzero_ps();
  for (int64_t s = lo; s < hi; ++s) {
    const float p = scores[s - lo];
    if (p == 0.f) continue;  // masked (or negligible)
    const __m512 pv = _mm512_set1_ps(p);
    const bf16* vs = v + s * c.slot;
    for (int64_t i = 0; i < D / 16; ++i) o[i] = _mm512_fmadd_ps(pv, bf16x16_to_fp32(vs + 16 * i), o[i]);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t i = 0; i < D / 16; ++i)
    _mm256_storeu_si256((__m256i*)(out + 16 * i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[i], inv)));
}

// act[m, n] = silu(gate[m, n]) * up[m, n] for this thread's share of the ffn columns: gate row n and
// up row n (row ffn + n of the fused weight) are read by the same thread.
OVERFILL_TARGET void gate_up_share(int M, const bf16* normed, const bf16* gate_up, bf16* act, const StackShape& s, int nt,
                                   int tid) {
  const auto [begin, end] = share(s.ffn, nt, tid);
  __m512 gate[kMaxRows], up[kMaxRows];
  alignas(64) float g_lanes[16], u_lanes[16];
  for (int64_t n0 = begin; n0 < end; n0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, end - n0));
    dot_block(M, normed, s.hidden, gate_up + n0 * s.hidden, s.hidden, s.hidden, rows, gate);
    dot_block(M, normed, s.hidden, gate_up + (s.ffn + n0) * s.hidden, s.hidden, s.hidden, rows, up);
    for (int m = 0; m < M; ++m) {
      _mm512_store_ps(g_lanes, gate[m]);
      _mm512_store_ps(u_lanes, up[m]);
      for (int r = 0; r < rows; ++r) {
        const float g = rounded(g_lanes[r]);
        act[m * s.ffn + n0 + r] = static_cast<bf16>(rounded(g / (1.f + std::exp(-g))) * rounded(u_lanes[r]));
      }
    }
  }
}

void layer_stack(bf16* x, const std::vector<LayerWeights>& layers, const std::vector<at::Tensor>& k_cache,
                 const std::vector<at::Tensor>& v_cache, const bf16* cos, const bf16* sin, const bool* mask,
                 int64_t slot, const StackShape& s, const CacheLayout& c) {
  const int M = static_cast<int>(s.rows);
  const int64_t q_width = s.heads * s.head_dim, kv_width = s.kv_heads * s.head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width, rep = s.heads / s.kv_heads, D = s.head_dim;
  std::vector<bf16> qkv(M * qkv_width), attn(M * q_width), act(M * s.ffn);
  const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(threads)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    std::vector<bf16> normed(M * s.hidden);
    std::vector<float> scores(s.slots);
    for (size_t l = 0; l < layers.size(); ++l) {
      const LayerWeights& w = layers[l];
      bf16* k_l = k_cache[l].data_ptr<bf16>();
      bf16* v_l = v_cache[l].data_ptr<bf16>();
      rms_norm(x, w.input_norm, normed.data(), s);
      product_share(M, normed.data(), w.qkv, s.hidden, qkv_width, nt, tid, [&](int m, int64_t n, float v) {
        qkv[m * qkv_width + n] = static_cast<bf16>(w.qkv_bias ? v + static_cast<float>(w.qkv_bias[n]) : v);
      });
#pragma omp barrier
      // this step's keys (rotated) and values into the cache slot, one (row, KV head) per task
      const auto [kv_begin, kv_end] = std::pair<int64_t, int64_t>{M * s.kv_heads * tid / nt, M * s.kv_heads * (tid + 1) / nt};
      for (int64_t t = kv_begin; t < kv_end; ++t) {
        const int64_t m = t / s.kv_heads, g = t % s.kv_heads;
        bf16* key = k_l + m * c.row + g * c.head + slot * c.slot;
        std::copy_n(qkv.data() + m * qkv_width + q_width + g * D, D, key);
        head_norm(key, w.k_norm, D, s.eps);
        rope(key, cos + m * D, sin + m * D, D);
        std::copy_n(qkv.data() + m * qkv_width + q_width + kv_width + g * D, D, v_l + m * c.row + g * c.head + slot * c.slot);
      }
#pragma omp barrier
      const auto [q_begin, q_end] = std::pair<int64_t, int64_t>{M * s.heads * tid / nt, M * s.heads * (tid + 1) / nt};
      for (int64_t t = q_begin; t < q_end; ++t) {
        const int64_t m = t / s.heads, h = t % s.heads, g = h / rep;
        bf16* q = qkv.data() + m * qkv_width + h * D;
        head_norm(q, w.q_norm, D, s.eps);
        rope(q, cos + m * D, sin + m * D, D);
        attend(q, k_l + m * c.row + g * c.head, v_l + m * c.row + g * c.head, mask + m * s.slots, c, s.slots, D,
               scores.data(), attn.data() + m * q_width + h * D);
      }
#pragma omp barrier
      product_share(M, attn.data(), w.o, q_width, s.hidden, nt, tid, [&](int m, int64_t n, float v) {
        bf16& r = x[m * s.hidden + n];
        r = static_cast<bf16>(static_cast<float>(r) + rounded(v));
      });
#pragma omp barrier
      rms_norm(x, w.post_norm, normed.data(), s);
      gate_up_share(M, normed.data(), w.gate_up, act.data(), s, nt, tid);
#pragma omp barrier
      product_share(M, act.data(), w.down, s.ffn, s.hidden, nt, tid, [&](int m, int64_t n, float v) {
        bf16& r = x[m * s.hidden + n];
        r = static_cast<bf16>(static_cast<float>(r) + rounded(v));
      });
#pragma omp barrier
    }
  }
}

// x [B, d]: the embedded tokens of one decode step; weights: per layer input norm, fused q/k/v,
// o, post-attention norm, fused gate/up, down, then the fused q/k/v bias (qkv_bias) and the q and k
// norms (qk_norm); k/v cache: per layer [B, H_kv, S_max, D]; cos, sin
// [B, D]; mask [B, S] (S <= S_max); slot: where this step's K/V go. Returns the residual stream [B, d]
// after the last layer (before the final norm).
at::Tensor decode_layers(const at::Tensor& x, at::TensorList weights, at::TensorList k_cache, at::TensorList v_cache,
                         const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& mask, int64_t slot,
                         int64_t heads, int64_t kv_heads, double eps, bool qkv_bias, bool qk_norm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "decode_layers: x [B, d] bf16 on the CPU");
  const int64_t B = x.size(0), d = x.size(1), L = static_cast<int64_t>(k_cache.size());
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "decode_layers: 1 to 8 rows, got ", B);
  const int64_t per_layer = 6 + qkv_bias + 2 * qk_norm;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == per_layer * L && static_cast<int64_t>(v_cache.size()) == L,
              "decode_layers: ", per_layer, " weights and one K and V buffer per layer");
  TORCH_CHECK(L > 0 && k_cache[0].dim() == 4 && k_cache[0].size(0) == B && k_cache[0].size(1) == kv_heads,
              "decode_layers: cache buffers [B, H_kv, S_max, D]");
  const int64_t D = k_cache[0].size(3), S = mask.size(1);
  TORCH_CHECK(D % 16 == 0 && D <= 512 && heads % kv_heads == 0, "decode_layers: head_dim a multiple of 16 up to 512");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == B && mask.is_contiguous() &&
              S <= k_cache[0].size(2) && slot >= 0 && slot < k_cache[0].size(2), "decode_layers: mask [B, S <= S_max] bool, slot < S_max");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * D &&
              sin.numel() == B * D, "decode_layers: cos, sin [B, D] bf16");
  TORCH_CHECK(weights[4].dim() == 2, "decode_layers: layer 0 weight 4 has the wrong shape, dtype or layout");
  const int64_t ffn = weights[4].size(0) / 2;
  const StackShape shape{B, d, heads, kv_heads, D, ffn, S, static_cast<float>(eps)};
  const CacheLayout layout{k_cache[0].stride(0), k_cache[0].stride(1), k_cache[0].stride(2)};
  std::vector<LayerWeights> layers;
  const int64_t qkv_width = (heads + 2 * kv_heads) * D;
  std::vector<std::array<int64_t, 2>> sizes = {{d, 1}, {qkv_width, d}, {d, heads * D}, {d, 1}, {2 * ffn, d}, {d, ffn}};
  if (qkv_bias) sizes.push_back({qkv_width, 0});
  if (qk_norm) sizes.insert(sizes.end(), {{D, 0}, {D, 0}});
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = weights.data() + per_layer * l;
    for (int i = 0; i < per_layer; ++i) {
      const bool vector = i == 0 || i == 3 || i >= 6;
      TORCH_CHECK(w[i].scalar_type() == at::kBFloat16 && w[i].is_contiguous() && w[i].size(0) == sizes[i][0] &&
                  (vector ? w[i].dim() == 1 : w[i].dim() == 2 && w[i].size(1) == sizes[i][1]),
                  "decode_layers: layer ", l, " weight ", i, " has the wrong shape, dtype or layout");
    }
    for (const at::Tensor* t : {&k_cache[l], &v_cache[l]})
      TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->sizes() == k_cache[0].sizes() && t->stride(0) == layout.row &&
                  t->stride(1) == layout.head && t->stride(2) == layout.slot && t->stride(3) == 1,
                  "decode_layers: cache buffers of one shape and layout, bf16");
    const at::Tensor* norms = w + 6 + qkv_bias;
    layers.push_back({w[0].data_ptr<bf16>(), w[1].data_ptr<bf16>(), w[2].data_ptr<bf16>(), w[3].data_ptr<bf16>(),
                      w[4].data_ptr<bf16>(), w[5].data_ptr<bf16>(), qkv_bias ? w[6].data_ptr<bf16>() : nullptr,
                      qk_norm ? norms[0].data_ptr<bf16>() : nullptr, qk_norm ? norms[1].data_ptr<bf16>() : nullptr});
  }
  at::Tensor out = x.contiguous().clone();
  std::vector<at::Tensor> ks(k_cache.begin(), k_cache.end()), vs(v_cache.begin(), v_cache.end());
  bf16* xp = out.data_ptr<bf16>();
  const bf16 *cp = cos.data_ptr<bf16>(), *sp = sin.data_ptr<bf16>();
  const bool* mp = mask.data_ptr<bool>();
  layer_stack(xp, layers, ks, vs, cp, sp, mp, slot, shape, layout);
  return out;
}

}  // namespace

TORCH_LIBRARY(overfill, m) {
  m.def("one_row_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("one_row_logits(Tensor x, Tensor weight) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor cos, Tensor sin, "
        "Tensor mask, int slot, int heads, int kv_heads, float eps, bool qkv_bias, bool qk_norm) -> Tensor");
}
TORCH_LIBRARY_IMPL(overfill, CPU, m) {
  m.impl("one_row_linear", &one_row_linear);
  m.impl("one_row_logits", &one_row_logits);
  m.impl("decode_layers", &decode_layers);
}
