//! Fused GPU kernels for what dominates a bf16 forward on a GPU after the GEMMs: attention (a
//! FlashAttention-2-style kernel on tensor cores that never materialises the probabilities, and,
//! where they are wanted, a masked softmax in one pass instead of five candle kernels, two of them
//! over a materialised [B, 1, T, T] mask broadcast with strided indexing), RMSNorm (four kernels
//! in candle), the gated MLP's SiLU product (two), LayerNorm (four with its casts) and a linear
//! layer's bias with its activation (a strided broadcast add and a pass of its own); and the tuned
//! lens's training loss (KL and its gradient over [rows, vocabulary] logits, two kernels instead
//! of about ten of candle's passes).
//!
//! Measured on the H200 with the Llama-3-8B shape cut to 4 blocks at 16 x 512 tokens (Nsight
//! Compute, `scripts/device_bench.sh profile`), before this module: 59 ms per forward, of which the
//! broadcast mask add alone took 11.5 ms and the casts 9.7 ms, against PyTorch's 28 ms (cuDNN flash
//! attention); with it the full 8B shape runs at 1.05-1.12x of PyTorch (README). Neither candle
//! nor candle-nn has these kernels, and the flash-attention crate needs hours of nvcc here, so they
//! are written by hand and compiled with NVRTC at first use (cached per device): the tensor-core
//! kernels in a module of their own for compute_80 (`scripts/check_kernels.py` assembles both
//! modules for sm_90 at build time).
//!
//! The arithmetic follows transformers' eager code exactly where it rounds:
//! - softmax: `s = round_T(float(qk) * scale)` (the scale as an f32 scalar, as PyTorch multiplies
//!   a tensor by a Python float), then in f32 the optional soft-cap `tanh(s / c) * c`, the mask
//!   (keys outside the row's length, after the query (causal) or beyond the sliding window are
//!   excluded; padded query rows of causal batches see key 0, as [`crate::model::Batch`]'s bias
//!   does), softmax, and one rounding to T;
//! - RMSNorm: `r = rsqrt(mean(x^2) + eps)` in f32; a scale stored in the compute dtype multiplies
//!   after rounding (`w * round_T(x r)`, LlamaRMSNorm), an f32 scale before it
//!   (`round_T(x r w)`, Gemma3RMSNorm).
//!
//! On the CPU nothing here runs: the existing candle ops are the reference path.

use candle_core::Tensor;

/// How a batch's attention is masked, for the fused softmax: the real length of each row (u32
/// [B] on the device), causal or bidirectional, and an optional sliding window.
#[derive(Debug, Clone)]
pub struct MaskSpec {
    pub lengths: Tensor,
    pub causal: bool,
    pub window: Option<usize>,
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
    use std::sync::OnceLock;

    const SOURCE: &str = r#"
// No headers under NVRTC: the infinity and the size type are spelled out.
#define NEG_INF __int_as_float(0xff800000)
typedef unsigned long long usize;
struct bf16 { unsigned short x; };
struct f16 { unsigned short x; };
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __uint_as_float(((unsigned int)v.x) << 16); }
__device__ __forceinline__ float to_f(f16 v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x)); return f; }
template <class T> __device__ __forceinline__ T from_f(float f);
template <> __device__ __forceinline__ float from_f<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float f) {
  unsigned int u = __float_as_uint(f);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.x = (unsigned short)((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.x = (unsigned short)(u >> 16);
  return r;
}
template <> __device__ __forceinline__ f16 from_f<f16>(float f) {
  f16 r; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(f)); return r;
}
template <class T> __device__ __forceinline__ float round_to(float f) { return to_f(from_f<T>(f)); }

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* shared) {
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : (is_max ? NEG_INF : 0.0f);
  for (int o = 16; o > 0; o >>= 1) {
    float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, w) : v + w;
  }
  return v;
}

__device__ __forceinline__ bool allowed(int i, int j, int len, int causal, int window) {
  if (!causal) return j < len;
  if (i >= len && j == 0) return true;
  return j < len && j <= i && (window <= 0 || i - j < window);
}

template <class T>
__device__ void masked_softmax(const T* x, const unsigned int* lens, T* out, int heads, int tq, int s,
                               float scale, float cap, int causal, int window) {
  __shared__ float shared[32];
  usize row = blockIdx.x;
  int i = (int)(row % tq);
  int b = (int)(row / ((usize)tq * heads));
  int len = (int)lens[b];
  const T* xr = x + row * (usize)s;
  T* orow = out + row * (usize)s;
  float m = NEG_INF;
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    if (!allowed(i, j, len, causal, window)) continue;
    float v = round_to<T>(to_f(xr[j]) * scale);
    if (cap > 0.0f) v = tanhf(v / cap) * cap;
    m = fmaxf(m, v);
  }
  m = block_reduce(m, true, shared);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    if (!allowed(i, j, len, causal, window)) continue;
    float v = round_to<T>(to_f(xr[j]) * scale);
    if (cap > 0.0f) v = tanhf(v / cap) * cap;
    sum += expf(v - m);
  }
  sum = block_reduce(sum, false, shared);
  for (int j = threadIdx.x; j < s; j += blockDim.x) {
    float p = 0.0f;
    if (allowed(i, j, len, causal, window)) {
      float v = round_to<T>(to_f(xr[j]) * scale);
      if (cap > 0.0f) v = tanhf(v / cap) * cap;
      p = expf(v - m) / sum;
    }
    orow[j] = from_f<T>(p);
  }
}

template <class T, class W>
__device__ void rms_norm(const T* x, const W* w, T* out, int d, float eps, int round_first) {
  __shared__ float shared[32];
  usize row = blockIdx.x;
  const T* xr = x + row * (usize)d;
  T* orow = out + row * (usize)d;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) { float v = to_f(xr[j]); ss += v * v; }
  ss = block_reduce(ss, false, shared);
  float r = rsqrtf(ss / (float)d + eps);
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    float n = to_f(xr[j]) * r;
    if (round_first) n = round_to<T>(n);
    orow[j] = from_f<T>(n * to_f(w[j]));
  }
}

// silu(gate) * up with PyTorch's rounding in a half dtype: round(round(silu(g)) * u), one pass.
template <class T>
__device__ void silu_mul(const T* g, const T* u, T* out, usize n) {
  for (usize i = (usize)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (usize)gridDim.x * blockDim.x) {
    float x = to_f(g[i]);
    float s = round_to<T>(x / (1.0f + expf(-x)));
    out[i] = from_f<T>(s * to_f(u[i]));
  }
}

