// gpusaver: crc32c (Castagnoli) of many device byte ranges in one launch.
//
// The crc is the standard crc32c: reflected polynomial 0x82F63B78, initial
// register 0xFFFFFFFF, final xor 0xFFFFFFFF.  The kernel writes the plain
// (unmasked) crc of every range; gs_crc32c_mask applies the checkpoint
// format's mask afterwards when the caller wants it.
//
// Algebra
// -------
// Write raw(v, D) for the crc register after feeding bytes D into register v
// (no initial value, no final xor), so crc32c(D) = raw(0xFFFFFFFF, D) ^ ~0.
// raw is affine in v:  raw(v, D) = Z_|D|(v) ^ raw(0, D),  where Z_m is the
// GF(2)-linear map "feed m zero bytes" (multiplication by x^(8m) modulo P).
// Hence, for D = A || B:  raw(v, A || B) = Z_|B|(raw(v, A)) ^ raw(0, B).
//
// Chunking
// --------
// A range of L > 0 bytes is cut into k = ceil(L / C) chunks of C bytes,
// aligned to the END of the range: chunk 0 is the short one (h = L - (k-1)C
// bytes, 1 <= h <= C), chunks 1 .. k-1 have exactly C bytes.  Let
// e = k - 1 - j be chunk j's distance from the end, in chunks.  Then
//
//   crc32c(range) = Z_{e_0 C}(raw(~0, chunk 0)) ^ XOR_{j>=1} Z_{e_j C}(raw(0, chunk j)) ^ ~0
//
// so every chunk's term is independent: one thread computes raw() over its
// chunk (chunk 0 starting from ~0, the others from 0), multiplies it by
// x^(8 e C) by applying Z_{C 2^b} for every set bit b of e, and XORs the term
// into out[r] (chunk 0 also XORs the final ~0).  An empty range has no chunk
// and keeps out[r] = 0 = crc32c("").  The caller zeroes `out` first.
// Aligning chunks to the end is what makes every shift a multiple of C, so a
// small set of precomputed operators covers every range length.
//
// Tables (built on the host, gpusaver/cuda/kernels.py, crc32c_tables, one uint32 array):
//   tables[0 .. 2048)                 slicing-by-8 tables T0..T7, Tk at k*256:
//                                     T0[b] = raw(b, one zero byte) (the classic
//                                     byte table), Tk[b] = Z_k(T0[b]);
//   tables[2048 + 1024 l + 256 q + b] operator Z_{C 2^l} applied to the value
//                                     (b << 8q), for l < shift_levels, q < 4;
//                                     applying it costs 4 lookups and 3 xors.
// Ranges need at most 2^shift_levels chunks; the host checks that.
//
// Per-chunk crc: slicing-by-8 with the 8 KiB of slicing tables copied into
// shared memory by every block; bytes up to 16-byte alignment one at a time,
// then 16-byte vector loads four at a time, then the byte tail.
//
// Reduction: one thread per chunk; a warp whose 32 chunks all belong to the
// same range XOR-reduces with shuffles and issues a single atomicXor, other
// warps issue one atomicXor per chunk.  XOR is associative and commutative, so
// the result does not depend on the order.
//
// The per-chunk helpers are __host__ __device__ so that a host program can run
// the exact same logic on the CPU for testing (tests/test_kernels_compile.py).
// The file is self-contained (no #include) so that NVRTC compiles it as is.

#ifndef GS_CRC32C_CU
#define GS_CRC32C_CU

typedef unsigned long long gs_crc_u64;
typedef unsigned int gs_crc_u32;

#define GS_CRC_HD __host__ __device__ __forceinline__
#define GS_CRC_SLICE_WORDS 2048
#define GS_CRC_SHIFT_WORDS 1024
#define GS_CRC_MASK_DELTA 0xA282EAD8u

GS_CRC_HD uint4 gs_crc_load16(const uint4* p)
{
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}

