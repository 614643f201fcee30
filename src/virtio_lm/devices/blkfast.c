/*
 * virtio_lm.devices.blkfast -- the virtio-blk read/write fast path, in C.
 *
 * One call takes the chains the driver has made available on one split
 * virtqueue (up to 64, and at most the queue size) and serves them with the
 * GIL released, in three phases: take each chain (walk it, read the request
 * header, check it, record it in the inflight journal); do every request's
 * preadv / pwritev between the image and guest memory, cut into units of at
 * most 128 KiB that the caller and 3 pool threads share when the batch moves
 * at least the caller's threads_min bytes (BlkDevice.fast_threads_min),
 * else all on the caller's thread; then complete them in the order taken
 * (status byte, used element, used idx, journal).  It serves only the
 * common case, exactly as the Python path would:
 *
 *   a direct chain or one INDIRECT head descriptor; only NEXT / WRITE flags
 *   inside; readable before writable; every buffer non-empty and inside one
 *   guest-memory region; at most MAX_SEGS buffers per part; then a virtio-blk
 *   IN with data, or an OUT with data and a one-byte writable part (FLUSH
 *   negotiated, image writable), aligned, inside capacity, within
 *   seg_max / size_max (when negotiated) and max_transfer.
 *
 * Anything else -- a malformed chain, any other request type, a request the
 * device would refuse with IOERR, rings outside one region -- is left
 * untouched: the call returns STOP_SLOW with last_avail_idx at that chain,
 * and the Python path (virtio_lm.virtqueue.device.Virtqueue.pop and
 * BlkDevice.handle) takes it and names the fault.  So the two paths accept
 * the same chains and produce the same memory, image and ring contents;
 * tests/test_blk_fast_path.py checks that differentially, and it is the
 * only place that knows the layouts below:
 *
 *   struct virtq_desc  { le64 addr; le32 len; le16 flags; le16 next; }   16 bytes
 *   avail ring         { le16 flags; le16 idx; le16 ring[size]; le16 used_event; }
 *   used ring          { le16 flags; le16 idx; { le32 id; le32 len; } ring[size]; le16 avail_event; }
 *   virtio_blk_outhdr  { le32 type; le32 reserved; le64 sector; }        16 bytes
 *
 * (virtio 1.x 2.7 and 5.2.6; the same layouts as virtio_lm.wire.ring and
 * virtio_lm.wire.blk).  The inflight journal's field offsets come from the
 * caller (virtio_lm.wire.vhost_user's dtypes), not from this file.
 *
 * Every guest-memory write is recorded as an (addr, len) pair in the
 * returned `written` bytes (little-endian u64 pairs); the caller tells the
 * device's writer of them, so the dirty trackers see every byte written here.
 *
 * Error returns: TypeError / ValueError / BufferError for arguments the
 * caller got wrong; nothing is written in that case.  An I/O error on the
 * image completes the request IOERR (zeros in the writable part, the status
 * last), as BlkDevice.backend_failed does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define OUTHDR 16u
#define SECTOR_SHIFT 9
#define T_IN 0u
#define T_OUT 1u
#define ST_OK 0
#define ST_IOERR 1

#include "vring.h"

/* iovecs for bytes [start, start+len) of segs; their count, or -1 when a
 * piece breaks seg_max / size_max (0 = not negotiated). */
static int pieces(const seg_t *s, int n, uint64_t start, uint64_t len, struct iovec *iov,
                  uint64_t seg_max, uint64_t size_max)
{
    int k = 0;
    uint64_t pos = 0;
    for (int i = 0; i < n && len; i++) {
        uint64_t end = pos + s[i].len;
        if (end > start) {
            uint64_t off = start > pos ? start - pos : 0;
            uint64_t take = s[i].len - off;
            if (take > len)
                take = len;
            if (take) {
                if (size_max && take > size_max)
                    return -1;
                iov[k].iov_base = s[i].host + off;
                iov[k].iov_len = take;
                k++;
                len -= take;
                start += take;
            }
        }
        pos = end;
    }
    if (seg_max && (uint64_t)k > seg_max)
        return -1;
    return k;
}

/* The guest-physical address of byte `off` of segs (off inside them). */
static uint64_t gpa_at(const seg_t *s, int n, uint64_t off, uint8_t **host)
{
    for (int i = 0; i < n; i++) {
        if (off < s[i].len) {
            *host = s[i].host + off;
            return s[i].addr + off;
        }
        off -= s[i].len;
    }
    *host = NULL;
    return 0;
}

