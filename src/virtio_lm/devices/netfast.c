/*
 * virtio_lm.devices.netfast -- the virtio-net transmit fast path, in C.
 *
 * One call takes the chains the driver has made available on one transmit
 * queue (up to max_chains, and at most the queue size), with the GIL
 * released: walks each, checks it, copies its frame out of guest memory and
 * completes it (used element with length 0, used idx) -- then returns the
 * frames, in order, for the caller to put on the wire.  It serves only the
 * common case, exactly as the Python path (NetDevice.handle, sending on the
 * notification's path) would:
 *
 *   a direct chain or one INDIRECT head descriptor; only NEXT flags inside
 *   (no writable buffer); every buffer non-empty and inside one guest-memory
 *   region; at most MAX_SEGS buffers; a virtio_net_hdr_v1 whose flags and
 *   gso_type are 0 (no offload is offered), then a frame of ETH_HLEN to
 *   max_frame bytes.
 *
 * Anything else -- a malformed chain, a short or long frame, a header asking
 * for an offload, a writable buffer -- is left untouched: the call returns
 * STOP_SLOW with last_avail_idx at that chain, and the Python path
 * (Virtqueue.pop and NetDevice.handle) takes it and names the fault.
 * tests/test_net_fast_path.py checks the two paths differentially.  The ring
 * layouts are in blkfast.c's header; the header read here is
 *
 *   virtio_net_hdr_v1 { u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
 *                       le16 csum_start; le16 csum_offset; le16 num_buffers; }   12 bytes
 *
 * (virtio 1.x 5.1.6; virtio_lm.wire.net.NetHdrV1).  Every guest-memory write
 * (the used ring, avail_event) is recorded as an (addr, len) pair in the
 * returned `written` bytes, for the caller to tell the dirty trackers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <endian.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vring.h"

#define NETHDR 12u
#define ETH_HLEN_ 14u
#define MAX_CHAINS 1024

typedef struct {
    ring_t q;
    uint64_t max_frame, max_chains;
    /* results */
    uint64_t bytes;
    /* frames: their bytes back to back in buf, their lengths in lens */
    uint8_t *buf;
    size_t fill, cap;
    uint32_t lens[MAX_CHAINS];
    int oom;
} tx_t;

