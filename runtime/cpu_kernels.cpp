// CPU decode kernels for the engine (loaded by runtime/cpu_kernels.py):
//   small_linear      y = x @ w.T (+ bias) for the few activation rows of a decode step;
//   int8_linear       the same for an int8 weight with one fp32 scale per output row (weight-only int8);
//   q4_1_linear       the same for a weight in GGML Q4_1 blocks (GGUF's bytes), fp32 activations kept;
//   q8_0_linear       and for GGML Q8_0 blocks;
//   rms_norm          transformers' LlamaRMSNorm in one pass; add_rms_norm: the residual add first;
//   silu_mul          SwiGLU's silu(gate) * up over a fused gate/up output;
//   decode_attention  RoPE, paged KV-cache write and GQA attention of one decode token per row;
//   decode_layers     a stage's decoder layers for one decode token per row, the above in one call.
//
// One source, compiled once per instruction-set level (cpu_kernels.py picks the best the CPU runs):
//   -DLARGEMODEL_ISA_AVX512  -mavx512f -mavx512bw -mavx512vl -mfma -mf16c  16 fp32 lanes per vector
//   -DLARGEMODEL_ISA_AVX2    -mavx2 -mfma -mf16c                              8 lanes
//   -DLARGEMODEL_ISA_NEON    aarch64's baseline Advanced SIMD                 4 lanes
//   -DLARGEMODEL_ISA_GENERIC no ISA flags (SSE2 on x86-64)                    4 lanes, no fused multiply-add
// The arithmetic is written once with GCC/Clang vector extensions (`vf` below: W fp32 lanes); the only
// per-level code is the fused multiply-add (`vfma`), which the vector extensions cannot spell, and the
// widening of int8/nibble/fp16 weights (GCC scalarizes those conversions from vector extensions). Each
// level registers its ops under its own namespace (torch.ops.largemodel_avx2, ...), so several levels
// can be loaded into one process and tested against each other and against torch.
//
// A decode step multiplies a few activation rows by every weight matrix once: it is bound by how fast
// the weights stream from memory, not by arithmetic. small_linear streams the weights with fp32 FMAs
// (bf16 weights widened to fp32 by a 16-bit shift, which is exact, products exact in fp32, fp32
// accumulation) and splits the output rows over torch's intra-op threads. Once the matmuls run at bus
// speed, the twenty-odd small tensor ops around them in each layer cost about a fifth of a step; the
// other kernels do their work in four calls with torch's arithmetic (built with -ffp-contract=off, so
// a*b+c rounds twice as torch does; vfma is used only where torch's result is not bit-for-bit defined
// anyway: dot products, exp's polynomial).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(LARGEMODEL_ISA_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__FMA__)
#error "LARGEMODEL_ISA_AVX512 needs -mavx512f -mavx512bw -mavx512vl -mfma"
#endif
#include <immintrin.h>
constexpr int W = 16, REGS = 32;
#elif defined(LARGEMODEL_ISA_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "LARGEMODEL_ISA_AVX2 needs -mavx2 -mfma"
#endif
#include <immintrin.h>
constexpr int W = 8, REGS = 16;
#elif defined(LARGEMODEL_ISA_NEON)
#if !defined(__ARM_NEON) || !defined(__aarch64__)
#error "LARGEMODEL_ISA_NEON is for aarch64"
#endif
#include <arm_neon.h>
constexpr int W = 4, REGS = 32;
#elif defined(LARGEMODEL_ISA_GENERIC)
constexpr int W = 4, REGS = 16;
#else
#error "define one of LARGEMODEL_ISA_AVX512, _AVX2, _NEON, _GENERIC (cpu_kernels.py does)"
#endif
#ifndef LARGEMODEL_NS
#error "define LARGEMODEL_NS, the torch.ops namespace of this level (cpu_kernels.py does)"
#endif

namespace {

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

// a * b + c with one rounding where the level has a fused multiply-add, two roundings otherwise.
inline vf vfma(vf a, vf b, vf c) {
#if defined(LARGEMODEL_ISA_AVX512)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(LARGEMODEL_ISA_AVX2)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(LARGEMODEL_ISA_NEON)
  return (vf)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
#else
  return a * b + c;
#endif
}

inline vf splat(float v) { return vf{} + v; }
inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// bf16 -> fp32 is exact: the 16 bits become the high half of the fp32 word.
inline vf widen(vh h) {
  const vu u = __builtin_convertvector(h, vu) << 16;
  return (vf)u;
}
inline vf loadv(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return widen(h);
}
inline vf loadv(const at::BFloat16* p) { return loadv(reinterpret_cast<const uint16_t*>(p)); }
// int8 -> fp32 is exact (sign-extend, convert): an int8 weight row streams at a quarter of fp32's bytes.
// Per level, like vfma: GCC 12 scalarizes __builtin_convertvector from an 8- or 16-byte int8 vector.
inline vf loadv(const int8_t* p) {
#if defined(LARGEMODEL_ISA_AVX512)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(LARGEMODEL_ISA_AVX2)
  return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#elif defined(LARGEMODEL_ISA_NEON)
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  const int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(word)));
  return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
