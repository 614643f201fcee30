#!/bin/sh
# Verifying read/write loop: 8 slots of 256 KiB at 32 MiB of /dev/vda.  Each round writes fresh
# random data to one slot (O_DIRECT), reads it back (O_DIRECT) and compares checksums; the data
# and its checksum stay in guest RAM (/tmp) for the post-migration verification (verify.sh).
i=0
while [ ! -e /tmp/stop ]; do
    if [ -e /tmp/pause ]; then touch /tmp/paused; sleep 0.05; continue; fi
    rm -f /tmp/paused
    n=$((i % 8))
    dd if=/dev/urandom of=/tmp/b$n.new bs=64k count=4 2>/dev/null
    sha256sum < /tmp/b$n.new | cut -c1-64 > /tmp/s$n.new
    dd if=/tmp/b$n.new of=/dev/vda bs=64k seek=$((512 + n * 4)) oflag=direct conv=notrunc 2>/dev/null
    mv /tmp/b$n.new /tmp/b$n; mv /tmp/s$n.new /tmp/s$n
    got=$(dd if=/dev/vda bs=64k skip=$((512 + n * 4)) count=4 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)
    [ "$got" = "$(cat /tmp/s$n)" ] || echo "VLM_LOOP_FAIL round $i slot $n"
    i=$((i + 1))
    echo $i > /tmp/iter.new && mv /tmp/iter.new /tmp/iter  # a reader never sees it half-written
done
echo "VLM_LOOP_STOPPED $i"
