#!/bin/busybox sh
# Guest init for the vfio-user tests: busybox, the virtio modules (blk and net), then a shell on
# the console that the host drives line by line (tests/qemu/vfio.py).  Nothing here waits: the
# host polls for the devices with its own deadline.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net; do
    [ -e /lib/modules/$m.ko ] || continue   # built into this kernel
    insmod /lib/modules/$m.ko || echo "VLM_INSMOD_FAIL $m"
done
stty -echo 2>/dev/null
echo "VLM_READY"
export PS1=''
exec sh