#else
  vi v;
  for (int i = 0; i < W; ++i) v[i] = p[i];
  return __builtin_convertvector(v, vf);
#endif
}
// fp32 -> bf16 rounded to nearest even, NaN to the quiet 0x7FC0: at::BFloat16's conversion, W lanes at once.
inline vh narrow(vf v) {
  const vu u = (vu)v;
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = v != v ? vu{} + 0x7FC0u : r;
  return __builtin_convertvector(r, vh);
}
inline void storev(at::BFloat16* p, vf v) {
  const vh h = narrow(v);
  std::memcpy(p, &h, sizeof h);
}
// What storing to T and loading back gives: identity for fp32, one bf16 rounding for bf16.
template <typename T>
inline vf roundv(vf v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return widen(narrow(v));
}
// The first n (< W) lanes from p, zeros after; and their store.
template <typename T>
inline vf load_part(const T* p, int64_t n) {
  T buf[W] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return loadv(buf);
}
template <typename T>
inline void store_part(T* p, int64_t n, vf v) {
  T buf[W];
  storev(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}
// Pairwise: lanes i and i + W/2, then halves again, in registers (the same additions in the same order
// as the generic loop, so every level sums alike). The loop through memory that GCC made of the generic
// form cost ~40 cycles of store forwarding per output row: a quarter of a 576-wide Q4_1 row's time.
inline float hsum(vf v) {
#if defined(LARGEMODEL_ISA_AVX512) || defined(LARGEMODEL_ISA_AVX2)
#if defined(LARGEMODEL_ISA_AVX512)
  const __m512 z = (__m512)v;
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(z),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
#else
  const __m256 a = (__m256)v;
#endif
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
  return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
#elif defined(LARGEMODEL_ISA_NEON)
  const float32x2_t a = vadd_f32(vget_low_f32((float32x4_t)v), vget_high_f32((float32x4_t)v));
  return vget_lane_f32(a, 0) + vget_lane_f32(a, 1);
#else
  float s[W];
  std::memcpy(s, &v, sizeof v);
  for (int w = W / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
#endif
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

// Weight rows are read one after another, the whole matrix as one sequential stream (the hardware
// prefetcher's best case; interleaving several rows' short streams measured 40% slower), with U
// independent accumulators per activation row over the reduction dimension. More than 4 activation
// rows are taken 4 at a time against the same weight row, which is then in L1: the weights still
// stream from memory once per call.
// A cache line 4 KiB ahead of the weight stream, into L2, per 64 bytes read: on top of the hardware
// prefetcher this read the model's matrices 5-9% faster on AVX-512 (paired runs, 2-16 KiB and L1/L2
// hints tried). Past the matrix's end it touches nothing: prefetches never fault.
template <typename WT>
inline void prefetch_ahead(const WT* at, int bytes) {
  const char* p = reinterpret_cast<const char*>(at) + 4096;
  for (int line = 0; line < bytes; line += 64) __builtin_prefetch(p + line, 0, 2);
}

// y[b * out] = dot(x[b], wr) for B activation rows (fp32, already widened) against one weight row.
template <int B, typename WT>
void dot(const float* x, int64_t in, const WT* wr, float* y, int64_t out) {
  constexpr int U = B * 4 + 2 <= REGS ? 4 : 2;  // accumulators per row that fit the register file
  vf acc[B][U];
  for (int b = 0; b < B; ++b)
    for (int u = 0; u < U; ++u) acc[b][u] = vf{};
  int64_t k = 0;
  for (; k + U * W <= in; k += U * W) {
    prefetch_ahead(wr + k, std::max<int>(64, U * W * sizeof(WT)));
    for (int u = 0; u < U; ++u) {
      const vf wv = loadv(wr + k + W * u);
      for (int b = 0; b < B; ++b) acc[b][u] = vfma(wv, loadv(x + b * in + k + W * u), acc[b][u]);
    }
  }
  for (; k + W <= in; k += W) {
    const vf wv = loadv(wr + k);
    for (int b = 0; b < B; ++b) acc[b][0] = vfma(wv, loadv(x + b * in + k), acc[b][0]);
  }
  if (k < in) {  // tail: zeros past the row's end
    const vf wv = load_part(wr + k, in - k);
    for (int b = 0; b < B; ++b) acc[b][0] = vfma(wv, load_part(x + b * in + k, in - k), acc[b][0]);
  }
  for (int b = 0; b < B; ++b) {
    vf s = acc[b][0];
    for (int u = 1; u < U; ++u) s += acc[b][u];
    y[b * out] = hsum(s);
  }
}

// Output rows r0:r1 for all `nrows` activation rows: y[b, r] = dot(x[b], w[r]).
template <typename WT>
void rows(const float* x, int64_t nrows, int64_t in, const WT* w, float* y, int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const WT* wr = w + r * in;
    int64_t b = 0;
    for (; b + 4 <= nrows; b += 4) dot<4>(x + b * in, in, wr, y + b * out + r, out);
    switch (nrows - b) {
      case 3: dot<3>(x + b * in, in, wr, y + b * out + r, out); break;
      case 2: dot<2>(x + b * in, in, wr, y + b * out + r, out); break;
      case 1: dot<1>(x + b * in, in, wr, y + b * out + r, out); break;
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
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  // Activations in fp32 (bf16 ones widened once here, exactly); fp32 results go straight to the
  // output, bf16 ones through an fp32 scratch, then bias and one rounding per element inside the same
  // task (no extra pass over the output).
  auto x = input.reshape({-1, in}).to(at::kFloat).contiguous();
  const int64_t rows_n = x.size(0);
  auto result = at::empty({rows_n, out}, input.options());
  auto scratch = bf16 ? at::empty({rows_n, out}, x.options()) : result;
  float* yp = scratch.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  // Output rows split over torch's intra-op threads, at least 64 rows per task.
  at::parallel_for(0, out, 64, [&](int64_t r0, int64_t r1) {
    if (bf16) {
      rows(xp, rows_n, in, reinterpret_cast<const uint16_t*>(weight.const_data_ptr()), yp, out, r0, r1);
      auto* op = result.mutable_data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < rows_n; ++i)
        for (int64_t r = r0; r < r1; ++r) op[i * out + r] = at::BFloat16(yp[i * out + r] + (bp ? bp[r] : 0.f));
    } else {
      rows(xp, rows_n, in, weight.const_data_ptr<float>(), yp, out, r0, r1);
      if (bp)
        for (int64_t i = 0; i < rows_n; ++i)
          for (int64_t r = r0; r < r1; ++r) yp[i * out + r] += bp[r];
    }
  });
  auto shape = input.sizes().vec();
  shape.back() = out;
  return result.view(shape);
}

// y = (x @ w.T) * scale[r] (+ bias) for an int8 weight [out, in] and fp32 per-output-row scales [out]:
// weight-only int8 (per-channel symmetric). The int8 row widens to fp32 in registers (exact), FMAs
// against the fp32 activations like small_linear, and the row's sum is multiplied by its scale once at
// the end; output rows are split over torch's intra-op threads as small_linear's are. Any row count
// works (more than 4 rows are taken 4 at a time against the weight row, then in L1).
at::Tensor int8_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu() && scale.device().is_cpu(),
              "int8_linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kChar,
              "int8_linear: weight must be a contiguous int8 matrix");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16,
              "int8_linear: float32 or bfloat16 activations only");
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(input.size(-1) == in, "int8_linear: input has ", input.size(-1), " features, weight ", in);
  TORCH_CHECK(scale.numel() == out, "int8_linear: ", scale.numel(), " scales for ", out, " output rows");
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  auto x = input.reshape({-1, in}).to(at::kFloat).contiguous();
  const int64_t rows_n = x.size(0);
  auto result = at::empty({rows_n, out}, input.options());
  auto scratch = bf16 ? at::empty({rows_n, out}, x.options()) : result;
  float* yp = scratch.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  auto s = scale.to(at::kFloat).contiguous();
  const float* sp = s.const_data_ptr<float>();
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const auto* wp = weight.const_data_ptr<int8_t>();
  at::parallel_for(0, out, 64, [&](int64_t r0, int64_t r1) {
    rows(xp, rows_n, in, wp, yp, out, r0, r1);
    for (int64_t i = 0; i < rows_n; ++i)
      for (int64_t r = r0; r < r1; ++r) yp[i * out + r] = yp[i * out + r] * sp[r] + (bp ? bp[r] : 0.f);
    if (bf16) {
      auto* op = result.mutable_data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < rows_n; ++i)
        for (int64_t r = r0; r < r1; ++r) op[i * out + r] = at::BFloat16(yp[i * out + r]);
    }
  });
  auto shape = input.sizes().vec();
  shape.back() = out;
  return result.view(shape);
}

