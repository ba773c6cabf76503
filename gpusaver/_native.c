/* gpusaver._native: the per-tensor loops of the host path, in C.
 *
 * A checkpoint of 100,000 small tensors spends its time in per-tensor
 * bookkeeping, not in bytes: laying tensors out, checksumming them, encoding
 * and decoding their index entries, building and parsing the index table.
 * Each function here does one of those loops over a whole batch, and each has
 * a pure-Python twin in gpusaver.format that the test suite compares it with;
 * when this module is not built (or GPUSAVER_NATIVE=0) the twins run instead.
 *
 * Loops that touch tensor bytes (pack, unpack) release the GIL, so writer and
 * reader threads overlap them with file I/O.
 *
 * Bump NATIVE_API whenever a signature or a semantic changes: gpusaver.native
 * refuses a stale build instead of running it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <nmmintrin.h>
#define HAVE_X86_CRC 1
#endif

#define NATIVE_API 4
#define MAX_RANK 254
#define INT64_MAXU ((uint64_t)INT64_MAX)
#define CRC_MASK_DELTA 0xA282EAD8u
#define CRC32C_POLY 0x82F63B78u /* reflected Castagnoli */

/* ------------------------------------------------------------------ crc32c */

static uint32_t crc_table[8][256];
static int crc_hw;
static int stream_hw; /* AVX2 streaming stores */
#ifdef HAVE_X86_CRC
static void crc_shift_init(void);
#endif

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
#ifdef HAVE_X86_CRC
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    if (crc_hw)
        crc_shift_init();
    stream_hw = __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
}

/* Slicing-by-8: the portable path, for CPUs without a crc32c instruction. */
static uint32_t crc_sw(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = crc_table[7][w & 0xFF] ^ crc_table[6][(w >> 8) & 0xFF] ^ crc_table[5][(w >> 16) & 0xFF] ^
              crc_table[4][(w >> 24) & 0xFF] ^ crc_table[3][(w >> 32) & 0xFF] ^ crc_table[2][(w >> 40) & 0xFF] ^
              crc_table[1][(w >> 48) & 0xFF] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
    return ~crc;
}

#ifdef HAVE_X86_CRC
/* Three lanes at once. One crc32 instruction has a latency of three cycles but
 * the CPU can start one every cycle, so a single chain runs at a third of the
 * instruction's throughput. A block of 3L bytes is split into three lanes of L
 * bytes, each chained on its own; the CRC register is linear, so
 *     crc(s, A|B|C) = shift(shift(crc(s, A)) ^ crc(0, B)) ^ crc(0, C)
 * where shift(r) = r * x^(8L) mod P (appending L zero bytes), done by four
 * table lookups built at import for each lane length. */
#define CRC_LANES 3
static const size_t crc_lane[CRC_LANES] = {8192, 512, 64};
static uint32_t crc_shift[CRC_LANES][4][256];

/* a * b mod P in the reflected representation (bit 31 is x^0). */
static uint32_t crc_mulmod(uint32_t a, uint32_t b)
{
    uint32_t prod = 0;
    for (int i = 0; i < 32; i++) {
        if (a & (0x80000000u >> i))
            prod ^= b;
        b = (b >> 1) ^ (CRC32C_POLY & (0u - (b & 1u))); /* b * x */
    }
    return prod;
}

static void crc_shift_init(void)
{
    for (int t = 0; t < CRC_LANES; t++) {
        uint32_t k = 0x80000000u; /* x^0, then x^(8L) mod P */
        for (size_t i = 0; i < 8 * crc_lane[t]; i++)
            k = (k >> 1) ^ (CRC32C_POLY & (0u - (k & 1u)));
        for (int j = 0; j < 4; j++)
            for (uint32_t v = 0; v < 256; v++)
                crc_shift[t][j][v] = crc_mulmod(v << (8 * j), k);
    }
}

static inline uint32_t crc_shift_by(int t, uint32_t r)
{
    return crc_shift[t][0][r & 0xFF] ^ crc_shift[t][1][(r >> 8) & 0xFF] ^ crc_shift[t][2][(r >> 16) & 0xFF] ^
           crc_shift[t][3][r >> 24];
}

__attribute__((target("sse4.2"))) static uint32_t crc_x86(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    for (int t = 0; t < CRC_LANES; t++) {
        size_t lane = crc_lane[t];
        while (n >= 3 * lane) {
            uint64_t c1 = 0, c2 = 0, w0, w1, w2;
            for (size_t i = 0; i < lane; i += 8) {
                memcpy(&w0, p + i, 8);
                memcpy(&w1, p + lane + i, 8);
                memcpy(&w2, p + 2 * lane + i, 8);
                c = _mm_crc32_u64(c, w0);
                c1 = _mm_crc32_u64(c1, w1);
                c2 = _mm_crc32_u64(c2, w2);
            }
            c = crc_shift_by(t, crc_shift_by(t, (uint32_t)c) ^ (uint32_t)c1) ^ (uint32_t)c2;
            p += 3 * lane;
            n -= 3 * lane;
        }
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        n -= 8;
    }
    while (n--)
        c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

/* The crc32c of the bytes the C extension touches (small tensors; the crc32c
 * package takes large buffers from Python). */
static uint32_t crc32c_extend(uint32_t crc, const void *data, size_t n)
{
#ifdef HAVE_X86_CRC
    if (crc_hw)
        return crc_x86(crc, (const unsigned char *)data, n);
#endif
    return crc_sw(crc, (const unsigned char *)data, n);
}

/* ------------------------------------------------------------- helpers */

/* Out of memory: the exception where this thread holds the GIL; else the caller sets it once it
 * holds it again (table building runs without the GIL; see build_run_table). */
static void nomem(void)
{
    if (PyGILState_Check())
        PyErr_NoMemory();
}

/* A growable byte buffer (raw allocator: it grows without the GIL too; free with PyMem_RawFree). */
typedef struct {
    unsigned char *p;
    size_t len, cap;
} Out;

static int out_reserve(Out *o, size_t more)
{
    if (o->len + more <= o->cap)
        return 0;
    size_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more)
        cap *= 2;
    unsigned char *np = PyMem_RawRealloc(o->p, cap);
    if (np == NULL) {
        nomem();
        return -1;
    }
    o->p = np;
    o->cap = cap;
    return 0;
}

static int out_put(Out *o, const void *data, size_t n)
{
    if (n == 0)
        return 0;
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->p + o->len, data, n);
    o->len += n;
    return 0;
}

static int out_fixed32(Out *o, uint32_t v)
{
    unsigned char b[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16), (unsigned char)(v >> 24)};
    return out_put(o, b, 4);
}

/* A contiguous writable (or readable) buffer of fixed-size items, checked. */
typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get_buf(PyObject *obj, Buf *b, int writable, Py_ssize_t itemsize, Py_ssize_t min_items, const char *what)
{
    if (PyObject_GetBuffer(obj, &b->view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    b->held = 1;
    if (itemsize > 0 && (b->view.len % itemsize != 0 || b->view.len / itemsize < min_items)) {
        PyErr_Format(PyExc_ValueError, "%s: need %zd items of %zd bytes, got a buffer of %zd bytes", what, min_items,
                     itemsize, b->view.len);
        return -1;
    }
    return 0;
}

static void release_buf(Buf *b)
{
    if (b->held) {
        PyBuffer_Release(&b->view);
        b->held = 0;
    }
}

static PyArrayObject *new_array(npy_intp n, int typenum)
{
    return (PyArrayObject *)PyArray_ZEROS(1, &n, typenum, 0);
}

/* Memory for the columns a restore decodes, kept for the next restore when their arrays are
 * freed: on the machines measured, the page faults of fresh memory for 100,000 tensors' columns
 * cost more than decoding them. At most POOL_SLOTS blocks and POOL_KEEP bytes wait here. */
#define POOL_SLOTS 32
#define POOL_KEEP ((size_t)32 << 20)
static void *pool_p[POOL_SLOTS];
static size_t pool_size[POOL_SLOTS], pool_held;

static void pool_give(void *p, size_t size)
{
    if (pool_held + size <= POOL_KEEP)
        for (int k = 0; k < POOL_SLOTS; k++)
            if (pool_p[k] == NULL) {
                pool_p[k] = p;
                pool_size[k] = size;
                pool_held += size;
                return;
            }
    PyMem_RawFree(p);
}

static void *pool_take(size_t size, size_t *got)
{
    for (int k = 0; k < POOL_SLOTS; k++)
        if (pool_p[k] != NULL && pool_size[k] >= size && pool_size[k] / 2 <= size) {
            void *p = pool_p[k];
            *got = pool_size[k];
            pool_p[k] = NULL;
            pool_held -= pool_size[k];
            return p;
        }
    *got = size;
    return PyMem_RawMalloc(size ? size : 1);
}

static void pool_release(PyObject *capsule)
{
    void *p = PyCapsule_GetPointer(capsule, "gpusaver._native.pooled");
    size_t *size = PyCapsule_GetContext(capsule);
    if (p != NULL && size != NULL) {
        pool_give(p, *size);
        PyMem_RawFree(size);
    }
}

/* A one-dimensional array of n items (typenum: uint8, int32, uint32 or int64) whose memory comes
 * from the pool and goes back there when the array is freed. Not zeroed: the caller writes every item. */
static PyArrayObject *new_pooled_array(npy_intp n, int typenum)
{
    size_t item = typenum == NPY_UINT8 ? 1 : typenum == NPY_INT32 || typenum == NPY_UINT32 ? 4 : 8;
    PyArray_Descr *descr = PyArray_DescrFromType(typenum);
    if (descr == NULL)
        return NULL;
    size_t bytes = (size_t)n * item, got;
    size_t *ctx = PyMem_RawMalloc(sizeof(size_t));
    void *p = ctx ? pool_take(bytes, &got) : NULL;
    PyObject *capsule = NULL;
    if (p == NULL) {
        PyMem_RawFree(ctx);
        Py_DECREF(descr);
        PyErr_NoMemory();
        return NULL;
    }
    *ctx = got;
    capsule = PyCapsule_New(p, "gpusaver._native.pooled", pool_release);
    if (capsule == NULL || PyCapsule_SetContext(capsule, ctx) < 0) {
        Py_XDECREF(capsule);
        PyMem_RawFree(ctx);
        pool_give(p, got);
        Py_DECREF(descr);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_NewFromDescr(&PyArray_Type, descr, 1, &n, NULL, p, NPY_ARRAY_CARRAY, NULL);
    if (a == NULL || PyArray_SetBaseObject(a, capsule) < 0) { /* SetBaseObject takes the capsule, even failing */
        Py_XDECREF(a);
        if (a == NULL)
            Py_DECREF(capsule);
        return NULL;
    }
    return a;
}

static size_t put_varint(unsigned char *out, uint64_t v)
{
    size_t i = 0;
    while (v >= 0x80) {
        out[i++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    out[i++] = (unsigned char)v;
    return i;
}

static size_t varint_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

/* codes (NumPy type number -> DataType enum) with the type numbers below 256 (NumPy's own types)
 * in a table: a dict lookup for each of 100,000 arrays costs more than the rest of their checks. */
typedef struct {
    PyObject *dict;
    int small[256]; /* -1: not in codes */
    int use_small;
} Codes;

static void codes_init(Codes *c, PyObject *dict)
{
    c->dict = dict;
    c->use_small = 1;
    for (int t = 0; t < 256; t++)
        c->small[t] = -1;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        if (!PyLong_CheckExact(key) || !PyLong_CheckExact(value)) {
            c->use_small = 0; /* not what gpusaver.native.type_codes makes: ask the dict */
            return;
        }
        long t = PyLong_AsLong(key), v = PyLong_AsLong(value);
        if (PyErr_Occurred()) {
            PyErr_Clear();
            c->use_small = 0;
            return;
        }
        if (t >= 0 && t < 256) {
            if (v < INT_MIN || v > INT_MAX) {
                c->use_small = 0;
                return;
            }
            c->small[t] = (int)v;
        }
    }
}

/* The tensor's type code for the format, or -1 when the array takes the
 * general path (not an ndarray, not C-contiguous, byte-swapped, unknown dtype). */
static int fast_code(PyObject *obj, const Codes *codes)
{
    if (!PyArray_Check(obj))
        return -1;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISNOTSWAPPED(a))
        return -1;
    int type = PyArray_TYPE(a);
    if (codes->use_small && type >= 0 && type < 256)
        return codes->small[type];
    PyObject *key = PyLong_FromLong(type);
    if (key == NULL)
        return -2;
    PyObject *code = PyDict_GetItemWithError(codes->dict, key);
    Py_DECREF(key);
    if (code == NULL)
        return PyErr_Occurred() ? -2 : -1;
    long v = PyLong_AsLong(code);
    if (v == -1 && PyErr_Occurred())
        return -2;
    return (int)v;
}

/* The arrays of a restore lie all over the heap: fetch the objects 16 ahead of i, their shapes 8 ahead. */
static inline void prefetch_arrays(PyObject *const *items, Py_ssize_t n, Py_ssize_t i)
{
    if (i + 32 < n) {
        __builtin_prefetch(items[i + 32]);
        __builtin_prefetch((const char *)items[i + 32] + 64);
    }
    if (i + 16 < n && PyArray_Check(items[i + 16]))
        __builtin_prefetch(PyArray_DIMS((PyArrayObject *)items[i + 16]));
}

/* 1 where obj can take a decoded entry's bytes on the fast path: a writable C-contiguous
 * native-order ndarray whose dtype's code is dtype, of rank rank and shape dims, and of size
 * bytes; 0 where not; -1 with an error set. */
static int array_fits(PyObject *obj, const Codes *codes, int32_t dtype, int32_t rank, const int64_t *dims, int64_t size)
{
    int code = fast_code(obj, codes);
    if (code == -2)
        return -1;
    if (code < 0 || code != dtype)
        return 0;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_ISWRITEABLE(a) || PyArray_NDIM(a) != rank)
        return 0;
    npy_intp *shape = PyArray_DIMS(a);
    for (int k = 0; k < rank; k++)
        if ((int64_t)shape[k] != dims[k])
            return 0;
    /* the same shape: the array's byte size is its itemsize times the product of those dims */
    return (int64_t)PyArray_NBYTES(a) == size;
}

/* ------------------------------------------------------------ describe */

PyDoc_STRVAR(describe_doc,
             "describe(arrays, codes) -> (enums, sizes, ndims, dims)\n\n"
             "For each array: its DataType enum (codes maps a NumPy type number to one), its byte\n"
             "size, its rank, and its dimensions (all ranks' dims back to back). enums[i] is -1 for\n"
             "an array the fast path does not take: not a C-contiguous native-order ndarray of a\n"
             "type in codes.");

static PyObject *describe(PyObject *self, PyObject *args)
{
    PyObject *seq, *codes;
    if (!PyArg_ParseTuple(args, "OO!:describe", &seq, &PyDict_Type, &codes))
        return NULL;
    /* A tuple of its own: NumPy lets go of the GIL while it allocates the columns (calloc of
     * 1 KiB or more), and another thread could empty the caller's list meanwhile. */
    PyObject *fast = PySequence_Tuple(seq);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(fast);
    PyObject **items = &PyTuple_GET_ITEM(fast, 0);
    PyArrayObject *enums = new_array(n, NPY_INT32), *sizes = new_array(n, NPY_INT64), *ndims = new_array(n, NPY_INT32);
    PyArrayObject *dims = NULL;
    PyObject *result = NULL;
    int64_t *shapes = NULL; /* every shape, read in the same pass as the ranks and sizes */
    size_t shapes_cap = 0;
    if (!enums || !sizes || !ndims)
        goto done;
    int32_t *e = (int32_t *)PyArray_DATA(enums), *r = (int32_t *)PyArray_DATA(ndims);
    int64_t *s = (int64_t *)PyArray_DATA(sizes);
    npy_intp total_dims = 0;
    Codes table;
    codes_init(&table, codes);
    /* One pass with the GIL and no call that may release it: another thread setting an array's
     * shape in place (which frees the dimensions read here) waits until every array is read. */
    for (Py_ssize_t i = 0; i < n; i++) {
        int code = fast_code(items[i], &table);
        if (code == -2)
            goto done;
        e[i] = code;
        if (code >= 0) {
            PyArrayObject *a = (PyArrayObject *)items[i];
            int rank = PyArray_NDIM(a);
            if ((size_t)(total_dims + rank) > shapes_cap) {
                size_t cap = shapes_cap ? 2 * shapes_cap : 1024;
                while (cap < (size_t)(total_dims + rank))
                    cap *= 2;
                int64_t *grown = PyMem_RawRealloc(shapes, cap * sizeof(int64_t));
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                shapes = grown;
                shapes_cap = cap;
            }
            npy_intp *shape = PyArray_DIMS(a);
            for (int k = 0; k < rank; k++)
                shapes[total_dims + k] = (int64_t)shape[k];
            s[i] = (int64_t)PyArray_NBYTES(a);
            r[i] = rank;
            total_dims += rank;
        }
    }
    dims = new_array(total_dims, NPY_INT64);
    if (!dims)
        goto done;
    if (total_dims)
        memcpy(PyArray_DATA(dims), shapes, (size_t)total_dims * sizeof(int64_t));
    result = PyTuple_Pack(4, (PyObject *)enums, (PyObject *)sizes, (PyObject *)ndims, (PyObject *)dims);
done:
    PyMem_RawFree(shapes);
    Py_DECREF(fast);
    Py_XDECREF(enums);
    Py_XDECREF(sizes);
    Py_XDECREF(ndims);
    Py_XDECREF(dims);
    return result;
}

/* ------------------------------------------------------------ stream copy */

/* Below this, a copy fits the caches and plain memcpy is as fast. */
#define STREAM_MIN ((size_t)256 << 10)

#ifdef HAVE_X86_CRC
/* Copies with non-temporal stores: the destination lines are written without
 * first being read into the cache (no read-for-ownership), so a copy much
 * larger than the caches moves two bytes over the memory bus per byte copied
 * instead of three. glibc's memcpy switches to such stores only above a
 * threshold derived from the last-level cache size, which some VMs report as
 * hundreds of MiB: a snapshot's copies never reach it there. The partial
 * lines at either end take memcpy; copy_stream_done fences the stores. */
__attribute__((target("avx2"))) static void copy_stream_avx2(unsigned char *dst, const unsigned char *src, size_t n)
{
    size_t head = (size_t)(-(uintptr_t)dst & 31);
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    while (n >= 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)src);
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(src + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(src + 96));
        _mm256_stream_si256((__m256i *)dst, a);
        _mm256_stream_si256((__m256i *)(dst + 32), b);
        _mm256_stream_si256((__m256i *)(dst + 64), c);
        _mm256_stream_si256((__m256i *)(dst + 96), d);
        src += 128;
        dst += 128;
        n -= 128;
    }
    memcpy(dst, src, n);
}
#endif

