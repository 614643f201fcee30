/* UDP sender for the net figures (tests/qemu/net_figures.py): as fast as it can.
 *   ublast IP PORT SIZE OUT
 * Sends SIZE-byte datagrams (16..1472) to IP:PORT back to back, each beginning with
 * {le32 magic "VLMU", le32 flow 0, le64 seq} (what virtio_lm.net.udppeer counts), the rest
 * zero.  Runs until SIGTERM, then writes OUT: "UBLAST sent N errors E ns T" (T: its own
 * sending time, guest clock) and "UBLAST end". */
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }
static uint64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000ull + t.tv_nsec; }

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: ublast ip port size out\n"); return 2; }
    int size = atoi(argv[3]);
    if (size < 16 || size > 1472) { fprintf(stderr, "size 16..1472\n"); return 2; }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    static uint32_t buf[1472 / 4];
    buf[0] = 0x554D4C56u;
    signal(SIGTERM, on_term);
    uint64_t sent = 0, errors = 0, t0 = now_ns();
    while (!stop) {
        buf[2] = (uint32_t)sent;
        buf[3] = (uint32_t)(sent >> 32);
        if (sendto(s, buf, size, 0, (struct sockaddr *)&to, sizeof to) == size) sent++;
        else errors++;
    }
    FILE *f = fopen(argv[4], "w");
    if (!f) return 1;
    fprintf(f, "UBLAST sent %llu errors %llu ns %llu\nUBLAST end\n", (unsigned long long)sent,
            (unsigned long long)errors, (unsigned long long)(now_ns() - t0));
    fclose(f);
    return 0;
}