// GGML Q4_1 / Q8_0 blocks (cpu_kernels.py, "GGML block formats"): a weight [out, in] is uint8
// [out, (in / 32) * bytes], each row its blocks along `in` as a GGUF file stores them.
//   Q4_1, 20 bytes: fp16 d, fp16 m, 16 bytes qs; weight j = d * q_j + m, q_j the low nibble of qs[j]
//         for j < 16, the high nibble of qs[j - 16] otherwise.
//   Q8_0, 34 bytes: fp16 d, 32 int8 qs; weight j = d * qs[j].
// The activations stay fp32 (no int8 quantization of x, unlike ggml's own dot products): each block's
// 32 integers widen to fp32 in registers once (exact), FMA against every activation row's 32 values,
// and the block's sum is scaled by d once (d * sum q_j x_j); Q4_1's offset adds m * sum x_j with the
// per-block activation sums computed once per call. The result is x @ W.T to fp32 rounding, W the
// weight ggml_dequantize gives.
constexpr int QV = 32 / W;  // fp32 vectors per 32-weight block

// Scalar a * b + c, one rounding where the level has FMA (GCC inlines it there), two otherwise.
inline float sfma(float a, float b, float c) {
#if defined(LARGEMODEL_ISA_GENERIC)
  return a * b + c;
#else
  return __builtin_fmaf(a, b, c);
#endif
}

inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

typedef float v4 __attribute__((vector_size(16)));
inline v4 load4(const float* p) {
  v4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v4 fma4(v4 a, v4 b, v4 c) {
#if defined(LARGEMODEL_ISA_AVX512) || defined(LARGEMODEL_ISA_AVX2)
  return (v4)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
#elif defined(LARGEMODEL_ISA_NEON)
  return (v4)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
#else
  return a * b + c;
#endif
}

// The block's d in all W lanes and m in all 4 lanes of a v4, from the two fp16 words at its start
// (Q8_0 has no m: its second word is qs[0..1], converted and ignored). Built as vectors directly:
// a float's splat (`vf{} + d`) costs an add that cannot fold away (-0 + 0 is +0) and an extra shuffle.
inline void block_scales(const uint8_t* blk, vf& d, v4& m) {
#if defined(LARGEMODEL_ISA_AVX512) || defined(LARGEMODEL_ISA_AVX2)
  const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load32(blk))));
#if defined(LARGEMODEL_ISA_AVX512)
  d = (vf)_mm512_broadcastss_ps(dm);
#else
  d = (vf)_mm256_broadcastss_ps(dm);
#endif
  m = (v4)_mm_permute_ps(dm, 0x55);
#elif defined(LARGEMODEL_ISA_NEON)
  const float32x4_t dm = vcvt_f32_f16(vreinterpret_f16_u32(vdup_n_u32(load32(blk))));
  d = (vf)vdupq_laneq_f32(dm, 0);
  m = (v4)vdupq_laneq_f32(dm, 1);
#else
  uint16_t h[2];
  std::memcpy(h, blk, sizeof h);
  const float df = static_cast<float>(c10::Half(h[0], c10::Half::from_bits()));
  const float mf = static_cast<float>(c10::Half(h[1], c10::Half::from_bits()));
  for (int i = 0; i < W; ++i) d[i] = df;
  m = v4{mf, mf, mf, mf};
#endif
}

// The 32 integers of a Q4_1 block (qs at p), in weight order, as QV fp32 vectors.
inline void decode_q4_1(const uint8_t* p, vf (&q)[QV]) {
#if defined(LARGEMODEL_ISA_AVX512)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  q[0] = (vf)_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  q[1] = (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
#elif defined(LARGEMODEL_ISA_AVX2)
  // Widened first, then split: one byte per 32-bit lane, so `>> 4` needs no mask.
  const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  const __m256i low = _mm256_set1_epi32(15);
  q[0] = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(v0, low));
  q[1] = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(v1, low));
  q[2] = (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
  q[3] = (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
#elif defined(LARGEMODEL_ISA_NEON)
  const uint8x16_t v = vld1q_u8(p);
  const uint8x16_t halves[2] = {vandq_u8(v, vdupq_n_u8(15)), vshrq_n_u8(v, 4)};
  for (int h = 0; h < 2; ++h) {
    const uint16x8_t a = vmovl_u8(vget_low_u8(halves[h])), b = vmovl_high_u8(halves[h]);
    q[4 * h] = (vf)vcvtq_f32_u32(vmovl_u16(vget_low_u16(a)));
    q[4 * h + 1] = (vf)vcvtq_f32_u32(vmovl_high_u16(a));
    q[4 * h + 2] = (vf)vcvtq_f32_u32(vmovl_u16(vget_low_u16(b)));
    q[4 * h + 3] = (vf)vcvtq_f32_u32(vmovl_high_u16(b));
  }
#else
  for (int v = 0; v < QV; ++v) {
    vi n;
    for (int i = 0; i < W; ++i) {
      const int j = v * W + i;
      n[i] = j < 16 ? p[j] & 15 : p[j - 16] >> 4;
    }
    q[v] = __builtin_convertvector(n, vf);
  }
#endif
}

// The 32 int8 of a Q8_0 block (qs at p) as QV fp32 vectors.
inline void decode_q8_0(const uint8_t* p, vf (&q)[QV]) {
#if defined(LARGEMODEL_ISA_NEON)
  for (int h = 0; h < 2; ++h) {
    const int8x16_t v = vld1q_s8(reinterpret_cast<const int8_t*>(p) + 16 * h);
    const int16x8_t a = vmovl_s8(vget_low_s8(v)), b = vmovl_high_s8(v);
    q[4 * h] = (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(a)));
    q[4 * h + 1] = (vf)vcvtq_f32_s32(vmovl_high_s16(a));
    q[4 * h + 2] = (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(b)));
    q[4 * h + 3] = (vf)vcvtq_f32_s32(vmovl_high_s16(b));
  }
#else
  for (int v = 0; v < QV; ++v) q[v] = loadv(reinterpret_cast<const int8_t*>(p) + v * W);  // int8 loadv above
#endif
}

