/*
 * vring.h -- what the C fast paths (blkfast.c, netfast.c) share: guest memory as regions,
 * the walk of a split virtqueue's descriptor chain, the record of guest-memory writes, and
 * little-endian / atomic ring accesses.  Included by each extension's one source file (every
 * function static).  The layouts it reads are in blkfast.c's header comment.
 */
#ifndef VIRTIO_LM_VRING_H
#define VIRTIO_LM_VRING_H

#include <Python.h>
#include <endian.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REGIONS 64
#define MAX_SEGS 512 /* per part; IOV_MAX is 1024 */
#define MAX_TABLE 32768
#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define DESC_SIZE 16u
#define U32_MAX_ 0xFFFFFFFFull

enum { STOP_EMPTY = 0, STOP_SLOW = 1, STOP_MORE = 2 };

typedef struct {
    uint64_t gpa, size;
    uint8_t *host;
} region_t;

typedef struct {
    uint8_t *host;
    uint64_t addr;
    uint32_t len;
} seg_t;

#define MAX_STEPS (2 * MAX_SEGS + 1) /* an indirect head, then at most both parts full */

typedef struct {
    seg_t r[MAX_SEGS], w[MAX_SEGS];
    int nr, nw;
    uint64_t rlen, wlen;
    uint8_t seen[MAX_TABLE / 8]; /* entries visited in the table being walked; all clear between walks */
    uint16_t visits[MAX_STEPS];
    int nvisits;
} chain_t;

typedef struct {
    uint64_t *v; /* addr, len, addr, len, ... */
    size_t n, cap;
    uint64_t bytes;
    int oom;
} log_t;

typedef struct {
    region_t r[MAX_REGIONS];
    int n;
} mem_t;

static uint8_t *host_of(const mem_t *m, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < m->n; i++) {
        const region_t *r = &m->r[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static void note(log_t *lg, uint64_t addr, uint64_t len)
{
    if (len == 0)
        return;
    lg->bytes += len;
    if (lg->n + 2 > lg->cap) {
        size_t cap = lg->cap ? lg->cap * 2 : 256;
        uint64_t *v = realloc(lg->v, cap * sizeof(uint64_t));
        if (v == NULL) {
            lg->oom = 1;
            return;
        }
        lg->v = v;
        lg->cap = cap;
    }
    lg->v[lg->n++] = htole64(addr);
    lg->v[lg->n++] = htole64(len);
}

static inline uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return le16toh(v);
}

static inline uint16_t ld16_acquire(const uint8_t *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE));
}

static inline void st16(uint8_t *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, 2);
}

static inline void st16_release(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELEASE);
}

static void unsee(chain_t *c)
{
    for (int i = 0; i < c->nvisits; i++)
        c->seen[c->visits[i] >> 3] = 0;
    c->nvisits = 0;
}

static int walk_(const mem_t *m, const uint8_t *dt, uint32_t qsize, int indirect_ok, uint16_t head, chain_t *c);

/* Walk the chain at head; 0 when the fast path takes it, -1 otherwise (the chain is
 * malformed -- a revisited entry included -- or simply not one the fast path serves). */
static int walk(const mem_t *m, const uint8_t *dt, uint32_t qsize, int indirect_ok, uint16_t head, chain_t *c)
{
    int rc = walk_(m, dt, qsize, indirect_ok, head, c);
    unsee(c);
    return rc;
}

static int walk_(const mem_t *m, const uint8_t *dt, uint32_t qsize, int indirect_ok, uint16_t head, chain_t *c)
{
    const uint8_t *table = dt;
    uint32_t tlen = qsize, idx = head, steps = 0;
    int indirect = 0;
    c->nr = c->nw = 0;
    c->rlen = c->wlen = 0;
    for (;;) {
        uint8_t d[DESC_SIZE];
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        if (idx >= tlen || ++steps > tlen || c->nvisits == MAX_STEPS)
            return -1;
        if (c->seen[idx >> 3] & (1u << (idx & 7)))
            return -1; /* a loop */
        c->seen[idx >> 3] |= (uint8_t)(1u << (idx & 7));
        c->visits[c->nvisits++] = (uint16_t)idx;
        memcpy(d, table + (size_t)DESC_SIZE * idx, DESC_SIZE); /* each descriptor read once */
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        addr = le64toh(addr);
        len = le32toh(len);
        flags = ld16(d + 12);
        next = ld16(d + 14);
        if (flags & ~(F_NEXT | F_WRITE | F_INDIRECT))
            return -1;
        if (flags & F_INDIRECT) {
            if (indirect || !indirect_ok || (flags & F_NEXT) || steps != 1)
                return -1;
            if (len == 0 || len % DESC_SIZE || len / DESC_SIZE > MAX_TABLE)
                return -1;
            table = host_of(m, addr, len);
            if (table == NULL)
                return -1;
            tlen = len / DESC_SIZE;
            unsee(c); /* a new table */
            idx = 0;
            steps = 0;
            indirect = 1;
            continue;
        }
        if (len == 0)
            return -1;
        uint8_t *h = host_of(m, addr, len);
        if (h == NULL)
            return -1;
        if (flags & F_WRITE) {
            if (c->nw == MAX_SEGS)
                return -1;
            c->w[c->nw++] = (seg_t){h, addr, len};
            c->wlen += len;
        } else {
            if (c->nw || c->nr == MAX_SEGS)
                return -1;
            c->r[c->nr++] = (seg_t){h, addr, len};
            c->rlen += len;
        }
        if (c->rlen + c->wlen > U32_MAX_)
            return -1;
        if (!(flags & F_NEXT))
            return 0;
        idx = next;
    }
}

/* Parse ``((gpa, writable buffer), ...)`` into m, holding a view of each buffer in views
 * (*nviews counts them, for release_views).  0, or -1 with a Python error set. */
static int parse_regions(const char *who, PyObject *regions, mem_t *m, Py_buffer *views, int *nviews)
{
    Py_ssize_t nreg = PyTuple_GET_SIZE(regions);
    if (nreg > MAX_REGIONS) {
        PyErr_Format(PyExc_ValueError, "%s: %zd regions, at most %d", who, nreg, MAX_REGIONS);
        return -1;
    }
    m->n = 0;
    for (Py_ssize_t i = 0; i < nreg; i++) {
        PyObject *item = PyTuple_GET_ITEM(regions, i);
        unsigned long long gpa;
        PyObject *buf;
        if (!PyTuple_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s: a region is a (gpa, buffer) tuple", who);
            return -1;
        }
        if (!PyArg_ParseTuple(item, "KO;a region is (gpa, buffer)", &gpa, &buf))
            return -1;
        if (PyObject_GetBuffer(buf, &views[*nviews], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        (*nviews)++;
        m->r[m->n++] = (region_t){gpa, (uint64_t)views[*nviews - 1].len, views[*nviews - 1].buf};
    }
    return 0;
}

static void release_views(Py_buffer *views, int n)
{
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

#endif