/* Streaming stores from min_stream bytes up where the CPU has them, memcpy below; copy_stream_done after the last. */
static void copy_stream(unsigned char *dst, const unsigned char *src, size_t n, size_t min_stream)
{
#ifdef HAVE_X86_CRC
    if (stream_hw && n >= min_stream) {
        copy_stream_avx2(dst, src, n);
        return;
    }
#endif
    if (n)
        memcpy(dst, src, n);
}

/* The streamed stores are visible to other threads once this returns. */
static void copy_stream_done(void)
{
#ifdef HAVE_X86_CRC
    if (stream_hw)
        _mm_sfence();
#endif
}

PyDoc_STRVAR(stream_copy_doc,
             "stream_copy(dst, src) -> None\\n\\n"
             "Copies the bytes of src into the writable buffer dst (the same length; they must not\\n"
             "overlap). Large copies use non-temporal stores where the CPU has them. The GIL is released.");

static PyObject *stream_copy(PyObject *self, PyObject *args)
{
    PyObject *dst_obj, *src_obj;
    if (!PyArg_ParseTuple(args, "OO:stream_copy", &dst_obj, &src_obj))
        return NULL;
    Buf dst, src;
    memset(&dst, 0, sizeof dst);
    memset(&src, 0, sizeof src);
    PyObject *result = NULL;
    if (get_buf(dst_obj, &dst, 1, 0, 0, "stream_copy dst") < 0 || get_buf(src_obj, &src, 0, 0, 0, "stream_copy src") < 0)
        goto done;
    if (dst.view.len != src.view.len) {
        PyErr_Format(PyExc_ValueError, "stream_copy: dst holds %zd bytes, src %zd", dst.view.len, src.view.len);
        goto done;
    }
    const unsigned char *d = dst.view.buf, *sp = src.view.buf;
    size_t n = (size_t)dst.view.len;
    if (n && d < sp + n && sp < d + n) {
        PyErr_SetString(PyExc_ValueError, "stream_copy: dst and src overlap");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    copy_stream(dst.view.buf, src.view.buf, n, STREAM_MIN);
    copy_stream_done();
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    release_buf(&dst);
    release_buf(&src);
    return result;
}

/* ---------------------------------------------------------- pack / unpack */

typedef struct {
    const unsigned char *src;
    unsigned char *dst;
    size_t n;
    PyObject *owner; /* a reference held while the GIL is released */
} Span;

static void release_spans(Span *spans, Py_ssize_t count)
{
    if (spans == NULL)
        return;
    for (Py_ssize_t k = 0; k < count; k++)
        Py_XDECREF(spans[k].owner);
    PyMem_Free(spans);
}

/* The data pointers and sizes of arrays[idx[k]] for k in [start, stop): every
 * one a C-contiguous ndarray (and writable, when writing into them). Each span
 * holds a reference to its array, so the arrays outlive the copy even if the
 * caller's list changes while the GIL is released; free with release_spans. */
static Span *gather(PyObject **items, Py_ssize_t count, const int64_t *idx, Py_ssize_t start, Py_ssize_t stop,
                    int writable, const char *what)
{
    Span *spans = PyMem_Calloc((size_t)(stop > start ? stop - start : 1), sizeof(Span));
    if (spans == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t k = start; k < stop; k++) {
        Py_ssize_t i = idx ? (Py_ssize_t)idx[k] : k;
        if (i < 0 || i >= count) {
            PyErr_Format(PyExc_IndexError, "%s: index %zd out of range", what, i);
            goto fail;
        }
        PyObject *obj = items[i];
        if (!PyArray_Check(obj) || !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)obj)) {
            PyErr_Format(PyExc_TypeError, "%s: item %zd is not a C-contiguous ndarray", what, i);
            goto fail;
        }
        PyArrayObject *a = (PyArrayObject *)obj;
        if (writable && !PyArray_ISWRITEABLE(a)) {
            PyErr_Format(PyExc_ValueError, "%s: array %zd is read-only", what, i);
            goto fail;
        }
        spans[k - start].src = PyArray_DATA(a);
        spans[k - start].dst = PyArray_DATA(a);
        spans[k - start].n = (size_t)PyArray_NBYTES(a);
        Py_INCREF(obj);
        spans[k - start].owner = obj;
    }
    return spans;
fail:
    release_spans(spans, stop - start);
    return NULL;
}

/* Small tensors live apart from each other, so the hardware prefetcher does not run ahead from
 * one to the next: packing (and unpacking) waits on memory for each one. Ask for a tensor's
 * first bytes (up to PACK_PREFETCH) PACK_AHEAD tensors before copying it: its source when
 * packing, its destination (to be written) when unpacking. 100,000 tensors of 640 bytes: pack
 * 18 -> 11 ms on the 2-core Xeon VM, the same for 2 to 16 ahead. */
#define PACK_AHEAD 8
#define PACK_PREFETCH 2048

static inline void prefetch_span(const Span *s, int for_write)
{
    size_t n = s->n < PACK_PREFETCH ? s->n : PACK_PREFETCH;
    if (for_write) {
        for (size_t at = 0; at < n; at += 64)
            __builtin_prefetch(s->dst + at, 1);
    } else {
        for (size_t at = 0; at < n; at += 64)
            __builtin_prefetch(s->src + at, 0);
    }
}

PyDoc_STRVAR(pack_doc,
             "pack(arrays, start, stop, out, crcs, stream=False) -> int\n\n"
             "Copies the bytes of arrays[start:stop] back to back into the writable buffer out and\n"
             "stores each one's crc32c (unmasked) in crcs[i] (a uint32 buffer indexed like arrays).\n"
             "Returns the number of bytes copied. The GIL is released while copying. With stream,\n"
             "out is written in non-temporal stores where the CPU has them (for a buffer nobody\n"
             "reads soon, such as a snapshot); else each crc is taken from the copy, in cache.");

