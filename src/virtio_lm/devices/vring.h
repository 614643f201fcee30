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

/* One split virtqueue as a fast path takes it: the caller's indices in, the results out. */
typedef struct {
    uint32_t size;
    uint64_t desc, avail, used;
    uint16_t last_avail, used_idx;
    int avail_cache; /* -1: unknown */
    int event_idx, notifications, indirect_ok;
    uint8_t *dt, *av, *us; /* the three parts in host memory (ring_map) */
    uint64_t taken;        /* chains taken by this call */
    int used_event;        /* the driver's, read after the last used idx written; -1: not read */
} ring_t;

#define RING_HEAD (-1) /* ring_peek: a chain is there */

/* Parse ``(size, desc, avail, used, last_avail, avail_cache, used_idx, event_idx, notifications,
 * indirect_ok)``: 0, or -1 with a Python error set (ValueError "... out of range" for values no
 * queue has: a size not a power of two up to 32768, indices past u16, misaligned parts). */
static int parse_ring(const char *who, PyObject *tuple, ring_t *q)
{
    unsigned long long desc, avail, used;
    unsigned int size, last_avail, used_idx;
    int avail_cache;
    memset(q, 0, sizeof *q);
    q->used_event = -1;
    if (!PyTuple_Check(tuple)) {
        PyErr_Format(PyExc_TypeError, "%s: the queue is a tuple", who);
        return -1;
    }
    if (!PyArg_ParseTuple(tuple, "IKKKIiIppp;queue", &size, &desc, &avail, &used, &last_avail, &avail_cache,
                          &used_idx, &q->event_idx, &q->notifications, &q->indirect_ok))
        return -1;
    if (size == 0 || size > 32768 || (size & (size - 1)) || last_avail > 0xFFFF || used_idx > 0xFFFF ||
        avail_cache < -1 || avail_cache > 0xFFFF || desc % 16 || avail % 2 || used % 4) {
        PyErr_Format(PyExc_ValueError, "%s: queue parameters out of range", who);
        return -1;
    }
    q->size = size;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->last_avail = (uint16_t)last_avail;
    q->avail_cache = avail_cache;
    q->used_idx = (uint16_t)used_idx;
    return 0;
}

/* Find the three parts in guest memory: 0, or -1 when one is not inside a region. */
static int ring_map(ring_t *q, const mem_t *m)
{
    uint64_t ev = q->event_idx ? 2 : 0;
    q->dt = host_of(m, q->desc, (uint64_t)DESC_SIZE * q->size);
    q->av = host_of(m, q->avail, 4 + 2ull * q->size + ev);
    q->us = host_of(m, q->used, 4 + 8ull * q->size + ev);
    return q->dt != NULL && q->av != NULL && q->us != NULL ? 0 : -1;
}

/* The head of the next available chain, not taken (RING_HEAD, *head set); STOP_EMPTY when the
 * ring is empty; STOP_SLOW when the avail idx is more than a queue ahead (the Python path names it). */
static int ring_peek(ring_t *q, uint16_t *head)
{
    uint16_t last = q->last_avail;
    if (q->avail_cache < 0 || (uint16_t)q->avail_cache == last) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* after our avail_event write */
        uint16_t idx = ld16_acquire(q->av + 2);
        if ((uint16_t)(idx - last) > q->size)
            return STOP_SLOW;
        q->avail_cache = idx;
        if (idx == last)
            return STOP_EMPTY;
    }
    *head = ld16(q->av + 4 + 2u * (last % q->size));
    return RING_HEAD;
}

/* The chain ring_peek returned is taken: last_avail moves on (and avail_event with EVENT_IDX). */
static void ring_take(ring_t *q, log_t *lg)
{
    q->last_avail = (uint16_t)(q->last_avail + 1);
    q->taken++;
    if (q->event_idx && q->notifications) {
        st16(q->us + 4 + 8u * q->size, q->last_avail);
        note(lg, q->used + 4 + 8ull * q->size, 2);
    }
}

/* Return a chain: its used element, then the used idx (a release store). */
static void ring_push(ring_t *q, log_t *lg, uint16_t head, uint32_t len)
{
    uint16_t u = q->used_idx;
    uint8_t *e = q->us + 4 + 8u * (u % q->size);
    uint32_t id = htole32(head), ln = htole32(len);
    memcpy(e, &id, 4);
    memcpy(e + 4, &ln, 4);
    note(lg, q->used + 4 + 8ull * (u % q->size), 8);
    q->used_idx = (uint16_t)(u + 1);
    st16_release(q->us + 2, q->used_idx);
    note(lg, q->used + 2, 2);
}

/* After the call's last push: with EVENT_IDX, the driver's used_event (a full barrier first). */
static void ring_done(ring_t *q)
{
    if (q->taken && q->event_idx) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        q->used_event = ld16_acquire(q->av + 4 + 2u * q->size);
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

/* The stop codes as module constants, and one more (name, value): 0, or -1 with an error set. */
static int add_constants(PyObject *mod, const char *name, long value)
{
    return PyModule_AddIntConstant(mod, "STOP_EMPTY", STOP_EMPTY) < 0 ||
                   PyModule_AddIntConstant(mod, "STOP_SLOW", STOP_SLOW) < 0 ||
                   PyModule_AddIntConstant(mod, "STOP_MORE", STOP_MORE) < 0 ||
                   PyModule_AddIntConstant(mod, name, value) < 0
               ? -1
               : 0;
}

#endif
