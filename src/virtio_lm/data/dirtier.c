/*
 * dirtier: the guest program of the QEMU downtime baseline (virtio_lm.qemu_baseline).
 *
 * It does the same work as virtio-lm's vCPU (virtio_lm.vm.vcpu.SweepVcpu):
 *
 *   1. "random fill": FILL_MIB MiB, every page filled with pseudo-random
 *      non-zero 64-bit words from a xorshift64 generator seeded by the page index;
 *   2. "sweep": SWEEP_MIB MiB that start all zero; the first byte of every page
 *      is incremented, page after page, wrapping around, sweep after sweep, at
 *      RATE_MBPS MB/s of dirtied pages (pages/s = rate * 1e6 / 4096), paced with
 *      CLOCK_MONOTONIC in bursts of at most 256 pages (a burst stops at the end of
 *      a sweep).  RATE_MBPS 0 = no dirtying at all (the sweep region is then not
 *      populated: it reads as zeros without taking guest RAM); a negative rate =
 *      as fast as it can.
 *
 * Usage: dirtier FILL_MIB SWEEP_MIB RATE_MBPS [--selftest-corrupt]
 *
 * It prints "DIRTIER_READY ..." once the fill is done and the sweep has started,
 * then "DIRTIER_STEADY ..." after one second of sweeping (at once when the rate is
 * 0).  On SIGUSR1 it stops sweeping and verifies:
 *
 *   - every fill page regenerates from the PRNG byte for byte;
 *   - the sweep region matches the one state (sweeps, position) kept in this
 *     program's variables: the first byte of pages [0, position) holds
 *     (sweeps + 1) mod 256, of the other pages sweeps mod 256, and every other
 *     byte is 0.
 *
 * It prints "DIRTIER_OK ..." and exits 0, or "DIRTIER_BAD <details>" (the first
 * mismatching pages) and exits 1.  A page whose latest store was lost by a
 * migration shows the value of an earlier sweep and fails the check.
 *
 * --selftest-corrupt is the negative control: just before verifying, it takes
 * the latest increment back from one sweep page (as a lost dirty page would) and
 * flips one byte of one fill page; the verification must then print DIRTIER_BAD.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define BURST 256UL
#define SHOW 4 /* mismatching pages shown per region */

static volatile sig_atomic_t stop_requested;

/* The sweep state: in this process's memory, so it migrates with the guest. */
static uint64_t sweeps, position, pages_written;

static void on_usr1(int sig) { (void)sig; stop_requested = 1; }

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Sleeps until CLOCK_MONOTONIC reaches t (at once when it has), with SIGUSR1 unblocked only while
 * waiting: the loop keeps SIGUSR1 blocked, so a signal that comes between its check of
 * stop_requested and this wait stays pending and ends the wait at once (ppoll sets the mask and
 * waits in one step).  With clock_nanosleep a signal landing in that gap was only seen after the
 * sleep, and a sleep is unbounded if the guest's clock misbehaves after a migration. */
static void wait_until(double t, const sigset_t *unblocked)
{
    double left = t - now_s();
    if (left < 0)
        left = 0;
    struct timespec ts;
    ts.tv_sec = (time_t)left;
    ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
    ppoll(NULL, 0, &ts, unblocked); /* EINTR on SIGUSR1: the caller checks stop_requested */
}

static uint64_t page_seed(uint64_t page)
{
    /* a 64-bit mix of the page index; xorshift64 needs a non-zero state */
    uint64_t z = (page + 1) * 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z ? z : 1;
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x; /* never 0 from a non-zero state */
}

static unsigned char *map_region(uint64_t bytes, const char *what, int populate)
{
    if (bytes == 0)
        return NULL;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
        printf("DIRTIER_BAD cannot map the %s region (%llu bytes): %s\n", what,
               (unsigned long long)bytes, strerror(errno));
        exit(2);
    }
    return p;
}

static void fill_page(uint64_t *w, uint64_t page)
{
    uint64_t s = page_seed(page);
    for (unsigned long i = 0; i < WORDS; i++)
        w[i] = xorshift64(&s);
}

/* Appends to buf; returns the number of bad fill pages. */
static uint64_t verify_fill(const unsigned char *fill, uint64_t pages, char *buf, size_t cap)
{
    uint64_t bad = 0;
    for (uint64_t p = 0; p < pages; p++) {
        const uint64_t *w = (const uint64_t *)(fill + p * PAGE);
        uint64_t s = page_seed(p);
        for (unsigned long i = 0; i < WORDS; i++) {
            uint64_t want = xorshift64(&s);
            if (w[i] != want) {
                if (bad < SHOW) {
                    size_t n = strlen(buf);
                    snprintf(buf + n, cap - n, " fill page %llu word %lu: expected %016llx found %016llx;",
                             (unsigned long long)p, i, (unsigned long long)want, (unsigned long long)w[i]);
                }
                bad++;
                break;
            }
        }
    }
    return bad;
}

