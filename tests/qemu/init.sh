#!/bin/busybox sh
# Guest init for the vhost-user tests: busybox, the virtio modules, then a shell on the console
# that the host drives line by line (tests/qemu/guest.py Vm.sh).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko || echo "VLM_INSMOD_FAIL $m"
done
# the disk may take a while on a busy host: wait for it and for its size (the node can appear
# before the capacity is read); the host bounds the boot by its own deadline
while [ ! -b /dev/vda ] || [ "$(cat /sys/block/vda/size 2>/dev/null || echo 0)" = 0 ]; do sleep 0.1; done
stty -echo 2>/dev/null
echo "VLM_READY $(cat /sys/block/vda/size 2>/dev/null)"
export PS1=''
exec sh
