"""vhost-user back-end: serve a virtio-lm device model to a real front-end (QEMU).

* :mod:`virtio_lm.vhost.memmap`   -- guest regions mapped from fds (GPA and user-address
  translation), the dirty log map;
* :mod:`virtio_lm.vhost.protocol` -- sans-I/O framing and per-request payload rules;
* :mod:`virtio_lm.vhost.backend`  -- the transport a QueueDevice binds to and the
  message handler (ring table, dirty logging through the push tracker);
* :mod:`virtio_lm.vhost.server`   -- the UNIX socket server (SCM_RIGHTS, eventfd kicks).
"""
