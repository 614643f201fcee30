"""Live migration: the pre-copy engine.

* :mod:`.endpoint`  -- the protocols the sessions drive (the VM and its VFs on each side)
* :mod:`.policy`    -- estimators and decisions (switch-over, auto-converge, give up, max-bandwidth)
* :mod:`.session`   -- sans-I/O :class:`SourceSession` / :class:`DestSession` and their transition tables
* :mod:`.transport` -- the thin socket / file layer around the sessions (threads, timeouts)
* :mod:`.analyze`   -- decode a saved stream into a summary (``virtio-lm analyze-stream``)

The stream format itself is :mod:`virtio_lm.wire.stream` (``docs/stream.md``).
"""

from virtio_lm.migration.endpoint import DestEndpoint, SourceEndpoint, VfImage
from virtio_lm.migration.policy import Decision, MigrationParams, Policy, RoundReport, TokenBucket
from virtio_lm.migration.session import (
    DestSession,
    MigrationEvent,
    PassEvent,
    SourceSession,
    ThrottleEvent,
    VmStateEvent,
)

__all__ = [
    "Decision",
    "DestEndpoint",
    "DestSession",
    "MigrationEvent",
    "MigrationParams",
    "PassEvent",
    "Policy",
    "RoundReport",
    "SourceEndpoint",
    "SourceSession",
    "ThrottleEvent",
    "TokenBucket",
    "VfImage",
    "VmStateEvent",
]
