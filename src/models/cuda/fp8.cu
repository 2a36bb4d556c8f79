// Activation quantization for the fp8 GEMM (gemm.rs): one dynamic scale per tensor,
// amax / 448, as models/fp8.rs does on the CPU. Two passes over the activations:
//   absmax_*:        the largest |x| (NaNs skipped) into a float held as its bits, which
//                    order like the floats for non-negative values, so atomicMax on the
//                    unsigned bits is a float max; the buffer starts at 0.
//   quantize_e4m3_*: scale = amax / 448 (1 when amax is 0 or not finite), written for the
//                    GEMM's B scale pointer; each x / scale rounded to nearest even e4m3 and
//                    saturated at +-448 (__NV_SATFINITE; NaN stays NaN).
// The per-tensor scheme is the fallback: where cuBLASLt takes a scale per row (sm90+), the
// activations are quantized one row (token) at a time instead, inside the fused modulate
// kernel (kernels.cu) or, for inputs no kernel of ours writes, by quantize_rows_e4m3_* below:
// one block per row, the row read twice (the second read from L2), no second launch.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common.cuh"

template <typename T>
__device__ void absmax(const T* __restrict__ x, unsigned int* amax_bits, long long n) {
  float m = 0.0f;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    m = fmaxf(m, fabsf(load_f32(x[i])));  // fmaxf drops a NaN operand
  }
  __shared__ float scratch[32];
  m = block_max(m, scratch);
  if (threadIdx.x == 0) atomicMax(amax_bits, __float_as_uint(m));
}

template <typename T>
__device__ void quantize_e4m3(const T* __restrict__ x, const unsigned int* amax_bits,
                              __nv_fp8_e4m3* __restrict__ q, float* scale_out, long long n) {
  const float amax = __uint_as_float(*amax_bits);
  const float scale = e4m3_scale(amax);
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale_out = scale;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    // IEEE division (no fast math), so the quotient is the CPU reference's.
    q[i].__x = __nv_cvt_float_to_fp8(load_f32(x[i]) / scale, __NV_SATFINITE, __NV_E4M3);
  }
}

// Row r of x [rows, cols] as e4m3 with its own scale, amax(row) / 448 (1 when 0 or not
// finite), into row_scales[r]: models/fp8.rs's quantize_rows. One block per row.
template <typename T>
__device__ void quantize_rows_e4m3(const T* __restrict__ x, __nv_fp8_e4m3* __restrict__ q,
                                   float* __restrict__ row_scales, int cols) {
  const size_t row = blockIdx.x;
  const T* xr = x + row * cols;
  float m = 0.0f;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, fabsf(load_f32(xr[c])));
  __shared__ float scratch[32];
  const float scale = e4m3_scale(block_max(m, scratch));
  if (threadIdx.x == 0) row_scales[row] = scale;
  __nv_fp8_e4m3* qr = q + row * cols;
  for (int c = threadIdx.x; c < cols; c += blockDim.x) {
    qr[c].__x = __nv_cvt_float_to_fp8(load_f32(xr[c]) / scale, __NV_SATFINITE, __NV_E4M3);
  }
}

#define INSTANTIATE(T, NAME)                                                                  \
  extern "C" __global__ void absmax_##NAME(const T* x, unsigned int* amax_bits, long long n) { \
    absmax<T>(x, amax_bits, n);                                                               \
  }                                                                                           \
  extern "C" __global__ void quantize_e4m3_##NAME(const T* x, const unsigned int* amax_bits,   \
                                                  __nv_fp8_e4m3* q, float* scale,             \
                                                  long long n) {                              \
    quantize_e4m3<T>(x, amax_bits, q, scale, n);                                              \
  }                                                                                           \
  extern "C" __global__ void quantize_rows_e4m3_##NAME(const T* x, __nv_fp8_e4m3* q,          \
                                                       float* row_scales, int cols) {         \
    quantize_rows_e4m3<T>(x, q, row_scales, cols);                                            \
  }

INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
