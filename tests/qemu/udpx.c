/* UDP test traffic with a peer, for the vhost-user-net tests.
 *   udpx PEER_IP PORT RATE FLOWS OUT
 * Sends RATE datagrams a second to PEER_IP:PORT, from FLOWS sockets (local ports 40000..),
 * each carrying {le32 magic "VLMU", le32 flow, le64 seq} with seq 0, 1, 2, ... across flows,
 * and receives the peer's datagrams of the same form on local port PORT.  Runs until SIGTERM,
 * then writes OUT: "UDPX sent N errors E" and "UDPX rx COUNT dup D runs A-B,C-D,..."
 * (the sequence numbers received from the peer as runs).  A tick missed while the guest
 * was stopped is not made up: after a pause sending resumes at RATE, not in a burst. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x554D4C56u
#define MAXSEQ (1u << 20)
#define MAXFLOWS 16

static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }
static uint64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000ull + t.tv_nsec; }

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: udpx peer_ip port rate flows out\n"); return 2; }
    int port = atoi(argv[2]), flows = atoi(argv[4]);
    double rate = atof(argv[3]);
    if (flows < 1 || flows > MAXFLOWS || rate <= 0) return 2;
    struct sockaddr_in peer = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, argv[1], &peer.sin_addr);
    int tx[MAXFLOWS];
    for (int i = 0; i < flows; i++) {
        tx[i] = socket(AF_INET, SOCK_DGRAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(40000 + i)};
        if (bind(tx[i], (struct sockaddr *)&a, sizeof a)) { perror("bind tx"); return 1; }
    }
    int rx = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in ra = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(rx, (struct sockaddr *)&ra, sizeof ra)) { perror("bind rx"); return 1; }
    unsigned char *seen = calloc(MAXSEQ, 1);
    signal(SIGTERM, on_term);
    uint64_t period = (uint64_t)(1e9 / rate), next = now_ns(), sent = 0, errors = 0, dup = 0, rxn = 0;
    while (!stop) {
        uint64_t t = now_ns();
        if (t >= next) {
            uint32_t buf[4] = {MAGIC, (uint32_t)(sent % flows), (uint32_t)sent, (uint32_t)(sent >> 32)};
            if (sendto(tx[sent % flows], buf, sizeof buf, 0, (struct sockaddr *)&peer, sizeof peer) == sizeof buf)
                sent++;
            else
                errors++;
            next += period;
            if (t > next + period) next = t + period; /* a pause (migration): no burst */
            continue;
        }
        struct pollfd p = {.fd = rx, .events = POLLIN};
        int ms = (int)((next - t) / 1000000) + 1;
        if (poll(&p, 1, ms) > 0) {
            uint32_t b[8];
            ssize_t n = recv(rx, b, sizeof b, MSG_DONTWAIT);
            if (n >= 16 && b[0] == MAGIC) {
                uint64_t s = b[2] | ((uint64_t)b[3] << 32);
                if (s < MAXSEQ) { if (seen[s]) dup++; else seen[s] = 1; rxn++; }
            }
        }
    }
    FILE *f = fopen(argv[5], "w");
    if (!f) return 1;
    fprintf(f, "UDPX sent %llu errors %llu\nUDPX rx %llu dup %llu runs ", (unsigned long long)sent,
            (unsigned long long)errors, (unsigned long long)rxn, (unsigned long long)dup);
    int first = 1;
    for (uint64_t s = 0; s < MAXSEQ; s++) {
        if (!seen[s]) continue;
        uint64_t e = s;
        while (e + 1 < MAXSEQ && seen[e + 1]) e++;
        fprintf(f, "%s%llu-%llu", first ? "" : ",", (unsigned long long)s, (unsigned long long)e);
        first = 0;
        s = e;
    }
    fprintf(f, "\nUDPX end\n");
    fclose(f);
    return 0;
}
