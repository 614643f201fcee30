#!/bin/busybox sh
# Guest init for the vhost-user tests: busybox, the virtio modules, then a shell on the console
# that the host drives line by line (tests/qemu/guest.py Vm.sh).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net; do
    insmod /lib/modules/$m.ko || echo "VLM_INSMOD_FAIL $m"
done
if grep -q vlm_nodisk /proc/cmdline; then
    # a guest with a NIC and no disk: wait for eth0 (the host bounds the boot by its own deadline)
    while [ ! -e /sys/class/net/eth0 ]; do sleep 0.1; done
    stty -echo 2>/dev/null
    echo "VLM_READY"
else
    # the disk may take a while on a busy host: wait for it and for its size (the node can appear
    # before the capacity is read); the host bounds the boot by its own deadline
    while [ ! -b /dev/vda ] || [ "$(cat /sys/block/vda/size 2>/dev/null || echo 0)" = 0 ]; do sleep 0.1; done
    stty -echo 2>/dev/null
    echo "VLM_READY $(cat /sys/block/vda/size 2>/dev/null)"
fi
export PS1=''
exec sh