/* All of iov moved, or -1 (an error, or the file ended). */
static int io_all(int fd, struct iovec *iov, int n, uint64_t offset, int write)
{
    while (n > 0) {
        ssize_t k = write ? pwritev(fd, iov, n, (off_t)offset) : preadv(fd, iov, n, (off_t)offset);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0)
            return -1;
        offset += (uint64_t)k;
        while (n > 0 && (size_t)k >= iov->iov_len) {
            k -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + k;
            iov->iov_len -= (size_t)k;
        }
    }
    return 0;
}

typedef struct {
    ring_t q;
    /* device */
    int fd;
    uint64_t capacity, blk_size, seg_max, size_max, max_transfer;
    int read_only, flush;
    uint64_t par_min; /* bytes in a batch before its units are spread over threads */
    /* journal (inflight region), optional */
    uint8_t *jhdr, *jdesc;
    uint64_t counter;
    Py_ssize_t j_lbh, j_used, j_stride, j_inflight, j_next, j_counter;
    /* results */
    uint64_t reads, bytes_read, writes, bytes_written, ok, ioerr;
} run_t;

/* One request taken in phase 1, its I/O done in phase 2, completed in phase 3. */
typedef struct {
    uint64_t n, wlen;
    int seg0, nseg; /* its writable segments, in the batch's segment pool */
    int out, rc;    /* rc: -1 once one of its units failed */
    uint16_t head;
} op_t;

/* A piece of an op's I/O: at most CHUNK bytes, its own iovecs in the batch's pool. */
typedef struct {
    int op, iov0, niov;
    uint64_t foff;
} unit_t;

#define MAX_BATCH 64
#define IOV_POOL 4096
#define SEG_POOL 4096
#define MAX_UNITS 512
#define CHUNK (128u << 10) /* an op's I/O is cut into units of at most this many bytes */
#define PAR_THREADS 4 /* the caller and 3 workers */

typedef struct {
    chain_t chain;
    struct iovec iov[IOV_POOL];
    seg_t wseg[SEG_POOL];
    op_t ops[MAX_BATCH];
    unit_t units[MAX_UNITS];
} batch_t;

static void do_unit(batch_t *b, int fd, int i)
{
    unit_t *u = &b->units[i];
    op_t *o = &b->ops[u->op];
    if (io_all(fd, &b->iov[u->iov0], u->niov, u->foff, o->out) < 0)
        __atomic_store_n(&o->rc, -1, __ATOMIC_RELAXED);
}

/* The worker pool: 3 threads made at first need, kept for the process's life, serving one
 * batch at a time (whoever finds it busy does its own units alone).  A worker copies the job
 * under the lock and is counted in `active` until it has no unit left; a new job is set up only
 * when no worker is active, so none can see half of one job and half of the next. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t work, idle;
    int workers, active;
    unsigned gen;
    batch_t *b;
    int fd, nunits;
    int next, finished; /* atomics */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t pool_user = PTHREAD_MUTEX_INITIALIZER;
static uint64_t threaded_batches; /* batches whose units were offered to the workers */

/* A child of fork() has none of the parent's workers: it starts with an empty pool. */
static void pool_after_fork(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.idle, NULL);
    pthread_mutex_init(&pool_user, NULL);
    pool.workers = pool.active = 0;
}

static void take_units(batch_t *b, int fd, int nunits)
{
    int i;
    while ((i = __atomic_fetch_add(&pool.next, 1, __ATOMIC_RELAXED)) < nunits) {
        do_unit(b, fd, i);
        __atomic_fetch_add(&pool.finished, 1, __ATOMIC_RELEASE);
    }
}

static void *pool_worker(void *arg)
{
    unsigned seen = 0;
    (void)arg;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        while (pool.gen == seen)
            pthread_cond_wait(&pool.work, &pool.lock);
        seen = pool.gen;
        batch_t *b = pool.b;
        int fd = pool.fd, nunits = pool.nunits;
        pool.active++;
        pthread_mutex_unlock(&pool.lock);
        take_units(b, fd, nunits);
        pthread_mutex_lock(&pool.lock);
        if (--pool.active == 0)
            pthread_cond_broadcast(&pool.idle);
    }
    return NULL;
}

