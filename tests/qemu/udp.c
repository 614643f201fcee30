/* UDP exchange for the vfio-user net test: udp IP PORT COUNT -> sends COUNT datagrams
 * "vlm-udp <i>" to IP:PORT, each followed by one receive with a 1 s timeout, and prints
 * "UDP <sent> <echoed>" where echoed counts replies equal to what was sent. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: udp ip port count\n"); return 2; }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct timeval tv = {1, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in to = {0};
    to.sin_family = AF_INET;
    to.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &to.sin_addr) != 1) { fprintf(stderr, "bad ip\n"); return 2; }
    int count = atoi(argv[3]), sent = 0, echoed = 0;
    char out[64], in[256];
    for (int i = 0; i < count; i++) {
        int n = snprintf(out, sizeof out, "vlm-udp %d", i);
        if (sendto(s, out, n, 0, (struct sockaddr *)&to, sizeof to) == n) sent++;
        ssize_t r = recv(s, in, sizeof in, 0);
        if (r == n && memcmp(in, out, n) == 0) echoed++;
    }
    printf("UDP %d %d\n", sent, echoed);
    return 0;
}
