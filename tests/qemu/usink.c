/* UDP receiver for the net figures' guest-receive direction (tests/qemu/net_figures.py).
 *   usink PORT OUT
 * Binds local UDP port PORT (4 MiB receive buffer, forced: the guest runs as root), writes
 * OUT.ready once bound, then counts the datagrams that begin with {le32 magic "VLMU"} (what
 * tests/qemu/hostblast.py sends) until SIGTERM, then those already queued on its socket, and
 * writes OUT: "USINK rx N other M bytes B" (B: payload bytes of the counted ones) and
 * "USINK end". */
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define MAGIC 0x554D4C56u

static volatile sig_atomic_t stop;
static void on_term(int s) { (void)s; stop = 1; }

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: usink port out\n"); return 2; }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    int rcvbuf = 4 << 20;
    if (setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        setsockopt(s, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in at = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (bind(s, (struct sockaddr *)&at, sizeof at) != 0) { perror("bind"); return 1; }
    /* no SA_RESTART: SIGTERM must end a recv that is waiting */
    struct sigaction sa = {0};
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    char ready[256];
    snprintf(ready, sizeof ready, "%s.ready", argv[2]);
    FILE *r = fopen(ready, "w");
    if (!r) return 1;
    fclose(r);
    static unsigned char buf[65536];
    uint64_t rx = 0, other = 0, bytes = 0;
    for (int draining = 0;;) {
        if (stop) draining = 1;
        ssize_t n = recv(s, buf, sizeof buf, draining ? MSG_DONTWAIT : 0);
        if (n < 0) {
            if (draining) break; /* EAGAIN: the socket is empty */
            continue;            /* EINTR: the SIGTERM; drain what is queued */
        }
        uint32_t m;
        if (n >= 4 && (memcpy(&m, buf, 4), m == MAGIC)) { rx++; bytes += (uint64_t)n; }
        else other++;
    }
    FILE *f = fopen(argv[2], "w");
    if (!f) return 1;
    fprintf(f, "USINK rx %llu other %llu bytes %llu\nUSINK end\n", (unsigned long long)rx,
            (unsigned long long)other, (unsigned long long)bytes);
    fclose(f);
    return 0;
}
