// Fused CUDA kernels for the hot spots candle runs as several passes (see mod.rs).
// Compiled to PTX by build.rs when the `cuda` feature is on; loaded at run time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <math.h>
#include <stdint.h>

#include "common.cuh"

// softmax(scale * x) over each row of a contiguous [rows, cols] matrix, all arithmetic in
// f32 whatever T is, one warp per row (blockDim = (32, rows per block)). Pass one keeps a
// running (max, sum of exp) per lane, merged across the warp; pass two writes the result.
// Rows of -inf only give NaN, as torch's softmax does.
template <typename T>
__device__ void scaled_softmax_rows(const T *src, T *dst, int rows, int cols, float scale) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // the whole warp shares `row`
    const T *x = src + (size_t)row * cols;
    T *y = dst + (size_t)row * cols;
    float m = -INFINITY, s = 0.f;
    for (int c = threadIdx.x; c < cols; c += 32) {
        const float v = load_f32(x[c]) * scale;
        if (v > m) {
            s = s * expf(m - v) + 1.f;  // expf(-inf) = 0 on the first value
            m = v;
        } else if (v != -INFINITY) {
            s += expf(v - m);
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, offset);
        const float s2 = __shfl_xor_sync(0xffffffff, s, offset);
        const float top = fmaxf(m, m2);
        const float a = m == -INFINITY ? 0.f : s * expf(m - top);
        const float b = m2 == -INFINITY ? 0.f : s2 * expf(m2 - top);
        s = a + b;
        m = top;
    }
    const float inv = 1.f / s;
    for (int c = threadIdx.x; c < cols; c += 32) {
        y[c] = store_f32<T>(expf(load_f32(x[c]) * scale - m) * inv);
    }
}

// y = x + bias over each row of a contiguous [rows, cols] matrix (bias [cols]), added in
// f32 and rounded once. Grid (column blocks, rows): no index division per element.
template <typename T>
__device__ void add_row_bias(const T *x, const T *bias, T *y, int rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const size_t i = (size_t)r * cols + c;
        y[i] = store_f32<T>(load_f32(x[i]) + load_f32(bias[c]));
    }
}

// FLUX's AdaLN modulation of one row: layer norm without affine (eps), then
// y = norm(x) * (1 + scale[b]) + shift[b], in f32, rounded once. x, y [B, S, C] contiguous;
// shift, scale [B, C]. One block per row; the row is kept in dynamic shared memory (C floats).
// With FP8 the rounded row is also written as e4m3 for the fp8 GEMM, with its own scale
// (amax / 448, 1 for a row of zeros or a non-finite amax) in row_scales[row]: the values
// the 16-bit y holds, quantized as models/fp8.rs's quantize_rows does, so the fused op
// equals "modulate, then quantize the rows" exactly.
template <typename T, bool FP8>
__device__ void modulated_layer_norm(const T *x, const T *shift, const T *scale, T *y,
                                     __nv_fp8_e4m3 *q, float *row_scales, int S, int C,
                                     float eps) {
    extern __shared__ float row_f32[];
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const int b = (int)(row / S);
    const T *xr = x + row * C;
    float sum = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float v = load_f32(xr[c]);
        row_f32[c] = v;
        sum += v;
    }
    const float mean = block_sum(sum, scratch) / C;
    __syncthreads();
    float sq = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float d = row_f32[c] - mean;
        sq += d * d;
    }
    const float rstd = rsqrtf(block_sum(sq, scratch) / C + eps);
    const T *sh = shift + (size_t)b * C, *sc = scale + (size_t)b * C;
    T *yr = y + row * C;
    float amax = 0.f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float n = (row_f32[c] - mean) * rstd;
        const T out = store_f32<T>(n * (1.f + load_f32(sc[c])) + load_f32(sh[c]));
        yr[c] = out;
        if (FP8) {
            // Each thread reads back only the columns it wrote: no barrier needed.
            const float v = load_f32(out);
            row_f32[c] = v;
            amax = fmaxf(amax, fabsf(v));
        }
    }
    if (!FP8) return;
    __syncthreads();  // block_sum's readers of `scratch` are done before block_max writes it
    amax = block_max(amax, scratch);
    const float s = e4m3_scale(amax);
    if (threadIdx.x == 0) row_scales[row] = s;
    __nv_fp8_e4m3 *qr = q + row * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        // IEEE division (no fast math), as the CPU reference divides.
        qr[c].__x = __nv_cvt_float_to_fp8(row_f32[c] / s, __NV_SATFINITE, __NV_E4M3);
    }
}

