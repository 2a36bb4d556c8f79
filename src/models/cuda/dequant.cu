// ggml-quantized weights dequantized straight into the model dtype (bf16 / f16) for the GEMM
// of a GGUF layer on the GPU (issue 32): candle's CUDA dequantization writes f32, which a
// second pass then casts, so a layer cost a 4-byte write, a 4-byte read and a 2-byte write
// per weight; here it is one pass, the quantized bytes in and 2 bytes out.
//
// One thread per output value; a block's scale is read by every thread of that block (the
// warp's loads coalesce). The block layouts are ggml's (ggml-common.h, as candle's
// k_quants.rs mirrors them):
//   Q8_0: 34 bytes per 32 values:  f16 d, int8 qs[32];          x[j] = qs[j] * d
//   Q4_0: 18 bytes per 32 values:  f16 d, uint8 qs[16];         x[j] = ((qs[j] & 15) - 8) * d,
//                                                                x[j + 16] = ((qs[j] >> 4) - 8) * d
//   Q4_K: 144 bytes per 256 values: f16 d, f16 dmin, uint8 scales[12] (8 pairs of 6-bit scale
//         and min), uint8 qs[128]; the 256 values are 4 chunks of 64, chunk c reading
//         qs[32c .. 32c + 32]: low nibbles with pair 2c, high nibbles with pair 2c + 1;
//         x = d * scale * nibble - dmin * min.
// Arithmetic in f32 as candle's CPU to_float does it (the product and difference rounded
// separately: __fmul_rn / __fsub_rn keep nvcc from contracting them into an fma), then one
// rounding to the output type. models/cuda/dequant.rs holds the same decoding on the CPU.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

__device__ __forceinline__ float half_at(const uint8_t *p) {
  // Blocks are 2-byte aligned (34, 18 and 144 are even), so the f16 loads are aligned.
  return __half2float(*reinterpret_cast<const __half *>(p));
}

template <typename T>
__device__ void dequantize_q8_0(const uint8_t *__restrict__ q, T *__restrict__ y, long long n) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint8_t *block = q + (i / 32) * 34;
  const float v = (float)(int8_t)block[2 + i % 32];
  y[i] = store_f32<T>(__fmul_rn(v, half_at(block)));
}

template <typename T>
__device__ void dequantize_q4_0(const uint8_t *__restrict__ q, T *__restrict__ y, long long n) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint8_t *block = q + (i / 32) * 18;
  const int j = (int)(i % 32);
  const uint8_t byte = block[2 + j % 16];
  const int nibble = j < 16 ? (byte & 15) : (byte >> 4);
  y[i] = store_f32<T>(__fmul_rn((float)(nibble - 8), half_at(block)));
}

// ggml's get_scale_min_k4: the 6-bit scale and min of pair j (0..7) from scales[12].
__device__ __forceinline__ void scale_min_k4(int j, const uint8_t *s, int *scale, int *min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

template <typename T>
__device__ void dequantize_q4_k(const uint8_t *__restrict__ q, T *__restrict__ y, long long n) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  const uint8_t *block = q + (i / 256) * 144;
  const int t = (int)(i % 256), chunk = t / 64, within = t % 64;
  const bool high = within >= 32;
  int scale, min;
  scale_min_k4(2 * chunk + (high ? 1 : 0), block + 4, &scale, &min);
  const uint8_t byte = block[16 + 32 * chunk + within % 32];
  const int nibble = high ? (byte >> 4) : (byte & 15);
  const float d = __fmul_rn(half_at(block), (float)scale);
  const float m = __fmul_rn(half_at(block + 2), (float)min);
  y[i] = store_f32<T>(__fsub_rn(__fmul_rn(d, (float)nibble), m));
}

#define DEQUANTIZE(KIND, T, SUFFIX)                                                         \
  extern "C" __global__ void dequantize_##KIND##_##SUFFIX(const uint8_t *q, T *y,          \
                                                          long long n) {                   \
    dequantize_##KIND<T>(q, y, n);                                                          \
  }

DEQUANTIZE(q8_0, __nv_bfloat16, bf16)
DEQUANTIZE(q8_0, __half, f16)
DEQUANTIZE(q4_0, __nv_bfloat16, bf16)
DEQUANTIZE(q4_0, __half, f16)
DEQUANTIZE(q4_k, __nv_bfloat16, bf16)
DEQUANTIZE(q4_k, __half, f16)
