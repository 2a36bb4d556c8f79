// Fused CUDA kernels for the hot spots candle runs as several passes (see mod.rs).
// Compiled to PTX by build.rs when the `cuda` feature is on; loaded at run time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float load_f32(T x);
template <> __device__ __forceinline__ float load_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float load_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float load_f32<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T store_f32(float x);
template <> __device__ __forceinline__ float store_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half store_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 store_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

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

#define DEFINE_KERNELS(T, SUFFIX)                                                             \
    extern "C" __global__ void scaled_softmax_##SUFFIX(const T *src, T *dst, int rows,       \
                                                       int cols, float scale) {               \
        scaled_softmax_rows<T>(src, dst, rows, cols, scale);                                  \
    }                                                                                         \
    extern "C" __global__ void add_row_bias_##SUFFIX(const T *x, const T *bias, T *y,        \
                                                     int rows, int cols) {                    \
        add_row_bias<T>(x, bias, y, rows, cols);                                              \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(__half, f16)
DEFINE_KERNELS(__nv_bfloat16, bf16)
