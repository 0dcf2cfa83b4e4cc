// CPU decode kernels for the engine (loaded by runtime/cpu_kernels.py):
//   small_linear      y = x @ w.T (+ bias) for the 1-4 activation rows of a decode step;
//   rms_norm          transformers' LlamaRMSNorm in one pass; add_rms_norm: the residual add first;
//   silu_mul          SwiGLU's silu(gate) * up over a fused gate/up output;
//   decode_attention  RoPE, KV-cache write and GQA attention of one decode token per row.
//
// A decode step multiplies a few activation rows by every weight matrix once: it is bound by how fast
// the weights stream from memory, not by arithmetic. MKL's GEMV on AMD Zen streams fp32 weights at
// about half the bus bandwidth; small_linear streams them with AVX-512 (bf16 rows through vdpbf16ps, two
// bf16 products per lane, fp32 accumulation, the same arithmetic as oneDNN's bf16 matmul) and splits the
// output rows over torch's intra-op threads. Once the matmuls run at bus speed, the twenty-odd small
// tensor ops around them in each layer cost about a fifth of a step; the other kernels do their work in
// four calls with torch's arithmetic (built with -ffp-contract=off, so a*b+c rounds twice as torch does).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// Weight rows are read one after another, the whole matrix as one sequential stream (the hardware
// prefetcher's best case; interleaving several rows' short streams measured 40% slower), with 4
// independent accumulators per activation row over the reduction dimension. More than 4 activation
// rows are taken 4 at a time against the same weight row, which is then in L1: the weights still
// stream from memory once per call.
// The four cache lines 4 KiB ahead of the weight stream, into L2: on top of the hardware prefetcher
// this read the model's matrices 5-9% faster (paired runs, 2-16 KiB and L1/L2 hints tried). Past the
// matrix's end it touches nothing: prefetches never fault.
inline void prefetch_ahead(const void* at) {
  const char* p = static_cast<const char*>(at) + 4096;
  for (int line = 0; line < 4; ++line) _mm_prefetch(p + 64 * line, _MM_HINT_T1);
}

template <int B>
void dot_f32(const float* x, int64_t in, const float* wr, float* y, int64_t out) {
  __m512 acc[B][4];
  for (int b = 0; b < B; ++b)
    for (int u = 0; u < 4; ++u) acc[b][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= in; k += 64) {
    prefetch_ahead(wr + k);
    for (int u = 0; u < 4; ++u) {
      const __m512 wv = _mm512_loadu_ps(wr + k + 16 * u);
      for (int b = 0; b < B; ++b) acc[b][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * in + k + 16 * u), acc[b][u]);
    }
  }
  for (; k < in; k += 16) {  // tail: masked loads read zeros past the row's end
    const __mmask16 m = in - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in - k)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(m, wr + k);
    for (int b = 0; b < B; ++b) acc[b][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + b * in + k), acc[b][0]);
  }
  for (int b = 0; b < B; ++b)
    y[b * out] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),
                                                    _mm512_add_ps(acc[b][2], acc[b][3])));
}

template <int B>
void dot_bf16(const uint16_t* x, int64_t in, const uint16_t* wr, float* y, int64_t out) {
  __m512 acc[B][4];
  for (int b = 0; b < B; ++b)
    for (int u = 0; u < 4; ++u) acc[b][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= in; k += 128) {
    prefetch_ahead(wr + k);
    for (int u = 0; u < 4; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k + 32 * u);
      for (int b = 0; b < B; ++b)
        acc[b][u] = _mm512_dpbf16_ps(acc[b][u], wv, (__m512bh)_mm512_loadu_si512(x + b * in + k + 32 * u));
    }
  }
  for (; k < in; k += 32) {  // tail: masked loads read zeros past the row's end
    const __mmask32 m = in - k >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (in - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, wr + k);
    for (int b = 0; b < B; ++b)
      acc[b][0] = _mm512_dpbf16_ps(acc[b][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(m, x + b * in + k));
  }
  for (int b = 0; b < B; ++b)
    y[b * out] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]),
                                                    _mm512_add_ps(acc[b][2], acc[b][3])));
}

// Output rows r0:r1 for all `rows` activation rows: y[b, r] = dot(x[b], w[r]).
template <typename T, void (*D1)(const T*, int64_t, const T*, float*, int64_t),
          void (*D2)(const T*, int64_t, const T*, float*, int64_t), void (*D3)(const T*, int64_t, const T*, float*, int64_t),
          void (*D4)(const T*, int64_t, const T*, float*, int64_t)>