#define SILU_MUL(NAME, T) extern "C" __global__ void NAME(const T* g, const T* u, T* out, usize n) { \
  silu_mul<T>(g, u, out, n); }
SILU_MUL(silu_mul_bf16, bf16)
SILU_MUL(silu_mul_f16, f16)

// A linear layer's bias, broadcast over rows, and optionally its activation, in one pass:
// v = round(y + b) (the GEMM's output already rounded: one rounding more than cuBLASLt's bias
// epilogue), then act(v) in f32 and one rounding. act: 0 none, 1 GELU (tanh), 2 GELU (erf),
// 3 ReLU, 4 SiLU.
template <class T>
__device__ void bias_act(const T* y, const T* b, T* out, usize n, usize cols, int act) {
  for (usize i = (usize)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (usize)gridDim.x * blockDim.x) {
    float v = round_to<T>(to_f(y[i]) + to_f(b[i % cols]));
    if (act == 1) v = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    else if (act == 2) v = 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
    else if (act == 3) v = fmaxf(v, 0.0f);
    else if (act == 4) v = v / (1.0f + expf(-v));
    out[i] = from_f<T>(v);
  }
}

#define BIAS_ACT(NAME, T) extern "C" __global__ void NAME(const T* y, const T* b, T* out, usize n, usize cols, \
    int act) { bias_act<T>(y, b, out, n, cols, act); }
BIAS_ACT(bias_act_f32, float)
BIAS_ACT(bias_act_bf16, bf16)
BIAS_ACT(bias_act_f16, f16)

// LayerNorm over the last dimension in f32 (mean, then the variance of the centred values: the
// row is read three times, from cache after the first), weight and bias upcast, one rounding to
// T: PyTorch's layer_norm on a 16-bit input.
template <class T>
__device__ void layer_norm(const T* x, const T* w, const T* b, T* out, int d, float eps) {
  __shared__ float shared[32];
  usize row = blockIdx.x;
  const T* xr = x + row * (usize)d;
  T* orow = out + row * (usize)d;
  float s = 0.0f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) s += to_f(xr[j]);
  const float mean = block_reduce(s, false, shared) / (float)d;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < d; j += blockDim.x) { float c = to_f(xr[j]) - mean; ss += c * c; }
  const float r = rsqrtf(block_reduce(ss, false, shared) / (float)d + eps);
  for (int j = threadIdx.x; j < d; j += blockDim.x) {
    orow[j] = from_f<T>((to_f(xr[j]) - mean) * r * to_f(w[j]) + to_f(b[j]));
  }
}

#define LAYER_NORM(NAME, T) extern "C" __global__ void NAME(const T* x, const T* w, const T* b, T* out, int d, \
    float eps) { layer_norm<T>(x, w, b, out, d, eps); }
LAYER_NORM(layer_norm_f32, float)
LAYER_NORM(layer_norm_bf16, bf16)
LAYER_NORM(layer_norm_f16, f16)

#define SOFTMAX(NAME, T) extern "C" __global__ void NAME(const T* x, const unsigned int* lens, T* out, \
    int heads, int tq, int s, float scale, float cap, int causal, int window) { \
  masked_softmax<T>(x, lens, out, heads, tq, s, scale, cap, causal, window); }
SOFTMAX(masked_softmax_f32, float)
SOFTMAX(masked_softmax_bf16, bf16)
SOFTMAX(masked_softmax_f16, f16)

#define RMS(NAME, T, W) extern "C" __global__ void NAME(const T* x, const W* w, T* out, int d, float eps, \
    int round_first) { rms_norm<T, W>(x, w, out, d, eps, round_first); }
RMS(rms_norm_bf16_bf16, bf16, bf16)
RMS(rms_norm_bf16_f32, bf16, float)
RMS(rms_norm_f16_f16, f16, f16)
RMS(rms_norm_f16_f32, f16, float)
RMS(rms_norm_f32_f32, float, float)

// ---- The tuned lens's loss (src/lens/tuned/train.rs) ----
// For row r of lens logits z [R, V] and row r % r0 of the target's log-probabilities lp [r0, V]
// (several layers' rows stacked against one target): with p = exp(lp),
// KL(p || softmax(z)) = sum p (lp - z) + lse(z) sum p. kl_row_stats writes (KL, lse(z)) per row
// (f64) from one read of z and lp: per thread an online maximum and sum of exp, combined across
// the block; kl_grad then writes the gradient (softmax(z) - p) * inv_n. z in f32, bf16 or f16. candle's ops take about
// ten passes over the [R, V] buffers for the same (log_softmax alone is five).
__device__ __forceinline__ double block_sum_d(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ void kl_row_stats(const T* z, const float* lp, double* stats, int v, int r0) {
  __shared__ float shared[32];
  __shared__ double shared_d[32];
  usize row = blockIdx.x;
  const T* zr = z + row * (usize)v;
  const float* lr = lp + (row % (usize)r0) * (usize)v;
  float m = NEG_INF, s = 0.0f;
  double a = 0.0, sp = 0.0;
  for (int j = threadIdx.x; j < v; j += blockDim.x) {
    float x = to_f(zr[j]);
    if (x > m) { s = s * expf(m - x) + 1.0f; m = x; } else { s += expf(x - m); }
    float l = lr[j];
    double p = (double)expf(l);
    a += p * ((double)l - (double)x);
    sp += p;
  }
  const float mm = block_reduce(m, true, shared);
  const double total = block_sum_d(m == NEG_INF ? 0.0 : (double)s * (double)expf(m - mm), shared_d);
  a = block_sum_d(a, shared_d);
  sp = block_sum_d(sp, shared_d);
  if (threadIdx.x == 0) {
    const double lse = (double)mm + log(total);
    stats[2 * row] = a + lse * sp;
    stats[2 * row + 1] = lse;
  }
}

// The gradient in z's dtype: computed in f32 and rounded once, as a cast of the f32 gradient.
template <class T>
__device__ void kl_grad(const T* z, const float* lp, const double* stats, T* g, int v, int r0, float inv_n) {
  usize row = blockIdx.x;
  const T* zr = z + row * (usize)v;
  const float* lr = lp + (row % (usize)r0) * (usize)v;
  T* gr = g + row * (usize)v;
  const float lse = (float)stats[2 * row + 1];
  for (int j = threadIdx.x; j < v; j += blockDim.x) gr[j] = from_f<T>((expf(to_f(zr[j]) - lse) - expf(lr[j])) * inv_n);
}

#define KL(SUFFIX, T) \
  extern "C" __global__ void kl_row_stats_##SUFFIX(const T* z, const float* lp, double* stats, int v, int r0) { \
    kl_row_stats<T>(z, lp, stats, v, r0); } \
  extern "C" __global__ void kl_grad_##SUFFIX(const T* z, const float* lp, const double* stats, T* g, int v, int r0, \
                                              float inv_n) { kl_grad<T>(z, lp, stats, g, v, r0, inv_n); }
