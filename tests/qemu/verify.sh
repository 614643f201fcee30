#!/bin/sh
# Verify everything the guest holds: each slot's data in RAM and on disk (O_DIRECT) against its
# checksum.  Prints VLM_VERIFY_OK <slots> or VLM_VERIFY_BAD lines.
touch /tmp/pause
if [ -e /tmp/iter ]; then while [ ! -e /tmp/paused ]; do sleep 0.05; done; fi
bad=0; k=0
for n in 0 1 2 3 4 5 6 7; do
    [ -e /tmp/s$n ] || continue
    k=$((k + 1))
    want=$(cat /tmp/s$n)
    mem=$(sha256sum < /tmp/b$n | cut -c1-64)
    disk=$(dd if=/dev/vda bs=64k skip=$((512 + n * 4)) count=4 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)
    [ "$mem" = "$want" ] || { echo "VLM_VERIFY_BAD slot $n ram"; bad=1; }
    [ "$disk" = "$want" ] || { echo "VLM_VERIFY_BAD slot $n disk"; bad=1; }
done
rm -f /tmp/pause
[ $bad = 0 ] && echo "VLM_VERIFY_OK $k"
