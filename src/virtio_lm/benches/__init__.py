"""The micro-benchmark groups ``virtio-lm bench`` runs besides the migration figures:
:mod:`.foundation` (chain walks, dirty-logged memory writes, the zero-page scan),
:mod:`.pf` (control commands, dirty collection per tracking mode), :mod:`.devices` (blk
and net VFs against files and raw sockets).  Each has ``main(argv)``; ``python -m
virtio_lm.benches.NAME`` runs one alone.
"""
