/* 4 KiB random I/O for the figures: rio r|w DEVICE SPAN_MIB COUNT SEED -> prints "RIO <ops> <ns>".
 * O_DIRECT, one request at a time (queue depth 1), offsets uniform over the first SPAN_MIB MiB. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: rio r|w dev span_mib count seed\n"); return 2; }
    int wr = argv[1][0] == 'w';
    int fd = open(argv[2], (wr ? O_WRONLY : O_RDONLY) | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    long blocks = atol(argv[3]) * 256L, count = atol(argv[4]);
    unsigned long long x = strtoull(argv[5], 0, 10) | 1;
    void *buf;
    if (posix_memalign(&buf, 4096, 4096)) return 1;
    for (int i = 0; i < 4096; i++) ((unsigned char *)buf)[i] = (unsigned char)(i * 7);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        off_t off = (off_t)(x % blocks) * 4096;
        ssize_t n = wr ? pwrite(fd, buf, 4096, off) : pread(fd, buf, 4096, off);
        if (n != 4096) { perror("io"); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("RIO %ld %lld\n", count, (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
