// gpusaver: gather many device byte ranges into one staging buffer (pack) and
// scatter a staging buffer back into many device byte ranges (unpack), each in
// ONE kernel launch.
//
// Work decomposition
// ------------------
// Range r (0 <= r < n) has `sizes[r]` bytes at device address `ptrs[r]` and
// occupies staging[offsets[r] .. offsets[r] + sizes[r]).  Every range is cut
// into chunks of `chunk_bytes` bytes (the last one may be shorter; an empty
// range has no chunk).  The host passes the exclusive prefix sum of the chunk
// counts, `chunk_starts[0..n]` (n + 1 entries, chunk_starts[0] == 0,
// chunk_starts[n] == total number of chunks), so chunk c belongs to the range r
// with chunk_starts[r] <= c < chunk_starts[r + 1] (binary search; empty ranges
// repeat a start value and are never selected).
//
// One warp copies one chunk; the warps of the grid walk over all chunks with a
// grid-stride loop.  Thousands of tiny ranges therefore cost one warp each,
// and a huge range is spread over thousands of warps.  blockDim.x must be a
// multiple of 32 (the launcher uses 256).
//
// Inside a chunk the 32 lanes copy interleaved units, so each warp access is
// coalesced:
//   * source and destination equally aligned modulo 16: byte head, 16-byte
//     vector body, byte tail;
//   * equally aligned modulo 8: byte head, 8-byte body, byte tail;
//   * otherwise: the destination is brought to 8-byte alignment and every
//     8-byte destination word is assembled from the two aligned 8-byte source
//     words that hold its bytes (shift and or).  Those aligned source words
//     always contain at least one byte of the range, so no read touches memory
//     outside the aligned words that the range overlaps.
// The source of a copy must not overlap its destination, and destination
// ranges must not overlap each other (the host checks the staging side).
//
// The copy helpers are __host__ __device__ so that a host program can run the
// exact same logic on the CPU for testing (tests/test_kernels_compile.py).
// The file is self-contained (no #include) so that NVRTC compiles it as is.

#ifndef GS_PACK_CU
#define GS_PACK_CU

typedef unsigned long long gs_u64;

#define GS_HD __host__ __device__ __forceinline__

// Read-only loads through the non-coherent cache on the device; plain loads on
// the host.
GS_HD uint4 gs_load16(const uint4* p)
{
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}

GS_HD gs_u64 gs_load8(const gs_u64* p)
{
#ifdef __CUDA_ARCH__
    return __ldg(p);
#else
    return *p;
#endif
}

// Index of the range that owns chunk `c`: the largest r in [0, n) with
// chunk_starts[r] <= c.  Requires n >= 1 and c < chunk_starts[n].
GS_HD int gs_find_range(const gs_u64* chunk_starts, int n, gs_u64 c)
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

// Copies `n` bytes from `src` to `dst`; the caller's `nlanes` cooperating
// threads call it with lane = 0 .. nlanes - 1 and together copy every byte.
GS_HD void gs_copy_span(unsigned char* dst, const unsigned char* src, gs_u64 n,
                        unsigned lane, unsigned nlanes)
{
    const gs_u64 d = (gs_u64)dst;
    const gs_u64 s = (gs_u64)src;
    gs_u64 i;
    if (((d ^ s) & 15ull) == 0) {
        gs_u64 head = (16ull - (d & 15ull)) & 15ull;
        if (head > n) {
            head = n;
        }
        for (i = lane; i < head; i += nlanes) {
            dst[i] = src[i];
        }
        const gs_u64 words = (n - head) >> 4;
        uint4* dw = (uint4*)(dst + head);
        const uint4* sw = (const uint4*)(src + head);
        // Four independent loads in flight per lane before the stores.
        for (i = lane; i + 3ull * nlanes < words; i += 4ull * nlanes) {
            const uint4 a = gs_load16(sw + i);
            const uint4 b = gs_load16(sw + i + nlanes);
            const uint4 c = gs_load16(sw + i + 2ull * nlanes);
            const uint4 e = gs_load16(sw + i + 3ull * nlanes);
            dw[i] = a;
            dw[i + nlanes] = b;
            dw[i + 2ull * nlanes] = c;
            dw[i + 3ull * nlanes] = e;
        }
        for (; i < words; i += nlanes) {
            dw[i] = gs_load16(sw + i);
        }
        for (i = head + (words << 4) + lane; i < n; i += nlanes) {
            dst[i] = src[i];
        }
        return;
    }

    gs_u64 head = (8ull - (d & 7ull)) & 7ull;
    if (head > n) {
        head = n;
    }
    for (i = lane; i < head; i += nlanes) {
        dst[i] = src[i];
    }
    const gs_u64 words = (n - head) >> 3;
    gs_u64* dw = (gs_u64*)(dst + head);
    const unsigned char* s0 = src + head;
    const unsigned shift = (unsigned)((gs_u64)s0 & 7ull);
    if (shift == 0) {
        const gs_u64* sw = (const gs_u64*)s0;
        for (i = lane; i < words; i += nlanes) {
            dw[i] = gs_load8(sw + i);
        }
    } else {
        // Destination word i holds source bytes s0 + 8i .. s0 + 8i + 7, which
        // straddle the aligned words sa[i] and sa[i + 1] (little endian).
        const gs_u64* sa = (const gs_u64*)(s0 - shift);
        const unsigned lo_bits = 8u * shift;
        const unsigned hi_bits = 64u - lo_bits;
        for (i = lane; i < words; i += nlanes) {
            const gs_u64 a = gs_load8(sa + i);
            const gs_u64 b = gs_load8(sa + i + 1);
            dw[i] = (a >> lo_bits) | (b << hi_bits);
        }
    }
    for (i = head + (words << 3) + lane; i < n; i += nlanes) {
        dst[i] = src[i];
    }
}

