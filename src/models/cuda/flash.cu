// Flash attention for FLUX's joint attention and, further down, the Qwen-VL judge's
// (judge_attention; see attention.rs): softmax(q k^T / sqrt(D)) v without writing the scores
// to memory. Our own kernel, after the published algorithm
// (Dao, "FlashAttention-2", 2023: query tiles held on chip, key/value tiles streamed, an
// online softmax with the running max and sum per row).
//
// Layout: q, k, v and out are [B, L, H, D] (row (b, l, h) of D elements at
// ((b * L + l) * H + h) * D), the layout the q/k/v linears write, so no transposes are
// needed before or after. bf16 or f16 in and out, f32 scores, softmax and accumulators.
// Not causal; any L (the tail tiles are zero-filled and their keys masked).
//
// One block computes BLOCK_M = 16 * WARPS query rows of one (b, h); each warp owns 16 of
// them. Per key tile of BLOCK_N = 64 keys:
//   S = Q K^T  (mma.sync m16n8k16, Q fragments kept in registers, K through ldmatrix),
//   online softmax on S in registers (each thread holds 2 rows x 16 columns of S),
//   O += P V   (P re-packed from the S accumulators as A fragments, V through
//               ldmatrix.trans).
// K and V tiles are loaded with cp.async: V(j) while S(j) is computed, K(j+1) while P V(j)
// is. Shared rows are padded by 8 elements so ldmatrix's 8 row addresses hit different banks.
// Needs sm_80+ (mma.sync bf16, cp.async); compiled to PTX by build.rs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int BLOCK_N = 64;
constexpr int PAD = 8;

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 zero-fills the destination.
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// d += a * b for one m16n8k16 tile, f32 accumulators.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // Two f32 values as one register of two bf16 (lo in the low half: the lower column).
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
};
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
};

// rows x D elements of one (b, h) starting at sequence row `row0` into shared memory
// (stride DP + PAD), rows at or past L zero-filled, and columns D..DP (the head dim padded
// to a multiple of 16, DP > D only for the judge's head dim 72) zero-filled.
template <typename T, int D, int THREADS, int DP = D>
__device__ __forceinline__ void load_tile(T *dst, const T *base, int row0, int rows, int L,
                                          size_t row_stride) {
    constexpr int CHUNKS = DP / 8;  // 16-byte pieces per row
    for (int i = threadIdx.x; i < rows * CHUNKS; i += THREADS) {
        const int r = i / CHUNKS, c = (i % CHUNKS) * 8;
        const int l = row0 + r;
        const bool inside = l < L && c < D;
        const T *src = base + (inside ? (size_t)l * row_stride + c : 0);
        cp_async_16(dst + r * (DP + PAD) + c, src, inside ? 16 : 0);
    }
}

template <typename T, int D, int WARPS>
__device__ __forceinline__ void flash_attention(const T *__restrict__ q, const T *__restrict__ k,
                                                const T *__restrict__ v, T *__restrict__ out,
                                                int L, int H, float scale_log2) {
    constexpr int THREADS = 32 * WARPS;
    constexpr int BLOCK_M = 16 * WARPS;
    constexpr int KSTEPS = D / 16;   // k-steps of Q K^T over the head dimension
    constexpr int NTILES = BLOCK_N / 8;  // 8-key column tiles of S
    constexpr int DTILES = D / 8;    // 8-wide column tiles of O
    static_assert(BLOCK_M <= 2 * BLOCK_N, "the Q tile is staged in the K and V buffers");
    __shared__ __align__(16) T smem[2 * BLOCK_N * (D + PAD)];
    T *k_tile = smem;
    T *v_tile = smem + BLOCK_N * (D + PAD);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int b = blockIdx.z, h = blockIdx.y;
    const int m0 = blockIdx.x * BLOCK_M;
    const size_t row_stride = (size_t)H * D;
    const size_t head_base = (size_t)b * L * row_stride + (size_t)h * D;
    const T *qh = q + head_base, *kh = k + head_base, *vh = v + head_base;

    // Q tile -> shared (through the K/V buffers) -> A fragments in registers.
    load_tile<T, D, THREADS>(smem, qh, m0, BLOCK_M, L, row_stride);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    uint32_t qf[KSTEPS][4];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        const int m = lane / 8;
        const int row = warp * 16 + (lane % 8) + (m % 2) * 8;
        const int col = ks * 16 + (m / 2) * 8;
        ldmatrix_x4(qf[ks], smem + row * (D + PAD) + col);
    }
    __syncthreads();  // the buffers now take K and V

    float o[DTILES][4];