static PyObject *pack(PyObject *self, PyObject *args)
{
    PyObject *seq, *out_obj, *crc_obj;
    Py_ssize_t start, stop;
    int stream = 0;
    if (!PyArg_ParseTuple(args, "OnnOO|p:pack", &seq, &start, &stop, &out_obj, &crc_obj, &stream))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "arrays must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    Buf out, crcs;
    memset(&out, 0, sizeof out);
    memset(&crcs, 0, sizeof crcs);
    Span *spans = NULL;
    PyObject *result = NULL;
    if (start < 0 || stop > count || start > stop) {
        PyErr_Format(PyExc_IndexError, "pack: range [%zd, %zd) outside %zd arrays", start, stop, count);
        goto done;
    }
    if (get_buf(out_obj, &out, 1, 0, 0, "pack out") < 0 || get_buf(crc_obj, &crcs, 1, 4, count, "pack crcs") < 0)
        goto done;
    spans = gather(PySequence_Fast_ITEMS(fast), count, NULL, start, stop, 0, "pack");
    if (spans == NULL)
        goto done;
    size_t total = 0;
    for (Py_ssize_t k = 0; k < stop - start; k++)
        total += spans[k].n;
    if (total > (size_t)out.view.len) {
        PyErr_Format(PyExc_ValueError, "pack: %zu bytes do not fit a buffer of %zd", total, out.view.len);
        goto done;
    }
    unsigned char *dst = out.view.buf;
    uint32_t *c = (uint32_t *)crcs.view.buf;
    Py_BEGIN_ALLOW_THREADS
    if (stream) {
        /* the crc first, from the source: the copy then reads it again from the cache */
        for (Py_ssize_t k = 0; k < stop - start; k++) {
            size_t n = spans[k].n;
            c[start + k] = crc32c_extend(0, spans[k].src, n);
            copy_stream(dst, spans[k].src, n, 256); /* every tensor: the destination is a snapshot */
            dst += n;
        }
        copy_stream_done();
    } else {
        for (Py_ssize_t k = 0; k < stop - start; k++) {
            size_t n = spans[k].n;
            if (k + PACK_AHEAD < stop - start)
                prefetch_span(&spans[k + PACK_AHEAD], 0);
            if (n)
                memcpy(dst, spans[k].src, n);
            c[start + k] = crc32c_extend(0, dst, n); /* from the copy: it is in cache */
            dst += n;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSize_t(total);
done:
    release_spans(spans, stop - start);
    release_buf(&out);
    release_buf(&crcs);
    Py_DECREF(fast);
    return result;
}

PyDoc_STRVAR(unpack_doc,
             "unpack(src, base, arrays, order, start, stop, offsets, crcs) -> list[int]\n\n"
             "For k in [start, stop), with i = order[k]: checks that the bytes of src at\n"
             "offsets[i] - base (as many as arrays[i] holds) have the unmasked crc32c crcs[i], and\n"
             "copies them into arrays[i] if so. Returns the i whose bytes do not match, in the order\n"
             "met (those arrays are left untouched; every other one is restored). The GIL is released.");

static PyObject *unpack(PyObject *self, PyObject *args)
{
    PyObject *src_obj, *seq, *order_obj, *off_obj, *crc_obj;
    long long base;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "OLOOnnOO:unpack", &src_obj, &base, &seq, &order_obj, &start, &stop, &off_obj,
                          &crc_obj))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "arrays must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    Buf src, order, offs, crcs;
    memset(&src, 0, sizeof src);
    memset(&order, 0, sizeof order);
    memset(&offs, 0, sizeof offs);
    memset(&crcs, 0, sizeof crcs);
    Span *spans = NULL;
    PyObject *result = NULL;
    if (get_buf(src_obj, &src, 0, 0, 0, "unpack src") < 0 || get_buf(order_obj, &order, 0, 8, stop, "unpack order") < 0 ||
        get_buf(off_obj, &offs, 0, 8, count, "unpack offsets") < 0 || get_buf(crc_obj, &crcs, 0, 4, count, "unpack crcs") < 0)
        goto done;
    if (start < 0 || start > stop) {
        PyErr_Format(PyExc_IndexError, "unpack: bad range [%zd, %zd)", start, stop);
        goto done;
    }
    const int64_t *idx = (const int64_t *)order.view.buf;
    spans = gather(PySequence_Fast_ITEMS(fast), count, idx, start, stop, 1, "unpack");
    if (spans == NULL)
        goto done;
    const int64_t *off = (const int64_t *)offs.view.buf;
    for (Py_ssize_t k = start; k < stop; k++) {
        int64_t at = off[idx[k]];
        uint64_t rel = (uint64_t)at - (uint64_t)base; /* unsigned: no overflow, meaningful when at >= base */
        if (at < (int64_t)base || rel > (uint64_t)src.view.len || spans[k - start].n > (uint64_t)src.view.len - rel) {
            PyErr_Format(PyExc_ValueError, "unpack: tensor %lld lies outside the source buffer", (long long)idx[k]);
            goto done;
        }
        spans[k - start].src = (const unsigned char *)src.view.buf + rel;
    }
    const uint32_t *want = (const uint32_t *)crcs.view.buf;
    Py_ssize_t nbad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = start; k < stop; k++) {
        Span *sp = &spans[k - start];
        if (k + PACK_AHEAD < stop)
            prefetch_span(sp + PACK_AHEAD, 1);
        if (crc32c_extend(0, sp->src, sp->n) != want[idx[k]]) {
            sp->n = SIZE_MAX; /* marks it bad: collected below, with the GIL */
            nbad++;
            continue;
        }
        if (sp->n)
            memcpy(sp->dst, sp->src, sp->n);
    }
    Py_END_ALLOW_THREADS
    result = PyList_New(nbad);
    if (result == NULL)
        goto done;
    for (Py_ssize_t k = start, j = 0; k < stop && j < nbad; k++) {
        if (spans[k - start].n != SIZE_MAX)
            continue;
        PyObject *index = PyLong_FromLongLong((long long)idx[k]);
        if (index == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, j++, index);
    }
done:
    release_spans(spans, stop - start);
    release_buf(&src);
    release_buf(&order);
    release_buf(&offs);
    release_buf(&crcs);
    Py_DECREF(fast);
    return result;
}

PyDoc_STRVAR(crc32c_doc, "crc32c(data, crc=0) -> int\n\nExtends the unmasked crc32c crc over the bytes of data.");

static PyObject *py_crc32c(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "y*|I:crc32c", &view, &crc))
        return NULL;
    uint32_t c;
    Py_BEGIN_ALLOW_THREADS
    c = crc32c_extend(crc, view.buf, (size_t)view.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

/* ------------------------------------------------------------- entries */

/* Room for one entry: 11 (dtype) + 2 + 10 (shape header) + 13 per dim + 3 x 11 + 5. */
#define ENTRY_ROOM(rank) (64 + 13 * (size_t)(rank))

/* One BundleEntryProto into buf (ENTRY_ROOM(rank) bytes), exactly as protobuf serialises it
 * (fields in number order, zero fields omitted, the shape always present); crc is masked.
 * Returns its length, or -1 for a negative dimension. */
static Py_ssize_t encode_entry_into(unsigned char *buf, int32_t dtype, int rank, const int64_t *d, uint64_t shard,
                                    int64_t offset, int64_t size, uint32_t crc)
{
    size_t body = 0;
    for (int k = 0; k < rank; k++) {
        if (d[k] < 0)
            return -1;
        body += d[k] ? 2 + 1 + varint_len((uint64_t)d[k]) : 2;
    }
    size_t p = 0;
    if (dtype) {
        buf[p++] = 0x08;
        p += put_varint(buf + p, (uint64_t)(uint32_t)dtype);
    }
    buf[p++] = 0x12;
    p += put_varint(buf + p, body);
    for (int k = 0; k < rank; k++) {
        buf[p++] = 0x12;
        if (d[k]) {
            buf[p++] = (unsigned char)(1 + varint_len((uint64_t)d[k]));
            buf[p++] = 0x08;
            p += put_varint(buf + p, (uint64_t)d[k]);
        } else {
            buf[p++] = 0x00;
        }
    }
    if (shard) {
        buf[p++] = 0x18;
        p += put_varint(buf + p, shard);
    }
    if (offset) {
        buf[p++] = 0x20;
        p += put_varint(buf + p, (uint64_t)offset);
    }
    if (size) {
        buf[p++] = 0x28;
        p += put_varint(buf + p, (uint64_t)size);
    }
    if (crc) {
        buf[p++] = 0x35;
        buf[p++] = (unsigned char)crc;
        buf[p++] = (unsigned char)(crc >> 8);
        buf[p++] = (unsigned char)(crc >> 16);
        buf[p++] = (unsigned char)(crc >> 24);
    }
    return (Py_ssize_t)p;
}

PyDoc_STRVAR(encode_entries_doc,
             "encode_entries(enums, ndims, dims, offsets, sizes, crcs, shard_id) -> list[bytes]\n\n"
             "BundleEntryProto bytes for each tensor, exactly as protobuf serialises them (fields in\n"
             "number order, zero fields omitted, the shape always present). crcs are masked; dims\n"
             "holds every tensor's dimensions back to back.");

static PyObject *encode_entries(PyObject *self, PyObject *args)
{
    PyObject *objs[6];
    unsigned long long shard;
    if (!PyArg_ParseTuple(args, "OOOOOOK:encode_entries", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5],
                          &shard))
        return NULL;
    Buf b[6];
    memset(b, 0, sizeof b);
    PyObject *list = NULL;
    if (get_buf(objs[0], &b[0], 0, 4, 0, "enums") < 0)
        goto fail;
    Py_ssize_t n = b[0].view.len / 4;
    if (get_buf(objs[1], &b[1], 0, 4, n, "ndims") < 0 || get_buf(objs[2], &b[2], 0, 8, 0, "dims") < 0 ||
        get_buf(objs[3], &b[3], 0, 8, n, "offsets") < 0 || get_buf(objs[4], &b[4], 0, 8, n, "sizes") < 0 ||
        get_buf(objs[5], &b[5], 0, 4, n, "crcs") < 0)
        goto fail;
    const int32_t *enums = b[0].view.buf, *ndims = b[1].view.buf;
    const int64_t *dims = b[2].view.buf, *offsets = b[3].view.buf, *sizes = b[4].view.buf;
    const uint32_t *crcs = b[5].view.buf;
    Py_ssize_t ndims_total = b[2].view.len / 8, used = 0;
    list = PyList_New(n);
    if (list == NULL)
        goto fail;
    Out scratch;
    memset(&scratch, 0, sizeof scratch);
    for (Py_ssize_t i = 0; i < n; i++) {
        int rank = ndims[i];
        if (rank < 0 || rank > MAX_RANK || used + rank > ndims_total) {
            PyErr_Format(PyExc_ValueError, "encode_entries: bad rank %d of tensor %zd", rank, i);
            goto fail_buf;
        }
        if (out_reserve(&scratch, ENTRY_ROOM(rank)) < 0)
            goto fail_buf;
        unsigned char *buf = scratch.p;
        Py_ssize_t p = encode_entry_into(buf, enums[i], rank, dims + used, shard, offsets[i], sizes[i], crcs[i]);
        used += rank;
        if (p < 0) {
            PyErr_Format(PyExc_ValueError, "encode_entries: negative dimension in tensor %zd", i);
            goto fail_buf;
        }
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)p);
        if (bytes == NULL)
            goto fail_buf;
        PyList_SET_ITEM(list, i, bytes);
    }
    PyMem_RawFree(scratch.p);
    for (int k = 0; k < 6; k++)
        release_buf(&b[k]);
    return list;
fail_buf:
    PyMem_RawFree(scratch.p);
fail:
    Py_XDECREF(list);
    for (int k = 0; k < 6; k++)
        release_buf(&b[k]);
    return NULL;
}

/* A varint as gpusaver.format.entry._varint_at reads it: at most 9 bytes
 * (shift 56), with no bound but the data's end. Returns 0 when it fails. */
static int varint_at(const unsigned char *data, size_t end, size_t *pos, uint64_t *out)
{
    uint64_t value = 0;
    unsigned shift = 0;
    size_t p = *pos;
    for (;;) {
        if (p >= end)
            return 0;
        unsigned char b = data[p++];
        value |= (uint64_t)(b & 0x7F) << shift;
        if (b < 0x80) {
            *pos = p;
            *out = value;
            return 1;
        }
        shift += 7;
        if (shift > 56)
            return 0;
    }
}

/* An optional varint field: when data[*pos] is tag, reads the value after it.
 * Returns 0 when the tag is there but its varint fails. */
static int tagged_varint(const unsigned char *data, size_t end, size_t *pos, unsigned char tag, uint64_t *out)
{
    if (*pos >= end || data[*pos] != tag)
        return 1;
    (*pos)++;
    return varint_at(data, end, pos, out);
}

/* Decodes the layout every writer emits (fields 1..6 in order, no slices),
 * accepting exactly what gpusaver.format.entry._decode_common accepts.
 * Returns the rank, or -1 for anything else. */
static int decode_common(const unsigned char *data, size_t end, int64_t *dims, int32_t *dtype, uint64_t *shard,
                         uint64_t *offset, uint64_t *size, uint32_t *crc)
{
    size_t pos = 0;
    *dtype = 0;
    if (end == 0)
        return -1;
    if (data[0] == 0x08) {
        if (end < 2 || (data[1] & 0x80))
            return -1;
        *dtype = data[1];
        pos = 2;
    }
    if (pos + 1 >= end || data[pos] != 0x12)
        return -1;
    unsigned shape_len = data[pos + 1];
    if (shape_len & 0x80)
        return -1;
    pos += 2;
    size_t stop = pos + shape_len;
    int rank = 0;
    uint64_t total = 1;
    while (pos < stop) {
        if (pos + 1 >= end)
            return -1;
        unsigned dim_len = data[pos + 1];
        if (data[pos] != 0x12 || (dim_len & 0x80))
            return -1;
        if (rank >= MAX_RANK)
            return -1; /* Python fails later on rank > 254; the result is the same */
        if (dim_len == 0) {
            dims[rank++] = 0;
            total = 0;
            pos += 2;
            continue;
        }
        if (pos + 2 >= end || data[pos + 2] != 0x08)
            return -1;
        size_t after = pos + 3;
        uint64_t d;
        if (!varint_at(data, end, &after, &d))
            return -1;
        if (after != pos + 2 + dim_len || (d >> 62))
            return -1;
        dims[rank++] = (int64_t)d;
        if (total && d) {
            if (total > INT64_MAXU / d)
                return -1;
            total *= d;
        } else {
            total = 0;
        }
        pos = after;
    }
    if (pos != stop)
        return -1;
    *shard = *offset = *size = 0;
    *crc = 0;
    if (!tagged_varint(data, end, &pos, 0x18, shard) || !tagged_varint(data, end, &pos, 0x20, offset) ||
        !tagged_varint(data, end, &pos, 0x28, size))
        return -1;
    if (pos < end && data[pos] == 0x35) {
        if (pos + 5 > end)
            return -1;
        *crc = (uint32_t)data[pos + 1] | (uint32_t)data[pos + 2] << 8 | (uint32_t)data[pos + 3] << 16 |
               (uint32_t)data[pos + 4] << 24;
        pos += 5;
    }
    if (pos != end || (*shard >> 31) || *offset > INT64_MAXU || *size > INT64_MAXU)
        return -1;
    return rank;
}