void rows(const T* x, int64_t nrows, int64_t in, const T* w, float* y, int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * in;
    int64_t b = 0;
    for (; b + 4 <= nrows; b += 4) D4(x + b * in, in, wr, y + b * out + r, out);
    switch (nrows - b) {
      case 3: D3(x + b * in, in, wr, y + b * out + r, out); break;
      case 2: D2(x + b * in, in, wr, y + b * out + r, out); break;
      case 1: D1(x + b * in, in, wr, y + b * out + r, out); break;
      default: break;
    }
  }
}

at::Tensor small_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "small_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "small_linear: weight must be a contiguous matrix");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "small_linear: input and weight dtypes differ");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "small_linear: float32 or bfloat16 only");
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(input.size(-1) == in, "small_linear: input has ", input.size(-1), " features, weight ", in);
  auto x = input.reshape({-1, in}).contiguous();
  const int64_t rows_n = x.size(0);
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  // fp32 results go straight to the output; bf16 ones through an fp32 scratch, then bias and one
  // rounding per element inside the same task (no extra pass over the output).
  auto result = at::empty({rows_n, out}, x.options());
  auto scratch = bf16 ? at::empty({rows_n, out}, x.options().dtype(at::kFloat)) : result;
  float* yp = scratch.mutable_data_ptr<float>();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  // Output rows split over torch's intra-op threads, at least 64 rows per task.
  at::parallel_for(0, out, 64, [&](int64_t r0, int64_t r1) {
    if (bf16) {
      const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
      const auto* wp = reinterpret_cast<const uint16_t*>(weight.const_data_ptr());
      rows<uint16_t, dot_bf16<1>, dot_bf16<2>, dot_bf16<3>, dot_bf16<4>>(xp, rows_n, in, wp, yp, out, r0, r1);
      auto* op = result.mutable_data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < rows_n; ++i)
        for (int64_t r = r0; r < r1; ++r) op[i * out + r] = at::BFloat16(yp[i * out + r] + (bp ? bp[r] : 0.f));
    } else {
      rows<float, dot_f32<1>, dot_f32<2>, dot_f32<3>, dot_f32<4>>(x.const_data_ptr<float>(), rows_n, in,
                                                                   weight.const_data_ptr<float>(), yp, out, r0, r1);
      if (bp)
        for (int64_t i = 0; i < rows_n; ++i)
          for (int64_t r = r0; r < r1; ++r) yp[i * out + r] += bp[r];
    }
  });
  auto shape = input.sizes().vec();
  shape.back() = out;
  return result.view(shape);
}

// transformers' LlamaRMSNorm of one row already in fp32: weight * T(x / sqrt(mean(x^2) + eps)), the
// normalized value rounded to T before the weight multiplies it.
template <typename T>
void norm_row(const float* row, int64_t dim, const T* w, double eps, T* o) {
  float lanes[16] = {};  // 16 partial sums: vectorizes, and sums more accurately than one
  int64_t k = 0;
  for (; k + 16 <= dim; k += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += row[k + l] * row[k + l];
  for (; k < dim; ++k) lanes[0] += row[k] * row[k];
  float ss = 0.f;
  for (float v : lanes) ss += v;
  const float scale = 1.f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
  for (int64_t k = 0; k < dim; ++k)
    o[k] = T(static_cast<float>(w[k]) * static_cast<float>(T(row[k] * scale)));
}

void check_norm(const at::Tensor& input, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), op, ": input and weight dtypes differ");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16, op,
              ": float32 or bfloat16 only");
  TORCH_CHECK(input.size(-1) == weight.numel(), op, ": input has ", input.size(-1), " features, weight ",
              weight.numel());
}