// Copies chunk `c` (see the header) between its range and the staging buffer:
// range -> staging when `to_staging` is nonzero, staging -> range otherwise.
GS_HD void gs_copy_chunk(gs_u64 c, unsigned lane, unsigned nlanes,
                         const gs_u64* ptrs, const gs_u64* offsets,
                         const gs_u64* sizes, const gs_u64* chunk_starts, int n,
                         gs_u64 chunk_bytes, unsigned char* staging,
                         int to_staging)
{
    const int r = gs_find_range(chunk_starts, n, c);
    const gs_u64 begin = (c - chunk_starts[r]) * chunk_bytes;
    gs_u64 len = sizes[r] - begin;
    if (len > chunk_bytes) {
        len = chunk_bytes;
    }
    unsigned char* mem = (unsigned char*)ptrs[r] + begin;
    unsigned char* stage = staging + offsets[r] + begin;
    if (to_staging) {
        gs_copy_span(stage, mem, len, lane, nlanes);
    } else {
        gs_copy_span(mem, stage, len, lane, nlanes);
    }
}

// Pack: staging[dst_offsets[r] ..][0 .. sizes[r]) = bytes at src_ptrs[r].
//   src_ptrs      n device addresses (uint64)
//   dst_offsets   n byte offsets into `staging` (uint64)
//   sizes         n byte counts (uint64)
//   chunk_starts  n + 1 chunk-count prefix sums (uint64), see the header
//   n             number of ranges (>= 1)
//   chunk_bytes   chunk size used to build chunk_starts (> 0)
//   staging       destination buffer
extern "C" __global__ void __launch_bounds__(256)
gs_pack(const gs_u64* src_ptrs, const gs_u64* dst_offsets, const gs_u64* sizes,
        const gs_u64* chunk_starts, int n, gs_u64 chunk_bytes,
        unsigned char* staging)
{
    const unsigned lane = threadIdx.x & 31u;
    const gs_u64 total = chunk_starts[n];
    const gs_u64 warps = ((gs_u64)gridDim.x * blockDim.x) >> 5;
    for (gs_u64 c = ((gs_u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
         c < total; c += warps) {
        gs_copy_chunk(c, lane, 32u, src_ptrs, dst_offsets, sizes, chunk_starts,
                      n, chunk_bytes, staging, 1);
    }
}

// Unpack: bytes at dst_ptrs[r] = staging[src_offsets[r] ..][0 .. sizes[r]).
// Same arguments as gs_pack with the direction reversed.
extern "C" __global__ void __launch_bounds__(256)
gs_unpack(const gs_u64* dst_ptrs, const gs_u64* src_offsets,
          const gs_u64* sizes, const gs_u64* chunk_starts, int n,
          gs_u64 chunk_bytes, const unsigned char* staging)
{
    const unsigned lane = threadIdx.x & 31u;
    const gs_u64 total = chunk_starts[n];
    const gs_u64 warps = ((gs_u64)gridDim.x * blockDim.x) >> 5;
    for (gs_u64 c = ((gs_u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
         c < total; c += warps) {
        gs_copy_chunk(c, lane, 32u, dst_ptrs, src_offsets, sizes, chunk_starts,
                      n, chunk_bytes, (unsigned char*)staging, 0);
    }
}

#endif  // GS_PACK_CU