struct Q4_1 {
  static constexpr int bytes = 20, head = 4;
  static constexpr bool has_min = true;
  static void decode(const uint8_t* blk, vf (&q)[QV]) { decode_q4_1(blk + head, q); }
};
struct Q8_0 {
  static constexpr int bytes = 34, head = 2;
  static constexpr bool has_min = false;
  static void decode(const uint8_t* blk, vf (&q)[QV]) { decode_q8_0(blk + head, q); }
};

// y[b * out] = dot(x[b], w) for B <= 4 activation rows (fp32, `in` = 32 nb apart) against one quantized
// row of nb blocks. xs (Q4_1 only): the 4-row group's per-block activation sums, [nb][4] (rows past B
// zero), so the m term of all B rows is one 4-lane FMA per block. One activation row takes its blocks
// in pairs into two accumulators, so a block's FMA does not wait on the previous block's.
template <int B, typename K>
void qdot(const float* x, const float* xs, int64_t nb, const uint8_t* wr, float* y, int64_t out) {
  constexpr int U = B == 1 ? 2 : 1;
  const int64_t in = nb * 32;
  vf tot[U][B];
  v4 mt[U];
  for (int u = 0; u < U; ++u) {
    for (int b = 0; b < B; ++b) tot[u][b] = vf{};
    mt[u] = v4{};
  }
  auto step = [&](int64_t k, vf (&t)[B], v4& mk) {
    const uint8_t* blk = wr + k * K::bytes;
    vf q[QV], dv;
    v4 mv;
    block_scales(blk, dv, mv);
    K::decode(blk, q);
    for (int b = 0; b < B; ++b) {
      const float* xb = x + b * in + k * 32;
      vf s = q[0] * loadv(xb);  // one chain per block: blocks overlap, out of order
      for (int v = 1; v < QV; ++v) s = vfma(q[v], loadv(xb + v * W), s);
      t[b] = vfma(dv, s, t[b]);
    }
    if constexpr (K::has_min) mk = fma4(mv, load4(xs + k * 4), mk);
  };
  int64_t k = 0;
  for (; k + U <= nb; k += U) {
    prefetch_ahead(wr + k * K::bytes, U * K::bytes);  // one line per 64 bytes (not one per block)
    for (int u = 0; u < U; ++u) step(k + u, tot[u], mt[u]);
  }
  if (k < nb) step(k, tot[0], mt[0]);
  v4 msum = mt[0];
  for (int u = 1; u < U; ++u) msum += mt[u];
  for (int b = 0; b < B; ++b) {
    vf s = tot[0][b];
    for (int u = 1; u < U; ++u) s += tot[u][b];
    y[b * out] = hsum(s) + msum[b];
  }
}

// Output rows r0:r1 for all `nrows` activation rows, 4 at a time against each weight row (then in L1);
// xs: per 4-row group, its [nb][4] block sums (see qdot).
template <typename K>
void qrows(const float* x, const float* xs, int64_t nrows, int64_t nb, const uint8_t* w, float* y, int64_t out,
           int64_t r0, int64_t r1) {
  const int64_t in = nb * 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wr = w + r * nb * K::bytes;
    int64_t b = 0;
    for (; b + 4 <= nrows; b += 4) qdot<4, K>(x + b * in, xs + b * nb, nb, wr, y + b * out + r, out);
    switch (nrows - b) {
      case 3: qdot<3, K>(x + b * in, xs + b * nb, nb, wr, y + b * out + r, out); break;
      case 2: qdot<2, K>(x + b * in, xs + b * nb, nb, wr, y + b * out + r, out); break;
      case 1: qdot<1, K>(x + b * in, xs + b * nb, nb, wr, y + b * out + r, out); break;
      default: break;
    }
  }
}

// y = x @ W.T (+ bias) for a GGML-block weight W (Q4_1 or Q8_0, see above): fp32 or bf16 activations
// of any leading shape, output in their dtype (bf16: one rounding of the fp32 result), output rows
// split over torch's intra-op threads like small_linear's.
template <typename K>
at::Tensor ggml_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const char* name) {
  TORCH_CHECK(input.device().is_cpu() && weight.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kByte, name,
              ": weight must be a contiguous uint8 matrix of blocks");
  TORCH_CHECK(weight.size(1) % K::bytes == 0, name, ": weight rows of ", weight.size(1), " bytes are not whole ",
              K::bytes, "-byte blocks");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16, name,
              ": float32 or bfloat16 activations only");
  const int64_t nb = weight.size(1) / K::bytes, in = nb * 32, out = weight.size(0);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in, name, ": input has ", input.size(-1), " features, weight ",
              in);
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->numel() == out, name, ": ", bias->numel(), " bias values for ", out, " output rows");
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  auto x = input.reshape({-1, in}).to(at::kFloat).contiguous();
  const int64_t rows_n = x.size(0);
  auto result = at::empty({rows_n, out}, input.options());
  auto scratch = bf16 ? at::empty({rows_n, out}, x.options()) : result;
  float* yp = scratch.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  // Q4_1's m term: each activation row's per-block sums, per group of 4 rows as [nb][4] (zero-padded).
  const int64_t groups = (rows_n + 3) / 4;
  std::vector<float> sums(K::has_min ? groups * nb * 4 : 0, 0.f);
  if (K::has_min)
    for (int64_t i = 0; i < rows_n; ++i)
      for (int64_t k = 0; k < nb; ++k) {
        const float* blk = xp + i * in + k * 32;
        vf s = vf{};
        for (int v = 0; v < QV; ++v) s += loadv(blk + v * W);
        sums[(i / 4 * nb + k) * 4 + i % 4] = hsum(s);
      }
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  const auto* wp = weight.const_data_ptr<uint8_t>();
  at::parallel_for(0, out, 64, [&](int64_t r0, int64_t r1) {
    qrows<K>(xp, sums.data(), rows_n, nb, wp, yp, out, r0, r1);
    if (bp)
      for (int64_t i = 0; i < rows_n; ++i)
        for (int64_t r = r0; r < r1; ++r) yp[i * out + r] += bp[r];
    if (bf16) {
      auto* op = result.mutable_data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < rows_n; ++i)
        for (int64_t r = r0; r < r1; ++r) op[i * out + r] = at::BFloat16(yp[i * out + r]);
    }
  });
  auto shape = input.sizes().vec();
  shape.back() = out;
  return result.view(shape);
}