static uint64_t verify_sweep(const unsigned char *sw, uint64_t pages, char *buf, size_t cap)
{
    static const unsigned char zero[PAGE];
    uint64_t bad = 0;
    for (uint64_t p = 0; p < pages; p++) {
        const unsigned char *pg = sw + p * PAGE;
        unsigned char want = (unsigned char)((p < position ? sweeps + 1 : sweeps) & 0xff);
        int tail_ok = memcmp(pg + 1, zero, PAGE - 1) == 0;
        if (pg[0] != want || !tail_ok) {
            if (bad < SHOW) {
                size_t n = strlen(buf);
                snprintf(buf + n, cap - n, " sweep page %llu: expected %u found %u%s;", (unsigned long long)p,
                         want, pg[0], tail_ok ? "" : " (non-zero bytes after the first)");
            }
            bad++;
        }
    }
    return bad;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5 || (argc == 5 && strcmp(argv[4], "--selftest-corrupt") != 0)) {
        fprintf(stderr, "usage: %s FILL_MIB SWEEP_MIB RATE_MBPS [--selftest-corrupt]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    uint64_t fill_pages = strtoull(argv[1], NULL, 10) * (1ULL << 20) / PAGE;
    uint64_t sweep_pages = strtoull(argv[2], NULL, 10) * (1ULL << 20) / PAGE;
    double rate = strtod(argv[3], NULL);
    int corrupt = argc == 5;

    sigset_t usr1, old;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);

    double t_start = now_s();
    unsigned char *fill = map_region(fill_pages * PAGE, "fill", 1);
    for (uint64_t p = 0; p < fill_pages; p++)
        fill_page((uint64_t *)(fill + p * PAGE), p);
    int dirtying = rate != 0 && sweep_pages > 0;
    /* Never written when not dirtying: left unpopulated it reads as zeros and costs no guest RAM
     * (its guest-physical pages are zero pages either way, as far as migration is concerned). */
    unsigned char *sw = map_region(sweep_pages * PAGE, "sweep", dirtying);
    double t_ready = now_s();
    printf("DIRTIER_READY fill_pages=%llu sweep_pages=%llu rate_mbps=%g fill_secs=%.3f\n",
           (unsigned long long)fill_pages, (unsigned long long)sweep_pages, rate, t_ready - t_start);

    double pages_per_s = rate > 0 ? rate * 1e6 / (double)PAGE : 0;
    double t0 = now_s(), next = t0;
    int steady_told = 0;
    if (!dirtying) {
        printf("DIRTIER_STEADY rate_mbps=0\n");
        steady_told = 1;
        sigprocmask(SIG_BLOCK, &usr1, &old);
        while (!stop_requested)
            sigsuspend(&old);
        sigprocmask(SIG_SETMASK, &old, NULL);
    }
    if (dirtying)
        sigprocmask(SIG_BLOCK, &usr1, &old);
    while (dirtying && !stop_requested) {
        uint64_t n = sweep_pages - position;
        if (n > BURST)
            n = BURST;
        unsigned char *pg = sw + position * PAGE;
        for (uint64_t i = 0; i < n; i++, pg += PAGE) {
            (*pg)++;
            position++;
        }
        pages_written += n;
        if (position == sweep_pages) {
            position = 0;
            sweeps++;
        }
        double t = now_s();
        if (!steady_told && t - t0 >= 1.0) {
            printf("DIRTIER_STEADY rate_mbps=%.1f\n", (double)pages_written * PAGE / 1e6 / (t - t0));
            steady_told = 1;
        }
        if (pages_per_s > 0) {
            next += (double)n / pages_per_s;
            if (next < t - 0.05)
                next = t - 0.05; /* behind by more than 50 ms: no catching up beyond that */
        }
        /* also when behind (a zero wait): a pending SIGUSR1 is delivered here */
        wait_until(pages_per_s > 0 ? next : 0, &old);
    }
    if (dirtying)
        sigprocmask(SIG_SETMASK, &old, NULL);
    double secs = now_s() - t0;

    if (corrupt) {
        if (sweep_pages) {
            uint64_t p = position ? position - 1 : sweep_pages - 1;
            sw[p * PAGE] -= 1; /* its latest increment is lost */
        }
        if (fill_pages)
            fill[(fill_pages / 2) * PAGE + 123] ^= 0x40;
    }

    char details[1024] = "";
    uint64_t bad_fill = verify_fill(fill, fill_pages, details, sizeof details);
    uint64_t bad_sweep = verify_sweep(sw, sweep_pages, details, sizeof details);
    if (bad_fill || bad_sweep) {
        printf("DIRTIER_BAD bad_fill_pages=%llu bad_sweep_pages=%llu sweeps=%llu position=%llu;%s\n",
               (unsigned long long)bad_fill, (unsigned long long)bad_sweep, (unsigned long long)sweeps,
               (unsigned long long)position, details);
        return 1;
    }
    printf("DIRTIER_OK fill_pages=%llu sweep_pages=%llu sweeps=%llu position=%llu pages_written=%llu "
           "secs=%.3f rate_mbps=%.1f\n",
           (unsigned long long)fill_pages, (unsigned long long)sweep_pages, (unsigned long long)sweeps,
           (unsigned long long)position, (unsigned long long)pages_written, secs,
           secs > 0 ? (double)pages_written * PAGE / 1e6 / secs : 0.0);
    return 0;
}
