// largemodel::small_linear: y = x @ w.T (+ bias) for the few rows of a decode step, on CPU.
//
// A decode step multiplies a few activation rows by every weight matrix once: it is bound by how fast
// the weights stream from memory, not by arithmetic. MKL's GEMV on AMD Zen streams fp32 weights at
// about half the bus bandwidth and oneDNN's bf16 path at less; this kernel streams them with AVX-512 (bf16 rows through vdpbf16ps, two bf16 products per lane, fp32 accumulation, the
// same arithmetic as oneDNN's bf16 matmul) and splits the output rows over torch's intra-op threads.
// Python calls it only where it measured faster (fp32 <= 8 rows, bf16 <= 4), fp32 or bf16, when the CPU has the instructions; everything
// else goes to F.linear.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Weight rows are read one after another, the whole matrix as one sequential stream (the hardware
// prefetcher's best case; interleaving several rows' short streams measured 40% slower), with 4
// independent accumulators per activation row over the reduction dimension. More than 4 activation
// rows are taken 4 at a time against the same weight row, which is then in L1: the weights still
// stream from memory once per call.
template <int B>
void dot_f32(const float* x, int64_t in, const float* wr, float* y, int64_t out) {
  __m512 acc[B][4];
  for (int b = 0; b < B; ++b)
    for (int u = 0; u < 4; ++u) acc[b][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= in; k += 64)
    for (int u = 0; u < 4; ++u) {
      const __m512 wv = _mm512_loadu_ps(wr + k + 16 * u);
      for (int b = 0; b < B; ++b) acc[b][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * in + k + 16 * u), acc[b][u]);
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
  for (; k + 128 <= in; k += 128)
    for (int u = 0; u < 4; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k + 32 * u);
      for (int b = 0; b < B; ++b)
        acc[b][u] = _mm512_dpbf16_ps(acc[b][u], wv, (__m512bh)_mm512_loadu_si512(x + b * in + k + 32 * u));
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

// weight * (x / sqrt(mean(x^2) + eps)), computed in fp32 and rounded to x's dtype before the weight
// multiplies it: transformers' LlamaRMSNorm, in one pass per row instead of eight tensor ops.
at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "rms_norm: input and weight dtypes differ");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16,
              "rms_norm: float32 or bfloat16 only");
  const int64_t dim = weight.numel();
  TORCH_CHECK(input.size(-1) == dim, "rms_norm: input has ", input.size(-1), " features, weight ", dim);
  auto x = input.reshape({-1, dim}).contiguous();
  auto w = weight.contiguous();
  auto result = at::empty_like(x);
  const int64_t n = x.size(0);
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(dim);
    for (int64_t i = i0; i < i1; ++i) {
      if (x.scalar_type() == at::kBFloat16) {
        const auto* xr = x.const_data_ptr<at::BFloat16>() + i * dim;
        for (int64_t k = 0; k < dim; ++k) row[k] = static_cast<float>(xr[k]);
      } else {
        std::copy_n(x.const_data_ptr<float>() + i * dim, dim, row.data());
      }
      float lanes[16] = {};  // 16 partial sums: vectorizes, and sums more accurately than one
      int64_t k = 0;
      for (; k + 16 <= dim; k += 16)
        for (int l = 0; l < 16; ++l) lanes[l] += row[k + l] * row[k + l];
      for (; k < dim; ++k) lanes[0] += row[k] * row[k];
      float ss = 0.f;
      for (float v : lanes) ss += v;
      const float scale = 1.f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
      if (x.scalar_type() == at::kBFloat16) {
        const auto* wr = w.const_data_ptr<at::BFloat16>();
        auto* o = result.mutable_data_ptr<at::BFloat16>() + i * dim;
        for (int64_t k = 0; k < dim; ++k)
          o[k] = at::BFloat16(static_cast<float>(wr[k]) * static_cast<float>(at::BFloat16(row[k] * scale)));
      } else {
        const float* wr = w.const_data_ptr<float>();
        float* o = result.mutable_data_ptr<float>() + i * dim;
        for (int64_t k = 0; k < dim; ++k) o[k] = wr[k] * (row[k] * scale);
      }
    }
  });
  return result.view(input.sizes());
}

}  // namespace

TORCH_LIBRARY(largemodel, m) {
  m.def("small_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(largemodel, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("rms_norm", &rms_norm);
}
