"""vfio-user: a host's PF and VFs served to a VMM (QEMU's vfio-user-pci) over UNIX sockets.

* :mod:`.protocol` -- the sans-I/O core: message framing and one function's device;
* :mod:`.server` -- the socket layer (SCM_RIGHTS fds), one socket per function;
* :mod:`.host` -- a PF and its VFs built and served, one socket each.
"""