// rms_norm(x) in one pass per row instead of eight tensor ops; with `delta`, first h = T(x + delta)
// (the residual add before a norm), returned alongside the norm of h.
template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& w, double eps, at::Tensor* h,
               at::Tensor& result) {
  const int64_t dim = w.numel(), n = x.size(0);
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(dim);
    for (int64_t i = i0; i < i1; ++i) {
      const T* xr = x.const_data_ptr<T>() + i * dim;
      if (delta != nullptr) {
        const T* dr = delta->const_data_ptr<T>() + i * dim;
        T* hr = h->mutable_data_ptr<T>() + i * dim;
        for (int64_t k = 0; k < dim; ++k) {
          hr[k] = T(static_cast<float>(xr[k]) + static_cast<float>(dr[k]));
          row[k] = static_cast<float>(hr[k]);
        }
      } else {
        for (int64_t k = 0; k < dim; ++k) row[k] = static_cast<float>(xr[k]);
      }
      norm_row<T>(row.data(), dim, w.const_data_ptr<T>(), eps, result.mutable_data_ptr<T>() + i * dim);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  check_norm(input, weight, "rms_norm");
  auto x = input.reshape({-1, weight.numel()}).contiguous();
  auto w = weight.contiguous();
  auto result = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    norm_rows<at::BFloat16>(x, nullptr, w, eps, nullptr, result);
  else
    norm_rows<float>(x, nullptr, w, eps, nullptr, result);
  return result.view(input.sizes());
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input, const at::Tensor& delta,
                                                const at::Tensor& weight, double eps) {
  check_norm(input, weight, "add_rms_norm");
  TORCH_CHECK(delta.sizes() == input.sizes() && delta.scalar_type() == input.scalar_type(),
              "add_rms_norm: delta must match the input's shape and dtype");
  auto x = input.reshape({-1, weight.numel()}).contiguous();
  auto d = delta.reshape({-1, weight.numel()}).contiguous();
  auto w = weight.contiguous();
  auto h = at::empty_like(x), result = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    norm_rows<at::BFloat16>(x, &d, w, eps, &h, result);
  else
    norm_rows<float>(x, &d, w, eps, &h, result);
  return {h.view(input.sizes()), result.view(input.sizes())};
}

// 16 lanes of fp32 from p (zeros past `mask`): fp32 as is, bf16 widened exactly.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
// 16 fp32 lanes to p: fp32 as is, bf16 rounded to nearest even (at::BFloat16's rounding).
inline void store16(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }
inline void store16(at::BFloat16* p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}
// What storing to T and loading back gives: identity for fp32, one bf16 rounding for bf16.
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
inline __mmask16 lanes_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// exp of 16 lanes to about 1 ulp: x = n ln2 + r (Cody-Waite split of ln2), Cephes' degree-6 polynomial
// for e^r, then scalef multiplies by 2^n (overflow to inf, underflow to 0 as expf does).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7228394f)), _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// silu(gate) * up over the two halves of a fused gate/up output [.., 2I] -> [.., I]: torch's
// arithmetic (x / (1 + exp(-x)), each op's result rounded to T) without the split, silu and mul passes.
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t inner) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t c = 0; c < inner; c += 16) {
    const __mmask16 m = lanes_mask(inner - c);
    const __m512 g = load16(gate + c, m);
    const __m512 silu = round16<T>(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    store16(out + c, m, _mm512_mul_ps(silu, load16(up + c, m)));
  }
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_mul: CPU tensors only");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "silu_mul: float32 or bfloat16 only");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "silu_mul: last dimension must be even (gate, up)");
  const int64_t inner = gate_up.size(-1) / 2;
  auto x = gate_up.reshape({-1, 2 * inner}).contiguous();
  auto result = at::empty({x.size(0), inner}, x.options());
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, 32768 / inner), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (x.scalar_type() == at::kBFloat16) {
        const auto* in = x.const_data_ptr<at::BFloat16>() + r * 2 * inner;
        silu_mul_row<at::BFloat16>(in, in + inner, result.mutable_data_ptr<at::BFloat16>() + r * inner, inner);
      } else {
        const float* in = x.const_data_ptr<float>() + r * 2 * inner;
        silu_mul_row<float>(in, in + inner, result.mutable_data_ptr<float>() + r * inner, inner);
      }
    }
  });
  auto shape = gate_up.sizes().vec();
  shape.back() = inner;
  return result.view(shape);
}

// Rotate-half RoPE of one head, torch's arithmetic: T(T(x * cos) + T(rotate_half(x) * sin)).
template <typename T>
void rope_head(const T* x, const T* cos, const T* sin, int64_t dim, T* out) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const float rot = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
    const T a = T(static_cast<float>(x[d]) * static_cast<float>(cos[d]));
    const T b = T(rot * static_cast<float>(sin[d]));
    out[d] = T(static_cast<float>(a) + static_cast<float>(b));
  }
}

