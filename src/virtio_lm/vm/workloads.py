"""Guest workloads that verify their VFs: a block workload and a network workload.

Both are guest software: they run on the guest drivers, keep what they must
remember in guest memory or in their exportable state, and migrate with the
VM.  Each runs on a thread of its own (like a vCPU) and parks at a step
boundary when the VM pauses, leaving its requests in flight on the device.

**Block** (:class:`BlkWorkload`).  Blocks of 4 KiB carry a stamp
(lba, generation, CRC-32; :class:`~virtio_lm.wire.guest.BlockStamp`).  The guest
keeps, in guest memory, the expected generation of every block and a page
cache: one 4 KiB slot (one page) per block plus a "valid" byte.  Only the
device ever writes a slot: a read DMAs the block into it, and on completion
the slot must hold exactly the expected generation and is marked valid.  A
write sends generation ``g + 1`` from a buffer of its own and, on
completion, makes ``g + 1`` the expected generation and marks the slot
stale.  So after a migration every valid slot must match its block's
expected generation *in guest memory*: the slot's page is dirtied by device
DMA alone, and if dirty tracking missed that write the destination holds an
older generation (or zeros), which :meth:`BlkWorkload.verify_cache` names.
Reading every block back through the VF then checks the disk.

**Network** (:class:`NetWorkload`).  The VM sends sequence-numbered frames to
a peer outside the VM at a fixed rate and records the sequence numbers it
receives from the peer; the peer does the same.  Comparing the two sides
after a migration gives loss, duplicates and reordering.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from virtio_lm.drivers.blk_driver import BlkDriver
from virtio_lm.drivers.net_driver import NetDriver
from virtio_lm.errors import GuestStateError, VirtioLmError
from virtio_lm.memory import Memory
from virtio_lm.net.peer import parse_seq, seq_frame
from virtio_lm.vm.worker import GuestThread
from virtio_lm.wire.blk import BlkReqType
from virtio_lm.wire.guest import BLOCK_MAGIC, BLOCK_SIZE, BlockStamp

SECTORS_PER_BLOCK = BLOCK_SIZE // 512
_GOLDEN = 0x9E3779B97F4A7C15
_U64 = (1 << 64) - 1


def block_content(lba: int, generation: int) -> bytes:
    """The 4 KiB a block holds at ``generation`` (all zero for generation 0)."""
    if generation == 0:
        return bytes(BLOCK_SIZE)
    word = ((lba + 1) * _GOLDEN ^ generation * 0xD6E8FEB86659FD93) & _U64
    body = np.full((BLOCK_SIZE - BlockStamp.SIZE) // 8, word, dtype="<u8")
    body ^= np.arange(len(body), dtype="<u8")
    raw = body.tobytes()
    return BlockStamp(BLOCK_MAGIC, lba, generation, zlib.crc32(raw)).encode() + raw


def describe_block(data: bytes, lba: int) -> str:
    """What a block's bytes look like, for error messages."""
    if data == bytes(len(data)):
        return "all zero"
    try:
        st = BlockStamp.unpack_from(data, 0)
    except VirtioLmError:
        return "garbage"
    if st.magic != BLOCK_MAGIC:
        return "garbage (no stamp)"
    ok = zlib.crc32(data[BlockStamp.SIZE :]) == st.crc32
    return f"lba {st.lba} generation {st.generation}{'' if ok else ' with a bad checksum'}"


class Lcg:
    """A tiny seeded generator whose whole state is one int (it migrates)."""

    def __init__(self, state: int) -> None:
        self.state = state & _U64

    def next(self) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & _U64
        return self.state >> 33


@dataclass(frozen=True)
class BlkWorkloadState:
    """A :class:`BlkWorkload`'s state outside guest memory (its page cache and expected
    generations are guest memory)."""

    nblocks: int
    meta_addr: int
    cache_addr: int
    qd: int
    write_percent: int
    rate: float
    rng: int
    inflight: tuple[tuple[int, str, int, int], ...]  # (token, "r" | "w", lba, generation), by token
    stats: dict[str, int]  # writes, reads, errors
    errors: tuple[str, ...]


MAX_ERRORS = 50
REAP_BATCH = 4  # completions checked between two looks for a pause


