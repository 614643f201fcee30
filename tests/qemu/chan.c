/* chan IFNAME [N]: ethtool -L IFNAME combined N through SIOCETHTOOL (the guest has no ethtool).
 * Prints "CHAN max M combined C" after the change (or without one when N is absent). */
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int channels(int s, const char *ifname, struct ethtool_channels *ch, unsigned cmd) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    ch->cmd = cmd;
    ifr.ifr_data = (void *)ch;
    return ioctl(s, SIOCETHTOOL, &ifr);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: chan ifname [combined]\n"); return 2; }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct ethtool_channels ch = {0};
    if (channels(s, argv[1], &ch, ETHTOOL_GCHANNELS)) { perror("ETHTOOL_GCHANNELS"); return 1; }
    if (argc > 2) {
        ch.combined_count = (unsigned)atoi(argv[2]);
        if (channels(s, argv[1], &ch, ETHTOOL_SCHANNELS)) { perror("ETHTOOL_SCHANNELS"); return 1; }
        if (channels(s, argv[1], &ch, ETHTOOL_GCHANNELS)) { perror("ETHTOOL_GCHANNELS"); return 1; }
    }
    printf("CHAN max %u combined %u\n", ch.max_combined, ch.combined_count);
    return 0;
}
