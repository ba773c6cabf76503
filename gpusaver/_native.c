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

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define HAVE_X86_CRC 1
#endif

#define NATIVE_API 2
#define MAX_RANK 254
#define INT64_MAXU ((uint64_t)INT64_MAX)
#define CRC_MASK_DELTA 0xA282EAD8u

/* ------------------------------------------------------------------ crc32c */

static uint32_t crc_table[8][256];
static int crc_hw;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
#ifdef HAVE_X86_CRC
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
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
__attribute__((target("sse4.2"))) static uint32_t crc_x86(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = ~crc;
    while (n && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
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

/* The crc32c of tensors that are small next to a cache; large buffers take
 * the crc32c package, whose interleaved loop is faster for them. */
static uint32_t crc32c_extend(uint32_t crc, const void *data, size_t n)
{
#ifdef HAVE_X86_CRC
    if (crc_hw)
        return crc_x86(crc, (const unsigned char *)data, n);
#endif
    return crc_sw(crc, (const unsigned char *)data, n);
}

/* ------------------------------------------------------------- helpers */

/* A growable byte buffer. */
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
    unsigned char *np = PyMem_Realloc(o->p, cap);
    if (np == NULL) {
        PyErr_NoMemory();
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

/* The tensor's type code for the format, or -1 when the array takes the
 * general path (not an ndarray, not C-contiguous, byte-swapped, unknown dtype). */
static int fast_code(PyObject *obj, PyObject *codes)
{
    if (!PyArray_Check(obj))
        return -1;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISNOTSWAPPED(a))
        return -1;
    PyObject *key = PyLong_FromLong(PyArray_TYPE(a));
    if (key == NULL)
        return -2;
    PyObject *code = PyDict_GetItemWithError(codes, key);
    Py_DECREF(key);
    if (code == NULL)
        return PyErr_Occurred() ? -2 : -1;
    long v = PyLong_AsLong(code);
    if (v == -1 && PyErr_Occurred())
        return -2;
    return (int)v;
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
    PyObject *fast = PySequence_Fast(seq, "arrays must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject **items = PySequence_Fast_ITEMS(fast);
    PyArrayObject *enums = new_array(n, NPY_INT32), *sizes = new_array(n, NPY_INT64), *ndims = new_array(n, NPY_INT32);
    PyArrayObject *dims = NULL;
    PyObject *result = NULL;
    if (!enums || !sizes || !ndims)
        goto done;
    int32_t *e = (int32_t *)PyArray_DATA(enums), *r = (int32_t *)PyArray_DATA(ndims);
    int64_t *s = (int64_t *)PyArray_DATA(sizes);
    npy_intp total_dims = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int code = fast_code(items[i], codes);
        if (code == -2)
            goto done;
        e[i] = code;
        if (code >= 0) {
            PyArrayObject *a = (PyArrayObject *)items[i];
            s[i] = (int64_t)PyArray_NBYTES(a);
            r[i] = PyArray_NDIM(a);
            total_dims += r[i];
        }
    }
    dims = new_array(total_dims, NPY_INT64);
    if (!dims)
        goto done;
    int64_t *d = (int64_t *)PyArray_DATA(dims);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (e[i] < 0)
            continue;
        PyArrayObject *a = (PyArrayObject *)items[i];
        npy_intp *shape = PyArray_DIMS(a);
        for (int k = 0; k < r[i]; k++)
            *d++ = (int64_t)shape[k];
    }
    result = PyTuple_Pack(4, (PyObject *)enums, (PyObject *)sizes, (PyObject *)ndims, (PyObject *)dims);
done:
    Py_DECREF(fast);
    Py_XDECREF(enums);
    Py_XDECREF(sizes);
    Py_XDECREF(ndims);
    Py_XDECREF(dims);
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

PyDoc_STRVAR(pack_doc,
             "pack(arrays, start, stop, out, crcs) -> int\n\n"
             "Copies the bytes of arrays[start:stop] back to back into the writable buffer out and\n"
             "stores each one's crc32c (unmasked) in crcs[i] (a uint32 buffer indexed like arrays).\n"
             "Returns the number of bytes copied. The GIL is released while copying.");

static PyObject *pack(PyObject *self, PyObject *args)
{
    PyObject *seq, *out_obj, *crc_obj;
    Py_ssize_t start, stop;
    if (!PyArg_ParseTuple(args, "OnnOO:pack", &seq, &start, &stop, &out_obj, &crc_obj))
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
    for (Py_ssize_t k = 0; k < stop - start; k++) {
        size_t n = spans[k].n;
        if (n)
            memcpy(dst, spans[k].src, n);
        c[start + k] = crc32c_extend(0, dst, n); /* from the copy: it is in cache */
        dst += n;
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
    /* Worst case per entry: 11 (dtype) + 2 + 10 (shape header) + 13 per dim + 3 x 11 + 5. */
    Out scratch;
    memset(&scratch, 0, sizeof scratch);
    for (Py_ssize_t i = 0; i < n; i++) {
        int rank = ndims[i];
        if (rank < 0 || rank > MAX_RANK || used + rank > ndims_total) {
            PyErr_Format(PyExc_ValueError, "encode_entries: bad rank %d of tensor %zd", rank, i);
            goto fail_buf;
        }
        if (out_reserve(&scratch, 64 + 13 * (size_t)rank) < 0)
            goto fail_buf;
        unsigned char *buf = scratch.p;
        const int64_t *d = dims + used;
        used += rank;
        size_t body = 0;
        for (int k = 0; k < rank; k++) {
            if (d[k] < 0) {
                PyErr_Format(PyExc_ValueError, "encode_entries: negative dimension in tensor %zd", i);
                goto fail_buf;
            }
            body += d[k] ? 2 + 1 + varint_len((uint64_t)d[k]) : 2;
        }
        size_t p = 0;
        if (enums[i]) {
            buf[p++] = 0x08;
            p += put_varint(buf + p, (uint64_t)(uint32_t)enums[i]);
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
        if (offsets[i]) {
            buf[p++] = 0x20;
            p += put_varint(buf + p, (uint64_t)offsets[i]);
        }
        if (sizes[i]) {
            buf[p++] = 0x28;
            p += put_varint(buf + p, (uint64_t)sizes[i]);
        }
        if (crcs[i]) {
            buf[p++] = 0x35;
            uint32_t c = crcs[i];
            buf[p++] = (unsigned char)c;
            buf[p++] = (unsigned char)(c >> 8);
            buf[p++] = (unsigned char)(c >> 16);
            buf[p++] = (unsigned char)(c >> 24);
        }
        PyObject *bytes = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)p);
        if (bytes == NULL)
            goto fail_buf;
        PyList_SET_ITEM(list, i, bytes);
    }
    PyMem_Free(scratch.p);
    for (int k = 0; k < 6; k++)
        release_buf(&b[k]);
    return list;
fail_buf:
    PyMem_Free(scratch.p);
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

PyDoc_STRVAR(decode_entries_doc,
             "decode_entries(values) -> (ok, enums, shards, offsets, sizes, crcs, ndims, dim_starts, dims)\n\n"
             "Decodes BundleEntryProto bytes in the common layout (see entry._decode_common). ok[i] is 0\n"
             "where values[i] is None, not bytes, or in any other layout: decode those in Python. crcs\n"
             "are as stored (masked); tensor i's dims are dims[dim_starts[i]:dim_starts[i + 1]].");

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
    PyArrayObject *ok = new_array(n, NPY_UINT8), *enums = new_array(n, NPY_INT32), *shards = new_array(n, NPY_INT64),
                  *offsets = new_array(n, NPY_INT64), *sizes = new_array(n, NPY_INT64), *crcs = new_array(n, NPY_UINT32),
                  *ndims = new_array(n, NPY_INT32), *starts = new_array(n + 1, NPY_INT64);
    PyArrayObject *dims_arr = NULL;
    int64_t *dims = NULL;
    PyObject *result = NULL;
    if (!ok || !enums || !shards || !offsets || !sizes || !crcs || !ndims || !starts)
        goto done;
    size_t cap = (size_t)(n > 0 ? n : 1) * 2, used = 0;
    dims = PyMem_Malloc(cap * sizeof(int64_t));
    if (dims == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint8_t *okp = PyArray_DATA(ok);
    int32_t *ep = PyArray_DATA(enums), *rp = PyArray_DATA(ndims);
    int64_t *shp = PyArray_DATA(shards), *op = PyArray_DATA(offsets), *sp = PyArray_DATA(sizes), *stp = PyArray_DATA(starts);
    uint32_t *cp = PyArray_DATA(crcs);
    for (Py_ssize_t i = 0; i < n; i++) {
        stp[i] = (int64_t)used;
        PyObject *v = items[i];
        if (!PyBytes_Check(v))
            continue;
        if (used + MAX_RANK > cap) {
            size_t ncap = cap * 2 + MAX_RANK;
            int64_t *nd = PyMem_Realloc(dims, ncap * sizeof(int64_t));
            if (nd == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            dims = nd;
            cap = ncap;
        }
        uint64_t shard, offset, size;
        uint32_t crc;
        int32_t dtype;
        int rank = decode_common((const unsigned char *)PyBytes_AS_STRING(v), (size_t)PyBytes_GET_SIZE(v), dims + used,
                                 &dtype, &shard, &offset, &size, &crc);
        if (rank < 0)
            continue;
        okp[i] = 1;
        ep[i] = dtype;
        shp[i] = (int64_t)shard;
        op[i] = (int64_t)offset;
        sp[i] = (int64_t)size;
        cp[i] = crc;
        rp[i] = rank;
        used += (size_t)rank;
    }
    stp[n] = (int64_t)used;
    dims_arr = new_array((npy_intp)used, NPY_INT64);
    if (dims_arr == NULL)
        goto done;
    if (used)
        memcpy(PyArray_DATA(dims_arr), dims, used * sizeof(int64_t));
    result = PyTuple_Pack(9, (PyObject *)ok, (PyObject *)enums, (PyObject *)shards, (PyObject *)offsets,
                          (PyObject *)sizes, (PyObject *)crcs, (PyObject *)ndims, (PyObject *)starts, (PyObject *)dims_arr);
done:
    PyMem_Free(dims);
    Py_DECREF(fast);
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
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!okp[i])
            continue;
        int code = fast_code(items[i], codes);
        if (code == -2)
            goto done;
        if (code < 0 || code != ep[i])
            continue;
        PyArrayObject *a = (PyArrayObject *)items[i];
        if (!PyArray_ISWRITEABLE(a) || PyArray_NDIM(a) != rp[i] || (int64_t)PyArray_NBYTES(a) != sp[i])
            continue;
        if (stp[i] < 0 || stp[i] + rp[i] > ndims_total)
            continue;
        npy_intp *shape = PyArray_DIMS(a);
        int same = 1;
        for (int k = 0; k < rp[i]; k++)
            if ((int64_t)shape[k] != dp[stp[i] + k]) {
                same = 0;
                break;
            }
        g[i] = (uint8_t)same;
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
        b->restarts = PyMem_Malloc(64 * sizeof(uint32_t));
        if (b->restarts == NULL) {
            PyErr_NoMemory();
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
            uint32_t *nr = PyMem_Realloc(b->restarts, 2 * b->restart_cap * sizeof(uint32_t));
            if (nr == NULL) {
                PyErr_NoMemory();
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
        size_t *ns = PyMem_Realloc(s->starts, (ncap + 1) * sizeof(size_t));
        if (ns == NULL)
            goto nomem;
        s->starts = ns;
        uint64_t *nh = PyMem_Realloc(s->handles, ncap * 2 * sizeof(uint64_t));
        if (nh == NULL)
            goto nomem;
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
nomem:
    PyErr_NoMemory();
    return -1;
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
    Out table;
    Block data, index, meta;
    Seps seps;
    memset(&table, 0, sizeof table);
    memset(&data, 0, sizeof data);
    memset(&index, 0, sizeof index);
    memset(&meta, 0, sizeof meta);
    memset(&seps, 0, sizeof seps);
    PyObject *result = NULL;
    const unsigned char *last = NULL;
    size_t last_len = 0;
    int pending = 0;
    uint64_t p_off = 0, p_size = 0, meta_off, meta_size, idx_off, idx_size;
    data.interval = 16;
    meta.interval = 16;
    index.interval = 1;
    if (block_reset(&data) < 0 || block_reset(&index) < 0 || block_reset(&meta) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_Format(PyExc_TypeError, "build_table: item %zd is not a (bytes, bytes) pair", i);
            goto done;
        }
        const unsigned char *key = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 0));
        size_t klen = (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 0));
        const unsigned char *value = (const unsigned char *)PyBytes_AS_STRING(PyTuple_GET_ITEM(item, 1));
        size_t vlen = (size_t)PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 1));
        if (last) {
            size_t m = last_len < klen ? last_len : klen;
            int c = memcmp(key, last, m);
            if (c < 0 || (c == 0 && klen <= last_len)) {
                PyErr_Format(PyExc_ValueError, "table keys must be strictly increasing (item %zd)", i);
                goto done;
            }
            if (klen + vlen >= 2 * (size_t)block_size && data.buf.len) {
                if (write_block(&table, &data, &p_off, &p_size) < 0 || block_reset(&data) < 0)
                    goto done;
                pending = 1;
            }
        }
        if (pending) { /* the separator: shortest_separator(last, key) */
            size_t m = last_len < klen ? last_len : klen;
            size_t s = shared_prefix(last, last_len, key, klen);
            int shorter = s < m && last[s] < 0xFF && last[s] + 1 < key[s];
            if (seps_push(&seps, last, shorter ? s + 1 : last_len, shorter, p_off, p_size) < 0)
                goto done;
            pending = 0;
        }
        last = key;
        last_len = klen;
        if (block_add(&data, key, klen, value, vlen) < 0)
            goto done;
        if (block_estimate(&data) >= (size_t)block_size) {
            if (write_block(&table, &data, &p_off, &p_size) < 0 || block_reset(&data) < 0)
                goto done;
            pending = 1;
        }
    }
    if (data.buf.len) {
        if (write_block(&table, &data, &p_off, &p_size) < 0)
            goto done;
        pending = 1;
    }
    if (write_block(&table, &meta, &meta_off, &meta_size) < 0)
        goto done;
    if (pending) { /* the last block's key: short_successor(last) */
        size_t cut = last_len;
        int bump = 0;
        for (size_t k = 0; k < last_len; k++)
            if (last[k] != 0xFF) {
                cut = k + 1;
                bump = 1;
                break;
            }
        if (seps_push(&seps, last, cut, bump, p_off, p_size) < 0)
            goto done;
    }
    for (size_t k = 0; k < seps.n; k++) {
        unsigned char handle[20];
        size_t hn = put_varint(handle, seps.handles[2 * k]);
        hn += put_varint(handle + hn, seps.handles[2 * k + 1]);
        if (block_add(&index, seps.keys.p + seps.starts[k], seps.starts[k + 1] - seps.starts[k], handle, hn) < 0)
            goto done;
    }
    if (write_block(&table, &index, &idx_off, &idx_size) < 0)
        goto done;
    unsigned char footer[48] = {0};
    size_t fp = put_varint(footer, meta_off);
    fp += put_varint(footer + fp, meta_size);
    fp += put_varint(footer + fp, idx_off);
    fp += put_varint(footer + fp, idx_size);
    static const unsigned char magic[8] = {0x57, 0xFB, 0x80, 0x8B, 0x24, 0x75, 0x47, 0xDB};
    memcpy(footer + 40, magic, 8);
    if (out_put(&table, footer, 48) < 0)
        goto done;
    result = PyBytes_FromStringAndSize((const char *)table.p, (Py_ssize_t)table.len);
done:
    PyMem_Free(table.p);
    PyMem_Free(seps.keys.p);
    PyMem_Free(seps.starts);
    PyMem_Free(seps.handles);
    PyMem_Free(data.buf.p);
    PyMem_Free(data.restarts);
    PyMem_Free(index.buf.p);
    PyMem_Free(index.restarts);
    PyMem_Free(meta.buf.p);
    PyMem_Free(meta.restarts);
    Py_DECREF(fast);
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
    PyMem_Free(key.p);
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
    {"encode_entries", encode_entries, METH_VARARGS, encode_entries_doc},
    {"decode_entries", decode_entries, METH_VARARGS, decode_entries_doc},
    {"check_arrays", check_arrays, METH_VARARGS, check_arrays_doc},
    {"build_table", build_table, METH_VARARGS, build_table_doc},
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
    if (PyModule_AddIntConstant(m, "API", NATIVE_API) < 0 || PyModule_AddIntConstant(m, "HARDWARE_CRC", crc_hw) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
