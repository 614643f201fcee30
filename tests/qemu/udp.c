/* UDP exchange for the vfio-user net test: udp IP PORT COUNT [WAIT_S] -> sends COUNT datagrams
 * "vlm-udp <i>" to IP:PORT one at a time.  After each it reads until that datagram's own echo
 * comes back or WAIT_S seconds (default 10) pass without it; an echo of an earlier datagram that
 * comes late (after its wait ended) is skipped and counted, so one slow echo on a busy host does
 * not make every later read see the previous echo.  Prints "UDP-LATE <late>" and then
 * "UDP <sent> <echoed>", where echoed counts replies equal to what was sent, each in its wait.
 * The host bounds the whole run with its own deadline. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) { fprintf(stderr, "usage: udp ip port count [wait_s]\n"); return 2; }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    double wait_s = argc == 5 ? atof(argv[4]) : 10.0;
    struct timeval tv = {0, 200000};  /* how often a read gives up to look at the clock */
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in to = {0};
    to.sin_family = AF_INET;
    to.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    int count = atoi(argv[3]), sent = 0, echoed = 0, late = 0;
    char out[64], in[256];
    for (int i = 0; i < count; i++) {
        int n = snprintf(out, sizeof out, "vlm-udp %d", i);
        if (sendto(s, out, n, 0, (struct sockaddr *)&to, sizeof to) == n) sent++;
        double deadline = now() + wait_s;
        while (now() < deadline) {
            ssize_t r = recv(s, in, sizeof in, 0);
            if (r < 0) continue;  /* the read's own timeout: look at the clock again */
            if (r == n && memcmp(in, out, n) == 0) { echoed++; break; }
            late++;  /* an earlier datagram's echo, or anything else: not this one's */
        }
    }
    printf("UDP-LATE %d\nUDP %d %d\n", late, sent, echoed);
    return 0;
}