KL(f32, float)
KL(bf16, bf16)
KL(f16, f16)
"#;

    /// The tensor-core kernels (mma.sync with bf16 needs PTX for compute_80 or newer), compiled
    /// after [`SOURCE`] into a module of their own so that older GPUs keep the other kernels.
    const FLASH_SOURCE: &str = r#"
// ---- Flash attention (forward, no probabilities materialised) ----
// q [B, T, H, D], k and v [B, T, Hkv, D] (the projections' own layout: no head transposes), out
// [B, T, H, D]. One block of 4 warps per (64 query rows, head, batch row); each warp owns 16 rows
// and walks the key tiles of 64 with an online softmax (FlashAttention-2). Products on tensor
// cores (mma.sync m16n8k16, f32 accumulation). Scores are rounded as transformers' eager
// attention rounds them (the GEMM's output in T, then times the scale in T), soft-capped and
// masked in f32; the probabilities enter the second product rounded to T, unnormalised, and the
// row sum divides at the end (as flash kernels do; PyTorch's sdpa deviates from eager the same way).
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
  unsigned int a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
template <class T> __device__ __forceinline__ void mma16816(float* c, const unsigned int* a, unsigned int b0, unsigned int b1);
template <> __device__ __forceinline__ void mma16816<bf16>(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<f16>(float* c, const unsigned int* a, unsigned int b0, unsigned int b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <class T> __device__ __forceinline__ unsigned int pack2(float lo, float hi) {
  return (unsigned int)from_f<T>(lo).x | ((unsigned int)from_f<T>(hi).x << 16);
}
__device__ __forceinline__ unsigned int ld32(const unsigned short* p) { return *(const unsigned int*)p; }

#define FA_BR 64
#define FA_BC 64
template <class T, int D>
__device__ void flash_attention(const unsigned short* q, const unsigned short* k, const unsigned short* v,
                                const unsigned int* lens, unsigned short* out, int tlen, int heads, int kv_heads,
                                float scale, float cap, int causal, int window) {
  __shared__ __align__(16) unsigned short ks[FA_BC][D + 8];
  __shared__ __align__(16) unsigned short vs[FA_BC][D + 8];
  const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * FA_BR;
  const int hk = h / (heads / kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;
  const int len = (int)lens[b];
  const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
  const usize qstride = (usize)heads * D, kstride = (usize)kv_heads * D;
  const unsigned short* qb = q + (usize)b * tlen * qstride + (usize)h * D;
  const unsigned short* kb = k + (usize)b * tlen * kstride + (usize)hk * D;
  const unsigned short* vb = v + (usize)b * tlen * kstride + (usize)hk * D;

  unsigned int qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int c = kk * 16 + 2 * tq;
    qf[kk][0] = r0 < tlen ? ld32(qb + (usize)r0 * qstride + c) : 0u;
    qf[kk][1] = r1 < tlen ? ld32(qb + (usize)r1 * qstride + c) : 0u;
    qf[kk][2] = r0 < tlen ? ld32(qb + (usize)r0 * qstride + c + 8) : 0u;
    qf[kk][3] = r1 < tlen ? ld32(qb + (usize)r1 * qstride + c + 8) : 0u;
  }
  float of[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) { of[n][0] = of[n][1] = of[n][2] = of[n][3] = 0.0f; }
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;

  // Keys this block can see: below the row length (padded causal rows see key 0 only), up to the
  // block's last row when causal, from the window's start when every row of the block is real.
  int kend = len < 1 ? 1 : len;
  if (kend > tlen) kend = tlen;
  if (causal && q0 + FA_BR < kend) kend = q0 + FA_BR;
  int kstart = 0;
  if (causal && window > 0 && q0 + FA_BR <= len) {
    int first = q0 - window + 1;
    kstart = first > 0 ? (first / FA_BC) * FA_BC : 0;
  }
  for (int kt = kstart; kt < kend; kt += FA_BC) {
    __syncthreads();
    for (int c = threadIdx.x; c < FA_BC * D / 8; c += blockDim.x) {
      const int row = c / (D / 8), col = (c % (D / 8)) * 8;
      uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
      if (kt + row < tlen) {
        kv = *(const uint4*)(kb + (usize)(kt + row) * kstride + col);
        vv = *(const uint4*)(vb + (usize)(kt + row) * kstride + col);
      }
      *(uint4*)&ks[row][col] = kv;
      *(uint4*)&vs[row][col] = vv;
    }
    __syncthreads();
    if (q0 + warp * 16 >= tlen) continue;
    float sf[FA_BC / 8][4];
#pragma unroll
    for (int nt = 0; nt < FA_BC / 8; ++nt) {
      sf[nt][0] = sf[nt][1] = sf[nt][2] = sf[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned short* kr = &ks[nt * 8 + g][kk * 16 + 2 * tq];
        mma16816<T>(sf[nt], qf[kk], ld32(kr), ld32(kr + 8));
      }
    }
    float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < FA_BC / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = e < 2 ? r0 : r1, col = kt + nt * 8 + 2 * tq + (e & 1);
        float s = round_to<T>(round_to<T>(sf[nt][e]) * scale);
        if (cap > 0.0f) s = tanhf(s / cap) * cap;
        if (col >= tlen || !allowed(row, col, len, causal, window)) s = NEG_INF;
        sf[nt][e] = s;
        if (e < 2) mx0 = fmaxf(mx0, s); else mx1 = fmaxf(mx1, s);
      }
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float a0 = n0 == NEG_INF ? 1.0f : expf(m0 - n0), a1 = n1 == NEG_INF ? 1.0f : expf(m1 - n1);
    m0 = n0;
    m1 = n1;
    l0 *= a0;
    l1 *= a1;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) { of[n][0] *= a0; of[n][1] *= a0; of[n][2] *= a1; of[n][3] *= a1; }
#pragma unroll
    for (int nt = 0; nt < FA_BC / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float mm = e < 2 ? n0 : n1;
        const float p = sf[nt][e] == NEG_INF ? 0.0f : expf(sf[nt][e] - mm);
        sf[nt][e] = p;
        if (e < 2) l0 += p; else l1 += p;
      }
    }
#pragma unroll
    for (int kk = 0; kk < FA_BC / 16; ++kk) {
      unsigned int pa[4];
      pa[0] = pack2<T>(sf[2 * kk][0], sf[2 * kk][1]);
      pa[1] = pack2<T>(sf[2 * kk][2], sf[2 * kk][3]);
      pa[2] = pack2<T>(sf[2 * kk + 1][0], sf[2 * kk + 1][1]);
      pa[3] = pack2<T>(sf[2 * kk + 1][2], sf[2 * kk + 1][3]);
#pragma unroll
      for (int nt = 0; nt < D / 8; nt += 2) {
        // ldmatrix.trans: matrix j = lane / 8 holds keys kk*16 + (j&1)*8 .. +8 of dims nt*8 + (j>>1)*8 .. +8;
        // lane l gets (key 2*tq and 2*tq+1, dim g) of each: the B fragments of dims nt and nt + 1.
        const int j = lane >> 3;
        const unsigned int addr = smem_addr(&vs[kk * 16 + (j & 1) * 8 + (lane & 7)][nt * 8 + (j >> 1) * 8]);
        unsigned int b0, b1, b2, b3;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(b0), "=r"(b1), "=r"(b2), "=r"(b3) : "r"(addr));
        mma16816<T>(of[nt], pa, b0, b1);
        mma16816<T>(of[nt + 1], pa, b2, b3);
      }
    }
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
  unsigned short* ob = out + (usize)b * tlen * qstride + (usize)h * D;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + 2 * tq;
    if (r0 < tlen) *(unsigned int*)(ob + (usize)r0 * qstride + c) = pack2<T>(of[n][0] * i0, of[n][1] * i0);
    if (r1 < tlen) *(unsigned int*)(ob + (usize)r1 * qstride + c) = pack2<T>(of[n][2] * i1, of[n][3] * i1);
  }
}

