"""The generic v1 control queue's format, above the bytes (``wire.ctrl``) and below every
device that has such a queue: the sans-I/O dispatcher (:mod:`.dispatch`) that the PF's
control queue (class 128, VF migration) and the net device's (classes 0..4) both use."""