/* Phase 2: every unit's I/O; offered to the workers when the batch moves enough bytes. */
static void run_io(batch_t *b, int fd, int nunits, uint64_t bytes, uint64_t par_min)
{
    if (nunits < 2 || bytes < par_min || pthread_mutex_trylock(&pool_user) != 0) {
        for (int i = 0; i < nunits; i++)
            do_unit(b, fd, i);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    while (pool.workers < PAR_THREADS - 1) {
        pthread_t th;
        pthread_attr_t attr;
        int ok = pthread_attr_init(&attr) == 0;
        if (ok) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&attr, 64u << 10);
            ok = pthread_create(&th, &attr, pool_worker, NULL) == 0;
            pthread_attr_destroy(&attr);
        }
        if (!ok)
            break; /* fewer workers: the caller does more */
        pool.workers++;
    }
    while (pool.active > 0)
        pthread_cond_wait(&pool.idle, &pool.lock);
    pool.b = b;
    pool.fd = fd;
    pool.nunits = nunits;
    __atomic_store_n(&pool.next, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&pool.finished, 0, __ATOMIC_RELAXED);
    pool.gen++;
    if (pool.workers)
        __atomic_fetch_add(&threaded_batches, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.lock);
    take_units(b, fd, nunits);
    pthread_mutex_lock(&pool.lock);
    while (pool.active > 0 || __atomic_load_n(&pool.finished, __ATOMIC_ACQUIRE) < nunits)
        pthread_cond_wait(&pool.idle, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool_user);
}

/* Cut pieces[0..k) (n bytes at file offset foff) into units of at most CHUNK bytes, appended to
 * the batch's pools; 0, or -1 when the pools cannot take them all (nothing appended then). */
static int add_units(batch_t *b, int *niov, int *nunits, int op, const struct iovec *piece, int k, uint64_t n,
                     uint64_t foff)
{
    uint64_t cuts = n / CHUNK + 1;
    if (*niov + k + (int)cuts > IOV_POOL || *nunits + (int)cuts > MAX_UNITS)
        return -1;
    int i = 0;
    size_t at = 0; /* bytes of piece[i] already in a unit */
    while (i < k) {
        unit_t *u = &b->units[(*nunits)++];
        u->op = op;
        u->iov0 = *niov;
        u->niov = 0;
        u->foff = foff;
        uint64_t room = CHUNK;
        while (i < k && room) {
            size_t take = piece[i].iov_len - at;
            if (take > room)
                take = (size_t)room;
            b->iov[(*niov)++] = (struct iovec){(uint8_t *)piece[i].iov_base + at, take};
            u->niov++;
            room -= take;
            foff += take;
            at += take;
            if (at == piece[i].iov_len) {
                i++;
                at = 0;
            }
        }
    }
    return 0;
}