// Attention of `group` query heads (fp32 values, contiguous) over keys/values 0..n-1 of one KV head:
// scores q.k * scale, softmax in fp32, weighted sum of values, one rounding to T at the end.
template <typename T>
void attend(const float* q, int64_t group, int64_t dim, const T* keys, const T* values, int64_t n, float scale,
            float* scores, T* out) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * dim;
    float* s = scores + g * n;
    if (dim == 64) {  // the common head size: the query in four registers for every key
      const __m512 q0 = _mm512_loadu_ps(qg), q1 = _mm512_loadu_ps(qg + 16), q2 = _mm512_loadu_ps(qg + 32),
                   q3 = _mm512_loadu_ps(qg + 48);
      for (int64_t t = 0; t < n; ++t) {
        const T* kr = keys + t * dim;
        const __m512 a = _mm512_add_ps(_mm512_fmadd_ps(q1, load16(kr + 16, 0xFFFF), _mm512_mul_ps(q0, load16(kr, 0xFFFF))),
                                       _mm512_fmadd_ps(q3, load16(kr + 48, 0xFFFF), _mm512_mul_ps(q2, load16(kr + 32, 0xFFFF))));
        s[t] = _mm512_reduce_add_ps(a) * scale;
      }
    } else {
      for (int64_t t = 0; t < n; ++t) {
        const T* kr = keys + t * dim;
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += 16) {
          const __mmask16 m = lanes_mask(dim - c);
          a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qg + c), load16(kr + c, m), a);
        }
        s[t] = _mm512_reduce_add_ps(a) * scale;
      }
    }
    // softmax numerators exp(s - max) in place, and their sum
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) top = _mm512_mask_max_ps(top, lanes_mask(n - t), top,
                                                                  _mm512_maskz_loadu_ps(lanes_mask(n - t), s + t));
    const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = lanes_mask(n - t);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), max));
      _mm512_mask_storeu_ps(s + t, m, e);
      sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    // weighted values, 64 output lanes at a time held in registers across all positions
    int64_t c0 = 0;
    for (; c0 + 64 <= dim; c0 += 64) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t t = 0; t < n; ++t) {
        const __m512 p = _mm512_set1_ps(s[t]);
        const T* vr = values + t * dim + c0;
        a0 = _mm512_fmadd_ps(p, load16(vr, 0xFFFF), a0);
        a1 = _mm512_fmadd_ps(p, load16(vr + 16, 0xFFFF), a1);
        a2 = _mm512_fmadd_ps(p, load16(vr + 32, 0xFFFF), a2);
        a3 = _mm512_fmadd_ps(p, load16(vr + 48, 0xFFFF), a3);
      }
      T* o = out + g * dim + c0;
      store16(o, 0xFFFF, _mm512_div_ps(a0, total));
      store16(o + 16, 0xFFFF, _mm512_div_ps(a1, total));
      store16(o + 32, 0xFFFF, _mm512_div_ps(a2, total));
      store16(o + 48, 0xFFFF, _mm512_div_ps(a3, total));
    }
    for (; c0 < dim; c0 += 16) {  // head_dim not a multiple of 64: the rest 16 lanes at a time
      const __mmask16 m = lanes_mask(dim - c0);
      __m512 a = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) a = _mm512_fmadd_ps(_mm512_set1_ps(s[t]), load16(values + t * dim + c0, m), a);
      store16(out + g * dim + c0, m, _mm512_div_ps(a, total));
    }
  }
}

