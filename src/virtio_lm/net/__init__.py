"""Network back-ends of the virtio-net VF: an embedded learning L2 switch over
UDP on loopback, its port back-end, a Linux TAP back-end, and an outside peer."""