#define FLASH(NAME, T, D) extern "C" __global__ void __launch_bounds__(128) NAME(const unsigned short* q, \
    const unsigned short* k, const unsigned short* v, const unsigned int* lens, unsigned short* out, int tlen, \
    int heads, int kv_heads, float scale, float cap, int causal, int window) { \
  flash_attention<T, D>(q, k, v, lens, out, tlen, heads, kv_heads, scale, cap, causal, window); }
FLASH(flash_attention_bf16_64, bf16, 64)
FLASH(flash_attention_bf16_128, bf16, 128)
FLASH(flash_attention_f16_64, f16, 64)
FLASH(flash_attention_f16_128, f16, 128)

"#;

    const MODULE: &str = "jumplens_fused";
    const FLASH_MODULE: &str = "jumplens_flash";

    /// The PTX, compiled once per process (NVRTC of the CUDA runtime on the machine).
    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling jumplens's fused kernels with NVRTC failed: {e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// The PTX of the tensor-core kernels (compute_80: Ampere and newer), compiled once.
    fn flash_ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            let opts = candle_core::cuda_backend::cudarc::nvrtc::CompileOptions {
                arch: Some("compute_80"),
                ..Default::default()
            };
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx_with_opts(format!("{SOURCE}\n{FLASH_SOURCE}"), opts)
                .map(|p| p.to_src())
                .map_err(|e| format!("compiling jumplens's fused attention with NVRTC failed: {e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// The error of a fused attention kernel the GPU's driver refused, saying what to do.
    fn flash_load_error(name: &str, e: candle_core::Error) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "loading the fused attention kernel {name} (PTX for compute_80, needs an Ampere or newer GPU) \
             failed: {e}; set JUMPLENS_ATTENTION=materialized to run without it"
        ))
    }

    fn threads(n: usize) -> u32 {
        match n {
            0..=64 => 32,
            65..=512 => 128,
            _ => 256,
        }
    }

    fn contiguous<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.slice(a..b)),
            None => candle_core::bail!("fused kernel input must be contiguous"),
        }
    }

    pub struct Softmax {
        pub heads: usize,
        pub scale: f32,
        pub cap: f32,
        pub causal: bool,
        pub window: Option<usize>,
    }

    impl candle_core::CustomOp2 for Softmax {
        fn name(&self) -> &'static str {
            "jumplens-masked-softmax"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused masked softmax runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            lens: &CudaStorage,
            ll: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let dims = xl.shape().dims4()?;
            let (b, h, t, s) = dims;
            let rows = b * h * t;
            let lens = match &lens.slice {
                CudaStorageSlice::U32(v) => contiguous(v, ll)?,
                _ => candle_core::bail!("fused softmax: lengths must be u32"),
            };
            let cfg = row_config(rows, threads(s));
            let (heads, tq, sl) = (self.heads as i32, t as i32, s as i32);
            let causal = self.causal as i32;
            let window = self.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
            debug_assert_eq!(h, self.heads);
            let args = SoftmaxArgs {
                heads,
                tq,
                s: sl,
                scale: self.scale,
                cap: self.cap,
                causal,
                window,
            };
            let out = match &x.slice {
                CudaStorageSlice::F32(v) => {
                    softmax_launch(&dev, v, xl, &lens, cfg, rows * s, &args, "masked_softmax_f32")?
                }
                CudaStorageSlice::BF16(v) => {
                    softmax_launch(&dev, v, xl, &lens, cfg, rows * s, &args, "masked_softmax_bf16")?
                }
                CudaStorageSlice::F16(v) => {
                    softmax_launch(&dev, v, xl, &lens, cfg, rows * s, &args, "masked_softmax_f16")?
                }
                _ => candle_core::bail!("fused softmax: unsupported dtype {:?}", x.dtype()),
            };
            Ok((out, xl.shape().clone()))
        }
    }

    pub struct Rms {
        pub eps: f32,
        pub round_first: bool,
    }

    impl candle_core::CustomOp2 for Rms {
        fn name(&self) -> &'static str {
            "jumplens-rms-norm"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused RMSNorm runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let d = xl.shape().dims().last().copied().unwrap_or(0);
            if d == 0 || wl.shape().elem_count() != d {
                candle_core::bail!("fused RMSNorm: scale of {} for rows of {d}", wl.shape().elem_count());
            }
            let rows = xl.shape().elem_count() / d;
            let cfg = row_config(rows, threads(d));
            let di = d as i32;
            let out = match (&x.slice, &w.slice) {
                (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
                    rms_launch(&dev, a, xl, b, wl, cfg, rows * d, di, self, "rms_norm_bf16_bf16")?
                }
                (CudaStorageSlice::BF16(a), CudaStorageSlice::F32(b)) => {
                    rms_launch(&dev, a, xl, b, wl, cfg, rows * d, di, self, "rms_norm_bf16_f32")?
                }
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => {
                    rms_launch(&dev, a, xl, b, wl, cfg, rows * d, di, self, "rms_norm_f16_f16")?
                }
                (CudaStorageSlice::F16(a), CudaStorageSlice::F32(b)) => {
                    rms_launch(&dev, a, xl, b, wl, cfg, rows * d, di, self, "rms_norm_f16_f32")?
                }
                (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
                    rms_launch(&dev, a, xl, b, wl, cfg, rows * d, di, self, "rms_norm_f32_f32")?
                }
                _ => candle_core::bail!("fused RMSNorm: unsupported dtypes {:?} x {:?}", x.dtype(), w.dtype()),
            };
            Ok((out, xl.shape().clone()))
        }
    }

    /// Flash attention over q [B, T, H, D], k and v [B, T, Hkv, D] (bf16 or f16, D 64 or 128).
    pub struct Flash {
        pub lengths: Tensor,
        pub scale: f32,
        pub cap: f32,
        pub causal: bool,
        pub window: Option<usize>,
    }

    impl candle_core::CustomOp3 for Flash {
        fn name(&self) -> &'static str {
            "jumplens-flash-attention"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused attention runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = q.device().clone();
            let (b, t, h, d) = ql.shape().dims4()?;
            let (kb, kt, h_kv, kd) = kl.shape().dims4()?;
            if (kb, kt, kd) != (b, t, d) || vl.shape() != kl.shape() || h_kv == 0 || h % h_kv != 0 {
                candle_core::bail!(
                    "fused attention: q {:?}, k {:?}, v {:?} do not fit together",
                    ql.shape(),
                    kl.shape(),
                    vl.shape()
                );
            }
            let (lens_storage, lens_layout) = self.lengths.storage_and_layout();
            let lens = match &*lens_storage {
                candle_core::Storage::Cuda(c) => match &c.slice {
                    CudaStorageSlice::U32(s) => contiguous(s, lens_layout)?,
                    _ => candle_core::bail!("fused attention: lengths must be u32"),
                },
                _ => candle_core::bail!("fused attention: lengths must be on the GPU"),
            };
            let name = match (q.dtype(), d) {
                (DType::BF16, 64) => "flash_attention_bf16_64",
                (DType::BF16, 128) => "flash_attention_bf16_128",
                (DType::F16, 64) => "flash_attention_f16_64",
                (DType::F16, 128) => "flash_attention_f16_128",
                (dt, d) => candle_core::bail!("fused attention: no kernel for {dt:?} with head size {d}"),
            };
            let cfg = LaunchConfig {
                grid_dim: (t.div_ceil(64) as u32, h as u32, b as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let causal = self.causal as i32;
            let window = self.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
            let args = FlashArgs {
                ints: [t as i32, h as i32, h_kv as i32],
                scale: self.scale,
                cap: self.cap,
                causal,
                window,
            };
            let n = b * t * h * d;
            let out = match (&q.slice, &k.slice, &v.slice) {
                (CudaStorageSlice::BF16(qs), CudaStorageSlice::BF16(ks), CudaStorageSlice::BF16(vs)) => {
                    flash_launch(&dev, name, [(qs, ql), (ks, kl), (vs, vl)], &lens, n, cfg, &args)?
                }
                (CudaStorageSlice::F16(qs), CudaStorageSlice::F16(ks), CudaStorageSlice::F16(vs)) => {
                    flash_launch(&dev, name, [(qs, ql), (ks, kl), (vs, vl)], &lens, n, cfg, &args)?
                }
                _ => candle_core::bail!("fused attention: q, k and v must share one half dtype"),
            };
            Ok((out, ql.shape().clone()))
        }
    }

    /// A contiguous view whose start is 16-byte aligned (the kernel loads 8 halves at a time).
    fn aligned<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) if a % 8 == 0 => Ok(s.slice(a..b)),
            _ => candle_core::bail!("fused attention input must be contiguous and 16-byte aligned"),
        }
    }

    /// silu(gate) * up in one pass (bf16 / f16).
    pub struct SiluMul;

    impl candle_core::CustomOp2 for SiluMul {
        fn name(&self) -> &'static str {
            "jumplens-silu-mul"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused SiLU product runs on CUDA only")
        }

        fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = g.device().clone();
            if gl.shape() != ul.shape() {
                candle_core::bail!("fused SiLU product: {:?} vs {:?}", gl.shape(), ul.shape());
            }
            let n = gl.shape().elem_count();
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let out = match (&g.slice, &u.slice) {
                (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
                    silu_mul_launch(&dev, "silu_mul_bf16", (a, gl), (b, ul), n, cfg)?
                }
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => {
                    silu_mul_launch(&dev, "silu_mul_f16", (a, gl), (b, ul), n, cfg)?
                }
                _ => candle_core::bail!("fused SiLU product: unsupported dtypes"),
            };
            Ok((out, gl.shape().clone()))
        }
    }

    /// A row-broadcast bias and an activation (code as in the kernel) in one pass.
    pub struct BiasAct {
        pub act: i32,
    }

    impl candle_core::CustomOp2 for BiasAct {
        fn name(&self) -> &'static str {
            "jumplens-bias-act"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused bias and activation run on CUDA only")
        }

        fn cuda_fwd(&self, y: &CudaStorage, yl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = y.device().clone();
            let cols = yl.shape().dims().last().copied().unwrap_or(0);
            if cols == 0 || bl.shape().elem_count() != cols {
                candle_core::bail!("fused bias: a bias of {} for rows of {cols}", bl.shape().elem_count());
            }
            let n = yl.shape().elem_count();
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let out = match (&y.slice, &b.slice) {
                (CudaStorageSlice::F32(a), CudaStorageSlice::F32(c)) => {
                    bias_act_launch(&dev, "bias_act_f32", (a, yl), (c, bl), n, cols, self.act, cfg)?
                }
                (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(c)) => {
                    bias_act_launch(&dev, "bias_act_bf16", (a, yl), (c, bl), n, cols, self.act, cfg)?
                }
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(c)) => {
                    bias_act_launch(&dev, "bias_act_f16", (a, yl), (c, bl), n, cols, self.act, cfg)?
                }
                _ => candle_core::bail!("fused bias: unsupported dtypes {:?} x {:?}", y.dtype(), b.dtype()),
            };
            Ok((out, yl.shape().clone()))
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn bias_act_launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        y: (&CudaSlice<T>, &Layout),
        b: (&CudaSlice<T>, &Layout),
        n: usize,
        cols: usize,
        act: i32,
        cfg: LaunchConfig,
    ) -> Result<CudaStorage> {
        let (y, b) = (contiguous(y.0, y.1)?, contiguous(b.0, b.1)?);
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let (n64, cols64) = (n as u64, cols as u64);
        let mut bld = func.builder();
        bld.arg(&y).arg(&b).arg(&dst).arg(&n64).arg(&cols64).arg(&act);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    /// LayerNorm over the last dimension with weight and bias in the input's dtype.
    pub struct LayerNormOp {
        pub eps: f32,
    }

    impl candle_core::CustomOp3 for LayerNormOp {
        fn name(&self) -> &'static str {
            "jumplens-layer-norm"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused LayerNorm runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let d = xl.shape().dims().last().copied().unwrap_or(0);
            if d == 0 || wl.shape().elem_count() != d || bl.shape().elem_count() != d {
                candle_core::bail!(
                    "fused LayerNorm: weight {} and bias {} for rows of {d}",
                    wl.shape().elem_count(),
                    bl.shape().elem_count()
                );
            }
            let rows = xl.shape().elem_count() / d;
            let cfg = row_config(rows, threads(d));
            let out = match (&x.slice, &w.slice, &b.slice) {
                (CudaStorageSlice::F32(a), CudaStorageSlice::F32(c), CudaStorageSlice::F32(e)) => layer_norm_launch(
                    &dev,
                    "layer_norm_f32",
                    [(a, xl), (c, wl), (e, bl)],
                    rows * d,
                    d,
                    self.eps,
                    cfg,
                )?,
                (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(c), CudaStorageSlice::BF16(e)) => layer_norm_launch(
                    &dev,
                    "layer_norm_bf16",
                    [(a, xl), (c, wl), (e, bl)],
                    rows * d,
                    d,
                    self.eps,
                    cfg,
                )?,
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(c), CudaStorageSlice::F16(e)) => layer_norm_launch(
                    &dev,
                    "layer_norm_f16",
                    [(a, xl), (c, wl), (e, bl)],
                    rows * d,
                    d,
                    self.eps,
                    cfg,
                )?,
                _ => candle_core::bail!("fused LayerNorm: x, weight and bias must share one dtype"),
            };
            Ok((out, xl.shape().clone()))
        }
    }

    fn layer_norm_launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        xwb: [(&CudaSlice<T>, &Layout); 3],
        n: usize,
        d: usize,
        eps: f32,
        cfg: LaunchConfig,
    ) -> Result<CudaStorage> {
        let [x, w, b] = xwb;
        let (x, w, b) = (contiguous(x.0, x.1)?, contiguous(w.0, w.1)?, contiguous(b.0, b.1)?);
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let di = d as i32;
        let mut bld = func.builder();
        bld.arg(&x).arg(&w).arg(&b).arg(&dst).arg(&di).arg(&eps);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    /// The fused attention kernel's scalar arguments: (T, heads, kv heads), scale, cap, causal, window.
    struct FlashArgs {
        ints: [i32; 3],
        scale: f32,
        cap: f32,
        causal: i32,
        window: i32,
    }

    /// One launch of a fused attention kernel on q, k, v (16-byte aligned views) of one dtype.
    fn flash_launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        qkv: [(&CudaSlice<T>, &Layout); 3],
        lens: &CudaView<'_, u32>,
        n: usize,
        cfg: LaunchConfig,
        a: &FlashArgs,
    ) -> Result<CudaStorage> {
        let [q, k, v] = qkv;
        let (q, k, v) = (aligned(q.0, q.1)?, aligned(k.0, k.1)?, aligned(v.0, v.1)?);
        let func = dev
            .get_or_load_custom_func(name, FLASH_MODULE, flash_ptx()?)
            .map_err(|e| flash_load_error(name, e))?;
        // SAFETY: the kernel writes every element of the output.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let mut bld = func.builder();
        bld.arg(&q).arg(&k).arg(&v).arg(lens).arg(&dst);
        bld.arg(&a.ints[0]).arg(&a.ints[1]).arg(&a.ints[2]);
        bld.arg(&a.scale).arg(&a.cap).arg(&a.causal).arg(&a.window);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    /// One launch of the fused SiLU product on gate and up of one dtype.
    fn silu_mul_launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        gate: (&CudaSlice<T>, &Layout),
        up: (&CudaSlice<T>, &Layout),
        n: usize,
        cfg: LaunchConfig,
    ) -> Result<CudaStorage> {
        let (g, u) = (contiguous(gate.0, gate.1)?, contiguous(up.0, up.1)?);
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let n64 = n as u64;
        let mut bld = func.builder();
        bld.arg(&g).arg(&u).arg(&dst).arg(&n64);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    struct SoftmaxArgs {
        heads: i32,
        tq: i32,
        s: i32,
        scale: f32,
        cap: f32,
        causal: i32,
        window: i32,
    }

    #[allow(clippy::too_many_arguments)]
    fn softmax_launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        v: &CudaSlice<T>,
        xl: &Layout,
        lens: &CudaView<'_, u32>,
        cfg: LaunchConfig,
        n: usize,
        a: &SoftmaxArgs,
        name: &str,
    ) -> Result<CudaStorage> {
        let src = contiguous(v, xl)?;
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let mut bld = func.builder();
        bld.arg(&src);
        bld.arg(lens);
        bld.arg(&dst);
        bld.arg(&a.heads);
        bld.arg(&a.tq);
        bld.arg(&a.s);
        bld.arg(&a.scale);
        bld.arg(&a.cap);
        bld.arg(&a.causal);
        bld.arg(&a.window);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    #[allow(clippy::too_many_arguments)]
    fn rms_launch<T: CudaDType + DeviceRepr, W: DeviceRepr>(
        dev: &CudaDevice,
        x: &CudaSlice<T>,
        xl: &Layout,
        w: &CudaSlice<W>,
        wl: &Layout,
        cfg: LaunchConfig,
        n: usize,
        d: i32,
        op: &Rms,
        name: &str,
    ) -> Result<CudaStorage> {
        let src = contiguous(x, xl)?;
        let scale = contiguous(w, wl)?;
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(n)? };
        let round_first = op.round_first as i32;
        let mut bld = func.builder();
        bld.arg(&src);
        bld.arg(&scale);
        bld.arg(&dst);
        bld.arg(&d);
        bld.arg(&op.eps);
        bld.arg(&round_first);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    /// Per row of lens logits z [R, V] against target log-probabilities lp [r0, V] (row r % r0):
    /// (KL(p || softmax(z)), lse(z)) as f64 [R, 2].
    pub struct KlRowStats;

    impl candle_core::CustomOp2 for KlRowStats {
        fn name(&self) -> &'static str {
            "jumplens-kl-row-stats"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused KL runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            z: &CudaStorage,
            zl: &Layout,
            lp: &CudaStorage,
            ll: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = z.device().clone();
            let (rows, v, r0) = kl_shapes(zl, ll)?;
            let CudaStorageSlice::F32(lp) = &lp.slice else {
                candle_core::bail!("fused KL: the target's log-probabilities must be f32");
            };
            let lp = contiguous(lp, ll)?;
            let dims = [v as i32, r0 as i32];
            let dst = match &z.slice {
                CudaStorageSlice::F32(s) => {
                    kl_stats_launch(&dev, "kl_row_stats_f32", contiguous(s, zl)?, &lp, rows, dims)?
                }
                CudaStorageSlice::BF16(s) => {
                    kl_stats_launch(&dev, "kl_row_stats_bf16", contiguous(s, zl)?, &lp, rows, dims)?
                }
                CudaStorageSlice::F16(s) => {
                    kl_stats_launch(&dev, "kl_row_stats_f16", contiguous(s, zl)?, &lp, rows, dims)?
                }
                _ => candle_core::bail!("fused KL: unsupported logits dtype {:?}", z.dtype()),
            };
            Ok((CudaStorage::wrap_cuda_slice(dst, dev.clone()), Shape::from((rows, 2))))
        }
    }

    /// The gradient (softmax(z) - exp(lp)) * inv_n [R, V] f32, with the row statistics of
    /// [`KlRowStats`].
    pub struct KlGrad {
        pub inv_n: f32,
    }

    impl candle_core::CustomOp3 for KlGrad {
        fn name(&self) -> &'static str {
            "jumplens-kl-grad"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the fused KL gradient runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            z: &CudaStorage,
            zl: &Layout,
            lp: &CudaStorage,
            ll: &Layout,
            st: &CudaStorage,
            sl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = z.device().clone();
            let (rows, v, r0) = kl_shapes(zl, ll)?;
            if sl.shape().dims() != [rows, 2] {
                candle_core::bail!("fused KL gradient: row statistics {:?} for {rows} rows", sl.shape());
            }
            let (CudaStorageSlice::F32(lp), CudaStorageSlice::F64(st)) = (&lp.slice, &st.slice) else {
                candle_core::bail!("fused KL gradient: f32 log-probabilities and f64 row statistics");
            };
            let (lp, st) = (contiguous(lp, ll)?, contiguous(st, sl)?);
            let (dims, inv_n) = ([rows, v, r0], self.inv_n);
            let out = match &z.slice {
                CudaStorageSlice::F32(s) => {
                    kl_grad_launch(&dev, "kl_grad_f32", contiguous(s, zl)?, &lp, &st, dims, inv_n)?
                }
                CudaStorageSlice::BF16(s) => {
                    kl_grad_launch(&dev, "kl_grad_bf16", contiguous(s, zl)?, &lp, &st, dims, inv_n)?
                }
                CudaStorageSlice::F16(s) => {
                    kl_grad_launch(&dev, "kl_grad_f16", contiguous(s, zl)?, &lp, &st, dims, inv_n)?
                }
                _ => candle_core::bail!("fused KL gradient: unsupported logits dtype {:?}", z.dtype()),
            };
            Ok((out, zl.shape().clone()))
        }
    }

    /// One launch of `kl_row_stats_*` on logits z [rows, v] against lp [r0, v] (`dims`: v, r0).
    fn kl_stats_launch<T: DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        z: CudaView<T>,
        lp: &CudaView<f32>,
        rows: usize,
        dims: [i32; 2],
    ) -> Result<CudaSlice<f64>> {
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes both entries of every row.
        let dst = unsafe { dev.alloc::<f64>(rows * 2)? };
        let mut bld = func.builder();
        bld.arg(&z).arg(lp).arg(&dst).arg(&dims[0]).arg(&dims[1]);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(row_config(rows, 1024)) }.w()?;
        Ok(dst)
    }

    /// One launch of `kl_grad_*`: the gradient [rows, v] in z's dtype (`dims`: rows, v, r0).
    fn kl_grad_launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        name: &str,
        z: CudaView<T>,
        lp: &CudaView<f32>,
        stats: &CudaView<f64>,
        dims: [usize; 3],
        inv_n: f32,
    ) -> Result<CudaStorage> {
        let [rows, v, r0] = dims;
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        // SAFETY: the kernel writes every element.
        let dst = unsafe { dev.alloc::<T>(rows * v)? };
        let (vi, r0i) = (v as i32, r0 as i32);
        let mut bld = func.builder();
        bld.arg(&z).arg(lp).arg(stats).arg(&dst).arg(&vi).arg(&r0i).arg(&inv_n);
        // SAFETY: the arguments match the kernel's signature.
        unsafe { bld.launch(row_config(rows, 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
    }

    /// (rows, vocabulary, target rows) of lens logits [R, V] against a target [r0, V], R a
    /// multiple of r0.
    fn kl_shapes(zl: &Layout, ll: &Layout) -> Result<(usize, usize, usize)> {
        let (rows, v) = zl.shape().dims2()?;
        let (r0, vt) = ll.shape().dims2()?;
        if v != vt || r0 == 0 || !rows.is_multiple_of(r0) || v > i32::MAX as usize {
            candle_core::bail!("fused KL: logits [{rows}, {v}] for a target of [{r0}, {vt}]");
        }
        Ok((rows, v, r0))
    }

    /// One block of `threads` per row (the row kernels: softmax, norms, the KL).
    fn row_config(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub fn is_cuda(t: &Tensor) -> bool {
        t.device().is_cuda()
    }

    pub fn half_or_f32(d: DType) -> bool {
        matches!(d, DType::F32 | DType::BF16 | DType::F16)
    }
}

/// softmax(mask(cap(round(scores * scale)))) in f32, returned in the scores' dtype, for scores
/// [B, H, T, S] on a CUDA device; `None` elsewhere (the caller runs the candle ops).
pub fn masked_softmax(
    scores: &Tensor,
    mask: &MaskSpec,
    scale: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if cuda::is_cuda(scores) && cuda::half_or_f32(scores.dtype()) {
            let (_, h, _, _) = scores.dims4()?;
            let op = cuda::Softmax {
                heads: h,
                scale: scale as f32,
                cap: softcap.unwrap_or(0.0) as f32,
                causal: mask.causal,
                window: mask.window,
            };
            return Ok(Some(scores.contiguous()?.apply_op2_no_bwd(&mask.lengths, &op)?));
        }
    }
    let _ = (scores, mask, scale, softcap);
    Ok(None)
}

/// RMSNorm of x over its last dimension on a CUDA device (`round_first`: the scale multiplies
/// after rounding the normalised value to x's dtype); `None` elsewhere.
/// Whether [`flash_attention`] can run: a CUDA tensor in bf16/f16 with head size 64 or 128, and not
/// switched off (`JUMPLENS_ATTENTION=materialized` keeps the probabilities-materialising path for
/// A/B comparisons).
pub fn flash_supported(q: &Tensor, head_dim: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("JUMPLENS_ATTENTION").is_ok_and(|v| v == "materialized"));
    cfg!(feature = "cuda")
        && !off
        && q.device().is_cuda()
        && matches!(q.dtype(), candle_core::DType::BF16 | candle_core::DType::F16)
        && matches!(head_dim, 64 | 128)
}

/// softmax(mask(cap(round(q k^T) * scale))) v without materialising the probabilities, for q
/// [B, T, H, D] and k, v [B, T, Hkv, D] in the projections' layout; returns [B, T, H, D]. `None`
/// where [`flash_supported`] is false.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &MaskSpec,
    scale: f64,
    softcap: Option<f64>,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if flash_supported(q, q.dims4()?.3) {
            let op = cuda::Flash {
                lengths: mask.lengths.clone(),
                scale: scale as f32,
                cap: softcap.unwrap_or(0.0) as f32,
                causal: mask.causal,
                window: mask.window,
            };
            return Ok(Some(q.contiguous()?.apply_op3_no_bwd(
                &k.contiguous()?,
                &v.contiguous()?,
                &op,
            )?));
        }
    }
    let _ = (q, k, v, mask, scale, softcap);
    Ok(None)
}

