// Device helpers shared by kernels.cu, fp8.cu and dequant.cu (each compiled to its own PTX by
// build.rs): conversions between f32 and the element types, block-wide reductions, and the
// e4m3 scale rule of models/fp8.rs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

// x of an element type as f32, and f32 rounded (to nearest) to an element type.
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

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `scratch` holds 32 floats; the caller syncs before reusing it.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? scratch[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

// The largest `v` over the block (NaNs dropped by fmaxf), as block_sum; every thread gets it.
__device__ __forceinline__ float block_max(float v, float *scratch) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x / 32) ? scratch[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// The e4m3 scale for a largest magnitude: amax / 448, or 1 when amax is 0 or not finite
// (models/fp8.rs's scale_for).
__device__ __forceinline__ float e4m3_scale(float amax) {
    return (amax > 0.f && isfinite(amax)) ? amax / 448.f : 1.f;
}