#pragma unroll
    for (int i = 0; i < DTILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    // This thread's two rows (lane / 4 and lane / 4 + 8 of the warp's 16): running max (in
    // log2 units of the scaled scores) and this thread's part of the running sum.
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};

    const int tiles = (L + BLOCK_N - 1) / BLOCK_N;
    load_tile<T, D, THREADS>(k_tile, kh, 0, BLOCK_N, L, row_stride);
    cp_async_commit();
    for (int j = 0; j < tiles; ++j) {
        cp_async_wait_all();
        __syncthreads();  // K(j) is in; every warp is done with V(j - 1)
        load_tile<T, D, THREADS>(v_tile, vh, j * BLOCK_N, BLOCK_N, L, row_stride);
        cp_async_commit();

        float s[NTILES][4];
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ks += 2) {
#pragma unroll
            for (int nt = 0; nt < NTILES; ++nt) {
                // Matrices: keys nt*8.., head dims ks*16 + {0, 8, 16, 24}: B fragments of
                // k-steps ks (r0, r1) and ks + 1 (r2, r3).
                uint32_t r[4];
                const int row = nt * 8 + (lane % 8);
                const int col = ks * 16 + (lane / 8) * 8;
                ldmatrix_x4(r, k_tile + row * (D + PAD) + col);
                Mma<T>::run(s[nt], qf[ks], r[0], r[1]);
                Mma<T>::run(s[nt], qf[ks + 1], r[2], r[3]);
            }
        }

        // Online softmax. Columns this thread holds: key j*BLOCK_N + nt*8 + (lane%4)*2 + {0,1}.
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j * BLOCK_N + nt * 8 + (lane % 4) * 2 + (e % 2);
                const float x = key < L ? s[nt][e] * scale_log2 : -INFINITY;
                s[nt][e] = x;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
            const float new_max = fmaxf(row_max[r], tile_max[r]);  // finite: key j*BLOCK_N < L
            alpha[r] = exp2f(row_max[r] - new_max);               // 0 on the first tile
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nt][e] - row_max[e / 2]);
                s[nt][e] = p;
                row_sum[e / 2] += p;
            }
        }
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }

        cp_async_wait_all();
        __syncthreads();  // V(j) is in; every warp is done with K(j)
        if (j + 1 < tiles) {
            load_tile<T, D, THREADS>(k_tile, kh, (j + 1) * BLOCK_N, BLOCK_N, L, row_stride);
            cp_async_commit();
        }

        // O += P V, P as A fragments straight from the S accumulators (16 keys a k-step).
#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            const uint32_t pf[4] = {
                Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int dt = 0; dt < DTILES; dt += 2) {
                // Matrices: keys kk*16 + {0, 8}, head dims dt*8 and (dt+1)*8, transposed:
                // B fragments of column tiles dt (r0, r1) and dt + 1 (r2, r3).
                uint32_t r[4];
                const int row = kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8);
                const int col = (dt + lane / 16) * 8;
                ldmatrix_x4_trans(r, v_tile + row * (D + PAD) + col);
                Mma<T>::run(o[dt], pf, r[0], r[1]);
                Mma<T>::run(o[dt + 1], pf, r[2], r[3]);
            }
        }
    }

    // The four threads of a row hold parts of its sum.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
    }
    const float inv[2] = {1.f / row_sum[0], 1.f / row_sum[1]};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int l = m0 + warp * 16 + lane / 4 + r * 8;
        if (l >= L) continue;
        T *dst = out + head_base + (size_t)l * row_stride + (lane % 4) * 2;
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            const uint32_t packed = Mma<T>::pack(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
            *reinterpret_cast<uint32_t *>(dst + dt * 8) = packed;
        }
    }
}