/* Scratch buffers kept from one call to the next. On the machines measured, touching fresh
 * pages costs more than the lookup itself, so lookup_entries reuses its working memory; more
 * than SCRATCH_KEEP bytes in all are given back after each call. Callers hold the GIL
 * throughout; scratch_busy turns away a call made from inside another (a finalizer run by the
 * garbage collector while a result is built), which then takes the caller's Python path. */
#define SCRATCH_KEEP ((size_t)32 << 20)
enum { S_ARENA, S_KOFF, S_NEXT, S_SLOTS, S_HASH, S_VPTR, S_VLEN, S_KEY, S_LAST, S_DIMS, S_BATCH, S_COUNT };
static void *scratch_p[S_COUNT];
static size_t scratch_cap[S_COUNT];
static int scratch_busy;

static void *scratch(int k, size_t bytes)
{
    if (bytes > scratch_cap[k]) {
        size_t cap = scratch_cap[k] ? scratch_cap[k] : 4096;
        while (cap < bytes)
            cap *= 2;
        void *p = PyMem_Realloc(scratch_p[k], cap);
        if (p == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        scratch_p[k] = p;
        scratch_cap[k] = cap;
    }
    return scratch_p[k];
}

static void scratch_trim(void)
{
    size_t total = 0;
    for (int k = 0; k < S_COUNT; k++)
        total += scratch_cap[k];
    if (total <= SCRATCH_KEEP)
        return;
    for (int k = 0; k < S_COUNT; k++) {
        PyMem_Free(scratch_p[k]);
        scratch_p[k] = NULL;
        scratch_cap[k] = 0;
    }
}

PyDoc_STRVAR(decode_entries_doc,
             "decode_entries(values) -> (ok, enums, shards, offsets, sizes, crcs, ndims, dim_starts, dims)\n\n"
             "Decodes BundleEntryProto bytes in the common layout (see entry._decode_common). ok[i] is 0\n"
             "where values[i] is None, not bytes, or in any other layout: decode those in Python. crcs\n"
             "are as stored (masked); tensor i's dims are dims[dim_starts[i]:dim_starts[i + 1]].");

static uint32_t unmask_crc(uint32_t m)
{
    uint32_t rot = m - CRC_MASK_DELTA;
    return (rot >> 17) | (rot << 15);
}

/* The columns of decode_entries for n entries given as (pointer, length) pairs; a NULL pointer
 * is an entry that is missing. Shared by decode_entries and lookup_entries (which holds the
 * scratch buffers: in_scratch). With num_shards >= 0, as reader.EntryColumns wants them: ok only
 * where the shard is below num_shards, crcs unmasked. */
static PyObject *decode_spans(Py_ssize_t n, const unsigned char *const *ptrs, const size_t *lens, int in_scratch,
                              long long num_shards, PyObject *const *arrays, const Codes *codes)
{
    /* Every item of every column is written below: the pooled memory is not zeroed. */
    PyArrayObject *(*make)(npy_intp, int) = in_scratch ? new_pooled_array : new_array;
    PyArrayObject *good = arrays ? make(n, NPY_UINT8) : NULL;
    if (arrays && good == NULL)
        return NULL;
    uint8_t *gp = good ? PyArray_DATA(good) : NULL;
    PyArrayObject *ok = make(n, NPY_UINT8), *enums = make(n, NPY_INT32), *shards = make(n, NPY_INT64),
                  *offsets = make(n, NPY_INT64), *sizes = make(n, NPY_INT64), *crcs = make(n, NPY_UINT32),
                  *ndims = make(n, NPY_INT32), *starts = make(n + 1, NPY_INT64);
    PyArrayObject *dims_arr = NULL;
    int64_t *dims = NULL;
    PyObject *result = NULL;
    if (!ok || !enums || !shards || !offsets || !sizes || !crcs || !ndims || !starts)
        goto done;
    size_t cap = (size_t)(n > 0 ? n : 1) * 2, used = 0;
    dims = in_scratch ? scratch(S_DIMS, cap * sizeof(int64_t)) : PyMem_Malloc(cap * sizeof(int64_t));
    if (dims == NULL) {
        if (!in_scratch) /* scratch() has said so */
            PyErr_NoMemory();
        goto done;
    }
    if (in_scratch)
        cap = scratch_cap[S_DIMS] / sizeof(int64_t);
    uint8_t *okp = PyArray_DATA(ok);
    int32_t *ep = PyArray_DATA(enums), *rp = PyArray_DATA(ndims);
    int64_t *shp = PyArray_DATA(shards), *op = PyArray_DATA(offsets), *sp = PyArray_DATA(sizes), *stp = PyArray_DATA(starts);
    uint32_t *cp = PyArray_DATA(crcs);
    for (Py_ssize_t i = 0; i < n; i++) {
        stp[i] = (int64_t)used;
        okp[i] = 0;
        ep[i] = rp[i] = 0;
        shp[i] = op[i] = sp[i] = 0;
        cp[i] = 0;
        if (gp)
            gp[i] = 0;
        if (i + 8 < n && ptrs[i + 8])
            __builtin_prefetch(ptrs[i + 8]);
        if (arrays)
            prefetch_arrays(arrays, n, i);
        if (ptrs[i] == NULL)
            continue;
        if (used + MAX_RANK > cap) {
            size_t ncap = cap * 2 + MAX_RANK;
            int64_t *nd = in_scratch ? scratch(S_DIMS, ncap * sizeof(int64_t)) : PyMem_Realloc(dims, ncap * sizeof(int64_t));
            if (nd == NULL) {
                if (!in_scratch) /* scratch() has said so */
                    PyErr_NoMemory();
                goto done;
            }
            dims = nd;
            cap = in_scratch ? scratch_cap[S_DIMS] / sizeof(int64_t) : ncap;
        }
        uint64_t shard, offset, size;
        uint32_t crc;
        int32_t dtype;
        int rank = decode_common(ptrs[i], lens[i], dims + used, &dtype, &shard, &offset, &size, &crc);
        if (rank < 0)
            continue;
        okp[i] = num_shards < 0 || shard < (uint64_t)num_shards;
        ep[i] = dtype;
        shp[i] = (int64_t)shard;
        op[i] = (int64_t)offset;
        sp[i] = (int64_t)size;
        cp[i] = num_shards < 0 ? crc : unmask_crc(crc);
        rp[i] = rank;
        if (gp && okp[i]) {
            int fits = array_fits(arrays[i], codes, dtype, rank, dims + used, (int64_t)size);
            if (fits < 0)
                goto done;
            gp[i] = (uint8_t)fits;
        }
        used += (size_t)rank;
    }
    stp[n] = (int64_t)used;
    dims_arr = make((npy_intp)used, NPY_INT64);
    if (dims_arr == NULL)
        goto done;
    if (used)
        memcpy(PyArray_DATA(dims_arr), dims, used * sizeof(int64_t));
    if (good)
        result = PyTuple_Pack(10, (PyObject *)ok, (PyObject *)enums, (PyObject *)shards, (PyObject *)offsets,
                              (PyObject *)sizes, (PyObject *)crcs, (PyObject *)ndims, (PyObject *)starts,
                              (PyObject *)dims_arr, (PyObject *)good);
    else
        result = PyTuple_Pack(9, (PyObject *)ok, (PyObject *)enums, (PyObject *)shards, (PyObject *)offsets,
                              (PyObject *)sizes, (PyObject *)crcs, (PyObject *)ndims, (PyObject *)starts,
                              (PyObject *)dims_arr);
done:
    Py_XDECREF(good);
    if (!in_scratch)
        PyMem_Free(dims);
    Py_XDECREF(ok);
    Py_XDECREF(enums);
    Py_XDECREF(shards);
    Py_XDECREF(offsets);
    Py_XDECREF(sizes);
    Py_XDECREF(crcs);
    Py_XDECREF(ndims);
    Py_XDECREF(starts);
    Py_XDECREF(dims_arr);
    return result;
}

static PyObject *decode_entries(PyObject *self, PyObject *args)
{
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "O:decode_entries", &seq))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "values must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    PyObject *result = NULL;
    const unsigned char **ptrs = PyMem_Malloc(sizeof(*ptrs) * (size_t)(n > 0 ? n : 1));
    size_t *lens = PyMem_Malloc(sizeof(*lens) * (size_t)(n > 0 ? n : 1));
    if (ptrs == NULL || lens == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        ptrs[i] = PyBytes_Check(v) ? (const unsigned char *)PyBytes_AS_STRING(v) : NULL;
        lens[i] = ptrs[i] ? (size_t)PyBytes_GET_SIZE(v) : 0;
    }
    result = decode_spans(n, ptrs, lens, 0, -1, NULL, NULL);
done:
    PyMem_Free(ptrs);
    PyMem_Free(lens);
    Py_DECREF(fast);
    return result;
}

/* ------------------------------------------------------- lookup_entries */

/* A 64-bit hash of a key, eight bytes at a time (the keys are the caller's own names). */
static uint64_t key_hash(const unsigned char *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ull ^ ((uint64_t)n * 0xC2B2AE3D27D4EB4Full);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, n);
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ull;
    return h ^ (h >> 29);
}

/* memcmp order, a prefix first. */
static int key_cmp(const unsigned char *a, size_t an, const unsigned char *b, size_t bn)
{
    size_t common = an < bn ? an : bn;
    int c = common ? memcmp(a, b, common) : 0; /* an empty key may have no buffer at all */
    if (c)
        return c;
    return an < bn ? -1 : an > bn;
}

static uint32_t mask_crc(uint32_t c);
static int varint32(const unsigned char *p, size_t limit, size_t *pos, uint32_t *out);

/* Every entry of a table's data blocks in order, each block's crc and layout checked as
 * TableReader._checked_block and parse_block check them. sorted stays 1 while every key is
 * larger than the one before. */
typedef struct {
    const unsigned char *p;
    size_t body_end;
    const int64_t *handles;
    Py_ssize_t nblocks, next_block;
    size_t pos, limit;
    unsigned char *key; /* the current key (scratch S_KEY) */
    size_t key_len, key_cap;
    size_t last_len; /* the previous block's last key, in scratch S_LAST */
    int any, sorted;
} Walk;

/* 1: an entry (its key in w->key); 0: the end; -1: a damaged block; -2: an error set. */
static int walk_next(Walk *w, const unsigned char **value, size_t *vlen_out)
{
    const unsigned char *p = w->p;
    while (w->pos >= w->limit) {
        if (w->next_block >= w->nblocks)
            return 0;
        int64_t off = w->handles[2 * w->next_block], size = w->handles[2 * w->next_block + 1];
        w->next_block++;
        if (off < 0 || size < 0 || (uint64_t)off + (uint64_t)size + 5 > w->body_end)
            return -1;
        size_t start = (size_t)off, end = start + (size_t)size;
        uint32_t stored = (uint32_t)p[end + 1] | (uint32_t)p[end + 2] << 8 | (uint32_t)p[end + 3] << 16 |
                          (uint32_t)p[end + 4] << 24;
        if (mask_crc(crc32c_extend(crc32c_extend(0, p + start, (size_t)size), p + end, 1)) != stored || p[end] != 0 ||
            size < 4)
            return -1;
        uint32_t restarts = (uint32_t)p[end - 4] | (uint32_t)p[end - 3] << 8 | (uint32_t)p[end - 2] << 16 |
                            (uint32_t)p[end - 1] << 24;
        if (restarts > (uint64_t)(size - 4) / 4)
            return -1;
        if (w->key_len) { /* the key the next block's first key must follow */
            unsigned char *last = scratch(S_LAST, w->key_len);
            if (last == NULL)
                return -2;
            memcpy(last, w->key, w->key_len);
            w->last_len = w->key_len;
        }
        w->key_len = 0;
        w->pos = start;
        w->limit = restarts ? end - 4 - 4 * (size_t)restarts : start;
    }
    uint32_t shared, unshared, vlen;
    size_t pos = w->pos;
    if (!varint32(p, w->limit, &pos, &shared) || !varint32(p, w->limit, &pos, &unshared) ||
        !varint32(p, w->limit, &pos, &vlen) || shared > w->key_len || (uint64_t)pos + unshared + vlen > w->limit)
        return -1;
    size_t klen = (size_t)shared + unshared;
    if (w->sorted && w->any) {
        int c = w->key_len ? key_cmp(p + pos, unshared, w->key + shared, w->key_len - shared)
                           : key_cmp(p + pos, unshared, (const unsigned char *)scratch_p[S_LAST], w->last_len);
        if (c <= 0)
            w->sorted = 0;
    }
    if (klen > w->key_cap) {
        unsigned char *k = scratch(S_KEY, klen);
        if (k == NULL)
            return -2;
        w->key = k;
        w->key_cap = scratch_cap[S_KEY];
    }
    if (unshared)
        memcpy(w->key + shared, p + pos, unshared);
    w->key_len = klen;
    w->any = 1;
    pos += unshared;
    *value = p + pos;
    *vlen_out = vlen;
    w->pos = pos + vlen;
    return 1;
}

