"""vhost-user-net: the :class:`~virtio_lm.devices.net.NetDevice` model behind the vhost-user transport.

QEMU's ``-netdev vhost-user,chardev=...,queues=N`` with ``-device virtio-net-pci,mq=on``
hands the back-end the data queues only: receiveq/transmitq pairs 0..N-1 as rings
0..2N-1 (QEMU keeps the control queue, the configuration space and the MAC filter
for itself; one vhost device per pair, all on one connection).  What that changes
against the device model driven through its own control queue:

* GET_QUEUE_NUM answers the queue *pairs* (QEMU compares it with ``queues=``);
* the pairs in use are the ones whose two rings run: QEMU turns a VQ_PAIRS_SET
  from the guest into SET_VRING_ENABLE on the pairs' rings, and the device's
  receive steering spreads over exactly those pairs
  (:meth:`~virtio_lm.devices.net.NetDevice.set_active_pairs`);
* the announce after a migration: without VIRTIO_NET_F_GUEST_ANNOUNCE QEMU sends
  SEND_RARP with the guest's MAC (VHOST_USER_PROTOCOL_F_RARP), and the device puts
  the RARP announce on its back-end (the switch learns the new port from it).
  With ``guest_announce=True`` the feature is offered and QEMU has the guest
  announce itself instead (gratuitous ARP through the transmit queue).
"""

from __future__ import annotations

from virtio_lm.devices.net import NetDevice
from virtio_lm.vhost.backend import BACKEND_PROTOCOL_FEATURES, RingState, VhostUserBackend
from virtio_lm.wire.features import bit
from virtio_lm.wire.vhost_user import ProtocolFeature

__all__ = ["NET_PROTOCOL_FEATURES", "VhostUserNetBackend"]

#: the blk set without CONFIG (QEMU's virtio-net owns the configuration space, and QEMU 7.2
#: crashes when a net back-end offers it), plus RARP
#: (no INFLIGHT_SHMFD either: a frame is not a request to execute again)
NET_PROTOCOL_FEATURES = (
    BACKEND_PROTOCOL_FEATURES & ~bit(ProtocolFeature.CONFIG) & ~bit(ProtocolFeature.INFLIGHT_SHMFD)
) | bit(ProtocolFeature.RARP)


class VhostUserNetBackend(VhostUserBackend):
    """One front-end connection to a :class:`NetDevice` (see the module docstring)."""

    protocol_offer = NET_PROTOCOL_FEATURES

    def __init__(self, device: NetDevice, *, name: str = "vhost-net", log_writes: bool = True) -> None:
        super().__init__(device, name=name, log_writes=log_writes, rings=2 * device.max_pairs)
        self.net = device
        self.rarps = 0

    def queue_num(self) -> int:
        return self.net.max_pairs

    def send_rarp(self, mac: bytes) -> None:
        self.rarps += 1
        self.net.send_rarp(mac)

    def rings_changed(self) -> None:
        pairs = 0
        for i in range(self.net.max_pairs):
            rx, tx = self.fn.rings[2 * i], self.fn.rings[2 * i + 1]
            if all(r.state is RingState.STARTED and r.enabled for r in (rx, tx)):
                pairs = i + 1
            else:
                break
        self.net.set_active_pairs(max(1, pairs))