// The judge's attention (Qwen-VL vision tower and decoder prefill, see attention.rs): the
// kernel above generalised, kept apart so that FLUX's instantiations stay as they were
// measured. Per call:
// - strided layouts: q, k, v and out are addressed as (batch, head, row) with element
//   strides per operand (the head dim contiguous), so the vision tower's [H, L, D] q/k and
//   its v read in place from the qkv projection, and the decoder's [B, H, L, D] cache, need
//   no copies; out is [B, L, H, D], what the output projection reads;
// - grouped key/value heads: query head h reads key/value head h / group;
// - causal (bottom-right aligned): query row i sees keys j <= i + (len_k - len_q), so a
//   prefill after a cached prefix of len_k - len_q keys works; key tiles past a block's
//   last visible key are skipped, and only tiles that cross the diagonal are masked;
// - variable-length segments (cu_seqlens, shared by queries and keys): with nseg > 0 the
//   rows [cu[s], cu[s + 1]) attend only among themselves (block-diagonal); grid.z runs over
//   (batch, segment) and blocks past their segment's end return at once;
// - head dims 64, 72, 80 and 128 (80 has an odd number of 16-wide k-steps: the last one
//   loads its K fragments with ldmatrix.x2). 72 (Qwen3-VL's vision tower) runs as 80 (DP):
//   the tiles' columns 72..79 are zero-filled, so they add nothing to Q K^T, and the
//   output's last 8-wide tile (all zeros) is not written.
template <typename T, int D, int WARPS, int DP = D>
__device__ __forceinline__ void judge_attention(
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
    T *__restrict__ out, const int *__restrict__ cu_seqlens, int nseg, int len_q_all,
    int len_k_all, int group, int causal, long long q_sb, long long q_sh, long long q_sl,
    long long k_sb, long long k_sh, long long k_sl, long long v_sb, long long v_sh,
    long long v_sl, long long o_sb, long long o_sh, long long o_sl, float scale_log2) {
    constexpr int THREADS = 32 * WARPS;
    constexpr int BLOCK_M = 16 * WARPS;
    constexpr int KSTEPS = DP / 16;
    constexpr int NTILES = BLOCK_N / 8;
    constexpr int DTILES = DP / 8;
    constexpr int OUT_TILES = D / 8;  // tiles of O written (the padding's are zeros)
    static_assert(DP % 16 == 0 && DTILES % 2 == 0, "padded head dim: a multiple of 16");
    static_assert(D % 8 == 0 && D <= DP && DP - D < 16, "head dim: a multiple of 8, padded once");
    static_assert(BLOCK_M <= 2 * BLOCK_N, "the Q tile is staged in the K and V buffers");
    __shared__ __align__(16) T smem[2 * BLOCK_N * (DP + PAD)];
    T *k_tile = smem;
    T *v_tile = smem + BLOCK_N * (DP + PAD);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y;
    const int segments = nseg > 0 ? nseg : 1;
    const int b = blockIdx.z / segments, seg = blockIdx.z % segments;
    int start = 0, len_q = len_q_all, len_k = len_k_all;
    if (nseg > 0) {
        start = cu_seqlens[seg];
        len_q = len_k = cu_seqlens[seg + 1] - start;
    }
    // Causal blocks late in the sequence do the most work: launch them first.
    const int m_block = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int m0 = m_block * BLOCK_M;
    if (m0 >= len_q) return;  // the whole block: before any barrier
    const int offset = len_k - len_q;
    // Keys the block reads, and keys every one of its rows sees (tiles below need no mask).
    const int kv_end = causal ? min(len_k, m0 + BLOCK_M + offset) : len_k;
    const int full_end = causal ? min(len_k, m0 + 1 + offset) : len_k;

    const int kvh = h / group;
    const T *qh = q + b * q_sb + h * q_sh + start * q_sl;
    const T *kh = k + b * k_sb + kvh * k_sh + start * k_sl;
    const T *vh = v + b * v_sb + kvh * v_sh + start * v_sl;
    T *oh = out + b * o_sb + h * o_sh + start * o_sl;

    load_tile<T, D, THREADS, DP>(smem, qh, m0, BLOCK_M, len_q, q_sl);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    uint32_t qf[KSTEPS][4];
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        const int m = lane / 8;
        const int row = warp * 16 + (lane % 8) + (m % 2) * 8;
        const int col = ks * 16 + (m / 2) * 8;
        ldmatrix_x4(qf[ks], smem + row * (DP + PAD) + col);
    }
    __syncthreads();

    float o[DTILES][4];