at::Tensor q4_1_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return ggml_linear<Q4_1>(input, weight, bias, "q4_1_linear");
}

at::Tensor q8_0_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return ggml_linear<Q8_0>(input, weight, bias, "q8_0_linear");
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

// exp of W lanes to about 1 ulp: x = n ln2 + r (Cody-Waite split of ln2), Cephes' degree-6 polynomial
// for e^r, then times 2^n in two exact power-of-two steps (overflow to inf, underflow through the
// subnormals to 0 as expf does). NaN stays NaN.
inline vf vexp(vf x) {
  x = x > splat(88.7228394f) ? splat(88.7228394f) : x;
  x = x < splat(-104.f) ? splat(-104.f) : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding and subtracting it rounds to nearest even
  const vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f);  // exact: n has at most 8 bits, the constant 9
  r = vfma(n, splat(2.12194440e-4f), r);
  vf p = splat(1.9875691500e-4f);
  p = vfma(p, r, splat(1.3981999507e-3f));
  p = vfma(p, r, splat(8.3334519073e-3f));
  p = vfma(p, r, splat(4.1665795894e-2f));
  p = vfma(p, r, splat(1.6666665459e-1f));
  p = vfma(p, r, splat(5.0000001201e-1f));
  p = vfma(p, r * r, r + splat(1.f));
  const vi ni = __builtin_convertvector(n, vi), half = ni >> 1;
  const vf lo = (vf)((half + 127) << 23), hi = (vf)((ni - half + 127) << 23);
  return p * lo * hi;
}

// silu(gate) * up over the two halves of a fused gate/up output [.., 2I] -> [.., I]: torch's
// arithmetic (x / (1 + exp(-x)), each op's result rounded to T) without the split, silu and mul passes.
template <typename T>
inline vf silu_mul_v(vf g, vf u) {
  return roundv<T>(g / (splat(1.f) + vexp(-g))) * u;
}
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t inner) {
  int64_t c = 0;
  for (; c + W <= inner; c += W) storev(out + c, silu_mul_v<T>(loadv(gate + c), loadv(up + c)));
  if (c < inner)
    store_part(out + c, inner - c, silu_mul_v<T>(load_part(gate + c, inner - c), load_part(up + c, inner - c)));
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu(), "silu_mul: CPU tensors only");
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "silu_mul: float32 or bfloat16 only");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "silu_mul: last dimension must be even (gate, up)");
  const int64_t inner = gate_up.size(-1) / 2;
  auto x = gate_up.reshape({-1, 2 * inner}).contiguous();
  auto result = at::empty({x.size(0), inner}, x.options());
  at::parallel_for(0, x.size(0), std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inner)), [&](int64_t r0,
                                                                                                int64_t r1) {
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

// Attention of `group` query heads (fp32 values, contiguous) over positions 0..n-1 of one KV head, whose
// key and value rows sit at `keys + idx[t] * dim` (the paged cache's index of position t):
// scores q.k * scale, softmax in fp32, weighted sum of values, one rounding to T at the end.
// `scores` holds group * round_up(n, W) floats.
template <typename T>
void attend(const float* q, int64_t group, int64_t dim, const T* keys, const T* values, const int64_t* idx,
            int64_t n, float scale, float* scores, T* out) {
  const int64_t stride = (n + W - 1) / W * W, full = dim / W * W;
  vi lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * dim;
    float* s = scores + g * stride;
    for (int64_t t = 0; t < n; ++t) {
      const T* kr = keys + idx[t] * dim;
      vf a0 = vf{}, a1 = vf{};  // two chains: even and odd vectors of the head
      int64_t c = 0;
      for (; c + 2 * W <= full; c += 2 * W) {
        a0 = vfma(loadv(qg + c), loadv(kr + c), a0);
        a1 = vfma(loadv(qg + c + W), loadv(kr + c + W), a1);
      }
      if (c < full) a0 = vfma(loadv(qg + c), loadv(kr + c), a0);
      float tail = 0.f;
      for (int64_t d = full; d < dim; ++d) tail += qg[d] * static_cast<float>(kr[d]);
      s[t] = (hsum(a0 + a1) + tail) * scale;
    }
    // softmax numerators exp(s - max) in place (lanes past n give 0), and their sum
    float top = -INFINITY;
    for (int64_t t = 0; t < n; ++t) top = std::max(top, s[t]);
    const vf max = splat(top);
    vf sum = vf{};
    for (int64_t t = 0; t < stride; t += W) {
      const vf e = vexp(loadv(s + t) - max);
      const vf kept = lane + static_cast<int32_t>(t) < static_cast<int32_t>(n) ? e : vf{};
      storev(s + t, kept);
      sum += kept;
    }
    const vf total = splat(hsum(sum));
    // weighted values, 4 vectors of output lanes at a time held in registers across all positions
    int64_t c0 = 0;
    for (; c0 + 4 * W <= full; c0 += 4 * W) {
      vf a0 = vf{}, a1 = a0, a2 = a0, a3 = a0;
      for (int64_t t = 0; t < n; ++t) {
        const vf p = splat(s[t]);
        const T* vr = values + idx[t] * dim + c0;
        a0 = vfma(p, loadv(vr), a0);
        a1 = vfma(p, loadv(vr + W), a1);
        a2 = vfma(p, loadv(vr + 2 * W), a2);
        a3 = vfma(p, loadv(vr + 3 * W), a3);
      }
      T* o = out + g * dim + c0;
      storev(o, a0 / total);
      storev(o + W, a1 / total);
      storev(o + 2 * W, a2 / total);
      storev(o + 3 * W, a3 / total);
    }
    for (; c0 < dim; c0 += W) {  // head_dim not a multiple of 4 W: the rest W lanes at a time
      const int64_t left = std::min<int64_t>(W, dim - c0);
      vf a = vf{};
      for (int64_t t = 0; t < n; ++t) {
        const T* vr = values + idx[t] * dim + c0;
        a = vfma(splat(s[t]), left == W ? loadv(vr) : load_part(vr, left), a);
      }
      if (left == W) storev(out + g * dim + c0, a / total);
      else store_part(out + g * dim + c0, left, a / total);
    }
  }
}

