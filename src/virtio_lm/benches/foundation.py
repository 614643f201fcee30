#!/usr/bin/env python3
"""Micro-benchmarks of the foundation: virtqueue chain walks, a chain's data from a file (buffered vs
zero-copy), memory writes with dirty logging, zero-page scan.

Not a test: prints a table of figures.  Each measurement runs for about
``--seconds`` (default 0.5 s); the whole script takes well under a minute.

    python -m virtio_lm.benches.foundation [--seconds 0.5] [--scan-gib 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Callable

from virtio_lm.memory import PAGE_SIZE, DirtyLog, Memory
from virtio_lm.virtqueue import Allocator, DescriptorChain, DriverQueue, Segment, Virtqueue

GiB = 1 << 30
QUEUE = 256


def timed(fn: Callable[[], int], seconds: float) -> tuple[float, float]:
    """Run ``fn`` (returns units of work done) until ``seconds`` pass; return (units, elapsed)."""
    fn()  # warm up
    units = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        units += fn()
        now = time.perf_counter()
        if now >= deadline:
            return units, now - start


# ----------------------------------------------------------------- chain walks
def chain_bench(ndesc: int, indirect: bool, seconds: float, fast_walk: bool = True) -> float:
    """Device-side pop + push of ``ndesc``-descriptor chains; returns chains per second.  With
    ``fast_walk`` off, indirect tables are walked entry by entry only (the baseline of the one pass)."""
    mem = Memory(16 << 20, name="bench-vq")
    alloc = Allocator(0, mem.size)
    dq = DriverQueue.allocate(mem.cpu, alloc, QUEUE)
    port = mem.device_port("bench-dev")
    vq = Virtqueue(0, QUEUE, name="bench")
    if not fast_walk:
        vq.fast_walk_min = None
    vq.desc_addr, vq.avail_addr, vq.used_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
    vq.check_config(port)
    vq.enabled = True
    buf = alloc.alloc(64 * 1024)
    nread = ndesc // 2 if ndesc > 1 else 1
    nwrite = ndesc - nread
    readable = [Segment(buf + 512 * i, 512) for i in range(nread)]
    writable = [Segment(buf + 32768 + 512 * i, 512) for i in range(nwrite)]
    heads = []
    per_chain = 1 if indirect else ndesc
    while dq.num_free() >= per_chain and len(heads) < QUEUE:
        heads.append(dq.add(readable, writable, indirect=indirect))
    n = len(heads)
    # fill every avail slot with the heads in turn, so re-publishing the same
    # chains round after round only needs a new avail idx
    for slot in range(QUEUE):
        mem.cpu.write(dq.avail_addr + 4 + 2 * slot, (heads[slot % n]).to_bytes(2, "little"))
    state = {"idx": 0}

    def round_() -> int:
        state["idx"] = (state["idx"] + n) & 0xFFFF
        dq.set_avail_idx(state["idx"])
        done = 0
        while (chain := vq.pop(port)) is not None:
            vq.push(port, chain.head, chain.writable_len)
            done += 1
        if vq.broken or done != n:
            raise RuntimeError(f"benchmark queue broke: {vq.error!r}, {done} of {n}")
        return done

    units, elapsed = timed(round_, seconds)
    mem.close()
    return units / elapsed


def round_trip_bench(ndesc: int, seconds: float) -> float:
    """Driver add/publish + device pop/push + driver get_used; returns chains per second."""
    mem = Memory(16 << 20, name="bench-rt")
    alloc = Allocator(0, mem.size)
    dq = DriverQueue.allocate(mem.cpu, alloc, QUEUE)
    port = mem.device_port("bench-dev")
    vq = Virtqueue(0, QUEUE, name="bench")
    vq.desc_addr, vq.avail_addr, vq.used_addr = dq.desc_addr, dq.avail_addr, dq.used_addr
    vq.check_config(port)
    vq.enabled = True
    buf = alloc.alloc(64 * 1024)
    readable = [Segment(buf + 512 * i, 512) for i in range(ndesc // 2)]
    writable = [Segment(buf + 32768 + 512 * i, 512) for i in range(ndesc - ndesc // 2)]
    batch = QUEUE // ndesc

    def round_() -> int:
        for i in range(batch):
            dq.add(readable, writable, token=i)
        dq.publish()
        while (chain := vq.pop(port)) is not None:
            vq.push(port, chain.head, 0)
        got = dq.get_all_used()
        if len(got) != batch:
            raise RuntimeError("round trip lost chains")
        return batch

    units, elapsed = timed(round_, seconds)
    mem.close()
    return units / elapsed


# ----------------------------------------------------------------- memory writes
# ----------------------------------------------------------------- a chain's data from a file
def file_to_chain_bench(pages: int, direct: bool, vhost: bool, seconds: float) -> float:
    """A blk read's data movement: ``pages`` scattered 4 KiB buffers (every other page) filled
    from a file in the page cache, either read into bytes and scattered (``DescriptorChain.write``,
    the buffered path) or ``preadv``'d straight into them (``DescriptorChain.pread_into``); the
    memory is a :class:`Memory` or a vhost-user map of it.  Returns MiB/s."""
    mem = Memory(16 << 20, name="bench-dma", backing="memfd")
    gm = None
    port = mem.device_port("bench-dev")
    if vhost:
        from virtio_lm.memory import DeviceWriter, MemoryPort
        from virtio_lm.vhost.memmap import GuestMemoryMap
        from virtio_lm.wire.vhost_user import MemRegion

        gm = GuestMemoryMap("bench")
        gm.set_table([MemRegion(0, mem.size, 0x7F00_0000_0000, 0)], [os.dup(mem.fd)])  # type: ignore[arg-type]
        port = MemoryPort(gm, DeviceWriter("bench-dev"))  # type: ignore[arg-type]
    n = pages * PAGE_SIZE
    segs = tuple(Segment((1 << 20) + 2 * i * PAGE_SIZE, PAGE_SIZE) for i in range(pages))
    chain = DescriptorChain(head=0, readable=(), writable=segs, avail_idx=0, readable_len=0, writable_len=n)
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(n))
        f.flush()
        fd = f.fileno()

        def round_() -> int:
            if direct:
                chain.pread_into(port, fd, 0, n)
            else:
                chain.write(port, os.pread(fd, n, 0))
            return n

        units, elapsed = timed(round_, seconds)
        if mem.read(segs[-1].addr, PAGE_SIZE) != os.pread(fd, PAGE_SIZE, n - PAGE_SIZE):
            raise RuntimeError("the benchmark's data did not arrive")
    if gm is not None:
        gm.close()
    mem.close()
    return units / elapsed / (1 << 20)


def write_bench(mem: Memory, write: Callable[[int, bytes], None], chunk: int, seconds: float) -> float:
    data = bytes(range(256)) * (chunk // 256)
    span = mem.size // chunk
    state = {"i": 0}

    def round_() -> int:
        i = state["i"]
        for k in range(64):
            write(((i + k) % span) * chunk, data)
        state["i"] = (i + 64) % span
        return 64 * chunk

    nbytes, elapsed = timed(round_, seconds)
    return nbytes / elapsed / GiB


def zero_scan_bench(gib: int, repeats: int) -> tuple[float, float, int]:
    """Touch a memfd Memory of ``gib`` GiB, then time full zero_pages() scans; (touch s, scan ms, zero pages)."""
    mem = Memory(gib * GiB, name="bench-scan", backing="memfd")
    t0 = time.perf_counter()
    mem.cpu.fill(0, mem.size, 0)  # every page exists
    step = 7 * PAGE_SIZE
    for addr in range(0, mem.size, step * 64):  # some pages not zero
        mem.cpu.write(addr + 100, b"\x01")
    touch = time.perf_counter() - t0
    best = float("inf")
    zeros = 0
    for _ in range(repeats):
        t = time.perf_counter()
        zeros = int(mem.zero_pages().sum())
        best = min(best, time.perf_counter() - t)
    mem.close()
    return touch, best * 1000, zeros


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement (default 0.5)")
    ap.add_argument("--scan-gib", type=int, default=1, help="size of the zero-page scan memory in GiB")
    ap.add_argument("--scan-repeats", type=int, default=3)
    args = ap.parse_args(argv)
    s = args.seconds

    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"  {name:<48} {value:>14}  {note}", flush=True)

    print("virtqueue chain walks (device side, pop + push, queue size 256)")
    for nd in (1, 4, 16):
        row(f"direct chain, {nd} descriptor(s)", f"{chain_bench(nd, False, s):,.0f}/s")
    for nd in (4, 16, 126):
        row(f"indirect chain, {nd} descriptors in table", f"{chain_bench(nd, True, s):,.0f}/s")
    for nd in (16, 32, 126):
        walk = chain_bench(nd, True, s, fast_walk=False)
        one = chain_bench(nd, True, s)
        row(f"  {nd}-entry table: one pass / entry by entry", f"{one / walk:.2f}x",
            f"{one:,.0f} vs {walk:,.0f} chains/s")
    row("round trip add+publish+pop+push+get_used, 4 desc", f"{round_trip_bench(4, s):,.0f}/s")

    print("\na chain's data from a file (scattered 4 KiB buffers; buffered: pread + scatter, direct: preadv)")
    for vhost in (False, True):
        for pages in (1, 126):
            where = "vhost-user map" if vhost else "Memory"
            buffered = file_to_chain_bench(pages, False, vhost, s)
            direct = file_to_chain_bench(pages, True, vhost, s)
            row(f"{where}, {pages} page(s), buffered", f"{buffered:,.0f} MiB/s")
            row(f"{where}, {pages} page(s), direct", f"{direct:,.0f} MiB/s", f"direct/buffered {direct / buffered:.2f}")

    print("\nmemory writes via Memory.write (64 MiB region, sequential)")
    mem = Memory(64 << 20, name="bench-mem")
    cpu = mem.cpu
    log = cpu.writer.log
    dev = mem.device_port("bench-dev")
    for chunk in (4096, 65536):
        label = f"{chunk // 1024} KiB"
        log.stop()
        off = write_bench(mem, cpu.write, chunk, s)
        log.start()
        on = write_bench(mem, cpu.write, chunk, s)
        log.stop()
        row(f"CPU writer, {label}, dirty log off", f"{off:.2f} GiB/s")
        row(f"CPU writer, {label}, dirty log started", f"{on:.2f} GiB/s", f"ratio on/off {on / off:.2f}")
        dev.writer.tracker = None
        doff = write_bench(mem, dev.write, chunk, s)
        dev.writer.tracker = DirtyLog(mem.num_pages, enabled=True)
        don = write_bench(mem, dev.write, chunk, s)
        dev.writer.tracker = None
        row(f"device port, {label}, no tracker", f"{doff:.2f} GiB/s")
        row(f"device port, {label}, tracker (DirtyLog)", f"{don:.2f} GiB/s", f"ratio on/off {don / doff:.2f}")
    mem.close()

    print(f"\nzero-page scan (memfd Memory of {args.scan_gib} GiB, touched first)")
    touch, ms, zeros = zero_scan_bench(args.scan_gib, args.scan_repeats)
    pages = args.scan_gib * GiB // PAGE_SIZE
    row(f"touch {args.scan_gib} GiB (fill + marks)", f"{touch * 1000:.0f} ms")
    row(f"Memory.zero_pages() over {pages} pages", f"{ms:.1f} ms", f"{zeros} zero, {pages - zeros} non-zero; best of {args.scan_repeats}")


if __name__ == "__main__":
    main()