static int walk_init(Walk *w, const Py_buffer *view, const Buf *blocks)
{
    memset(w, 0, sizeof *w);
    w->p = (const unsigned char *)view->buf;
    w->body_end = view->len >= 48 ? (size_t)view->len - 48 : 0;
    w->handles = (const int64_t *)blocks->view.buf;
    w->nblocks = blocks->view.len / 16;
    w->sorted = 1;
    w->key = scratch(S_KEY, 256);
    w->key_cap = scratch_cap[S_KEY];
    return w->key ? 0 : -1;
}

/* keys sorted, each larger than the one before: one merge of the two sorted lists. Returns
 * 1 done, 0 when the table's keys are not in order (the caller hashes instead), -1 damaged,
 * -2 error. */
static int match_sorted(Walk *w, PyObject **items, Py_ssize_t n, const unsigned char **vptrs, size_t *vlens)
{
    Py_ssize_t k = 0;
    const unsigned char *value;
    size_t vlen;
    int rc;
    while ((rc = walk_next(w, &value, &vlen)) == 1) {
        if (!w->sorted)
            return 0;
        while (k < n) {
            PyObject *q = items[k];
            int c = key_cmp((const unsigned char *)PyBytes_AS_STRING(q), (size_t)PyBytes_GET_SIZE(q), w->key, w->key_len);
            if (c > 0)
                break;
            if (c == 0) {
                vptrs[k] = value;
                vlens[k] = vlen;
                k++;
                break;
            }
            k++;
        }
    }
    return rc == 0 ? 1 : rc;
}

typedef struct {
    uint32_t tag; /* the hash's high bits, compared before the key */
    int32_t idx;  /* the first of the keys with this name, -1 for an empty slot */
} Slot;

/* Any keys: a hash table of them, probed with every key of the table. Returns 1, -1 or -2. */
static int match_hashed(Walk *w, PyObject **items, Py_ssize_t n, const unsigned char **vptrs, size_t *vlens)
{
    size_t m = (size_t)(n > 0 ? n : 1), total = 0, slots = 16;
    while (slots < m * 2)
        slots *= 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + 16 < n)
            __builtin_prefetch(items[i + 16]);
        if (PyBytes_Check(items[i]))
            total += (size_t)PyBytes_GET_SIZE(items[i]);
    }
    unsigned char *arena = scratch(S_ARENA, total + 1);
    size_t *koff = scratch(S_KOFF, sizeof(size_t) * (m + 1));
    int32_t *next = scratch(S_NEXT, sizeof(int32_t) * m);
    Slot *table = scratch(S_SLOTS, sizeof(Slot) * slots);
    uint64_t *hashes = scratch(S_HASH, sizeof(uint64_t) * m);
    if (!arena || !koff || !next || !table || !hashes)
        return -2;
    size_t mask = slots - 1, at = 0;
    for (size_t s = 0; s < slots; s++)
        table[s].idx = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + 16 < n)
            __builtin_prefetch(items[i + 16]);
        koff[i] = at;
        next[i] = -1;
        PyObject *k = items[i];
        if (PyBytes_Check(k)) {
            size_t len = (size_t)PyBytes_GET_SIZE(k);
            memcpy(arena + at, PyBytes_AS_STRING(k), len);
            hashes[i] = key_hash(arena + at, len);
            at += len;
        }
    }
    koff[n] = at;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + 8 < n)
            __builtin_prefetch(&table[hashes[i + 8] & mask]);
        if (!PyBytes_Check(items[i]))
            continue; /* never found */
        size_t len = koff[i + 1] - koff[i];
        const unsigned char *kp = arena + koff[i];
        uint32_t tag = (uint32_t)(hashes[i] >> 32);
        for (size_t s = (size_t)hashes[i] & mask;; s = (s + 1) & mask) {
            int32_t j = table[s].idx;
            if (j < 0) {
                table[s].tag = tag;
                table[s].idx = (int32_t)i;
                break;
            }
            if (table[s].tag == tag && koff[j + 1] - koff[j] == len && memcmp(arena + koff[j], kp, len) == 0) {
                next[i] = next[j]; /* the same key asked for twice: both get its value */
                next[j] = (int32_t)i;
                break;
            }
        }
    }
    /* The table's keys go through in batches, each step prefetching what the next one reads:
     * the probes are cache misses, and a batch overlaps them. */
    enum { BATCH = 32 };
    unsigned char *batch_keys = scratch(S_BATCH, 4096);
    if (batch_keys == NULL)
        return -2;
    size_t bk_off[BATCH + 1], bvlen[BATCH];
    const unsigned char *bval[BATCH];
    uint64_t bh[BATCH];
    int32_t cand[BATCH];
    size_t bslot[BATCH];
    int rc = 1;
    while (rc == 1) {
        int count = 0;
        size_t used = 0;
        while (count < BATCH && (rc = walk_next(w, &bval[count], &bvlen[count])) == 1) {
            if (used + w->key_len > scratch_cap[S_BATCH]) {
                batch_keys = scratch(S_BATCH, used + w->key_len);
                if (batch_keys == NULL)
                    return -2;
            }
            bk_off[count] = used;
            memcpy(batch_keys + used, w->key, w->key_len);
            used += w->key_len;
            count++;
        }
        bk_off[count] = used;
        for (int e = 0; e < count; e++) {
            bh[e] = key_hash(batch_keys + bk_off[e], bk_off[e + 1] - bk_off[e]);
            bslot[e] = (size_t)bh[e] & mask;
            __builtin_prefetch(&table[bslot[e]]);
        }
        for (int e = 0; e < count; e++) { /* the first slot whose tag matches: a candidate */
            uint32_t tag = (uint32_t)(bh[e] >> 32);
            size_t slot = bslot[e];
            cand[e] = -1;
            for (;; slot = (slot + 1) & mask) {
                int32_t j = table[slot].idx;
                if (j < 0)
                    break;
                if (table[slot].tag == tag) {
                    cand[e] = j;
                    __builtin_prefetch(&koff[j]);
                    break;
                }
            }
            bslot[e] = slot;
        }
        for (int e = 0; e < count; e++)
            if (cand[e] >= 0)
                __builtin_prefetch(arena + koff[cand[e]]);
        for (int e = 0; e < count; e++) {
            if (cand[e] < 0)
                continue;
            const unsigned char *key = batch_keys + bk_off[e];
            size_t klen = bk_off[e + 1] - bk_off[e];
            uint32_t tag = (uint32_t)(bh[e] >> 32);
            for (size_t slot = bslot[e];; slot = (slot + 1) & mask) {
                int32_t j = table[slot].idx;
                if (j < 0)
                    break;
                if (table[slot].tag == tag && koff[j + 1] - koff[j] == klen && memcmp(arena + koff[j], key, klen) == 0) {
                    for (; j >= 0; j = next[j]) { /* a key stored twice: the later value wins */
                        vptrs[j] = bval[e];
                        vlens[j] = bvlen[e];
                    }
                    break;
                }
            }
        }
    }
    return rc == 0 ? 1 : rc;
}

PyDoc_STRVAR(lookup_entries_doc,
             "lookup_entries(data, blocks, keys, num_shards=None, arrays=None, codes=None) -> values, columns, or None\n\n"
             "values[i] is the value the table in data stores under keys[i] (None where it has none,\n"
             "or keys[i] is not bytes). Given num_shards, decode_entries(values) instead, made without\n"
             "a Python object per entry, as reader.EntryColumns takes them: ok[i] only where the entry\n"
             "names a shard below num_shards, crcs unmasked. blocks is an int64 buffer of (offset, size) pairs, the data\n"
             "blocks in table order. Every block's crc32c (masked, over the block and its type byte)\n"
             "and type byte (0) are checked, and its entries parsed as parse_block parses them; where\n"
             "one of those fails the result is None, for the caller's own reader to raise the precise\n"
             "error (None too for a call made while another runs). A key stored twice takes the value\n"
             "stored last, as a dict built block by block. Keys in increasing order are matched by\n"
             "one merge with the table's; others through a hash table of them. Given arrays (one per\n"
             "key) and codes as check_arrays takes them, the columns end with a tenth, what\n"
             "check_arrays(arrays, codes, ...) of those columns gives, made in the same pass.");