template <typename T>
void decode_attention_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* index,
                           int64_t span, const int64_t* positions, int64_t heads, int64_t kv_heads, double scale,
                           at::Tensor& result) {
  const int64_t rows = qkv.size(0), dim = k_cache.size(2), cache_len = k_cache.size(1);
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
      const int64_t at = (j * cache_len + index[b * span + positions[b]]) * dim;
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
      scores.resize(group * ((n + W - 1) / W * W));
      const int64_t base = j * cache_len * dim;
      attend<T>(queries.data() + (b * heads + j * group) * dim, group, dim, kc + base, vc + base, index + b * span,
                n, static_cast<float>(scale), scores.data(),
                result.mutable_data_ptr<T>() + (b * heads + j * group) * dim);
    }
  });
}

// One decode token per row b: RoPE on its query and key heads (fused q|k|v projection output, q and k
// heads adjacent), its key and value written to the paged cache at index[b, positions[b]], then each
// query head attends over the row's positions 0..positions[b], found at index[b, 0..positions[b]]
// (GQA: `heads / kv_heads` query heads share a KV head). Replaces rotate-half, the cache writes and
// scaled_dot_product_attention: about twenty tensor ops per layer, each costing more than the
// arithmetic at one token.
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& index,
                            const at::Tensor& positions, int64_t heads, int64_t kv_heads, double scale) {
  const auto dtype = qkv.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_attention: float32 or bfloat16 only");
  for (const auto* t : {&qkv, &cos, &sin, &k_cache, &v_cache, &index, &positions})
    TORCH_CHECK(t->device().is_cpu(), "decode_attention: CPU tensors only");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes(),
              "decode_attention: caches must be contiguous [kv_heads, cache_len, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == dtype && v_cache.scalar_type() == dtype && cos.scalar_type() == dtype &&
                  sin.scalar_type() == dtype,
              "decode_attention: qkv, cos, sin and the caches must share one dtype");
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && k_cache.size(0) == kv_heads,
              "decode_attention: ", heads, " query heads cannot share ", kv_heads, " KV heads");
  const int64_t dim = k_cache.size(2), cache_len = k_cache.size(1), rows = positions.numel();
  TORCH_CHECK(dim % 2 == 0, "decode_attention: head_dim must be even for RoPE");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == rows, "decode_attention: index must be [rows, positions]");
  auto x = qkv.reshape({-1, (heads + 2 * kv_heads) * dim}).contiguous();
  TORCH_CHECK(x.size(0) == rows, "decode_attention: ", x.size(0), " rows of qkv for ", rows, " positions");
  auto c = cos.reshape({-1, dim}).contiguous(), s = sin.reshape({-1, dim}).contiguous();
  TORCH_CHECK(c.size(0) == rows && s.size(0) == rows, "decode_attention: one cos/sin row per token");
  auto ix = index.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const int64_t* ip = ix.const_data_ptr<int64_t>();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const int64_t span = ix.size(1);
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(0 <= pp[b] && pp[b] < span, "decode_attention: position ", pp[b], " outside the index's ", span);
    for (int64_t t = 0; t <= pp[b]; ++t)
      TORCH_CHECK(0 <= ip[b * span + t] && ip[b * span + t] < cache_len, "decode_attention: cache index ",
                  ip[b * span + t], " out of range");
    for (int64_t a = 0; a < b; ++a)
      TORCH_CHECK(ip[a * span + pp[a]] != ip[b * span + pp[b]], "decode_attention: cache index ",
                  ip[b * span + pp[b]], " written twice");
  }
  auto result = at::empty({rows, heads * dim}, x.options());
  if (dtype == at::kBFloat16)
    decode_attention_impl<at::BFloat16>(x, c, s, k_cache, v_cache, ip, span, pp, heads, kv_heads, scale, result);
  else
    decode_attention_impl<float>(x, c, s, k_cache, v_cache, ip, span, pp, heads, kv_heads, scale, result);
  return result;
}

