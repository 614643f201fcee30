"""The VM's lease: one owner at a time, decided on storage both hosts reach.

A migration's commit is a message, and a message can be lost: after the source
sent COMMIT and heard nothing back it cannot know whether the destination got
it (and runs) or not (and waits, or died).  Neither side may then run the VM on
its own guess -- one guessing wrong makes two.  The lease is the arbiter they
share, as libvirt's lock managers (virtlockd, sanlock) keep one for a disk: a
small file beside the VM's disk image holding the token of the one host that may
run the VM.

* A host that boots the VM :meth:`FileLease.acquire` s it (a fresh token).
* The destination reads the token when the source's HELLO arrives
  (:meth:`owner`) and, before it starts the VM -- on COMMIT, or when an operator
  resolves an unknown outcome -- takes it over **only if that token is still
  there** (:meth:`take`, a compare-and-swap under an exclusive ``flock``).
* The source, whenever it would resume the VM after the migration began (a
  rollback, a resolution), first :meth:`reclaim` s the lease: compare-and-swap
  its own token for a fresh one.  If the destination took it, the source must
  not resume (the VM runs, or ran, there); if the source reclaimed it, the
  destination can never take it (its expected token is gone).

So at most one host ever holds the lease, and each side can find out on its own
which one does: the outcome of a lost COMMIT is whoever gets there first, and it
is the same answer for both.  Sessions get a :class:`Lease` injected (they stay
sans-I/O); :class:`FileLease` is the file behind it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from typing import Protocol, runtime_checkable

__all__ = ["MAX_HOLDER", "RECORD_SIZE", "FileLease", "Lease", "lease_path"]


@runtime_checkable
class Lease(Protocol):
    """What a migration session asks of the VM's lease."""

    def owner(self) -> str:
        """The token of the host that holds the lease now ("" when nobody does)."""
        ...

    def take(self, expected: str) -> bool:
        """Take the lease over if ``expected`` (the source's token, read at HELLO) is
        still its owner -- or it is ours already.  False: someone else holds it."""
        ...

    def reclaim(self) -> bool:
        """Keep the lease if we still hold it, under a fresh token (so a destination
        that read the old one can never take it).  False: another host took it."""
        ...


def lease_path(image: str) -> str:
    """The lease file of a VM whose disk image is ``image`` (beside it, on the same storage)."""
    return image + ".lease"


#: the lease file's size: one line, the token padded with spaces (``RECORD_SIZE - 1`` bytes) and "\n"
RECORD_SIZE = 128
_TOKEN_RANDOM = 8  # bytes of randomness in a token (16 hex digits)
MAX_HOLDER = RECORD_SIZE - 1 - 1 - 2 * _TOKEN_RANDOM


class FileLease:
    """A lease file: one line, the owner's token ``HOLDER/RANDOM`` padded to a fixed size.

    Every change happens under an exclusive ``flock`` of the file and is made
    durable before the lock is let go.  A change overwrites the same
    :data:`RECORD_SIZE` bytes in place and ``fdatasync`` s them: the file's size
    and blocks never change after its first write, so the sync is one data block
    and a cache flush, not a journal commit that waits behind every other file's
    writeback -- it sits on the switch-over's critical path (the destination's
    take on COMMIT).  ``holder`` names this host in the token (for people reading
    the file; only equality matters)."""

    def __init__(self, path: str, holder: str) -> None:
        if "/" in holder or "\n" in holder or not holder.strip() or holder != holder.strip():
            raise ValueError(f"a lease holder name without '/', newlines or outer blanks, not {holder!r}")
        if len(holder.encode()) > MAX_HOLDER:
            raise ValueError(f"a lease holder name of at most {MAX_HOLDER} bytes, not {len(holder.encode())}")
        self.path = path
        self.holder = holder
        self.mine: str | None = None  # the token we wrote last (None: never held it)

    def _fresh(self) -> str:
        return f"{self.holder}/{secrets.token_hex(_TOKEN_RANDOM)}"

    def _cas(self, expected: tuple[str, ...] | None, new: str) -> bool:
        """Under the lock: if the owner is one of ``expected`` (None: whoever), write ``new``."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            if expected is not None and current not in expected:
                return False
            data = new.encode().ljust(RECORD_SIZE - 1) + b"\n"
            if os.fstat(fd).st_size != RECORD_SIZE:  # a new (or foreign) file: sized once, then in place
                os.ftruncate(fd, RECORD_SIZE)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            else:
                os.pwrite(fd, data, 0)
                os.fdatasync(fd)
            self.mine = new
            return True
        finally:
            os.close(fd)  # closing releases the flock

    def acquire(self) -> str:
        """This host boots the VM: the lease is ours, whoever held it (the operator's word)."""
        self._cas(None, self._fresh())
        assert self.mine is not None
        return self.mine

    def owner(self) -> str:
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH)
                return f.read(4096).decode("utf-8", "replace").strip()
        except FileNotFoundError:
            return ""

    @property
    def held(self) -> bool:
        """We hold the lease now."""
        return self.mine is not None and self.owner() == self.mine

    def take(self, expected: str) -> bool:
        if self.mine is not None and self.owner() == self.mine:
            return True
        return self._cas((expected,), self._fresh())

    def reclaim(self) -> bool:
        if self.mine is None:
            return False
        return self._cas((self.mine,), self._fresh())