static PyObject *lookup_entries(PyObject *self, PyObject *args)
{
    Py_buffer view;
    PyObject *blocks_obj, *seq, *shards_obj = Py_None, *arrays_obj = Py_None, *codes_obj = Py_None;
    if (!PyArg_ParseTuple(args, "y*OO|OOO:lookup_entries", &view, &blocks_obj, &seq, &shards_obj, &arrays_obj, &codes_obj))
        return NULL;
    if ((arrays_obj != Py_None) != (codes_obj != Py_None) || (codes_obj != Py_None && !PyDict_Check(codes_obj)) ||
        (arrays_obj != Py_None && shards_obj == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "lookup_entries: arrays need num_shards and a codes dict");
        PyBuffer_Release(&view);
        return NULL;
    }
    long long num_shards = -1;
    if (shards_obj != Py_None) {
        num_shards = PyLong_AsLongLong(shards_obj);
        if (num_shards == -1 && PyErr_Occurred()) {
            PyBuffer_Release(&view);
            return NULL;
        }
        if (num_shards < 0) {
            PyErr_SetString(PyExc_ValueError, "lookup_entries: num_shards must be >= 0");
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    if (scratch_busy) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    scratch_busy = 1;
    PyObject *fast = NULL, *arrays = NULL, *result = NULL;
    Buf blocks;
    memset(&blocks, 0, sizeof blocks);
    fast = PySequence_Fast(seq, "keys must be a sequence");
    if (fast == NULL || get_buf(blocks_obj, &blocks, 0, 16, 0, "blocks") < 0)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Codes codes;
    if (arrays_obj != Py_None) {
        arrays = PySequence_Fast(arrays_obj, "arrays must be a sequence");
        if (arrays == NULL)
            goto done;
        if (PySequence_Fast_GET_SIZE(arrays) != n) {
            PyErr_SetString(PyExc_ValueError, "lookup_entries: as many arrays as keys");
            goto done;
        }
        codes_init(&codes, codes_obj);
    }
    if ((size_t)n > (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "lookup_entries: too many keys");
        goto done;
    }
    size_t m = (size_t)(n > 0 ? n : 1);
    const unsigned char **vptrs = scratch(S_VPTR, sizeof(*vptrs) * m);
    size_t *vlens = scratch(S_VLEN, sizeof(size_t) * m);
    if (!vptrs || !vlens)
        goto done;
    memset((void *)vptrs, 0, sizeof(*vptrs) * m);
    int in_order = 1;
    for (Py_ssize_t i = 0; i < n && in_order; i++) {
        if (i + 16 < n)
            __builtin_prefetch(items[i + 16]);
        if (!PyBytes_Check(items[i]))
            in_order = 0;
        else if (i > 0)
            in_order = key_cmp((const unsigned char *)PyBytes_AS_STRING(items[i - 1]), (size_t)PyBytes_GET_SIZE(items[i - 1]),
                               (const unsigned char *)PyBytes_AS_STRING(items[i]), (size_t)PyBytes_GET_SIZE(items[i])) < 0;
    }
    Walk w;
    if (walk_init(&w, &view, &blocks) < 0)
        goto done;
    int rc = in_order ? match_sorted(&w, items, n, vptrs, vlens) : 0;
    if (rc == 0) { /* keys out of order, in the request or the table */
        memset((void *)vptrs, 0, sizeof(*vptrs) * m);
        if (walk_init(&w, &view, &blocks) < 0)
            goto done;
        rc = match_hashed(&w, items, n, vptrs, vlens);
    }
    if (rc == -2)
        goto done;
    if (rc == -1) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (num_shards >= 0) {
        result = decode_spans(n, vptrs, vlens, 1, num_shards, arrays ? PySequence_Fast_ITEMS(arrays) : NULL, &codes);
        goto done;
    }
    PyObject *list = PyList_New(n);
    if (list == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = vptrs[i] ? PyBytes_FromStringAndSize((const char *)vptrs[i], (Py_ssize_t)vlens[i]) : Py_None;
        if (v == NULL) {
            Py_DECREF(list);
            goto done;
        }
        if (v == Py_None)
            Py_INCREF(v);
        PyList_SET_ITEM(list, i, v);
    }
    result = list;
done:
    scratch_trim();
    scratch_busy = 0;
    release_buf(&blocks);
    Py_XDECREF(fast);
    Py_XDECREF(arrays);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(first_entry_doc,
             "first_entry(data, blocks) -> (key, value), None or False\n\n"
             "The first entry of the first data block that has one, as TableReader.first gives it: the\n"
             "blocks before it and that block whole checked and parsed as lookup_entries does. None\n"
             "when no block has an entry; False where a block is damaged (or a call is running), for the\n"
             "caller's own reader to raise the precise error.");

static PyObject *first_entry(PyObject *self, PyObject *args)
{
    Py_buffer view;
    PyObject *blocks_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*O:first_entry", &view, &blocks_obj))
        return NULL;
    if (scratch_busy) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    scratch_busy = 1;
    Buf blocks;
    memset(&blocks, 0, sizeof blocks);
    PyObject *key = NULL, *value = NULL;
    Walk w;
    if (get_buf(blocks_obj, &blocks, 0, 16, 0, "blocks") < 0 || walk_init(&w, &view, &blocks) < 0)
        goto done;
    const unsigned char *vp;
    size_t vlen;
    int rc = walk_next(&w, &vp, &vlen);
    if (rc == 1) {
        key = PyBytes_FromStringAndSize((const char *)w.key, (Py_ssize_t)w.key_len);
        value = PyBytes_FromStringAndSize((const char *)vp, (Py_ssize_t)vlen);
        if (key == NULL || value == NULL)
            goto done;
        while (rc == 1 && w.pos < w.limit) /* the rest of its block, parsed as TableReader parses it */
            rc = walk_next(&w, &vp, &vlen);
    }
    if (rc == -2)
        goto done;
    if (rc == -1)
        result = Py_False;
    else if (key == NULL)
        result = Py_None;
    else
        result = PyTuple_Pack(2, key, value);
    if (result == Py_False || result == Py_None)
        Py_INCREF(result);
done:
    Py_XDECREF(key);
    Py_XDECREF(value);
    scratch_trim();
    scratch_busy = 0;
    release_buf(&blocks);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(extents_inside_doc,
             "extents_inside(where, shards, offsets, sizes, num_shards, file_sizes) -> (inside, needed)\n\n"
             "inside[i] (bool): where[i], shards[i] in [0, num_shards), and offsets[i] + sizes[i]\n"
             "(uint64, wrapping as NumPy's does) at most file_sizes[shards[i]] (a dict; a negative\n"
             "size is a file that cannot be read). needed: the shards, ascending, whose sizes\n"
             "file_sizes lacks and an entry in where names; their entries are False until a call\n"
             "that has them.");

static PyObject *extents_inside(PyObject *self, PyObject *args)
{
    PyObject *objs[4], *files;
    long long num_shards;
    if (!PyArg_ParseTuple(args, "OOOOLO!:extents_inside", &objs[0], &objs[1], &objs[2], &objs[3], &num_shards,
                          &PyDict_Type, &files))
        return NULL;
    Buf b[4];
    memset(b, 0, sizeof b);
    PyArrayObject *out = NULL;
    PyObject *needed = NULL, *result = NULL;
    if (get_buf(objs[0], &b[0], 0, 1, 0, "where") < 0)
        goto done;
    Py_ssize_t n = b[0].view.len;
    if (get_buf(objs[1], &b[1], 0, 8, n, "shards") < 0 || get_buf(objs[2], &b[2], 0, 8, n, "offsets") < 0 ||
        get_buf(objs[3], &b[3], 0, 8, n, "sizes") < 0)
        goto done;
    out = (PyArrayObject *)PyArray_ZEROS(1, (npy_intp[]){n}, NPY_BOOL, 0);
    needed = PySet_New(NULL);
    if (out == NULL || needed == NULL)
        goto done;
    const uint8_t *where = b[0].view.buf;
    const int64_t *shards = b[1].view.buf, *offsets = b[2].view.buf, *sizes = b[3].view.buf;
    npy_bool *o = PyArray_DATA(out);
    int64_t last = -1, last_size = -1;
    int last_known = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = shards[i];
        if (!where[i] || s < 0 || s >= num_shards)
            continue;
        if (s != last) {
            PyObject *k = PyLong_FromLongLong(s);
            if (k == NULL)
                goto done;
            PyObject *size = PyDict_GetItemWithError(files, k);
            if (size == NULL && PyErr_Occurred()) {
                Py_DECREF(k);
                goto done;
            }
            last_known = size != NULL;
            if (size == NULL) {
                int rc = PySet_Add(needed, k);
                Py_DECREF(k);
                if (rc < 0)
                    goto done;
            } else {
                Py_DECREF(k);
                last_size = PyLong_AsLongLong(size);
                if (last_size == -1 && PyErr_Occurred())
                    goto done;
            }
            last = s;
        }
        if (last_known && last_size >= 0)
            o[i] = (uint64_t)offsets[i] + (uint64_t)sizes[i] <= (uint64_t)last_size;
    }
    PyObject *ordered = PySequence_List(needed);
    if (ordered == NULL || PyList_Sort(ordered) < 0) {
        Py_XDECREF(ordered);
        goto done;
    }
    result = PyTuple_Pack(2, (PyObject *)out, ordered);
    Py_DECREF(ordered);
done:
    Py_XDECREF(out);
    Py_XDECREF(needed);
    for (int k = 0; k < 4; k++)
        release_buf(&b[k]);
    return result;
}

PyDoc_STRVAR(byte_bounds_doc,
             "byte_bounds(arrays) -> (lo, hi)\n\n"
             "For each ndarray, the address of its first byte and one past its last (uint64), as\n"
             "variables._byte_bounds computes them from its data pointer, shape and strides; 0 and 0\n"
             "for an array without elements.");

static PyObject *byte_bounds(PyObject *self, PyObject *args)
{
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "O:byte_bounds", &seq))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "arrays must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    PyArrayObject *lo_arr = new_array(n, NPY_UINT64), *hi_arr = new_array(n, NPY_UINT64);
    PyObject *result = NULL;
    if (lo_arr == NULL || hi_arr == NULL)
        goto done;
    uint64_t *lo = PyArray_DATA(lo_arr), *hi = PyArray_DATA(hi_arr);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + 16 < n)
            __builtin_prefetch(items[i + 16]);
        if (!PyArray_Check(items[i])) {
            PyErr_Format(PyExc_TypeError, "byte_bounds: item %zd is not an ndarray", i);
            goto done;
        }
        PyArrayObject *a = (PyArrayObject *)items[i];
        int nd = PyArray_NDIM(a);
        npy_intp *shape = PyArray_DIMS(a), *strides = PyArray_STRIDES(a);
        int empty = PyArray_ITEMSIZE(a) == 0;
        for (int k = 0; k < nd; k++)
            empty |= shape[k] == 0;
        if (empty)
            continue;
        uint64_t first = (uint64_t)(uintptr_t)PyArray_DATA(a), last = first;
        for (int k = 0; k < nd; k++) {
            int64_t step = (int64_t)(shape[k] - 1) * (int64_t)strides[k];
            if (step < 0)
                first -= (uint64_t)(-step);
            else
                last += (uint64_t)step;
        }
        lo[i] = first;
        hi[i] = last + (uint64_t)PyArray_ITEMSIZE(a);
    }
    result = PyTuple_Pack(2, (PyObject *)lo_arr, (PyObject *)hi_arr);
done:
    Py_XDECREF(lo_arr);
    Py_XDECREF(hi_arr);
    Py_DECREF(fast);
    return result;
}

PyDoc_STRVAR(check_arrays_doc,
             "check_arrays(arrays, codes, ok, enums, ndims, dim_starts, dims, sizes) -> ndarray[uint8]\n\n"
             "1 where arrays[i] can be restored from its decoded entry by the fast path: ok[i], a\n"
             "writable C-contiguous native-order ndarray whose dtype's code equals enums[i], whose\n"
             "shape equals the entry's and whose byte size equals sizes[i]. 0 elsewhere: check and\n"
             "restore those in Python.");

