/* 4 KiB random I/O for the figures: rio r|w DEVICE SPAN_MIB COUNT SEED [QD] -> prints "RIO <ops> <ns>".
 * O_DIRECT, offsets uniform over the first SPAN_MIB MiB; QD threads (default 1), each with one
 * request at a time, so QD requests are in flight; COUNT is the total over all threads. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int fd, wr;
static long blocks, per;
static unsigned long long seed;
static volatile int failed;

static void *run(void *arg) {
    unsigned long long x = (seed + 0x9E3779B97F4A7C15ull * (unsigned long long)(long)arg) | 1;
    void *buf;
    if (posix_memalign(&buf, 4096, 4096)) { failed = 1; return 0; }
    for (int i = 0; i < 4096; i++) ((unsigned char *)buf)[i] = (unsigned char)(i * 7);
    for (long i = 0; i < per; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        off_t off = (off_t)(x % blocks) * 4096;
        ssize_t n = wr ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
        if (n != 4096) { perror("io"); failed = 1; return 0; }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 6 && argc != 7) { fprintf(stderr, "usage: rio r|w dev span_mib count seed [qd]\n"); return 2; }
    wr = argv[1][0] == 'w';
    fd = open(argv[2], (wr ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    int qd = argc == 7 ? atoi(argv[6]) : 1;
    if (qd < 1 || qd > 256) return 2;
    blocks = atol(argv[3]) * 256L;
    per = atol(argv[4]) / qd;
    seed = strtoull(argv[5], 0, 10);
    pthread_t t[256];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < qd; i++) pthread_create(&t[i], 0, run, (void *)i);
    for (int i = 0; i < qd; i++) pthread_join(t[i], 0);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (failed) return 1;
    printf("RIO %ld %lld\n", per * qd, (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