// out = x + gate[b] * y for x, y [B, S, C], gate [B, C]; f32, rounded once. Grid (column
// blocks, rows).
template <typename T>
__device__ void gated_residual(const T *x, const T *y, const T *gate, T *out, int rows, int S,
                               int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const size_t i = (size_t)r * C + c;
        const float g = load_f32(gate[(size_t)(r / S) * C + c]);
        out[i] = store_f32<T>(load_f32(x[i]) + g * load_f32(y[i]));
    }
}

// Per-head RMS norm (weight w [D], eps) then interleaved-pair RoPE (cos, sin [S, D/2] f32:
// (a, b) -> (a cos - b sin, a sin + b cos)) of x [B, S, H, D], written in the same layout;
// f32, rounded once. One warp per (b, s, h) row; blockDim = (32, rows per block).
template <typename T>
__device__ void qk_norm_rope(const T *x, const T *w, const float *cos, const float *sin, T *y,
                             int rows, int S, int H, int D, float eps) {
    const size_t row = (size_t)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= (size_t)rows) return;  // the whole warp shares `row`
    const int s = (int)((row / H) % S);
    const T *xr = x + row * D;
    T *yr = y + row * D;
    float sq = 0.f;
    for (int i = threadIdx.x; i < D; i += 32) {
        const float v = load_f32(xr[i]);
        sq += v * v;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, offset);
    const float rstd = rsqrtf(sq / D + eps);
    const float *cr = cos + (size_t)s * (D / 2), *sr = sin + (size_t)s * (D / 2);
    for (int p = threadIdx.x; p < D / 2; p += 32) {
        const float a = load_f32(xr[2 * p]) * rstd * load_f32(w[2 * p]);
        const float b = load_f32(xr[2 * p + 1]) * rstd * load_f32(w[2 * p + 1]);
        yr[2 * p] = store_f32<T>(a * cr[p] - b * sr[p]);
        yr[2 * p + 1] = store_f32<T>(a * sr[p] + b * cr[p]);
    }
}

#define DEFINE_KERNELS(T, SUFFIX)                                                             \
    extern "C" __global__ void scaled_softmax_##SUFFIX(const T *src, T *dst, int rows,       \
                                                       int cols, float scale) {               \
        scaled_softmax_rows<T>(src, dst, rows, cols, scale);                                  \
    }                                                                                         \
    extern "C" __global__ void add_row_bias_##SUFFIX(const T *x, const T *bias, T *y,        \
                                                     int rows, int cols) {                    \
        add_row_bias<T>(x, bias, y, rows, cols);                                              \
    }                                                                                         \
    extern "C" __global__ void modulated_layer_norm_##SUFFIX(                                 \
        const T *x, const T *shift, const T *scale, T *y, int S, int C, float eps) {           \
        modulated_layer_norm<T, false>(x, shift, scale, y, nullptr, nullptr, S, C, eps);      \
    }                                                                                         \
    extern "C" __global__ void modulated_layer_norm_fp8_##SUFFIX(                             \
        const T *x, const T *shift, const T *scale, T *y, __nv_fp8_e4m3 *q, float *row_scales, \
        int S, int C, float eps) {                                                            \
        modulated_layer_norm<T, true>(x, shift, scale, y, q, row_scales, S, C, eps);          \
    }                                                                                         \
    extern "C" __global__ void gated_residual_##SUFFIX(const T *x, const T *y, const T *gate,  \
                                                       T *out, int rows, int S, int C) {      \
        gated_residual<T>(x, y, gate, out, rows, S, C);                                       \
    }                                                                                         \
    extern "C" __global__ void qk_norm_rope_##SUFFIX(const T *x, const T *w, const float *cos, \
                                                     const float *sin, T *y, int rows, int S, \
                                                     int H, int D, float eps) {               \
        qk_norm_rope<T>(x, w, cos, sin, y, rows, S, H, D, eps);                               \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(__half, f16)
DEFINE_KERNELS(__nv_bfloat16, bf16)