// Index of the range that owns chunk `c`: the largest r in [0, n) with
// chunk_starts[r] <= c.  Requires n >= 1 and c < chunk_starts[n].
GS_CRC_HD int gs_crc_find_range(const gs_crc_u64* chunk_starts, int n,
                                gs_crc_u64 c)
{
    int lo = 0;
    int hi = n;
    while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        if (chunk_starts[mid] <= c) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// One step of slicing-by-8: feeds the 8 bytes whose little-endian halves are
// `lo` (bytes 0..3) and `hi` (bytes 4..7).
GS_CRC_HD gs_crc_u32 gs_crc_step8(gs_crc_u32 crc, gs_crc_u32 lo, gs_crc_u32 hi,
                                  const gs_crc_u32* t)
{
    crc ^= lo;
    return t[7 * 256 + (crc & 0xffu)] ^ t[6 * 256 + ((crc >> 8) & 0xffu)] ^
           t[5 * 256 + ((crc >> 16) & 0xffu)] ^ t[4 * 256 + (crc >> 24)] ^
           t[3 * 256 + (hi & 0xffu)] ^ t[2 * 256 + ((hi >> 8) & 0xffu)] ^
           t[1 * 256 + ((hi >> 16) & 0xffu)] ^ t[hi >> 24];
}

GS_CRC_HD gs_crc_u32 gs_crc_step16(gs_crc_u32 crc, uint4 w, const gs_crc_u32* t)
{
    crc = gs_crc_step8(crc, w.x, w.y, t);
    return gs_crc_step8(crc, w.z, w.w, t);
}

// raw(crc, p[0 .. n)) with the slicing tables `t` (8 x 256 words).
GS_CRC_HD gs_crc_u32 gs_crc_raw(gs_crc_u32 crc, const unsigned char* p,
                                gs_crc_u64 n, const gs_crc_u32* t)
{
    gs_crc_u64 head = (16ull - ((gs_crc_u64)p & 15ull)) & 15ull;
    if (head > n) {
        head = n;
    }
    for (gs_crc_u64 i = 0; i < head; ++i) {
        crc = (crc >> 8) ^ t[(crc ^ p[i]) & 0xffu];
    }
    p += head;
    n -= head;
    const uint4* w = (const uint4*)p;
    const gs_crc_u64 words = n >> 4;
    gs_crc_u64 i = 0;
    for (; i + 4 <= words; i += 4) {
        const uint4 a = gs_crc_load16(w + i);
        const uint4 b = gs_crc_load16(w + i + 1);
        const uint4 c = gs_crc_load16(w + i + 2);
        const uint4 d = gs_crc_load16(w + i + 3);
        crc = gs_crc_step16(crc, a, t);
        crc = gs_crc_step16(crc, b, t);
        crc = gs_crc_step16(crc, c, t);
        crc = gs_crc_step16(crc, d, t);
    }
    for (; i < words; ++i) {
        crc = gs_crc_step16(crc, gs_crc_load16(w + i), t);
    }
    p += words << 4;
    n &= 15ull;
    for (gs_crc_u64 k = 0; k < n; ++k) {
        crc = (crc >> 8) ^ t[(crc ^ p[k]) & 0xffu];
    }
    return crc;
}

// Z_{e C}(v): applies the operator of level l for every set bit l of e.
GS_CRC_HD gs_crc_u32 gs_crc_shift(gs_crc_u32 v, gs_crc_u64 e,
                                  const gs_crc_u32* shift_tables)
{
    for (const gs_crc_u32* m = shift_tables; e != 0;
         e >>= 1, m += GS_CRC_SHIFT_WORDS) {
        if (e & 1ull) {
            v = m[v & 0xffu] ^ m[256 + ((v >> 8) & 0xffu)] ^
                m[512 + ((v >> 16) & 0xffu)] ^ m[768 + (v >> 24)];
        }
    }
    return v;
}

// The term that chunk `c` of range `r` contributes to out[r] (see the header).
GS_CRC_HD gs_crc_u32 gs_crc_chunk_term(gs_crc_u64 c, int r,
                                       const gs_crc_u64* ptrs,
                                       const gs_crc_u64* sizes,
                                       const gs_crc_u64* chunk_starts,
                                       gs_crc_u64 chunk_bytes,
                                       const gs_crc_u32* slice_tables,
                                       const gs_crc_u32* shift_tables)
{
    const gs_crc_u64 j = c - chunk_starts[r];
    const gs_crc_u64 k = chunk_starts[r + 1] - chunk_starts[r];
    const gs_crc_u64 first = sizes[r] - (k - 1) * chunk_bytes;
    const unsigned char* base = (const unsigned char*)ptrs[r];
    gs_crc_u32 term;
    if (j == 0) {
        term = gs_crc_raw(0xFFFFFFFFu, base, first, slice_tables);
    } else {
        term = gs_crc_raw(0u, base + first + (j - 1) * chunk_bytes, chunk_bytes,
                          slice_tables);
    }
    term = gs_crc_shift(term, k - 1 - j, shift_tables);
    if (j == 0) {
        term ^= 0xFFFFFFFFu;
    }
    return term;
}

GS_CRC_HD gs_crc_u32 gs_crc_mask(gs_crc_u32 c)
{
    return ((c >> 15) | (c << 17)) + GS_CRC_MASK_DELTA;
}

// out[r] ^= crc terms of every chunk of range r; with out zeroed beforehand
// this leaves out[r] = crc32c(bytes at ptrs[r], sizes[r] bytes), unmasked.
//   ptrs          n device addresses (uint64)
//   sizes         n byte counts (uint64)
//   chunk_starts  n + 1 prefix sums of ceil(sizes[r] / chunk_bytes) (uint64)
//   n             number of ranges (>= 1)
//   chunk_bytes   chunk size C used for chunk_starts and the tables (> 0)
//   tables        2048 + 1024 * shift_levels uint32 words, see the header
//   out           n uint32, zero on entry
// blockDim.x must be a multiple of 32 (the launcher uses 256).
extern "C" __global__ void __launch_bounds__(256)
gs_crc32c_chunks(const gs_crc_u64* ptrs, const gs_crc_u64* sizes,
                 const gs_crc_u64* chunk_starts, int n, gs_crc_u64 chunk_bytes,
                 const gs_crc_u32* tables, gs_crc_u32* out)
{
    __shared__ gs_crc_u32 slice[GS_CRC_SLICE_WORDS];
    for (unsigned i = threadIdx.x; i < GS_CRC_SLICE_WORDS; i += blockDim.x) {
        slice[i] = tables[i];
    }
    __syncthreads();

    const gs_crc_u32* shift_tables = tables + GS_CRC_SLICE_WORDS;
    const gs_crc_u64 total = chunk_starts[n];
    const gs_crc_u64 stride = (gs_crc_u64)gridDim.x * blockDim.x;
    const unsigned lane = threadIdx.x & 31u;
    // `base` is the same for the 32 lanes of a warp, so whole warps iterate
    // together and the shuffles below see every lane.
    for (gs_crc_u64 base = (gs_crc_u64)blockIdx.x * blockDim.x +
                           (threadIdx.x & ~31u);
         base < total; base += stride) {
        const gs_crc_u64 c = base + lane;
        const bool active = c < total;
        int r = -1;
        gs_crc_u32 term = 0u;
        if (active) {
            r = gs_crc_find_range(chunk_starts, n, c);
            term = gs_crc_chunk_term(c, r, ptrs, sizes, chunk_starts,
                                     chunk_bytes, slice, shift_tables);
        }
        const int r0 = __shfl_sync(0xffffffffu, r, 0);
        if (__all_sync(0xffffffffu, active && r == r0)) {
            for (int delta = 16; delta > 0; delta >>= 1) {
                term ^= __shfl_xor_sync(0xffffffffu, term, delta);
            }
            if (lane == 0) {
                atomicXor(out + r0, term);
            }
        } else if (active) {
            atomicXor(out + r, term);
        }
    }
}

// crcs[i] = Mask(crcs[i]) = rotr(crcs[i], 15) + 0xA282EAD8 (mod 2^32), the
// form the checkpoint format stores.  Launch after gs_crc32c_chunks, on the
// same stream.
extern "C" __global__ void __launch_bounds__(256)
gs_crc32c_mask(gs_crc_u32* crcs, int n)
{
    const gs_crc_u64 stride = (gs_crc_u64)gridDim.x * blockDim.x;
    for (gs_crc_u64 i = (gs_crc_u64)blockIdx.x * blockDim.x + threadIdx.x;
         i < (gs_crc_u64)n; i += stride) {
        crcs[i] = gs_crc_mask(crcs[i]);
    }
}

#endif  // GS_CRC32C_CU