#pragma unroll
    for (int i = 0; i < DTILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};
    // This thread's two query rows within the segment.
    const int row_lo = m0 + warp * 16 + lane / 4;

    const int tiles = (kv_end + BLOCK_N - 1) / BLOCK_N;
    load_tile<T, D, THREADS, DP>(k_tile, kh, 0, BLOCK_N, len_k, k_sl);
    cp_async_commit();
    for (int j = 0; j < tiles; ++j) {
        cp_async_wait_all();
        __syncthreads();
        load_tile<T, D, THREADS, DP>(v_tile, vh, j * BLOCK_N, BLOCK_N, len_k, v_sl);
        cp_async_commit();

        float s[NTILES][4];
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ks += 2) {
#pragma unroll
            for (int nt = 0; nt < NTILES; ++nt) {
                const int row = nt * 8 + (lane % 8);
                if (ks + 1 < KSTEPS) {
                    uint32_t r[4];
                    ldmatrix_x4(r, k_tile + row * (DP + PAD) + ks * 16 + (lane / 8) * 8);
                    Mma<T>::run(s[nt], qf[ks], r[0], r[1]);
                    Mma<T>::run(s[nt], qf[ks + 1], r[2], r[3]);
                } else {
                    // The odd last k-step: two matrices (head dims ks*16 + {0, 8}); lanes
                    // 16..31 give addresses ldmatrix.x2 ignores.
                    uint32_t r[2];
                    ldmatrix_x2(r, k_tile + row * (DP + PAD) + ks * 16 + ((lane / 8) % 2) * 8);
                    Mma<T>::run(s[nt], qf[ks], r[0], r[1]);
                }
            }
        }

        // Scale, and mask where the tile crosses the segment's end or the diagonal.
        float tile_max[2] = {-INFINITY, -INFINITY};
        const bool masked = (j + 1) * BLOCK_N > full_end;
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * scale_log2;
                if (masked) {
                    const int key = j * BLOCK_N + nt * 8 + (lane % 4) * 2 + (e % 2);
                    const int row = row_lo + (e / 2) * 8;
                    if (key >= len_k || (causal && key > row + offset)) x = -INFINITY;
                }
                s[nt][e] = x;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
            // Finite from the first tile on: every row sees key 0 of its segment.
            const float new_max = fmaxf(row_max[r], tile_max[r]);
            alpha[r] = exp2f(row_max[r] - new_max);
            row_max[r] = new_max;
            row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = exp2f(s[nt][e] - row_max[e / 2]);
                s[nt][e] = p;
                row_sum[e / 2] += p;
            }
        }
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            o[dt][0] *= alpha[0];
            o[dt][1] *= alpha[0];
            o[dt][2] *= alpha[1];
            o[dt][3] *= alpha[1];
        }

        cp_async_wait_all();
        __syncthreads();
        if (j + 1 < tiles) {
            load_tile<T, D, THREADS, DP>(k_tile, kh, (j + 1) * BLOCK_N, BLOCK_N, len_k, k_sl);
            cp_async_commit();
        }

#pragma unroll
        for (int kk = 0; kk < BLOCK_N / 16; ++kk) {
            const uint32_t pf[4] = {
                Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int dt = 0; dt < DTILES; dt += 2) {
                uint32_t r[4];
                const int row = kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8);
                const int col = (dt + lane / 16) * 8;
                ldmatrix_x4_trans(r, v_tile + row * (DP + PAD) + col);
                Mma<T>::run(o[dt], pf, r[0], r[1]);
                Mma<T>::run(o[dt + 1], pf, r[2], r[3]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffff, row_sum[r], 2);
    }
    const float inv[2] = {1.f / row_sum[0], 1.f / row_sum[1]};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int l = row_lo + r * 8;
        if (l >= len_q) continue;
        T *dst = oh + l * o_sl + (lane % 4) * 2;