static int serve(run_t *t, const mem_t *m, batch_t *b, log_t *lg)
{
    ring_t *q = &t->q;
    uint32_t size = q->size;
    chain_t *c = &b->chain;
    struct iovec piece[MAX_SEGS];
    int nops = 0, niov = 0, nseg = 0, nunits = 0, stop;
    uint64_t bytes = 0;
    if (ring_map(q, m) < 0)
        return STOP_SLOW;
    /* --- phase 1: take chains (walk, check, record) --- */
    for (;;) {
        uint16_t head;
        if (q->taken == size || nops == MAX_BATCH) {
            stop = STOP_MORE;
            break;
        }
        if ((stop = ring_peek(q, &head)) != RING_HEAD)
            break;
        stop = STOP_SLOW;
        if (head >= size || walk(m, q->dt, size, q->indirect_ok, head, c) < 0)
            break;
        if (c->wlen < 1 || c->rlen < OUTHDR)
            break;
        uint8_t hdr[OUTHDR];
        {
            uint64_t got = 0;
            for (int i = 0; i < c->nr && got < OUTHDR; i++) {
                uint64_t k = c->r[i].len < OUTHDR - got ? c->r[i].len : OUTHDR - got;
                memcpy(hdr + got, c->r[i].host, k);
                got += k;
            }
        }
        uint32_t type;
        uint64_t sector;
        memcpy(&type, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
        type = le32toh(type);
        sector = le64toh(sector);
        int out = type == T_OUT;
        if (type != T_IN && !out)
            break;
        uint64_t n = out ? c->rlen - OUTHDR : c->wlen - 1;
        if (n == 0 || n > t->max_transfer || n % t->blk_size || sector % (t->blk_size >> SECTOR_SHIFT) ||
            sector > t->capacity || sector + (n >> SECTOR_SHIFT) > t->capacity)
            break;
        if (out && (c->wlen != 1 || t->read_only || !t->flush))
            break;
        int k = out ? pieces(c->r, c->nr, OUTHDR, n, piece, t->seg_max, t->size_max)
                    : pieces(c->w, c->nw, 0, n, piece, t->seg_max, t->size_max);
        if (k <= 0)
            break;
        if (nseg + c->nw > SEG_POOL || add_units(b, &niov, &nunits, nops, piece, k, n, sector << SECTOR_SHIFT) < 0) {
            stop = STOP_MORE; /* not taken: the next call walks it again */
            break;
        }
        /* taken: from here on the chain is ours */
        ring_take(q, lg);
        if (t->jdesc) {
            uint8_t *jd = t->jdesc + (size_t)t->j_stride * head;
            uint64_t ctr = htole64(t->counter++);
            memcpy(jd + t->j_counter, &ctr, 8);
            jd[t->j_inflight] = 1;
        }
        op_t *o = &b->ops[nops++];
        *o = (op_t){n, c->wlen, nseg, c->nw, out, 0, head};
        memcpy(&b->wseg[nseg], c->w, sizeof(seg_t) * (size_t)c->nw);
        nseg += c->nw;
        bytes += n;
    }
    /* --- phase 2: the I/O --- */
    if (nunits)
        run_io(b, t->fd, nunits, bytes, t->par_min);
    /* --- phase 3: complete in the order taken --- */
    for (int i = 0; i < nops; i++) {
        op_t *o = &b->ops[i];
        seg_t *w = &b->wseg[o->seg0];
        uint8_t status = ST_OK;
        if (o->rc == 0) {
            if (o->out) {
                t->writes++;
                t->bytes_written += o->n;
            } else {
                t->reads++;
                t->bytes_read += o->n;
            }
            t->ok++;
        } else {
            status = ST_IOERR;
            t->ioerr++;
            for (int s = 0; s < o->nseg; s++) /* the whole writable part: zeros, then the status */
                memset(w[s].host, 0, w[s].len);
        }
        if (!o->out || o->rc != 0) /* written: an IN's data (all writable bytes but the status), or zeros */
            for (int s = 0; s < o->nseg; s++)
                note(lg, w[s].addr, w[s].len - (s == o->nseg - 1));
        uint8_t *sp;
        uint64_t sa = gpa_at(w, o->nseg, o->wlen - 1, &sp);
        *sp = status;
        note(lg, sa, 1);
        if (t->jdesc) { /* the journal's batch list, before the used ring */
            uint8_t *jd = t->jdesc + (size_t)t->j_stride * o->head;
            st16(jd + t->j_next, ld16(t->jhdr + t->j_lbh));
            st16(t->jhdr + t->j_lbh, o->head);
        }
        ring_push(q, lg, o->head, (uint32_t)o->wlen);
        if (t->jdesc) {
            t->jdesc[(size_t)t->j_stride * o->head + t->j_inflight] = 0;
            st16(t->jhdr + t->j_used, q->used_idx);
        }
    }
    ring_done(q);
    return stop;
}

/* The batch storage, one per thread that calls run (kept while the thread lives: the kick
 * thread calls run for every notification, and it is too large to allocate each time). */
static pthread_key_t batch_key;

static batch_t *thread_batch(void)
{
    batch_t *b = pthread_getspecific(batch_key);
    if (b == NULL) {
        b = calloc(1, sizeof *b);
        if (b != NULL && pthread_setspecific(batch_key, b) != 0) {
            free(b);
            b = NULL;
        }
    }
    return b;
}

PyDoc_STRVAR(run_doc,
"run(regions, queue, device, journal) -> (stop, taken, last_avail, avail_cache, used_idx, counter,\n"
"    reads, bytes_read, writes, bytes_written, ok, ioerr, written_bytes, written, used_event)\n\n"
"regions: ((gpa, writable buffer), ...)\n"
"queue: (size (a power of two <= 32768), desc (16-aligned), avail (2-aligned), used (4-aligned), last_avail,\n"
"    avail_cache or -1, used_idx, event_idx, notifications, indirect_ok)\n"
"device: (fd, capacity, blk_size, seg_max or 0, size_max or 0, max_transfer, read_only, flush, threads_min)\n"
"    threads_min: a batch moving at least this many bytes shares its I/O with the pool's threads\n"
"journal: None or (header buffer, desc buffer, counter, last_batch_head offset, used_idx offset,\n"
"    desc stride, inflight offset, next offset, counter offset)\n"
"stop: 0 the ring is empty, 1 the next chain takes the Python path, 2 a queue's worth was served.\n"
"written: the guest-memory writes as little-endian u64 (addr, len) pairs.\n"
"used_event: the driver's used_event read after the last used idx written (EVENT_IDX), else -1.");

static PyObject *run(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *regions, *journal;
    PyObject *queue;
    run_t t;
    memset(&t, 0, sizeof t);
    unsigned long long capacity, blk_size, seg_max, size_max, max_transfer, par_min;
    if (!PyArg_ParseTuple(args, "O!O(iKKKKKppK)O", &PyTuple_Type, &regions, &queue, &t.fd, &capacity, &blk_size,
                          &seg_max, &size_max, &max_transfer, &t.read_only, &t.flush, &par_min, &journal))
        return NULL;
    if (parse_ring("blkfast.run", queue, &t.q) < 0)
        return NULL;
    if (blk_size < 512 || (blk_size & (blk_size - 1)) || max_transfer > U32_MAX_) {
        PyErr_SetString(PyExc_ValueError, "blkfast.run: device parameters out of range");
        return NULL;
    }
    t.capacity = capacity;
    t.blk_size = blk_size;
    t.seg_max = seg_max;
    t.size_max = size_max;
    t.max_transfer = max_transfer;
    t.par_min = par_min;

    mem_t m;
    Py_buffer views[MAX_REGIONS + 2];
    int nviews = 0;
    if (parse_regions("blkfast.run", regions, &m, views, &nviews) < 0)
        goto fail;
    if (journal != Py_None) {
        PyObject *jh, *jd;
        unsigned long long counter;
        if (!PyArg_ParseTuple(journal, "OOKnnnnnn;journal", &jh, &jd, &counter, &t.j_lbh, &t.j_used, &t.j_stride,
                              &t.j_inflight, &t.j_next, &t.j_counter))
            goto fail;
        if (PyObject_GetBuffer(jh, &views[nviews], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        nviews++;
        if (PyObject_GetBuffer(jd, &views[nviews], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            goto fail;
        nviews++;
        Py_buffer *h = &views[nviews - 2], *d = &views[nviews - 1];
        if (t.j_lbh < 0 || t.j_lbh + 2 > h->len || t.j_used < 0 || t.j_used + 2 > h->len || t.j_stride < 16 ||
            t.j_inflight < 0 || t.j_inflight >= t.j_stride || t.j_next < 0 || t.j_next + 2 > t.j_stride ||
            t.j_counter < 0 || t.j_counter + 8 > t.j_stride || d->len < t.j_stride * (Py_ssize_t)t.q.size) {
            PyErr_SetString(PyExc_ValueError, "blkfast.run: the journal does not fit its layout and the queue size");
            goto fail;
        }
        t.jhdr = h->buf;
        t.jdesc = d->buf;
        t.counter = counter;
    }

    batch_t *batch = thread_batch();
    if (batch == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    log_t lg = {0};
    int stop;
    Py_BEGIN_ALLOW_THREADS
    stop = serve(&t, &m, batch, &lg);
    Py_END_ALLOW_THREADS
    release_views(views, nviews);
    PyObject *written = lg.oom ? NULL : PyBytes_FromStringAndSize((const char *)lg.v, (Py_ssize_t)(lg.n * 8));
    free(lg.v);
    if (written == NULL) {
        /* the chains were served; without their write list the caller cannot tell the
         * dirty trackers, so it must treat all of guest memory as written */
        PyErr_Clear();
        written = Py_None;
        Py_INCREF(written);
    }
    return Py_BuildValue("iKiiiKKKKKKKKNi", stop, (unsigned long long)t.q.taken, (int)t.q.last_avail,
                         t.q.avail_cache, (int)t.q.used_idx, (unsigned long long)t.counter, (unsigned long long)t.reads,
                         (unsigned long long)t.bytes_read, (unsigned long long)t.writes,
                         (unsigned long long)t.bytes_written, (unsigned long long)t.ok,
                         (unsigned long long)t.ioerr, (unsigned long long)lg.bytes, written, t.q.used_event);
fail:
    release_views(views, nviews);
    return NULL;
}

static PyObject *threaded(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&threaded_batches, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, run_doc},
    {"threaded_batches", threaded, METH_NOARGS, "Batches so far whose I/O ran on more than one thread."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "blkfast", "The virtio-blk read/write fast path (see the source's header).", -1, methods,
};

PyMODINIT_FUNC PyInit_blkfast(void)
{
    if (pthread_key_create(&batch_key, free) != 0 || pthread_atfork(NULL, NULL, pool_after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "blkfast: pthread_key_create / pthread_atfork failed");
        return NULL;
    }
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    if (add_constants(mod, "MAX_SEGS", MAX_SEGS) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