/// silu(gate) * up in one pass on a CUDA device in bf16 / f16 (PyTorch's two roundings); `None`
/// elsewhere.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if gate.device().is_cuda()
            && matches!(gate.dtype(), candle_core::DType::BF16 | candle_core::DType::F16)
            && gate.dtype() == up.dtype()
            && gate.dims() == up.dims()
        {
            return Ok(Some(
                gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &cuda::SiluMul)?,
            ));
        }
    }
    let _ = (gate, up);
    Ok(None)
}

pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64, round_first: bool) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if cuda::is_cuda(x) && cuda::half_or_f32(x.dtype()) {
            let op = cuda::Rms {
                eps: eps as f32,
                round_first,
            };
            return Ok(Some(x.contiguous()?.apply_op2_no_bwd(&scale.contiguous()?, &op)?));
        }
    }
    let _ = (x, scale, eps, round_first);
    Ok(None)
}

/// The tuned lens's loss and its gradient for lens logits [R, V] (f32, bf16 or f16 on a CUDA
/// device; read as f32, the gradient rounded once to their dtype) against
/// a target's log-probabilities [r0, V] (f32; row r of the logits is scored against target row
/// r % r0): `(sum over rows of KL(p || softmax(logits)) as an f64 scalar tensor,
/// (softmax(logits) - p) * inv_n)`, two kernels instead of candle's ~ten passes; `None` elsewhere.
pub fn kl_and_grad(logits: &Tensor, log_p: &Tensor, inv_n: f64) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::DType;
        if cuda::is_cuda(logits) && cuda::half_or_f32(logits.dtype()) && log_p.dtype() == DType::F32 {
            let (z, lp) = (logits.contiguous()?, log_p.contiguous()?);
            let stats = z.apply_op2_no_bwd(&lp, &cuda::KlRowStats)?;
            let grad = z.apply_op3_no_bwd(&lp, &stats, &cuda::KlGrad { inv_n: inv_n as f32 })?;
            return Ok(Some((stats.narrow(1, 0, 1)?.sum_all()?, grad)));
        }
    }
    let _ = (logits, log_p, inv_n);
    Ok(None)
}