#pragma unroll
        for (int dt = 0; dt < OUT_TILES; ++dt) {
            const uint32_t packed = Mma<T>::pack(o[dt][2 * r] * inv[r], o[dt][2 * r + 1] * inv[r]);
            *reinterpret_cast<uint32_t *>(dst + dt * 8) = packed;
        }
    }
}

}  // namespace

// Grid (ceil(L / (16 * WARPS)), H, B), block 32 * WARPS threads, static shared memory.
#define DEFINE_FLASH(T, SUFFIX, D, WARPS)                                                     \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                  \
        flash_attention_d##D##_w##WARPS##_##SUFFIX(const T *q, const T *k, const T *v, T *out, \
                                                   int L, int H, float scale_log2) {          \
        flash_attention<T, D, WARPS>(q, k, v, out, L, H, scale_log2);                         \
    }

DEFINE_FLASH(__nv_bfloat16, bf16, 128, 4)
DEFINE_FLASH(__nv_bfloat16, bf16, 128, 8)
DEFINE_FLASH(__half, f16, 128, 4)
DEFINE_FLASH(__half, f16, 128, 8)
DEFINE_FLASH(__nv_bfloat16, bf16, 64, 4)
DEFINE_FLASH(__nv_bfloat16, bf16, 64, 8)
DEFINE_FLASH(__half, f16, 64, 4)
DEFINE_FLASH(__half, f16, 64, 8)

// Grid (ceil(longest segment / (16 * WARPS)), heads, batch * max(nseg, 1)), block 32 * WARPS
// threads, static shared memory. `cu_seqlens` is read only when nseg > 0.
#define DEFINE_JUDGE_PADDED(T, SUFFIX, D, WARPS, DP)                                        \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                 \
        judge_attention_d##D##_w##WARPS##_##SUFFIX(                                          \
            const T *q, const T *k, const T *v, T *out, const int *cu_seqlens, int nseg,     \
            int len_q, int len_k, int group, int causal, long long q_sb, long long q_sh,     \
            long long q_sl, long long k_sb, long long k_sh, long long k_sl, long long v_sb,  \
            long long v_sh, long long v_sl, long long o_sb, long long o_sh, long long o_sl,  \
            float scale_log2) {                                                              \
        judge_attention<T, D, WARPS, DP>(q, k, v, out, cu_seqlens, nseg, len_q, len_k,      \
                                         group, causal, q_sb, q_sh, q_sl, k_sb, k_sh, k_sl,  \
                                         v_sb, v_sh, v_sl, o_sb, o_sh, o_sl, scale_log2);    \
    }

#define DEFINE_JUDGE(T, SUFFIX, D, WARPS) DEFINE_JUDGE_PADDED(T, SUFFIX, D, WARPS, D)

DEFINE_JUDGE(__nv_bfloat16, bf16, 64, 4)
DEFINE_JUDGE(__nv_bfloat16, bf16, 64, 8)
DEFINE_JUDGE(__half, f16, 64, 4)
DEFINE_JUDGE(__half, f16, 64, 8)
DEFINE_JUDGE_PADDED(__nv_bfloat16, bf16, 72, 4, 80)
DEFINE_JUDGE_PADDED(__nv_bfloat16, bf16, 72, 8, 80)
DEFINE_JUDGE_PADDED(__half, f16, 72, 4, 80)
DEFINE_JUDGE_PADDED(__half, f16, 72, 8, 80)
DEFINE_JUDGE(__nv_bfloat16, bf16, 80, 4)
DEFINE_JUDGE(__nv_bfloat16, bf16, 80, 8)
DEFINE_JUDGE(__half, f16, 80, 4)
DEFINE_JUDGE(__half, f16, 80, 8)
DEFINE_JUDGE(__nv_bfloat16, bf16, 128, 4)
DEFINE_JUDGE(__nv_bfloat16, bf16, 128, 8)
DEFINE_JUDGE(__half, f16, 128, 4)
DEFINE_JUDGE(__half, f16, 128, 8)