static int room(tx_t *t, size_t n)
{
    if (t->fill + n <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap : 65536;
    while (cap < t->fill + n)
        cap *= 2;
    uint8_t *b = realloc(t->buf, cap);
    if (b == NULL)
        return -1;
    t->buf = b;
    t->cap = cap;
    return 0;
}

static int serve(tx_t *t, const mem_t *m, chain_t *c, log_t *lg)
{
    ring_t *q = &t->q;
    uint32_t size = q->size;
    int stop;
    if (ring_map(q, m) < 0)
        return STOP_SLOW;
    for (;;) {
        uint16_t head;
        if (q->taken == size || q->taken == t->max_chains) {
            stop = STOP_MORE;
            break;
        }
        if ((stop = ring_peek(q, &head)) != RING_HEAD)
            break;
        stop = STOP_SLOW;
        if (head >= size || walk(m, q->dt, size, q->indirect_ok, head, c) < 0)
            break;
        if (c->nw != 0 || c->rlen < NETHDR + ETH_HLEN_ || c->rlen - NETHDR > t->max_frame)
            break;
        uint64_t n = c->rlen - NETHDR;
        if (room(t, n) < 0) {
            t->oom = 1;
            stop = STOP_MORE; /* not taken: the next call walks it again */
            break;
        }
        /* the header's first two bytes (flags, gso_type), then the frame */
        uint8_t hdr[2] = {0xFF, 0xFF}; /* (always filled: rlen >= NETHDR) */
        int got = 0;
        uint8_t *dst = t->buf + t->fill;
        for (int i = 0; i < c->nr && got < 2; i++)
            for (uint64_t k = 0; k < c->r[i].len && got < 2; k++)
                hdr[got++] = c->r[i].host[k];
        if (hdr[0] != 0 || hdr[1] != 0)
            break;
        uint64_t pos = 0; /* the frame: bytes NETHDR.. of the readable part */
        for (int i = 0; i < c->nr; i++) {
            const seg_t *s = &c->r[i];
            uint64_t a = pos, b = pos + s->len; /* this segment's bytes of the part */
            pos = b;
            if (b <= NETHDR)
                continue;
            uint64_t from = a < NETHDR ? NETHDR - a : 0;
            memcpy(dst, s->host + from, s->len - from);
            dst += s->len - from;
        }
        /* taken and sent: complete it */
        t->lens[q->taken] = (uint32_t)n;
        t->fill += n;
        t->bytes += n;
        ring_take(q, lg);
        ring_push(q, lg, head, 0);
    }
    ring_done(q);
    return stop;
}

PyDoc_STRVAR(tx_doc,
"tx(regions, queue, max_frame, max_chains) -> (stop, taken, last_avail, avail_cache, used_idx, frames,\n"
"    written_bytes, written, used_event)\n\n"
"regions: ((gpa, writable buffer), ...)\n"
"queue: (size (a power of two <= 32768), desc (16-aligned), avail (2-aligned), used (4-aligned), last_avail,\n"
"    avail_cache or -1, used_idx, event_idx, notifications, indirect_ok)\n"
"max_frame: the longest frame served (ETH_HLEN..65535); max_chains: at most this many chains (1..1024).\n"
"stop: 0 the ring is empty, 1 the next chain takes the Python path, 2 more may be there.\n"
"frames: the frames of the chains taken (completed), in order, as a list of bytes (None: lost for memory).\n"
"written: the guest-memory writes as little-endian u64 (addr, len) pairs (None: lost, treat all as written).\n"
"used_event: the driver's used_event read after the last used idx written (EVENT_IDX), else -1.");

static PyObject *tx(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *regions;
    tx_t *t = calloc(1, sizeof *t);
    chain_t *c = calloc(1, sizeof *c);
    PyObject *frames = NULL, *written = NULL;
    Py_buffer views[MAX_REGIONS];
    int nviews = 0;
    mem_t m;
    if (t == NULL || c == NULL) {
        free(t);
        free(c);
        return PyErr_NoMemory();
    }
    PyObject *queue;
    unsigned long long max_frame, max_chains;
    if (!PyArg_ParseTuple(args, "O!OKK", &PyTuple_Type, &regions, &queue, &max_frame, &max_chains))
        goto fail;
    if (parse_ring("netfast.tx", queue, &t->q) < 0)
        goto fail;
    if (max_frame < ETH_HLEN_ || max_frame > 0xFFFF || max_chains < 1 || max_chains > MAX_CHAINS) {
        PyErr_SetString(PyExc_ValueError, "netfast.tx: frame or chain limits out of range");
        goto fail;
    }
    t->max_frame = max_frame;
    t->max_chains = max_chains;
    if (parse_regions("netfast.tx", regions, &m, views, &nviews) < 0)
        goto fail;
    log_t lg = {0};
    int stop;
    Py_BEGIN_ALLOW_THREADS
    stop = serve(t, &m, c, &lg);
    Py_END_ALLOW_THREADS
    release_views(views, nviews);
    nviews = 0;
    written = lg.oom ? NULL : PyBytes_FromStringAndSize((const char *)lg.v, (Py_ssize_t)(lg.n * 8));
    free(lg.v);
    if (written == NULL) { /* the chains were served: without the list, all memory counts as written */
        PyErr_Clear();
        written = Py_None;
        Py_INCREF(written);
    }
    frames = PyList_New((Py_ssize_t)t->q.taken);
    size_t off = 0;
    for (uint64_t i = 0; frames != NULL && i < t->q.taken; i++) {
        PyObject *f = PyBytes_FromStringAndSize((const char *)t->buf + off, (Py_ssize_t)t->lens[i]);
        if (f == NULL)
            Py_CLEAR(frames);
        else
            PyList_SET_ITEM(frames, (Py_ssize_t)i, f);
        off += t->lens[i];
    }
    if (frames == NULL) { /* taken and completed, their frames lost: as a back-end that failed to send them */
        PyErr_Clear();
        frames = Py_None;
        Py_INCREF(frames);
    }
    PyObject *res = Py_BuildValue("iKiiiNKNi", stop, (unsigned long long)t->q.taken, (int)t->q.last_avail,
                                  t->q.avail_cache, (int)t->q.used_idx, frames, (unsigned long long)lg.bytes, written,
                                  t->q.used_event);
    free(t->buf);
    free(t);
    free(c);
    return res;
fail:
    release_views(views, nviews);
    Py_XDECREF(frames);
    Py_XDECREF(written);
    free(t->buf);
    free(t);
    free(c);
    return NULL;
}

static PyMethodDef methods[] = {
    {"tx", tx, METH_VARARGS, tx_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "netfast", "The virtio-net transmit fast path (see the source's header).", -1, methods,
};

PyMODINIT_FUNC PyInit_netfast(void)
{
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    if (add_constants(mod, "MAX_CHAINS", MAX_CHAINS) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