template <typename T>
void decode_attention_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* slots,
                           const int64_t* positions, int64_t heads, int64_t kv_heads, double scale,
                           at::Tensor& result) {
  const int64_t rows = qkv.size(0), dim = k_cache.size(3), max_len = k_cache.size(2);
  const int64_t width = (heads + 2 * kv_heads) * dim, group = heads / kv_heads;
  const T* src = qkv.const_data_ptr<T>();
  T* kc = k_cache.mutable_data_ptr<T>();
  T* vc = v_cache.mutable_data_ptr<T>();
  // RoPE'd queries (fp32 holding T values), and this token's keys and values into the cache.
  std::vector<float> queries(rows * heads * dim);
  std::vector<T> rotated(dim);
  for (int64_t b = 0; b < rows; ++b) {
    const T* row = src + b * width;
    const T* c = cos.const_data_ptr<T>() + b * dim;
    const T* s = sin.const_data_ptr<T>() + b * dim;
    for (int64_t h = 0; h < heads; ++h) {
      rope_head<T>(row + h * dim, c, s, dim, rotated.data());
      for (int64_t d = 0; d < dim; ++d) queries[(b * heads + h) * dim + d] = static_cast<float>(rotated[d]);
    }
    for (int64_t j = 0; j < kv_heads; ++j) {
      const int64_t at = ((slots[b] * kv_heads + j) * max_len + positions[b]) * dim;
      rope_head<T>(row + (heads + j) * dim, c, s, dim, kc + at);
      std::copy_n(row + (heads + kv_heads + j) * dim, dim, vc + at);
    }
  }
  int64_t work = 0;
  for (int64_t b = 0; b < rows; ++b) work += (positions[b] + 1) * heads * dim;
  // One task per (row, KV head); below ~64K multiply-adds a thread hand-off costs more than it saves.
  const int64_t tasks = rows * kv_heads;
  at::parallel_for(0, tasks, work < 65536 ? tasks : 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / kv_heads, j = task % kv_heads, n = positions[b] + 1;
      scores.resize(group * n);
      const int64_t base = (slots[b] * kv_heads + j) * max_len * dim;
      attend<T>(queries.data() + (b * heads + j * group) * dim, group, dim, kc + base, vc + base, n,
                static_cast<float>(scale), scores.data(), result.mutable_data_ptr<T>() + (b * heads + j * group) * dim);
    }
  });
}

// One decode token per row b: RoPE on its query and key heads (fused q|k|v projection output, q and k
// heads adjacent), its key and value written to cache slot slots[b] at position positions[b], then
// each query head attends over that slot's positions 0..positions[b] (GQA: `heads / kv_heads` query
// heads share a KV head). Replaces rotate-half, the cache writes and scaled_dot_product_attention:
// about twenty tensor ops per layer, each costing more than the arithmetic at one token.
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                            const at::Tensor& positions, int64_t heads, int64_t kv_heads, double scale) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_attention: float32 or bfloat16 only");
  for (const auto* t : {&qkv, &cos, &sin, &k_cache, &v_cache, &slots, &positions})
    TORCH_CHECK(t->device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "decode_attention: caches must be contiguous [slots, kv_heads, max_len, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype,
              "decode_attention: qkv, cos, sin and the caches must share one dtype");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && k_cache.size(1) == kv_heads,
              "decode_attention: ", heads, " query heads cannot share ", kv_heads, " KV heads");
  const int64_t dim = k_cache.size(3), rows = slots.numel();
  TORCH_CHECK(dim % 2 == 0, "decode_attention: head_dim must be even for RoPE");
  auto x = qkv.reshape({-1, (heads + 2 * kv_heads) * dim}).contiguous();
  TORCH_CHECK(x.size(0) == rows && positions.numel() == rows, "decode_attention: ", x.size(0),
              " rows of qkv for ", rows, " slots and ", positions.numel(), " positions");
  auto c = cos.reshape({-1, dim}).contiguous(), s = sin.reshape({-1, dim}).contiguous();
  TORCH_CHECK(c.size(0) == rows && s.size(0) == rows, "decode_attention: one cos/sin row per token");
  auto sl = slots.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t* sp = sl.const_data_ptr<int64_t>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(0 <= sp[b] && sp[b] < k_cache.size(0), "decode_attention: slot ", sp[b], " out of range");
    TORCH_CHECK(0 <= pp[b] && pp[b] < k_cache.size(2), "decode_attention: position ", pp[b], " out of range");
    for (int64_t a = 0; a < b; ++a)
      TORCH_CHECK(sp[a] != sp[b], "decode_attention: slot ", sp[b], " appears twice");
  }
  auto result = at::empty({rows, heads * dim}, x.options());
  if (dtype == at::kBFloat16)
    decode_attention_impl<at::BFloat16>(x, c, s, k_cache, v_cache, sp, pp, heads, kv_heads, scale, result);
  else
    decode_attention_impl<float>(x, c, s, k_cache, v_cache, sp, pp, heads, kv_heads, scale, result);
  return result;
}

}  // namespace

TORCH_LIBRARY(largemodel, m) {
  m.def("small_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor input, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor positions, int heads, int kv_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(largemodel, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attention", &decode_attention);
}