class BlkWorkload(GuestThread):
    """The verifying block workload; see the module docstring."""

    name = "guest-blk"

    def __init__(
        self,
        driver: BlkDriver,
        memory: Memory,
        *,
        meta_addr: int,
        cache_addr: int,
        nblocks: int,
        qd: int = 16,
        write_percent: int = 60,
        seed: int = 1,
        rate: float = 0.0,
    ) -> None:
        super().__init__()
        if nblocks * SECTORS_PER_BLOCK > driver.capacity:
            raise ValueError(f"{nblocks} blocks do not fit a disk of {driver.capacity} sectors")
        self.driver = driver
        self.memory = memory
        self.meta_addr = meta_addr
        self.cache_addr = cache_addr
        self.nblocks = nblocks
        self.qd = qd
        self.write_percent = write_percent
        self.rate = rate  # requests per second, 0 = as fast as the device goes
        self.rng = Lcg(seed)
        self.inflight: dict[int, tuple[str, int, int]] = {}  # token -> (op, lba, generation)
        self.busy: set[int] = set()
        self.stats = {"writes": 0, "reads": 0, "errors": 0}
        self.errors: list[str] = []  # at most MAX_ERRORS
        self._next_at = 0.0
        self._check_first = False
        self.arrival_problems: list[str] = []  # what the first step after a migration found

    # ------------------------------------------------------------------ guest memory views
    def _gen_addr(self, lba: int) -> int:
        return self.meta_addr + 4 * lba

    def _valid_addr(self, lba: int) -> int:
        return self.meta_addr + 4 * self.nblocks + lba

    def _slot(self, lba: int) -> int:
        return self.cache_addr + lba * BLOCK_SIZE

    def generations(self) -> np.ndarray:
        return self.memory.array[self.meta_addr : self.meta_addr + 4 * self.nblocks].view("<u4").copy()

    def valid(self) -> np.ndarray:
        a = self.meta_addr + 4 * self.nblocks
        return self.memory.array[a : a + self.nblocks].copy()

    def _set_gen(self, lba: int, gen: int) -> None:
        self.memory.cpu.write(self._gen_addr(lba), int(gen).to_bytes(4, "little"))

    def _set_valid(self, lba: int, v: int) -> None:
        self.memory.cpu.write(self._valid_addr(lba), bytes([v]))

    def _fail(self, msg: str) -> None:
        self.stats["errors"] += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)

    # ------------------------------------------------------------------ the loop
    def step(self) -> bool:
        """Reap and check completions, then submit up to the queue depth -- in small batches,
        looking for a pause between them: a vCPU stops at an instruction boundary, not after
        a whole queue's worth of checks (a pause waits for the step it meets).  A pause never
        finds the queue empty, though: with nothing in flight one request is submitted first, so
        the workload parks with I/O in flight (a stress trial once paused it right after it had
        reaped all 16 of its requests)."""
        did = False
        while True:
            n = self._reap(REAP_BATCH)
            did = did or n > 0
            if n < REAP_BATCH or self._pausing.is_set():
                break
        now = time.monotonic()
        while (len(self.inflight) < self.qd and len(self.busy) < self.nblocks
               and (not self._pausing.is_set() or not self.inflight)):  # fmt: skip
            if self.rate > 0:
                if now < self._next_at:
                    break
                self._next_at = max(self._next_at, now) + 1.0 / self.rate
            self._submit_one()
            did = True
        return did

    def check_cache_first(self) -> None:
        """The VM arrived by migration: the next step checks the page cache as received
        (:meth:`verify_cache`) before any request -- the next read of a block would
        overwrite the evidence -- and keeps what it finds in :attr:`arrival_problems`."""
        self._check_first = True

    def arrival_check(self) -> list[str]:
        """What the arrival check found; run now if the workload has not stepped since (it
        must be paused then)."""
        if self._check_first:
            self._check_first = False
            self.arrival_problems += self.verify_cache()
        return self.arrival_problems

    def _tick(self) -> bool:
        if self._check_first:
            self.arrival_check()
        return self.step()

    def _pace(self, did: bool, busy: float) -> None:
        if not did:
            self._idle()

    def _idle(self) -> None:
        self.driver.wait_interrupt(0.002)

    def _wake(self) -> None:
        self.driver.wake()  # a pause must not wait out the 2 ms idle wait

    def _pick(self) -> int:
        while True:
            lba = self.rng.next() % self.nblocks
            if lba not in self.busy:
                return lba

    def _submit_one(self) -> None:
        lba = self._pick()
        gen = int(self.generations()[lba])
        if self.rng.next() % 100 < self.write_percent:
            new = gen + 1
            token = self.driver.submit(BlkReqType.OUT, lba * SECTORS_PER_BLOCK, data=block_content(lba, new))
            self.inflight[token] = ("w", lba, new)
        else:
            self._set_valid(lba, 0)
            token = self.driver.submit(BlkReqType.IN, lba * SECTORS_PER_BLOCK, read_len=BLOCK_SIZE, buf=self._slot(lba))
            self.inflight[token] = ("r", lba, gen)
        self.busy.add(lba)

    def _reap(self, limit: int | None = None) -> int:
        done = self.driver.reap(limit)
        for c in done:
            rec = self.inflight.pop(c.token, None)
            if rec is None:
                self._fail(f"completion for token {c.token} that the workload never submitted")
                continue
            op, lba, gen = rec
            self.busy.discard(lba)
            if not c.ok:
                self._fail(f"{'write' if op == 'w' else 'read'} of block {lba} failed with status {c.status}")
                continue
            if op == "w":
                self._set_gen(lba, gen)
                self._set_valid(lba, 0)  # the slot holds an older generation now
                self.stats["writes"] += 1
            else:
                got = self.memory.read(self._slot(lba), BLOCK_SIZE)
                if got != block_content(lba, gen):
                    self._fail(f"read of block {lba} returned {describe_block(got, lba)}, expected generation {gen}")
                else:
                    self._set_valid(lba, 1)
                self.stats["reads"] += 1
        return len(done)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for every request in flight (the workload thread must be paused)."""
        deadline = time.monotonic() + timeout
        while self.inflight:
            self._reap()
            if time.monotonic() > deadline:
                raise VirtioLmError(f"{len(self.inflight)} block requests still in flight after {timeout}s")
            self._idle()

    # ------------------------------------------------------------------ verification
    def verify_cache(self) -> list[str]:
        """Every valid page-cache slot holds its block's expected generation (guest memory only)."""
        problems = []
        gens, valid = self.generations(), self.valid()
        for lba in np.flatnonzero(valid):
            lba = int(lba)
            got = self.memory.read(self._slot(lba), BLOCK_SIZE)
            if got != block_content(lba, int(gens[lba])):
                problems.append(
                    f"page cache slot of block {lba} holds {describe_block(got, lba)}, "
                    f"expected generation {int(gens[lba])}"
                )
        return problems

    def verify_disk(self) -> list[str]:
        """Read every block back through the VF and compare with the expected generations."""
        problems = []
        gens = self.generations()
        for lba in range(self.nblocks):
            got = self.driver.read(lba * SECTORS_PER_BLOCK, SECTORS_PER_BLOCK)
            if got != block_content(lba, int(gens[lba])):
                problems.append(f"disk block {lba} holds {describe_block(got, lba)}, expected generation {int(gens[lba])}")
        return problems

    # ------------------------------------------------------------------ migration of the guest
    def save(self) -> BlkWorkloadState:
        return BlkWorkloadState(
            self.nblocks, self.meta_addr, self.cache_addr, self.qd, self.write_percent, self.rate, self.rng.state,
            tuple((t, op, lba, gen) for t, (op, lba, gen) in sorted(self.inflight.items())),
            dict(self.stats), tuple(self.errors),
        )

    @classmethod
    def from_state(cls, st: BlkWorkloadState, *, driver: BlkDriver, memory: Memory, path: str = "blk.work") -> "BlkWorkload":
        """The workload continuing ``st`` over ``driver`` (already restored): its requests in
        flight are exactly the driver's outstanding ones, one per block, each a read or a
        write of a block of its disk; the rest in range."""
        fail = GuestStateError
        if st.nblocks < 1 or st.nblocks * SECTORS_PER_BLOCK > driver.capacity:
            raise fail(f"{path}.nblocks", f"{st.nblocks} blocks do not fit a disk of {driver.capacity} sectors")
        if not 1 <= st.qd <= 1 << 16:
            raise fail(f"{path}.qd", f"{st.qd} is outside 1..65536")
        if not 0 <= st.write_percent <= 100:
            raise fail(f"{path}.write_percent", f"{st.write_percent} is outside 0..100")
        if not (math.isfinite(st.rate) and st.rate >= 0):
            raise fail(f"{path}.rate", f"{st.rate} is not a rate (finite, >= 0)")
        if not 0 <= st.rng <= _U64:
            raise fail(f"{path}.rng", f"{st.rng} is outside 0..2**64-1")
        if set(st.stats) != {"writes", "reads", "errors"} or any(not 0 <= v for v in st.stats.values()):
            raise fail(f"{path}.stats", "expected writes, reads and errors, each >= 0")
        if len(st.errors) > MAX_ERRORS:
            raise fail(f"{path}.errors", f"{len(st.errors)} errors kept (at most {MAX_ERRORS})")
        w = cls(driver, memory, meta_addr=st.meta_addr, cache_addr=st.cache_addr, nblocks=st.nblocks, qd=st.qd,
                write_percent=st.write_percent, rate=st.rate)
        w.rng = Lcg(st.rng)
        for i, (t, op, lba, gen) in enumerate(st.inflight):
            p = f"{path}.inflight[{i}]"
            if op not in ("r", "w"):
                raise fail(p, f"operation {op!r} is neither 'r' nor 'w'")
            if not 0 <= lba < st.nblocks:
                raise fail(p, f"block {lba} is outside 0..{st.nblocks - 1}")
            if lba in w.busy or t in w.inflight:
                raise fail(p, f"block {lba} or token {t} in flight twice")
            if not 0 <= gen <= 0xFFFF_FFFF:
                raise fail(p, f"generation {gen} is outside 0..2**32-1")
            w.inflight[t] = (op, lba, gen)
            w.busy.add(lba)
        if set(w.inflight) != driver.outstanding():
            raise fail(f"{path}.inflight", f"tokens {sorted(w.inflight)} are not the driver's outstanding "
                                           f"{sorted(driver.outstanding())}")
        w.stats = dict(st.stats)
        w.errors = list(st.errors)
        return w


