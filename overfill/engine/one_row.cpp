// y[M, N] = x[M, K] @ w[N, K]^T in bf16 for the few rows of a decode step (M <= 8), on AVX512-BF16.
// Each weight row is loaded once and dotted with every x row (vdpbf16ps, fp32 accumulation), so
// the product streams the weight once at memory speed; the rows are split between threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace {

constexpr int64_t kMaxRows = 8;

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

// Output rows [begin, end) in blocks of 16: per input row, 16 accumulators (one per weight row)
// over the K chunks, then one tree for their 16 sums. A block's weights (16 x K bf16) stay in L1/L2
// for the next input row, so memory is read once.
template <int M>
OVERFILL_TARGET void rows_range(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t K,
                                int64_t N, int64_t begin, int64_t end) {
  const int64_t full = K / 32;
  const int rem = static_cast<int>(K % 32);
  const __mmask32 tail = rem ? ((1u << rem) - 1) : 0;
  for (int64_t n0 = begin; n0 < end; n0 += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, end - n0));
    for (int m = 0; m < M; ++m) {
      const c10::BFloat16* xm = x + m * K;
      __m512 acc[16];
      for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t c = 0; c <= full; ++c) {
        if (c == full && !rem) break;
        const __mmask32 mask = c < full ? ~__mmask32(0) : tail;
        const __m512i xv = _mm512_maskz_loadu_epi16(mask, xm + c * 32);
        for (int r = 0; r < rows; ++r) {
          const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + (n0 + r) * K + c * 32);
          acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)xv);
        }
      }
      const __m256bh sums = _mm512_cvtneps_pbh(sum16(acc));  // round to nearest even, as c10::BFloat16
      _mm256_mask_storeu_epi16(y + m * N + n0, static_cast<__mmask16>((1u << rows) - 1), (__m256i)sums);
    }
  }
}

template <int M>
void product(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t K, int64_t N) {
  // blocks of 16 rows, at least 64 rows per thread: below that, waking a second thread costs more
  // than it saves
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) { rows_range<M>(x, w, y, K, N, begin, end); });
}

at::Tensor one_row_linear(const at::Tensor& x, const at::Tensor& weight) {
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
  at::Tensor y = at::empty({M, N}, x.options());
  const auto* xp = x2.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  auto* yp = y.data_ptr<c10::BFloat16>();
  switch (M) {
    case 1: product<1>(xp, wp, yp, K, N); break;
    case 2: product<2>(xp, wp, yp, K, N); break;
    case 3: product<3>(xp, wp, yp, K, N); break;
    case 4: product<4>(xp, wp, yp, K, N); break;
    case 5: product<5>(xp, wp, yp, K, N); break;
    case 6: product<6>(xp, wp, yp, K, N); break;
    case 7: product<7>(xp, wp, yp, K, N); break;
    default: product<8>(xp, wp, yp, K, N); break;
  }
  return y.view(sizes);
}

}  // namespace

TORCH_LIBRARY(overfill, m) { m.def("one_row_linear(Tensor x, Tensor weight) -> Tensor"); }
TORCH_LIBRARY_IMPL(overfill, CPU, m) { m.impl("one_row_linear", &one_row_linear); }