static PyObject *check_arrays(PyObject *self, PyObject *args)
{
    PyObject *seq, *codes, *objs[6];
    if (!PyArg_ParseTuple(args, "OO!OOOOOO:check_arrays", &seq, &PyDict_Type, &codes, &objs[0], &objs[1], &objs[2],
                          &objs[3], &objs[4], &objs[5]))
        return NULL;
    PyObject *fast = PySequence_Fast(seq, "arrays must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    Buf b[6];
    memset(b, 0, sizeof b);
    PyArrayObject *good = NULL;
    PyObject *result = NULL;
    if (get_buf(objs[0], &b[0], 0, 1, n, "ok") < 0 || get_buf(objs[1], &b[1], 0, 4, n, "enums") < 0 ||
        get_buf(objs[2], &b[2], 0, 4, n, "ndims") < 0 || get_buf(objs[3], &b[3], 0, 8, n + 1, "dim_starts") < 0 ||
        get_buf(objs[4], &b[4], 0, 8, 0, "dims") < 0 || get_buf(objs[5], &b[5], 0, 8, n, "sizes") < 0)
        goto done;
    good = new_array(n, NPY_UINT8);
    if (good == NULL)
        goto done;
    const uint8_t *okp = b[0].view.buf;
    const int32_t *ep = b[1].view.buf, *rp = b[2].view.buf;
    const int64_t *stp = b[3].view.buf, *dp = b[4].view.buf, *sp = b[5].view.buf;
    Py_ssize_t ndims_total = b[4].view.len / 8;
    uint8_t *g = PyArray_DATA(good);
    Codes table;
    codes_init(&table, codes);
    for (Py_ssize_t i = 0; i < n; i++) {
        prefetch_arrays(items, n, i);
        if (!okp[i])
            continue;
        if (stp[i] < 0 || stp[i] + rp[i] > ndims_total)
            continue;
        int fits = array_fits(items[i], &table, ep[i], rp[i], dp + stp[i], sp[i]);
        if (fits < 0)
            goto done;
        g[i] = (uint8_t)fits;
    }
    result = (PyObject *)good;
    good = NULL;
done:
    Py_XDECREF(good);
    for (int k = 0; k < 6; k++)
        release_buf(&b[k]);
    Py_DECREF(fast);
    return result;
}

/* --------------------------------------------------------------- tables */

/* A block being built: entries in out, restart offsets in restarts. */
typedef struct {
    Out buf;
    uint32_t *restarts;
    size_t nrestarts, restart_cap;
    int counter, interval;
    const unsigned char *last;
    size_t last_len;
} Block;

static int block_reset(Block *b)
{
    b->buf.len = 0;
    b->nrestarts = 0;
    b->counter = 0;
    b->last = NULL;
    b->last_len = 0;
    if (b->restart_cap == 0) {
        b->restarts = PyMem_RawMalloc(64 * sizeof(uint32_t));
        if (b->restarts == NULL) {
            nomem();
            return -1;
        }
        b->restart_cap = 64;
    }
    b->restarts[b->nrestarts++] = 0;
    return 0;
}

static size_t shared_prefix(const unsigned char *a, size_t an, const unsigned char *b, size_t bn)
{
    size_t n = an < bn ? an : bn, i = 0;
    while (i < n && a[i] == b[i])
        i++;
    return i;
}

static int block_add(Block *b, const unsigned char *key, size_t klen, const unsigned char *value, size_t vlen)
{
    size_t shared = 0;
    if (b->counter < b->interval) {
        if (b->last)
            shared = shared_prefix(b->last, b->last_len, key, klen);
    } else {
        if (b->nrestarts == b->restart_cap) {
            uint32_t *nr = PyMem_RawRealloc(b->restarts, 2 * b->restart_cap * sizeof(uint32_t));
            if (nr == NULL) {
                nomem();
                return -1;
            }
            b->restarts = nr;
            b->restart_cap *= 2;
        }
        b->restarts[b->nrestarts++] = (uint32_t)b->buf.len;
        b->counter = 0;
    }
    if (out_reserve(&b->buf, 30 + klen - shared + vlen) < 0)
        return -1;
    Out *o = &b->buf;
    o->len += put_varint(o->p + o->len, shared);
    o->len += put_varint(o->p + o->len, klen - shared);
    o->len += put_varint(o->p + o->len, vlen);
    if (klen > shared)
        memcpy(o->p + o->len, key + shared, klen - shared);
    o->len += klen - shared;
    if (vlen)
        memcpy(o->p + o->len, value, vlen);
    o->len += vlen;
    b->last = key;
    b->last_len = klen;
    b->counter++;
    return 0;
}

static size_t block_estimate(const Block *b) { return b->buf.len + 4 * b->nrestarts + 4; }

static uint32_t mask_crc(uint32_t c) { return ((c >> 15) | (c << 17)) + CRC_MASK_DELTA; }

/* Appends the finished block and its trailer to the table; sets its handle. */
static int write_block(Out *table, Block *b, uint64_t *h_off, uint64_t *h_size)
{
    size_t start = table->len;
    if (out_put(table, b->buf.p, b->buf.len) < 0)
        return -1;
    for (size_t i = 0; i < b->nrestarts; i++)
        if (out_fixed32(table, b->restarts[i]) < 0)
            return -1;
    if (out_fixed32(table, (uint32_t)b->nrestarts) < 0)
        return -1;
    size_t size = table->len - start;
    uint32_t c = crc32c_extend(0, table->p + start, size);
    unsigned char type = 0;
    c = crc32c_extend(c, &type, 1);
    if (out_put(table, &type, 1) < 0 || out_fixed32(table, mask_crc(c)) < 0)
        return -1;
    *h_off = start;
    *h_size = size;
    return 0;
}

/* Separator keys of the index block, with the handles of the blocks they close. */
typedef struct {
    Out keys;
    size_t *starts;
    uint64_t *handles;
    size_t n, cap;
} Seps;

/* Appends a separator: key[:len], its last byte incremented when bump. */
static int seps_push(Seps *s, const unsigned char *key, size_t len, int bump, uint64_t off, uint64_t size)
{
    if (s->n == s->cap) {
        size_t ncap = s->cap ? 2 * s->cap : 64;
        size_t *ns = PyMem_RawRealloc(s->starts, (ncap + 1) * sizeof(size_t));
        if (ns == NULL)
            goto out_of_memory;
        s->starts = ns;
        uint64_t *nh = PyMem_RawRealloc(s->handles, ncap * 2 * sizeof(uint64_t));
        if (nh == NULL)
            goto out_of_memory;
        s->handles = nh;
        s->cap = ncap;
    }
    s->starts[s->n] = s->keys.len;
    if (out_put(&s->keys, key, len) < 0)
        return -1;
    if (bump)
        s->keys.p[s->keys.len - 1]++;
    s->handles[2 * s->n] = off;
    s->handles[2 * s->n + 1] = size;
    s->n++;
    s->starts[s->n] = s->keys.len;
    return 0;
out_of_memory:
    nomem();
    return -1;
}

/* A table file being built from entries in strictly increasing key order. A key's bytes must
 * stay where they are until the next key is added (and the last one until table_finish). */
typedef struct {
    Out table;
    Block data, index, meta;
    Seps seps;
    Out data_blocks; /* (offset, size) of each data block written, uint64 pairs */
    const unsigned char *last;
    size_t last_len, block_size;
    int started, pending;
    uint64_t p_off, p_size;
} Table;

/* Writes the data block being built (its handle in p_off, p_size and data_blocks). */
static int table_flush_data(Table *t)
{
    if (write_block(&t->table, &t->data, &t->p_off, &t->p_size) < 0)
        return -1;
    uint64_t handle[2] = {t->p_off, t->p_size};
    t->pending = 1;
    return out_put(&t->data_blocks, handle, sizeof handle);
}

static int table_init(Table *t, size_t block_size)
{
    memset(t, 0, sizeof *t);
    t->block_size = block_size;
    t->data.interval = 16;
    t->meta.interval = 16;
    t->index.interval = 1;
    return block_reset(&t->data) < 0 || block_reset(&t->index) < 0 || block_reset(&t->meta) < 0 ? -1 : 0;
}

/* Returns 1 when key does not come after the last one (nothing added), -1 on an error, else 0.
 * With at, sets at[0] to the number of the data block the entry goes into and at[1] to where
 * its value ends in that block. */
static int table_add(Table *t, const unsigned char *key, size_t klen, const unsigned char *value, size_t vlen,
                     size_t *at)
{
    const unsigned char *last = t->last;
    size_t last_len = t->last_len;
    if (t->started) {
        size_t m = last_len < klen ? last_len : klen;
        int c = memcmp(key, last, m);
        if (c < 0 || (c == 0 && klen <= last_len))
            return 1;
        if (klen + vlen >= 2 * t->block_size && t->data.buf.len) {
            if (table_flush_data(t) < 0 || block_reset(&t->data) < 0)
                return -1;
        }
    }
    if (t->pending) { /* the separator: shortest_separator(last, key) */
        size_t m = last_len < klen ? last_len : klen;
        size_t s = shared_prefix(last, last_len, key, klen);
        int shorter = s < m && last[s] < 0xFF && last[s] + 1 < key[s];
        if (seps_push(&t->seps, last, shorter ? s + 1 : last_len, shorter, t->p_off, t->p_size) < 0)
            return -1;
        t->pending = 0;
    }
    t->started = 1;
    t->last = key;
    t->last_len = klen;
    if (block_add(&t->data, key, klen, value, vlen) < 0)
        return -1;
    if (at) {
        at[0] = t->data_blocks.len / (2 * sizeof(uint64_t));
        at[1] = t->data.buf.len;
    }
    if (block_estimate(&t->data) >= t->block_size) {
        if (table_flush_data(t) < 0 || block_reset(&t->data) < 0)
            return -1;
    }
    return 0;
}

/* Writes the rest of the table: the last data block, the meta and index blocks, the footer.
 * Needs no GIL; -1 when out of memory. */
static int table_close(Table *t)
{
    uint64_t meta_off, meta_size, idx_off, idx_size;
    if (t->data.buf.len) {
        if (table_flush_data(t) < 0)
            return -1;
    }
    if (write_block(&t->table, &t->meta, &meta_off, &meta_size) < 0)
        return -1;
    if (t->pending) { /* the last block's key: short_successor(last) */
        const unsigned char *last = t->last;
        size_t cut = t->last_len;
        int bump = 0;
        for (size_t k = 0; k < t->last_len; k++)
            if (last[k] != 0xFF) {
                cut = k + 1;
                bump = 1;
                break;
            }
        if (seps_push(&t->seps, last, cut, bump, t->p_off, t->p_size) < 0)
            return -1;
    }
    Seps *seps = &t->seps;
    for (size_t k = 0; k < seps->n; k++) {
        unsigned char handle[20];
        size_t hn = put_varint(handle, seps->handles[2 * k]);
        hn += put_varint(handle + hn, seps->handles[2 * k + 1]);
        if (block_add(&t->index, seps->keys.p + seps->starts[k], seps->starts[k + 1] - seps->starts[k], handle, hn) < 0)
            return -1;
    }
    if (write_block(&t->table, &t->index, &idx_off, &idx_size) < 0)
        return -1;
    unsigned char footer[48] = {0};
    size_t fp = put_varint(footer, meta_off);
    fp += put_varint(footer + fp, meta_size);
    fp += put_varint(footer + fp, idx_off);
    fp += put_varint(footer + fp, idx_size);
    static const unsigned char magic[8] = {0x57, 0xFB, 0x80, 0x8B, 0x24, 0x75, 0x47, 0xDB};
    memcpy(footer + 40, magic, 8);
    return out_put(&t->table, footer, 48);
}

/* The finished table as bytes, or NULL with an exception set. */
static PyObject *table_finish(Table *t)
{
    if (table_close(t) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)t->table.p, (Py_ssize_t)t->table.len);
}

static void table_free(Table *t)
{
    PyMem_RawFree(t->table.p);
    PyMem_RawFree(t->data_blocks.p);
    PyMem_RawFree(t->seps.keys.p);
    PyMem_RawFree(t->seps.starts);
    PyMem_RawFree(t->seps.handles);
    Block *blocks[3] = {&t->data, &t->index, &t->meta};
    for (int k = 0; k < 3; k++) {
        PyMem_RawFree(blocks[k]->buf.p);
        PyMem_RawFree(blocks[k]->restarts);
    }
}

PyDoc_STRVAR(build_table_doc,
             "build_table(items, block_size) -> bytes\n\n"
             "The whole table file for sorted (key, value) byte pairs, byte-identical to\n"
             "gpusaver.format.table.TableWriter. Raises ValueError when keys do not strictly increase.");

static PyObject *build_table(PyObject *self, PyObject *args)
{
    PyObject *seq;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "On:build_table", &seq, &block_size))
        return NULL;
    if (block_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be positive");
        return NULL;
    }
    PyObject *fast = PySequence_Fast(seq, "items must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    PyObject *result = NULL;
    Table t;
    if (table_init(&t, (size_t)block_size) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_Format(PyExc_TypeError, "build_table: item %zd is not a (bytes, bytes) pair", i);
            goto done;
        }
        PyObject *key = PyTuple_GET_ITEM(item, 0), *value = PyTuple_GET_ITEM(item, 1);
        int r = table_add(&t, (const unsigned char *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key),
                          (const unsigned char *)PyBytes_AS_STRING(value), (size_t)PyBytes_GET_SIZE(value), NULL);
        if (r > 0)
            PyErr_Format(PyExc_ValueError, "table keys must be strictly increasing (item %zd)", i);
        if (r != 0)
            goto done;
    }
    result = table_finish(&t);
done:
    table_free(&t);
    Py_DECREF(fast);
    return result;
}

PyDoc_STRVAR(build_run_table_doc,
             "build_run_table(header, keys, order, enums, ndims, dims, offsets, sizes, crcs, shard_id, block_size,\n"
             "                crc_at=None) -> bytes | (bytearray, blocks) | None\n\n"
             "The whole index table of one bundle straight from its columns: the header entry (key b\"\"),\n"
             "then each tensor's entry (as encode_entries makes them; crcs masked), keys taken in the order\n"
             "order gives (int64 positions; None: as they come). The same bytes as build_table over those\n"
             "pairs. Returns None, building nothing, when the keys in that order do not strictly increase.\n"
             "With crc_at (a writable int64 buffer, one item per tensor), a table to finish later with\n"
             "patch_run_table: every crc must be non-zero (a stand-in, its field then present), crc_at[i]\n"
             "receives where tensor i's 4 crc bytes lie, and the result is the table as a bytearray with\n"
             "the (offset, size) pairs of its data blocks (int64).");