class NetWorkload(GuestThread):
    """Sequence-numbered frames to and from a peer outside the VM."""

    name = "guest-net"

    def __init__(self, driver: NetDriver, *, mac: bytes, peer_mac: bytes, rate: float = 200.0, stream: int = 2) -> None:
        super().__init__()
        self.driver = driver
        self.mac = bytes(mac)
        self.peer_mac = bytes(peer_mac)
        self.rate = rate
        self.stream = stream
        self.next_seq = 0
        # the peer's sequence numbers in arrival order, run-length coded: [first, count] runs
        # of consecutive numbers (a VM that runs for hours keeps a few runs, not millions of
        # numbers -- this list is part of the guest state every switch-over encodes)
        self._runs: list[list[int]] = []
        self.other_frames = 0
        self._next_at = 0.0

    def _tick(self) -> bool:
        return self.step()

    def step(self) -> bool:
        did = False
        self.driver.poll()  # announce after migration
        for _pair, frame in self.driver.receive():
            did = True
            p = parse_seq(frame)
            if p is not None and p[1] == self.peer_mac:
                self._got(p[3])
            else:
                self.other_frames += 1
        self.driver.reap_tx()
        now = time.monotonic()
        if self.rate > 0 and now >= self._next_at:
            self._next_at = max(self._next_at, now - 0.1) + 1.0 / self.rate
            try:
                self.driver.send(seq_frame(self.peer_mac, self.mac, self.stream, self.next_seq))
                self.next_seq += 1
                did = True
            except VirtioLmError:
                pass  # transmit ring full: try again on the next step
        return did

    def _got(self, seq: int) -> None:
        runs = self._runs
        if runs and runs[-1][0] + runs[-1][1] == seq:
            runs[-1][1] += 1
        else:
            runs.append([seq, 1])

    def received_runs(self) -> list[list[int]]:
        """The peer's sequence numbers in arrival order, as ``[first, count]`` runs."""
        return [list(r) for r in self._runs]

    def stats(self) -> dict[str, Any]:
        runs = self._runs
        total = sum(n for _, n in runs)
        distinct, end = 0, -1  # the union of the runs' ranges, in order of their first number
        for first, n in sorted(runs):
            if first + n > end:
                distinct += first + n - max(first, end)
                end = first + n
        return {
            "tx-sent": self.next_seq,
            "rx-received": total,
            "rx-duplicates": total - distinct,
            # within a run every number follows its predecessor; between runs, a step down
            "rx-reordered": sum(1 for a, b in zip(runs, runs[1:]) if b[0] < a[0] + a[1] - 1),
            "rx-highest": end - 1 if runs else -1,
            "other-frames": self.other_frames,
        }

    def save(self) -> NetWorkloadState:
        return NetWorkloadState(self.next_seq, tuple((f, n) for f, n in self._runs), self.other_frames, self.rate)

    @classmethod
    def from_state(
        cls, st: NetWorkloadState, *, driver: NetDriver, mac: bytes, peer_mac: bytes, path: str = "net.work"
    ) -> "NetWorkload":
        """The workload continuing ``st`` over ``driver`` (already restored)."""
        fail = GuestStateError
        if st.next_seq < 0 or st.other < 0:
            raise fail(path, "negative counters")
        if not (math.isfinite(st.rate) and st.rate >= 0):
            raise fail(f"{path}.rate", f"{st.rate} is not a rate (finite, >= 0)")
        for i, (first, n) in enumerate(st.received):
            if first < 0 or n < 1:
                raise fail(f"{path}.received[{i}]", f"[{first}, {n}] is not a run [first >= 0, count >= 1]")
        w = cls(driver, mac=mac, peer_mac=peer_mac, rate=st.rate)
        w.next_seq, w._runs, w.other_frames = st.next_seq, [[f, n] for f, n in st.received], st.other
        return w


@dataclass(frozen=True)
class NetWorkloadState:
    """A :class:`NetWorkload`'s counters and what it received (its frames are guest memory)."""

    next_seq: int
    received: tuple[tuple[int, int], ...]  # [first, count] runs of the peer's numbers, in arrival order
    other: int
    rate: float