// A stage's decoder layers for one decode token per row, in one call: what KernelDecoderLayer's forward
// does layer after layer (RMSNorm, qkv, decode_attention, o, residual add + RMSNorm, gate/up, SwiGLU,
// down, residual add), calling the same functions in the same order, so the result is bit-for-bit the
// module path's. At batch 1 the module path spends about as long in Python and the dispatcher between
// the ~10 ops of a layer as the matmuls take on a small model (7 ms a token for 30 layers on the 2-core
// Zen 3); here that is one call per stage. Only without tensor parallelism (the modules' all-reduce hooks
// run between the ops) and for up to MAX_ROWS rows (beyond, the module path's oneDNN GEMMs are faster).
// params: 14 tensors per layer: input norm; (weight, scale, bias) of qkv and o; post-attention norm;
// (weight, scale, bias) of gate/up and down. A scale is empty for a float or GGML weight, a bias empty when absent.
at::Tensor linear_of(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& bias) {
  const std::optional<at::Tensor> b = bias.numel() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (weight.scalar_type() == at::kChar) return int8_linear(x, weight, scale, b);
  if (weight.scalar_type() == at::kByte)  // GGML blocks: 20 bytes per 32 weights is Q4_1, 34 is Q8_0
    return weight.size(1) == x.size(-1) / 32 * 20 ? q4_1_linear(x, weight, b) : q8_0_linear(x, weight, b);
  return small_linear(x, weight, b);
}

constexpr size_t LAYER_PARAMS = 14;

at::Tensor decode_layers(const at::Tensor& input, at::TensorList params, at::TensorList k_caches,
                         at::TensorList v_caches, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& index,
                         const at::Tensor& positions, int64_t heads, int64_t kv_heads, double scale, double eps) {
  TORCH_CHECK(k_caches.size() == v_caches.size() && params.size() == LAYER_PARAMS * k_caches.size(),
              "decode_layers: ", params.size(), " params and ", k_caches.size(), "/", v_caches.size(),
              " caches; want ", LAYER_PARAMS, " params per layer");
  TORCH_CHECK(input.dim() == 2, "decode_layers: input must be [rows, hidden]");
  at::Tensor x = input.contiguous();
  for (size_t layer = 0; layer < k_caches.size(); ++layer) {
    const at::Tensor* p = params.data() + LAYER_PARAMS * layer;
    const at::Tensor qkv = linear_of(rms_norm(x, p[0], eps), p[1], p[2], p[3]);
    const at::Tensor attn = decode_attention(qkv, cos, sin, k_caches[layer], v_caches[layer], index, positions, heads,
                                             kv_heads, scale);
    const auto [h, normed] = add_rms_norm(x, linear_of(attn, p[4], p[5], p[6]), p[7], eps);
    x = h + linear_of(silu_mul(linear_of(normed, p[8], p[9], p[10])), p[11], p[12], p[13]);
  }
  return x;
}

}  // namespace

// TORCH_LIBRARY pastes its namespace argument into identifiers: expand LARGEMODEL_NS first.
#define LARGEMODEL_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LARGEMODEL_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

LARGEMODEL_LIBRARY(LARGEMODEL_NS, m) {
  m.def("small_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("int8_linear(Tensor input, Tensor weight, Tensor scale, Tensor? bias=None) -> Tensor");
  m.def("q4_1_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("q8_0_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor input, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor input, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor index, Tensor positions, int heads, int kv_heads, float scale) -> Tensor");
  m.def("decode_layers(Tensor input, Tensor[] params, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor cos, "
        "Tensor sin, Tensor index, Tensor positions, int heads, int kv_heads, float scale, float eps) -> Tensor");
}

LARGEMODEL_LIBRARY_IMPL(LARGEMODEL_NS, CPU, m) {
  m.impl("small_linear", &small_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("q4_1_linear", &q4_1_linear);
  m.impl("q8_0_linear", &q8_0_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_layers", &decode_layers);
}