static PyObject *build_run_table(PyObject *self, PyObject *args)
{
    PyObject *header, *keys_obj, *order_obj, *objs[6], *at_obj = Py_None;
    unsigned long long shard;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "SOOOOOOOOKn|O:build_run_table", &header, &keys_obj, &order_obj, &objs[0], &objs[1],
                          &objs[2], &objs[3], &objs[4], &objs[5], &shard, &block_size, &at_obj))
        return NULL;
    if (block_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "block_size must be positive");
        return NULL;
    }
    /* A tuple of its own: it keeps every key alive while the table is built without the GIL,
     * whatever another thread does to the caller's list. */
    PyObject *fast = PySequence_Tuple(keys_obj);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(fast);
    PyObject **keys = &PyTuple_GET_ITEM(fast, 0);
    Buf b[8];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    /* Copies of what steers the loop (ranks as dim_at, order, where each crc lands), taken and
     * checked with the GIL: another thread changing the caller's columns meanwhile, or crc_at
     * sharing memory with one of them, can change what the entries say, never where this reads. */
    int64_t *dim_at = NULL, *crc_at = NULL, *ord = NULL, *crc_pos = NULL;
    uint32_t *crc_block = NULL; /* with crc_at: the data block each tensor's entry went into */
    const unsigned char **key_ptr = NULL; /* the keys' bytes (the tuple holds them), read without the GIL */
    size_t *key_len = NULL;
    unsigned char scratch[ENTRY_ROOM(MAX_RANK)];
    Table t;
    int table_ready = 0;
    if (get_buf(objs[0], &b[0], 0, 4, n, "enums") < 0 || get_buf(objs[1], &b[1], 0, 4, n, "ndims") < 0 ||
        get_buf(objs[2], &b[2], 0, 8, 0, "dims") < 0 || get_buf(objs[3], &b[3], 0, 8, n, "offsets") < 0 ||
        get_buf(objs[4], &b[4], 0, 8, n, "sizes") < 0 || get_buf(objs[5], &b[5], 0, 4, n, "crcs") < 0)
        goto done;
    if (order_obj != Py_None) {
        if (get_buf(order_obj, &b[6], 0, 8, n, "order") < 0)
            goto done;
        ord = PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
        if (ord == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memcpy(ord, b[6].view.buf, (size_t)n * sizeof(int64_t));
        for (Py_ssize_t j = 0; j < n; j++)
            if (ord[j] < 0 || ord[j] >= n) {
                PyErr_Format(PyExc_ValueError, "build_run_table: order[%zd] = %lld is out of range", j,
                             (long long)ord[j]);
                goto done;
            }
    }
    const int32_t *enums = b[0].view.buf, *ndims = b[1].view.buf;
    const int64_t *dims = b[2].view.buf, *offsets = b[3].view.buf, *sizes = b[4].view.buf;
    const uint32_t *crcs = b[5].view.buf;
    if (at_obj != Py_None) {
        if (get_buf(at_obj, &b[7], 1, 8, n, "crc_at") < 0)
            goto done;
        crc_at = b[7].view.buf;
        crc_block = PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(uint32_t));
        crc_pos = PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
        if (crc_block == NULL || crc_pos == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    Py_ssize_t ndims_total = b[2].view.len / 8;
    dim_at = PyMem_Malloc((size_t)(n + 1) * sizeof(int64_t));
    if (dim_at == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    key_ptr = PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(*key_ptr));
    key_len = PyMem_RawMalloc((size_t)(n > 0 ? n : 1) * sizeof(size_t));
    if (key_ptr == NULL || key_len == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    dim_at[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyBytes_Check(keys[i])) {
            PyErr_Format(PyExc_TypeError, "build_run_table: key %zd is not bytes", i);
            goto done;
        }
        key_ptr[i] = (const unsigned char *)PyBytes_AS_STRING(keys[i]);
        key_len[i] = (size_t)PyBytes_GET_SIZE(keys[i]);
        int32_t rank = ndims[i]; /* read once: dim_at is what the loop below trusts */
        if (rank < 0 || rank > MAX_RANK || dim_at[i] + rank > ndims_total) {
            PyErr_Format(PyExc_ValueError, "build_run_table: bad rank %d of tensor %zd", rank, i);
            goto done;
        }
        dim_at[i + 1] = dim_at[i] + rank;
    }
    if (table_init(&t, (size_t)block_size) < 0)
        goto done;
    table_ready = 1;
    /* Everything below reads only C memory, held by the caller's objects and this call's copies:
     * other threads (the writer threads a prepared index overlaps) run meanwhile. */
    int failed = 0; /* 1: keys out of order; -1: out of memory; -2: negative dimension; -3: a crc of 0 */
    Py_ssize_t bad = 0;
    Py_BEGIN_ALLOW_THREADS
    if (table_add(&t, (const unsigned char *)"", 0, (const unsigned char *)PyBytes_AS_STRING(header),
                  (size_t)PyBytes_GET_SIZE(header), NULL) < 0)
        failed = -1;
    for (Py_ssize_t j = 0; j < n && !failed; j++) {
        Py_ssize_t i = ord ? (Py_ssize_t)ord[j] : j;
        uint32_t c = crcs[i];
        if (crc_pos && c == 0) { /* the field would be left out: no place to patch the crc into */
            failed = -3;
            bad = i;
            break;
        }
        Py_ssize_t len = encode_entry_into(scratch, enums[i], (int)(dim_at[i + 1] - dim_at[i]), dims + dim_at[i], shard,
                                           offsets[i], sizes[i], c);
        if (len < 0) {
            failed = -2;
            bad = i;
            break;
        }
        size_t at[2];
        failed = table_add(&t, key_ptr[i], key_len[i], scratch, (size_t)len, at);
        if (!failed && crc_pos) { /* the crc is the entry's last field: its 4 bytes end the value */
            crc_block[i] = (uint32_t)at[0];
            crc_pos[i] = (int64_t)at[1] - 4;
        }
    }
    if (!failed && table_close(&t) < 0)
        failed = -1;
    Py_END_ALLOW_THREADS
    if (failed == 1) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    if (failed == -2) {
        PyErr_Format(PyExc_ValueError, "build_run_table: negative dimension in tensor %zd", bad);
        goto done;
    }
    if (failed == -3) {
        PyErr_Format(PyExc_ValueError, "build_run_table: crc_at needs non-zero crcs (tensor %zd)", bad);
        goto done;
    }
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *table = crc_at ? PyByteArray_FromStringAndSize((const char *)t.table.p, (Py_ssize_t)t.table.len)
                             : PyBytes_FromStringAndSize((const char *)t.table.p, (Py_ssize_t)t.table.len);
    if (table == NULL || crc_at == NULL) {
        result = table;
        goto done;
    }
    npy_intp nb = (npy_intp)(t.data_blocks.len / sizeof(uint64_t));
    PyArrayObject *blocks = new_array(nb, NPY_INT64);
    if (blocks == NULL) {
        Py_DECREF(table);
        goto done;
    }
    memcpy(PyArray_DATA(blocks), t.data_blocks.p, t.data_blocks.len);
    const uint64_t *handles = (const uint64_t *)t.data_blocks.p;
    for (Py_ssize_t i = 0; i < n; i++)
        crc_at[i] = crc_pos[i] + (int64_t)handles[2 * (size_t)crc_block[i]];
    result = Py_BuildValue("(NN)", table, (PyObject *)blocks);
done:
    if (table_ready)
        table_free(&t);
    PyMem_Free(dim_at);
    PyMem_RawFree(crc_block);
    PyMem_RawFree(crc_pos);
    PyMem_RawFree(ord);
    PyMem_RawFree(key_ptr);
    PyMem_RawFree(key_len);
    for (int k = 0; k < 8; k++)
        release_buf(&b[k]);
    Py_DECREF(fast);
    return result;
}

PyDoc_STRVAR(patch_run_table_doc,
             "patch_run_table(table, crc_at, crcs, blocks) -> bool\n\n"
             "Finishes a table build_run_table made with crc_at: writes each tensor's masked crc (crcs,\n"
             "uint32) at crc_at[i] of the bytearray table, then each data block's trailer crc (blocks:\n"
             "its (offset, size) pairs). The result is the table build_run_table makes from these crcs.\n"
             "Returns False, changing nothing, where a crc is 0 (protobuf leaves that field out: the\n"
             "entry is shorter, so the table must be built again).");

static PyObject *patch_run_table(PyObject *self, PyObject *args)
{
    PyObject *objs[4];
    if (!PyArg_ParseTuple(args, "OOOO:patch_run_table", &objs[0], &objs[1], &objs[2], &objs[3]))
        return NULL;
    Buf b[4];
    memset(b, 0, sizeof b);
    PyObject *result = NULL;
    int64_t *copies = NULL;
    if (get_buf(objs[0], &b[0], 1, 0, 0, "table") < 0 || get_buf(objs[1], &b[1], 0, 8, 0, "crc_at") < 0)
        goto done;
    Py_ssize_t n = b[1].view.len / 8;
    if (get_buf(objs[2], &b[2], 0, 4, n, "crcs") < 0 || get_buf(objs[3], &b[3], 0, 16, 0, "blocks") < 0)
        goto done;
    unsigned char *table = b[0].view.buf;
    size_t len = (size_t)b[0].view.len;
    Py_ssize_t nb = b[3].view.len / 16;
    /* Copies, checked, then used: positions, blocks or crcs lying in the table itself cannot
     * move a later write once the first one is made. */
    size_t want = (size_t)(n + 2 * nb + 1) * sizeof(int64_t) + (size_t)(n + 1) * sizeof(uint32_t);
    copies = PyMem_RawMalloc(want);
    if (copies == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t *at = copies, *blocks = at + n;
    uint32_t *crcs = (uint32_t *)(blocks + 2 * nb);
    memcpy(at, b[1].view.buf, (size_t)n * sizeof(int64_t));
    memcpy(blocks, b[3].view.buf, (size_t)(2 * nb) * sizeof(int64_t));
    memcpy(crcs, b[2].view.buf, (size_t)n * sizeof(uint32_t));
    for (Py_ssize_t i = 0; i < n; i++) {
        if (len < 4 || at[i] < 0 || (uint64_t)at[i] > len - 4) {
            PyErr_Format(PyExc_ValueError, "patch_run_table: crc_at[%zd] lies outside the table", i);
            goto done;
        }
        if (crcs[i] == 0) {
            result = Py_False;
            Py_INCREF(result);
            goto done;
        }
    }
    for (Py_ssize_t k = 0; k < nb; k++)
        if (blocks[2 * k] < 0 || blocks[2 * k + 1] < 0 || (uint64_t)blocks[2 * k] > len ||
            (uint64_t)blocks[2 * k + 1] + 5 > len - (uint64_t)blocks[2 * k]) {
            PyErr_Format(PyExc_ValueError, "patch_run_table: block %zd lies outside the table", k);
            goto done;
        }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t c = crcs[i];
        unsigned char *p = table + at[i];
        p[0] = (unsigned char)c;
        p[1] = (unsigned char)(c >> 8);
        p[2] = (unsigned char)(c >> 16);
        p[3] = (unsigned char)(c >> 24);
    }
    for (Py_ssize_t k = 0; k < nb; k++) {
        unsigned char *start = table + blocks[2 * k];
        size_t size = (size_t)blocks[2 * k + 1];
        uint32_t c = crc32c_extend(0, start, size);
        c = mask_crc(crc32c_extend(c, start + size, 1)); /* the block type byte */
        start[size + 1] = (unsigned char)c;
        start[size + 2] = (unsigned char)(c >> 8);
        start[size + 3] = (unsigned char)(c >> 16);
        start[size + 4] = (unsigned char)(c >> 24);
    }
    result = Py_True;
    Py_INCREF(result);
done:
    PyMem_RawFree(copies);
    for (int k = 0; k < 4; k++)
        release_buf(&b[k]);
    return result;
}

PyDoc_STRVAR(parse_block_doc,
             "parse_block(data, offset, size) -> (keys, values)\n\n"
             "Decodes every entry of the table block data[offset:offset + size] (its crc already\n"
             "checked). Raises ValueError on a malformed block, as table._parse_block does.");

static int varint32(const unsigned char *p, size_t limit, size_t *pos, uint32_t *out)
{
    uint64_t v = 0;
    unsigned shift = 0;
    size_t i = *pos;
    for (;;) {
        if (i >= limit || shift >= 32)
            return 0;
        unsigned char b = p[i++];
        v |= (uint64_t)(b & 0x7F) << shift;
        if (b < 0x80)
            break;
        shift += 7;
    }
    if (v >> 32)
        return 0;
    *out = (uint32_t)v;
    *pos = i;
    return 1;
}

static PyObject *parse_block(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t offset, size;
    if (!PyArg_ParseTuple(args, "y*nn:parse_block", &view, &offset, &size))
        return NULL;
    PyObject *keys = NULL, *values = NULL, *result = NULL;
    Out key; /* the current key: each entry shares a prefix of the one before */
    memset(&key, 0, sizeof key);
    if (offset < 0 || size < 0 || offset > view.len || size > view.len - offset) {
        PyErr_SetString(PyExc_ValueError, "block outside the data");
        goto done;
    }
    if (size < 4) {
        PyErr_SetString(PyExc_ValueError, "block too short");
        goto done;
    }
    const unsigned char *p = (const unsigned char *)view.buf;
    size_t end = (size_t)offset + (size_t)size;
    uint32_t num_restarts = (uint32_t)p[end - 4] | (uint32_t)p[end - 3] << 8 | (uint32_t)p[end - 2] << 16 |
                            (uint32_t)p[end - 1] << 24;
    if (num_restarts > (uint64_t)(size - 4) / 4) {
        PyErr_SetString(PyExc_ValueError, "bad restart count");
        goto done;
    }
    size_t limit = end - 4 - 4 * (size_t)num_restarts;
    keys = PyList_New(0);
    values = PyList_New(0);
    if (!keys || !values)
        goto done;
    if (num_restarts > 0) {
        size_t pos = (size_t)offset;
        while (pos < limit) {
            uint32_t shared, unshared, vlen;
            if (!varint32(p, limit, &pos, &shared) || !varint32(p, limit, &pos, &unshared) ||
                !varint32(p, limit, &pos, &vlen)) {
                PyErr_SetString(PyExc_ValueError, "bad varint");
                goto done;
            }
            if (shared > key.len || (uint64_t)pos + unshared + vlen > limit) {
                PyErr_SetString(PyExc_ValueError, "bad block entry");
                goto done;
            }
            size_t klen = (size_t)shared + unshared;
            if (out_reserve(&key, klen) < 0)
                goto done;
            if (unshared)
                memcpy(key.p + shared, p + pos, unshared);
            key.len = klen;
            pos += unshared;
            PyObject *k = PyBytes_FromStringAndSize((const char *)key.p, (Py_ssize_t)klen);
            if (k == NULL)
                goto done;
            int rc = PyList_Append(keys, k);
            Py_DECREF(k);
            if (rc < 0)
                goto done;
            PyObject *v = PyBytes_FromStringAndSize((const char *)p + pos, (Py_ssize_t)vlen);
            if (v == NULL)
                goto done;
            rc = PyList_Append(values, v);
            Py_DECREF(v);
            if (rc < 0)
                goto done;
            pos += vlen;
        }
    }
    result = PyTuple_Pack(2, keys, values);
done:
    PyMem_RawFree(key.p);
    Py_XDECREF(keys);
    Py_XDECREF(values);
    PyBuffer_Release(&view);
    return result;
}

/* ------------------------------------------------------------------ module */

static PyMethodDef methods[] = {
    {"describe", describe, METH_VARARGS, describe_doc},
    {"pack", pack, METH_VARARGS, pack_doc},
    {"unpack", unpack, METH_VARARGS, unpack_doc},
    {"crc32c", py_crc32c, METH_VARARGS, crc32c_doc},
    {"stream_copy", stream_copy, METH_VARARGS, stream_copy_doc},
    {"encode_entries", encode_entries, METH_VARARGS, encode_entries_doc},
    {"decode_entries", decode_entries, METH_VARARGS, decode_entries_doc},
    {"lookup_entries", lookup_entries, METH_VARARGS, lookup_entries_doc},
    {"first_entry", first_entry, METH_VARARGS, first_entry_doc},
    {"extents_inside", extents_inside, METH_VARARGS, extents_inside_doc},
    {"byte_bounds", byte_bounds, METH_VARARGS, byte_bounds_doc},
    {"check_arrays", check_arrays, METH_VARARGS, check_arrays_doc},
    {"build_table", build_table, METH_VARARGS, build_table_doc},
    {"build_run_table", build_run_table, METH_VARARGS, build_run_table_doc},
    {"patch_run_table", patch_run_table, METH_VARARGS, patch_run_table_doc},
    {"parse_block", parse_block, METH_VARARGS, parse_block_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gpusaver._native", "gpusaver's per-tensor loops in C (see gpusaver.native).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    import_array();
    crc_init();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "API", NATIVE_API) < 0 || PyModule_AddIntConstant(m, "HARDWARE_CRC", crc_hw) < 0 ||
        PyModule_AddIntConstant(m, "STREAM_STORES", stream_hw) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