/// Whether the LayerNorm and bias/activation kernels ([`layer_norm`], [`bias_act`]) run: yes,
/// unless `JUMPLENS_FUSED_EPILOGUES=0` (candle's ops then run, for comparison). Measured on the
/// H200 (`scripts/device_bench.sh forward fused bf16small`, GPT-2 shape, same run against
/// PyTorch): bf16 at 256 / 1024 x 24 tokens 0.42x / 0.38x of PyTorch without them, 1.35x / 0.85x
/// with them; f32 0.80x / 0.78x -> 0.96x / 0.97x; hidden states vs transformers' eager attention
/// 7.1e-3 (bf16, PyTorch's own sdpa 6.4e-3) and 5.3e-7 (f32), as without them.
pub fn epilogues_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("JUMPLENS_FUSED_EPILOGUES").as_deref() != Ok("0"))
}

/// `act(y + bias)` with the bias broadcast over rows, in one pass on a CUDA device (f32, bf16,
/// f16; the bias in y's dtype) when [`epilogues_enabled`]; `None` elsewhere. Replaces candle's broadcast add, whose strided
/// indexing took 32 of a GPT-2 forward's 60 ms at 1024 x 24 tokens on the H200 (four bias adds
/// per block), and the activation's own pass.
pub fn bias_act(
    y: &Tensor,
    bias: &Tensor,
    act: Option<crate::model::layers::Activation>,
) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        use crate::model::layers::Activation;
        if epilogues_enabled() && cuda::is_cuda(y) && cuda::half_or_f32(y.dtype()) && bias.dtype() == y.dtype() {
            let code = match act {
                None => 0,
                Some(Activation::GeluTanh) => 1,
                Some(Activation::GeluErf) => 2,
                Some(Activation::Relu) => 3,
                Some(Activation::Silu) => 4,
            };
            return Ok(Some(
                y.contiguous()?
                    .apply_op2_no_bwd(&bias.contiguous()?, &cuda::BiasAct { act: code })?,
            ));
        }
    }
    let _ = (y, bias, act);
    Ok(None)
}

/// LayerNorm of x over its last dimension on a CUDA device, weight and bias in x's dtype
/// (computed in f32, one rounding) when [`epilogues_enabled`]; `None` elsewhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> candle_core::Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if epilogues_enabled()
            && cuda::is_cuda(x)
            && cuda::half_or_f32(x.dtype())
            && weight.dtype() == x.dtype()
            && bias.dtype() == x.dtype()
        {
            let op = cuda::LayerNormOp { eps: eps as f32 };
            return Ok(Some(x.contiguous()?.apply_op3_no_bwd(
                &weight.contiguous()?,
                &bias.contiguous()?,
                &op,
            )?));
        }
    }
    let _ = (x, weight, bias, eps);
    Ok(None)
}
