"""A virtio-lm host process: its PF, the VMs placed on it, and its QMP monitor.

``host.qmp`` is the monitor: QEMU's QMP wire protocol on a unix or TCP socket
(:class:`~virtio_lm.host.qmp.CommandTable`, :class:`~virtio_lm.host.qmp.QmpConnection`,
:class:`~virtio_lm.host.qmp.QmpServer`).
"""
