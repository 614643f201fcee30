/* Write-and-verify for the back-end restart test: wver DEV FIRST_BLOCK NBLOCKS ROUNDS CPU
 * (runs on CPU: blk-mq then submits on that CPU's queue; busybox's taskset is not used, a
 * background "taskset ... &" ended the guest's shell) */
/*
 * Round g = 1..ROUNDS writes every 4 KiB block FIRST..FIRST+NBLOCKS-1 (O_DIRECT, one at a time)
 * with {le32 magic "VLMW", le32 block, le32 round, then bytes (block * 31 + round * 7 + i)};
 * then reads every block back and checks it holds the last round.  A lost write leaves an
 * older round or zeros, a write executed again after a newer one leaves an older round.
 * Prints "WVER progress G" after each round, then "WVER ok N" or "WVER bad ..." / "WVER ioerr ...". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BS 4096
#define MAGIC 0x574D4C56u

static void fill(unsigned char *b, uint32_t blk, uint32_t g) {
    uint32_t h[3] = {MAGIC, blk, g};
    memcpy(b, h, sizeof h);
    for (int i = 12; i < BS; i++) b[i] = (unsigned char)(blk * 31 + g * 7 + i);
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: wver dev first nblocks rounds cpu\n"); return 2; }
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(atoi(argv[5]), &set);
    if (sched_setaffinity(0, sizeof set, &set)) { perror("sched_setaffinity"); return 1; }
    long first = atol(argv[2]), n = atol(argv[3]), rounds = atol(argv[4]);
    int fd = open(argv[1], O_RDWR | O_DIRECT);
    if (fd < 0) { perror("open"); return 1; }
    unsigned char *b, *want;
    if (posix_memalign((void **)&b, BS, BS) || posix_memalign((void **)&want, BS, BS)) return 1;
    for (long g = 1; g <= rounds; g++) {
        for (long i = 0; i < n; i++) {
            fill(b, (uint32_t)(first + i), (uint32_t)g);
            if (pwrite(fd, b, BS, (first + i) * BS) != BS) { printf("WVER ioerr write block %ld round %ld\n", first + i, g); return 1; }
        }
        printf("WVER progress %ld\n", g);
        fflush(stdout);
    }
    for (long i = 0; i < n; i++) {
        if (pread(fd, b, BS, (first + i) * BS) != BS) { printf("WVER ioerr read block %ld\n", first + i); return 1; }
        fill(want, (uint32_t)(first + i), (uint32_t)rounds);
        if (memcmp(b, want, BS)) {
            uint32_t h[3];
            memcpy(h, b, sizeof h);
            printf("WVER bad block %ld holds magic %08x block %u round %u\n", first + i, h[0], h[1], h[2]);
            return 1;
        }
    }
    printf("WVER ok %ld\n", n);
    return 0;
}
